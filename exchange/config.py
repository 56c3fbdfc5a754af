"""The data directory and its config.toml (DESIGN §9): one place that says where things live."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exchange.domain.units import MINOR_UNITS
from exchange.store.engine import sqlite_url
from merchant_sdk.signing import load_private_key_file, private_key_pem

DEFAULT_DATA_DIR = "pointsx-data"
DEFAULT_LISTEN = "127.0.0.1:50051"

CONFIG_TEMPLATE = """\
# pointsx hub configuration. Durations are in seconds; money in integer micros.

[network]
name = "{name}"
# ISO 4217 currencies merchants may register in.
currencies = ["CNY", "USD", "EUR", "JPY"]
# A scheduled point value takes effect no sooner than this after it is scheduled.
notice_period_s = 86400
quote_ttl_s = 30
reversal_window_s = 604800
default_fee_bps = 100

[hub]
listen = "{listen}"
# Empty: the SQLite file pointsx.db in this directory. PostgreSQL: "postgresql+psycopg://user@host/db".
database_url = ""
# Requests whose timestamp is further than this from the hub's clock are refused.
auth_window_s = 300
# StreamEvents: idle streams poll for new events this often, and send a heartbeat this often.
event_poll_s = 0.2
event_heartbeat_s = 15
# Group commit: the writer commits up to this many concurrent writes in one transaction.
write_batch_max = 256

[clearing]
# Cron (UTC) of the clearing cutoffs.
cron = "0 0 * * *"

[settlement]
# The network's settlement account: the debtor of the pain.001 credit transfers to merchants.
account_name = "{name} settlement"
iban = ""
bic = ""
country = ""
"""


@dataclass(frozen=True)
class HubConfig:
    data_dir: Path
    network_name: str = "pointsx-dev"
    currencies: tuple[str, ...] = ("CNY", "USD", "EUR", "JPY")
    notice_period_s: int = 86400
    quote_ttl_s: int = 30
    reversal_window_s: int = 604800
    default_fee_bps: int = 100
    listen: str = DEFAULT_LISTEN
    database_url: str = ""
    auth_window_s: int = 300
    # StreamEvents: how often an idle stream looks for new events, and sends a heartbeat.
    event_poll_s: float = 0.2
    event_heartbeat_s: float = 15.0
    write_batch_max: int = 256
    clearing_cron: str = "0 0 * * *"
    settlement_account_name: str = ""
    settlement_iban: str = ""
    settlement_bic: str = ""
    settlement_country: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def hub_key_path(self) -> Path:
        return self.data_dir / "hub.key"

    @property
    def operator_key_path(self) -> Path:
        return self.data_dir / "operator.key"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or sqlite_url(self.data_dir / "pointsx.db")


def resolve_data_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("POINTSX_DATA_DIR") or DEFAULT_DATA_DIR).resolve()


class ConfigError(Exception):
    """The data directory or its config is missing or wrong; the message says what to run."""


def _positive(value: int, name: str) -> int:
    if value < 1:
        raise ValueError(f"[hub] {name} must be at least 1, not {value}")
    return value


def load(data_dir: Path) -> HubConfig:
    path = data_dir / "config.toml"
    if not path.exists():
        raise ConfigError(f"{path} does not exist: run `pointsx init --data-dir {data_dir}` first")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    network, hub, clearing = raw.get("network", {}), raw.get("hub", {}), raw.get("clearing", {})
    settlement = raw.get("settlement", {})
    currencies = tuple(network.get("currencies", HubConfig.currencies))
    unknown = [c for c in currencies if c not in MINOR_UNITS]
    if unknown:
        raise ConfigError(f"{path}: unknown currencies {unknown}")
    try:
        return HubConfig(
            data_dir=data_dir,
            network_name=str(network.get("name", HubConfig.network_name)),
            currencies=currencies,
            notice_period_s=int(network.get("notice_period_s", HubConfig.notice_period_s)),
            quote_ttl_s=int(network.get("quote_ttl_s", HubConfig.quote_ttl_s)),
            reversal_window_s=int(network.get("reversal_window_s", HubConfig.reversal_window_s)),
            default_fee_bps=int(network.get("default_fee_bps", HubConfig.default_fee_bps)),
            listen=str(hub.get("listen", DEFAULT_LISTEN)),
            database_url=str(hub.get("database_url", "")),
            auth_window_s=int(hub.get("auth_window_s", HubConfig.auth_window_s)),
            event_poll_s=float(hub.get("event_poll_s", HubConfig.event_poll_s)),
            event_heartbeat_s=float(hub.get("event_heartbeat_s", HubConfig.event_heartbeat_s)),
            write_batch_max=_positive(int(hub.get("write_batch_max", HubConfig.write_batch_max)), "write_batch_max"),
            clearing_cron=check_cron(str(clearing.get("cron", HubConfig.clearing_cron))),
            settlement_account_name=str(settlement.get("account_name", "")),
            settlement_iban=str(settlement.get("iban", "")),
            settlement_bic=str(settlement.get("bic", "")),
            settlement_country=str(settlement.get("country", "")),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def check_cron(expression: str) -> str:
    """A bad schedule is found when the hub starts, not at midnight."""
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(expression, timezone="UTC")
    except ValueError as exc:
        raise ConfigError(f"[clearing] cron {expression!r} is not a crontab expression: {exc}") from None
    return expression


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """PKCS#8 PEM, created 0600 so the key is never readable by others, not even briefly."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_key_pem(key))


def init_data_dir(data_dir: Path, *, name: str = "pointsx-dev", listen: str = DEFAULT_LISTEN) -> HubConfig:
    data_dir.mkdir(parents=True, exist_ok=True)
    config_path = data_dir / "config.toml"
    if config_path.exists():
        raise ConfigError(f"{config_path} already exists; refusing to overwrite a network's keys")
    for key_path in (data_dir / "hub.key", data_dir / "operator.key"):
        if not key_path.exists():
            write_private_key(key_path, Ed25519PrivateKey.generate())
    config_path.write_text(CONFIG_TEMPLATE.format(name=name, listen=listen))
    return load(data_dir)


def load_key(path: Path) -> Ed25519PrivateKey:
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    try:
        return load_private_key_file(path)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
