"""SQLite WAL checkpoints on a thread of their own, not inside the writer's commits.

With WAL, SQLite copies committed pages back into the database file at checkpoints, and by
default the connection whose commit pushes the log past 1,000 pages runs one there and then —
with `synchronous=FULL`, writing megabytes and syncing the file inside that commit. On the hub
that connection is the ledger writer, so every few seconds one batch took 100-300 ms instead of
10 and every caller in it (and behind it) waited. Here the hub checkpoints every second from
its own connection (PASSIVE: it never blocks the writer or readers), and the automatic
threshold is raised so it only acts as a backstop when no checkpointer runs (command-line tools).
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import Engine

log = logging.getLogger("pointsx.checkpoints")

AUTOCHECKPOINT_PAGES = 16_384  # the backstop: 64 MB of log with 4 KiB pages
INTERVAL_S = 1.0


class WalCheckpointer:
    """Runs `PRAGMA wal_checkpoint(PASSIVE)` every `interval_s` until closed."""

    def __init__(self, engine: Engine, interval_s: float = INTERVAL_S) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.checkpoints = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sqlite-checkpointer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with self.engine.connect() as conn:
                    conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
                self.checkpoints += 1
            except Exception:  # a busy or closing database: the next round, or the backstop, catches up
                log.warning("WAL checkpoint failed", exc_info=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
