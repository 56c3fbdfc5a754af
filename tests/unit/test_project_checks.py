"""Generated code and migrations are checked fresh on every run (STYLE habits 9 and 10)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine

from exchange.store import migrate

ROOT = Path(__file__).resolve().parents[2]


def test_generated_protobuf_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_proto.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_migrations_match_the_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'check.db'}"
    migrate.upgrade(url)
    migrate.check(url)  # raises if the models and the migrations differ
    engine = create_engine(url)
    assert migrate.current_revision(engine) == migrate.head_revision()
    engine.dispose()


def test_sdk_imports_nothing_of_the_hub() -> None:
    code = (
        "import sys, merchant_sdk; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('exchange', 'clearing', 'sqlalchemy')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sdk_public_surface_is_pinned() -> None:
    """What a merchant may import: changing it is an API change, made here on purpose."""
    import merchant_sdk

    assert merchant_sdk.__all__ == sorted(merchant_sdk.__all__)
    assert merchant_sdk.__all__ == [
        "AsyncEventStream", "AsyncMerchantClient", "AsyncSignedTransport", "EventStream", "MerchantClient",
        "PointsxError", "SignedTransport", "Signer", "StatementVerificationError", "TlsOptions", "clearing_pb2",
        "common_pb2", "errors", "exchange_pb2", "key_id_of", "ledger_pb2", "load_private_key",
        "load_private_key_file", "merchant_pb2", "network_pb2", "new_request_id", "verify_statement",
    ]  # fmt: skip
    assert all(hasattr(merchant_sdk, name) for name in merchant_sdk.__all__)


def _python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in (ROOT / folder).rglob("*.py") if "_pb" not in p.parts]


def test_database_dialects_stay_behind_the_store_seam() -> None:
    """SQLite and PostgreSQL differ in exchange/store/ only (exchange/store/dialect.py)."""
    leaks = [
        str(p.relative_to(ROOT))
        for p in _python_files("exchange", "clearing")
        if "store" not in p.relative_to(ROOT).parts
        and ("is_sqlite" in p.read_text() or "dialect.name" in p.read_text())
    ]
    assert leaks == []


def test_the_rpc_edge_reaches_the_store_only_through_commands() -> None:
    """Servicers decode, call a command and encode (docs/architecture.md)."""
    forbidden = ("from exchange.store", "import exchange.store", "from exchange.ledger", "import sqlalchemy",
                 "from sqlalchemy")  # fmt: skip
    leaks = [
        f"{p.relative_to(ROOT)}: {line.strip()}"
        for p in _python_files("exchange/rpc")
        for line in p.read_text().splitlines()
        if line.lstrip().startswith(forbidden)
    ]
    assert leaks == []


def test_one_conversion_engine() -> None:
    """Conversions are decided by exchange/domain/decider.py alone; the domain imports no storage."""
    assert not (ROOT / "exchange/ledger/conversion_batch.py").exists()
    domain = [p for p in _python_files("exchange/domain") if "sqlalchemy" in p.read_text() or "grpc" in p.read_text()]
    assert domain == []
