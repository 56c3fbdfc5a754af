"""SQLite WAL checkpoints run on the checkpointer's thread, not inside the writer's commits."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import text

from exchange.store import checkpoints
from exchange.store.engine import make_engine, sqlite_url, write_transaction


def test_the_log_is_checkpointed_beside_the_writer(tmp_path: Path) -> None:
    database = tmp_path / "wal.db"
    engine = make_engine(sqlite_url(database))
    with engine.connect() as conn:
        # The automatic checkpoint is only a backstop, far above what a second of writes makes.
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one() == checkpoints.AUTOCHECKPOINT_PAGES
    with write_transaction(engine) as conn:
        conn.execute(text("CREATE TABLE t (x BLOB)"))
    for _ in range(20):  # 20 commits of ~16 pages each: left alone, all of it stays in the log
        with write_transaction(engine) as conn:
            conn.execute(text("INSERT INTO t VALUES (randomblob(65536))"))
    # 1.3 MB committed, all of it still in the log: the commits did not checkpoint.
    assert database.stat().st_size < 100_000 and Path(f"{database}-wal").stat().st_size > 1_300_000

    checkpointer = checkpoints.WalCheckpointer(engine, interval_s=0.05)
    try:
        deadline = time.monotonic() + 10
        while checkpointer.checkpoints == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert checkpointer.checkpoints >= 1
        assert database.stat().st_size > 1_300_000, "the log's pages are back in the database file"
    finally:
        checkpointer.close()
        engine.dispose()
