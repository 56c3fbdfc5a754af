"""`pointsx`: the command line of the hub and its operators (DESIGN §9).

Tables for people, `--json` for machines. Exit codes: 0 done, 1 refused or failed (the message
says why), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import json_format
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from clearing.exports import format_minor
from exchange import config as config_mod
from exchange.config import ConfigError
from exchange.domain import errors as domain_errors
from exchange.domain.keys import public_from_pem
from exchange.domain.units import format_micros, parse_cash_decimal
from merchant_sdk._pb.pointsx.v1 import clearing_pb2, common_pb2, operator_pb2
from merchant_sdk.errors import PointsxError, TransientError
from merchant_sdk.signing import key_id_of, public_key_bytes, public_key_pem

console = Console()
err_console = Console(stderr=True)


def _data_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="data directory (default ./pointsx-data or $POINTSX_DATA_DIR)")


def _load_config(args: argparse.Namespace) -> config_mod.HubConfig:
    return config_mod.load(config_mod.resolve_data_dir(args.data_dir))


# --- init / keygen / migrate -------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    from exchange.runtime import ensure_schema
    from exchange.store.engine import make_engine

    data_dir = config_mod.resolve_data_dir(args.data_dir)
    cfg = config_mod.init_data_dir(data_dir, name=args.name, listen=args.listen)
    engine = make_engine(cfg.effective_database_url, pool_size=1)
    ensure_schema(cfg.effective_database_url, engine, migrate_now=True)
    engine.dispose()
    hub_id = key_id_of(config_mod.load_key(cfg.hub_key_path).public_key())
    op_id = key_id_of(config_mod.load_key(cfg.operator_key_path).public_key())
    console.print(f"[bold]initialised[/] network [cyan]{cfg.network_name}[/] in {data_dir}")
    console.print(f"  config.toml    {data_dir / 'config.toml'}")
    console.print(f"  hub.key        key id {hub_id} (signs statements)")
    console.print(f"  operator.key   key id {op_id} (signs operator commands)")
    console.print(f"  database       {cfg.effective_database_url}")
    console.print(f"next: pointsx serve --data-dir {data_dir}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"{out} exists; refusing to overwrite a private key")
    key = Ed25519PrivateKey.generate()
    config_mod.write_private_key(out, key)
    pub_path = out.with_name(out.name + ".pub")
    pub_path.write_bytes(public_key_pem(key.public_key()))
    raw = public_key_bytes(key.public_key())
    if args.json:
        print(
            json.dumps(
                {
                    "private_key_file": str(out),
                    "public_key_file": str(pub_path),
                    "key_id": key_id_of(raw),
                    "public_key_hex": raw.hex(),
                }
            )
        )
        return 0
    console.print(f"private key  {out} (PKCS#8 PEM, mode 0600 — keep it secret)")
    console.print(f"public key   {pub_path} (SPKI PEM — give this to the network operator)")
    console.print(f"key id       {key_id_of(raw)}")
    print(public_key_pem(key.public_key()).decode(), end="")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from exchange.store import migrate
    from exchange.store.engine import make_engine

    url = args.database_url or _load_config(args).effective_database_url
    engine = make_engine(url, pool_size=1)
    before = migrate.current_revision(engine)
    migrate.upgrade(url)
    after = migrate.current_revision(engine)
    engine.dispose()
    console.print(f"database schema: {before or 'empty'} -> {after}")
    return 0


# --- serve ----------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from exchange.rpc.server import TlsFiles
    from exchange.runtime import open_hub, serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    cfg = _load_config(args)
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        tls = TlsFiles(
            Path(args.tls_cert), Path(args.tls_key), Path(args.tls_client_ca) if args.tls_client_ca else None
        )
    listen = args.listen or cfg.listen
    worker = _worker_of(args.worker) if args.worker else None
    if worker is None and args.workers != 1:
        return _serve_workers(args, cfg, listen)
    hub = open_hub(cfg, database_url=args.database_url, migrate_now=args.migrate and worker is None)
    asyncio.run(serve(hub, listen, tls=tls, allow_insecure=args.insecure, worker=worker, freeze_heap=True))
    return 0


def _worker_of(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ConfigError(f"--worker {text!r}: expected INDEX/COUNT")
    return int(index), int(count)


def _serve_workers(args: argparse.Namespace, cfg: config_mod.HubConfig, listen: str) -> int:
    """The supervisor of `serve --workers N`: checks once, then runs N workers (exchange/workers.py)."""
    from exchange.runtime import open_hub
    from exchange.workers import MAX_WORKERS, supervise

    if not 1 <= args.workers <= MAX_WORKERS:
        raise ConfigError(f"--workers must be 1 to {MAX_WORKERS}, not {args.workers}")
    url = args.database_url or cfg.effective_database_url
    if not url.startswith("postgresql"):
        raise ConfigError(
            "--workers needs PostgreSQL: SQLite allows one writer, so one hub process serves it "
            "(give --database-url postgresql+psycopg://USER@HOST/DB)"
        )
    if listen.rsplit(":", 1)[-1] == "0":
        raise ConfigError("--workers needs a fixed port to share, not port 0")
    hub = open_hub(cfg, database_url=url, migrate_now=args.migrate)  # schema and keys, once, before the workers
    hub.close()
    hub.engine.dispose()
    argv = [sys.executable, "-m", "exchange.cli", "serve", "--data-dir", str(cfg.data_dir), "--listen", listen,
            "--database-url", url, "--log-level", args.log_level]  # fmt: skip
    for flag in ("tls_cert", "tls_key", "tls_client_ca"):
        if getattr(args, flag):
            argv += [f"--{flag.replace('_', '-')}", str(Path(getattr(args, flag)).resolve())]
    if args.insecure:
        argv.append("--insecure")
    return supervise(argv, args.workers, listen)


# --- operator -------------------------------------------------------------------------------
def _operator_client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from exchange.operator_client import OperatorClient
    from merchant_sdk.transport import TlsOptions

    cfg = _load_config(args)
    key_path = Path(args.operator_key) if args.operator_key else cfg.operator_key_path
    if bool(args.client_cert) != bool(args.client_key):
        raise ConfigError("--client-cert and --client-key go together")
    tls = None
    if args.ca_bundle or args.client_cert:
        tls = TlsOptions(
            ca_bundle=Path(args.ca_bundle) if args.ca_bundle else None,
            client_cert=Path(args.client_cert) if args.client_cert else None,
            client_key=Path(args.client_key) if args.client_key else None,
        )
    return OperatorClient(args.hub or cfg.listen, config_mod.load_key(key_path), tls=tls)


def _print_merchant(merchant: common_pb2.Merchant, as_json: bool) -> None:
    if as_json:
        print(json_format.MessageToJson(merchant, indent=None, preserving_proto_field_name=True))
        return
    table = Table(title=f"merchant {merchant.merchant_id}", show_header=False)
    table.add_row("name", merchant.name)
    table.add_row("currency", merchant.currency)
    table.add_row("status", common_pb2.MerchantStatus.Name(merchant.status).removeprefix("MERCHANT_STATUS_").lower())
    table.add_row("point value", f"{format_micros(merchant.point_value.value_micros)} {merchant.currency}")
    table.add_row("net debit cap", f"{format_micros(merchant.net_debit_cap.micros)} {merchant.currency}")
    table.add_row(
        "keys", ", ".join(f"{k.key_id} ({common_pb2.KeyStatus.Name(k.status)[11:].lower()})" for k in merchant.keys)
    )
    table.add_row(
        "bank", " / ".join(x for x in (merchant.bank.account_name, merchant.bank.iban, merchant.bank.bic) if x)
    )
    console.print(table)


def cmd_register_merchant(args: argparse.Namespace) -> int:
    public_key = public_from_pem(Path(args.public_key).read_bytes())
    bank = common_pb2.BankDetails(
        account_name=args.bank_account_name or args.name, iban=args.iban or "", bic=args.bic or "",
        bank_name=args.bank_name or "", country=args.bank_country or "",
    )  # fmt: skip
    with _operator_client(args) as client:
        merchant = client.register_merchant(
            args.id, args.name, args.currency, parse_cash_decimal(args.point_value), public_key,
            net_debit_cap_micros=parse_cash_decimal(args.net_debit_cap), bank=bank, request_id=args.request_id,
        )  # fmt: skip
    _print_merchant(merchant, args.json)
    return 0


def cmd_set_status(active: bool) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        with _operator_client(args) as client:
            merchant = client.set_merchant_status(args.id, active, reason=args.reason or "")
        _print_merchant(merchant, args.json)
        return 0

    return run


def cmd_set_net_debit_cap(args: argparse.Namespace) -> int:
    with _operator_client(args) as client:
        merchant = client.set_net_debit_cap(args.id, parse_cash_decimal(args.cap))
    _print_merchant(merchant, args.json)
    return 0


def cmd_list_merchants(args: argparse.Namespace) -> int:
    rows: list[common_pb2.Merchant] = []
    with _operator_client(args) as client:
        token = ""
        while True:
            page = client.list_merchants(page_size=200, page_token=token)
            rows.extend(page.merchants)
            token = page.next_page_token
            if not token:
                break
    if args.json:
        print(json.dumps([json_format.MessageToDict(m, preserving_proto_field_name=True) for m in rows]))
        return 0
    table = Table(title="merchants")
    for column in ("id", "name", "currency", "status", "point value", "net debit cap"):
        table.add_column(column)
    for m in rows:
        status = common_pb2.MerchantStatus.Name(m.status).removeprefix("MERCHANT_STATUS_").lower()
        table.add_row(
            m.merchant_id,
            m.name,
            m.currency,
            status,
            format_micros(m.point_value.value_micros),
            format_micros(m.net_debit_cap.micros),
        )
    console.print(table)
    return 0


def _print_route(route: common_pb2.Route, as_json: bool) -> None:
    if as_json:
        print(json.dumps(json_format.MessageToDict(route, preserving_proto_field_name=True)))
        return
    table = Table(title=f"route {route.source_merchant_id} -> {route.destination_merchant_id}", show_header=False)
    table.add_column("field")
    table.add_column("value")
    table.add_row("state", common_pb2.RouteState.Name(route.state).removeprefix("ROUTE_STATE_").lower())
    table.add_row("opened by source", "yes" if route.outbound_open else "no")
    table.add_row("accepted by destination", "yes" if route.inbound_accepted else "no")
    table.add_row("fee", f"{route.fee_bps} bps")
    table.add_row("min source points", str(route.min_src_points or "none"))
    table.add_row("max source points", str(route.max_src_points or "none"))
    cap = route.daily_member_cap
    table.add_row("daily cap per member", f"{format_micros(cap.micros)} {cap.currency}" if cap.micros else "none")
    console.print(table)


def cmd_set_route_terms(args: argparse.Namespace) -> int:
    with _operator_client(args) as client:
        route = client.set_route_terms(
            args.source, args.destination, fee_bps=args.fee_bps, min_src_points=args.min_src_points,
            max_src_points=args.max_src_points, daily_member_cap_micros=parse_cash_decimal(args.daily_member_cap),
            closed=args.close, request_id=args.request_id,
        )  # fmt: skip
    _print_route(route, args.json)
    return 0


def cmd_reverse_conversion(args: argparse.Namespace) -> int:
    with _operator_client(args) as client:
        reversal = client.reverse_conversion(args.id, reason=args.reason or "", request_id=args.request_id)
    if args.json:
        print(json.dumps(json_format.MessageToDict(reversal, preserving_proto_field_name=True)))
    else:
        console.print(f"conversion {reversal.conversion_id} reversed by {reversal.reversal_operation_id}")
    return 0


# --- clearing -------------------------------------------------------------------------------
def _cycle_json(cycle: operator_pb2.Cycle) -> str:
    return json.dumps(json_format.MessageToDict(cycle, preserving_proto_field_name=True))


def _print_cycle(cycle: operator_pb2.Cycle) -> None:
    status = operator_pb2.CycleStatus.Name(cycle.status).removeprefix("CYCLE_STATUS_").lower()
    console.print(
        f"[bold]cycle {cycle.cycle_id}[/] {cycle.currency} {cycle.period_start.ToJsonString()} .. "
        f"{cycle.cutoff.ToJsonString()}, {cycle.operation_count} operations, {status}"
        + (f", bank reference {cycle.bank_reference}" if cycle.bank_reference else "")
    )
    digits = cycle.minor_units
    table = Table("merchant", "opening carry", "payable", "receivable", "fees", "net", "settlement", "closing carry",
                  "ack", "disputes", title="positions (micros; settlement in minor units)")  # fmt: skip
    for p in cycle.positions:
        table.add_row(
            p.merchant_id,
            str(p.opening_carry_micros),
            str(p.payable_micros),
            str(p.receivable_micros),
            str(p.fees_micros),
            str(p.net_micros),
            format_minor(p.settlement_minor, digits),
            str(p.closing_carry_micros),
            "yes" if p.acknowledged or p.merchant_id == "platform" else "no",
            str(p.open_disputes or ""),
        )
    table.add_row(
        "[bold]total",
        *(str(sum(getattr(p, f) for p in cycle.positions)) for f in (
            "opening_carry_micros", "payable_micros", "receivable_micros", "fees_micros", "net_micros")),
        format_minor(sum(p.settlement_minor for p in cycle.positions), digits),
        str(sum(p.closing_carry_micros for p in cycle.positions)),
        "", "",
    )  # fmt: skip
    console.print(table)
    if cycle.counterparties:
        pairs = Table("merchant", "counterparty", "payable", "receivable", title="per counterparty (micros)")
        for c in cycle.counterparties:
            pairs.add_row(c.merchant_id, c.counterparty_id, str(c.payable_micros), str(c.receivable_micros))
        console.print(pairs)
    if cycle.disputes:
        disputes = Table("merchant", "operation", "reason", "status", title="disputes")
        for d in cycle.disputes:
            disputes.add_row(d.merchant_id, d.operation_id, d.reason, clearing_pb2.DisputeStatus.Name(d.status)[15:])
        console.print(disputes)


def cmd_clearing_close(args: argparse.Namespace) -> int:
    cutoff_ms = _parse_instant(args.cutoff) if args.cutoff else None
    with _operator_client(args) as client:
        if args.json:
            cycle = client.close_cycle(args.currency, cutoff_ms, request_id=args.request_id)
        else:
            with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                          console=err_console, transient=True) as progress:  # fmt: skip
                progress.add_task(f"closing the {args.currency} cycle (netting, signing statements)", total=None)
                cycle = client.close_cycle(args.currency, cutoff_ms, request_id=args.request_id)
    if args.json:
        print(_cycle_json(cycle))
    else:
        _print_cycle(cycle)
    return 0


def cmd_clearing_list(args: argparse.Namespace) -> int:
    cycles: list[operator_pb2.Cycle] = []
    with _operator_client(args) as client:
        token = ""
        while True:
            page = client.list_cycles(args.currency or "", page_size=100, page_token=token)
            cycles.extend(page.cycles)
            token = page.next_page_token
            if not token or len(cycles) >= args.limit:
                break
    cycles = cycles[: args.limit]
    if args.json:
        print(json.dumps([json_format.MessageToDict(c, preserving_proto_field_name=True) for c in cycles]))
        return 0
    table = Table("cycle", "currency", "cutoff", "operations", "merchants", "status", "paid out", "collected",
                  title="clearing cycles, newest first")  # fmt: skip
    for c in cycles:
        paid = sum(p.settlement_minor for p in c.positions if p.settlement_minor > 0 and p.merchant_id != "platform")
        collected = -sum(
            p.settlement_minor for p in c.positions if p.settlement_minor < 0 and p.merchant_id != "platform"
        )
        table.add_row(
            c.cycle_id, c.currency, c.cutoff.ToJsonString(), str(c.operation_count), str(len(c.positions) - 1),
            operator_pb2.CycleStatus.Name(c.status).removeprefix("CYCLE_STATUS_").lower(),
            format_minor(paid, c.minor_units), format_minor(collected, c.minor_units),
        )  # fmt: skip
    console.print(table)
    return 0


def cmd_clearing_show(args: argparse.Namespace) -> int:
    with _operator_client(args) as client:
        cycle = client.get_cycle(args.cycle_id)
    if args.json:
        print(_cycle_json(cycle))
    else:
        _print_cycle(cycle)
    return 0


def cmd_clearing_settle(args: argparse.Namespace) -> int:
    with _operator_client(args) as client:
        cycle = client.mark_settled(args.cycle_id, args.bank_reference, request_id=args.request_id)
    if args.json:
        print(_cycle_json(cycle))
    else:
        console.print(f"cycle {cycle.cycle_id} settled, bank reference {cycle.bank_reference}")
    return 0


def cmd_clearing_export(args: argparse.Namespace) -> int:
    from clearing.exports import Instruction, Party, pain001_xml, settlement_csv

    cfg = _load_config(args)
    with _operator_client(args) as client:
        cycle = client.get_cycle(args.cycle_id)
        banks: dict[str, common_pb2.BankDetails] = {}
        token = ""
        while True:
            page = client.list_merchants(page_size=200, page_token=token)
            banks.update({m.merchant_id: m.bank for m in page.merchants})
            token = page.next_page_token
            if not token:
                break
    instructions = [
        Instruction(
            p.merchant_id,
            p.settlement_minor,
            Party(
                name=banks[p.merchant_id].account_name or p.merchant_id,
                iban=banks[p.merchant_id].iban,
                bic=banks[p.merchant_id].bic,
                bank_name=banks[p.merchant_id].bank_name,
                country=banks[p.merchant_id].country,
            ),
        )
        for p in cycle.positions
        if p.merchant_id != "platform" and p.settlement_minor != 0
    ]
    try:
        if args.format == "csv":
            data = settlement_csv(cycle_id=cycle.cycle_id, currency=cycle.currency, minor_units=cycle.minor_units,
                                  instructions=instructions).encode()  # fmt: skip
        else:
            debtor = Party(
                name=cfg.settlement_account_name or f"{cfg.network_name} settlement",
                iban=cfg.settlement_iban,
                bic=cfg.settlement_bic,
                country=cfg.settlement_country,
            )
            data = pain001_xml(
                message_id=cycle.cycle_id[:35], created_at_ms=int(time.time() * 1000), cycle_id=cycle.cycle_id,
                currency=cycle.currency, minor_units=cycle.minor_units, debtor=debtor, instructions=instructions,
            )  # fmt: skip
    except ValueError as exc:
        raise ConfigError(
            f"cannot export {cycle.cycle_id}: {exc} (the network's account is [settlement] in config.toml; "
            "a merchant's is its bank details at register-merchant)"
        ) from None
    if args.out:
        Path(args.out).write_bytes(data)
        err_console.print(f"wrote {len(instructions)} instructions to {args.out}")
    else:
        sys.stdout.write(data.decode())
    return 0


def _parse_instant(text: str) -> int:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--cutoff {text!r} is not an ISO 8601 instant, e.g. 2026-11-24T00:00:00Z") from None
    if moment.tzinfo is None:
        raise ConfigError("--cutoff needs a time zone, e.g. 2026-11-24T00:00:00Z")
    return int(moment.timestamp() * 1000)


# --- audit ----------------------------------------------------------------------------------
def cmd_audit_verify(args: argparse.Namespace) -> int:
    from exchange.store import audit
    from exchange.store.engine import make_engine

    url = args.database_url or _load_config(args).effective_database_url
    engine = make_engine(url, pool_size=1)
    report = audit.verify(engine)
    engine.dispose()
    if args.json:
        print(
            json.dumps(
                {
                    "ok": report.ok,
                    "records": report.records,
                    "first_broken_seq": report.first_broken_seq,
                    "problem": report.problem,
                }
            )
        )
    elif report.ok:
        console.print(f"audit chain intact: {report.records} records verified")
    else:
        err_console.print(
            f"[red]audit chain broken[/] at record {report.first_broken_seq}: {report.problem} "
            f"({report.records} records before it verified)"
        )
    return 0 if report.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from exchange.demo import run_demo

    return run_demo(keep=args.keep)


# --- parser ---------------------------------------------------------------------------------
def _operator_args(parser: argparse.ArgumentParser) -> None:
    _data_dir_arg(parser)
    parser.add_argument("--hub", help="hub address (default: [hub] listen from config.toml)")
    parser.add_argument("--operator-key", help="operator private key (default: DATA_DIR/operator.key)")
    parser.add_argument("--ca-bundle", help="CA bundle to verify a TLS hub")
    parser.add_argument("--client-cert", help="client certificate (PEM), for a hub that requires one")
    parser.add_argument("--client-key", help="the client certificate's private key (PEM)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pointsx", description="pointsx: a cross-merchant loyalty points exchange network"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a data directory: config.toml, hub.key, operator.key, database")
    _data_dir_arg(p)
    p.add_argument("--name", default="pointsx-dev", help="network name")
    p.add_argument("--listen", default=config_mod.DEFAULT_LISTEN, help="address the hub will listen on")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("serve", help="run the hub")
    _data_dir_arg(p)
    p.add_argument("--listen", help="HOST:PORT (default from config.toml: 127.0.0.1:50051)")
    p.add_argument("--database-url", help="e.g. postgresql+psycopg://user@host/db (default: SQLite in the data dir)")
    p.add_argument("--migrate", action="store_true", help="apply pending schema migrations before serving")
    p.add_argument("--tls-cert", help="server certificate chain (PEM)")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this CA")
    p.add_argument("--insecure", action="store_true", help="allow plaintext on a non-loopback address")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--workers", type=int, default=1,
                   help="hub processes sharing the port (SO_REUSEPORT); PostgreSQL only (default 1)")  # fmt: skip
    p.add_argument("--worker", help=argparse.SUPPRESS)  # INDEX/COUNT: set by the supervisor for its workers
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("migrate", help="apply database schema migrations")
    _data_dir_arg(p)
    p.add_argument("--database-url")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("keygen", help="write a new Ed25519 private key (PKCS#8 PEM) and print its key id")
    p.add_argument("--out", required=True, help="private key file to create (FILE.pub gets the public key)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keygen)

    op = sub.add_parser("operator", help="operator commands, signed with the operator key").add_subparsers(
        dest="operator_command", required=True
    )
    p = op.add_parser("register-merchant", help="admit a merchant to the network")
    _operator_args(p)
    p.add_argument("--id", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--currency", required=True, help="ISO 4217 code, e.g. CNY")
    p.add_argument("--point-value", required=True, help="cash value of one point, decimal, e.g. 0.01")
    p.add_argument("--public-key", required=True, help="the merchant's public key, SPKI PEM file")
    p.add_argument("--net-debit-cap", default="0", help="decimal cash amount (default 0)")
    p.add_argument("--bank-account-name")
    p.add_argument("--iban")
    p.add_argument("--bic")
    p.add_argument("--bank-name")
    p.add_argument("--bank-country")
    p.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    p.set_defaults(func=cmd_register_merchant)
    for name, active in (("suspend-merchant", False), ("reactivate-merchant", True)):
        p = op.add_parser(name, help=f"{name.split('-')[0]} a merchant")
        _operator_args(p)
        p.add_argument("--id", required=True)
        p.add_argument("--reason")
        p.set_defaults(func=cmd_set_status(active))
    p = op.add_parser("set-net-debit-cap", help="set a merchant's net debit cap")
    _operator_args(p)
    p.add_argument("--id", required=True)
    p.add_argument("--cap", required=True, help="decimal cash amount")
    p.set_defaults(func=cmd_set_net_debit_cap)
    p = op.add_parser(
        "set-route-terms",
        help="set a route's fee, limits and open/closed state (replaces all its terms)",
        description="Terms apply to conversions from SOURCE to DESTINATION. Every call sets all terms: "
        "an option left out returns to its default (network fee, no limits, open).",
    )
    _operator_args(p)
    p.add_argument("--source", required=True, help="source merchant id")
    p.add_argument("--destination", required=True, help="destination merchant id")
    p.add_argument("--fee-bps", type=int, help="fee in basis points 0..10000 (default: the network's default fee)")
    p.add_argument("--min-src-points", type=int, default=0, help="smallest conversion in source points (0: none)")
    p.add_argument("--max-src-points", type=int, default=0, help="largest conversion in source points (0: none)")
    p.add_argument("--daily-member-cap", default="0", help="cash a member may convert per UTC day, decimal (0: none)")
    p.add_argument("--close", action="store_true", help="close the route: no conversions until set again without it")
    p.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    p.set_defaults(func=cmd_set_route_terms)
    p = op.add_parser("reverse-conversion", help="reverse a conversion within the reversal window")
    _operator_args(p)
    p.add_argument("--id", required=True, help="conversion id, e.g. op_0000000000000042")
    p.add_argument("--reason", help="why (kept in the ledger as the reversal's memo)")
    p.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    p.set_defaults(func=cmd_reverse_conversion)
    p = op.add_parser("list-merchants", help="list merchants")
    _operator_args(p)
    p.set_defaults(func=cmd_list_merchants)

    clearing_cmd = sub.add_parser("clearing", help="clearing cycles, signed with the operator key").add_subparsers(
        dest="clearing_command", required=True
    )
    p = clearing_cmd.add_parser("close", help="close a currency's cycle at a cutoff (default: now)")
    _operator_args(p)
    p.add_argument("--currency", required=True)
    p.add_argument("--cutoff", help="ISO 8601 instant, e.g. 2026-11-24T00:00:00Z (default: now)")
    p.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    p.set_defaults(func=cmd_clearing_close)
    p = clearing_cmd.add_parser("list", help="list cycles, newest first")
    _operator_args(p)
    p.add_argument("--currency")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_clearing_list)
    p = clearing_cmd.add_parser("show", help="a cycle's positions, counterparties and disputes")
    _operator_args(p)
    p.add_argument("cycle_id")
    p.set_defaults(func=cmd_clearing_show)
    p = clearing_cmd.add_parser("settle", help="mark a cycle settled with the bank's reference")
    _operator_args(p)
    p.add_argument("cycle_id")
    p.add_argument("--bank-reference", required=True)
    p.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    p.set_defaults(func=cmd_clearing_settle)
    p = clearing_cmd.add_parser("export", help="settlement instructions as CSV or ISO 20022 pain.001.001.09")
    _operator_args(p)
    p.add_argument("cycle_id")
    p.add_argument("--format", choices=["csv", "pain001"], default="csv")
    p.add_argument("--out", help="file to write (default: stdout)")
    p.set_defaults(func=cmd_clearing_export)

    audit_cmd = sub.add_parser("audit", help="the hash-chained audit log").add_subparsers(
        dest="audit_command", required=True
    )
    p = audit_cmd.add_parser("verify", help="walk the chain and report the first broken record")
    _data_dir_arg(p)
    p.add_argument("--database-url")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit_verify)

    p = sub.add_parser("demo", help="run the whole network end to end on a throwaway SQLite database")
    p.add_argument("--keep", action="store_true", help="keep the demo's data directory")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, domain_errors.DomainError) as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}")
        return 1
    except TransientError as exc:
        err_console.print(f"[red]could not reach the hub:[/] {exc.code.name}: {escape(exc.message)}")
        return 1
    except PointsxError as exc:
        err_console.print(f"[red]refused by the hub:[/] {exc.reason or exc.code.name}: {escape(exc.message)}")
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
