"""`pointsx serve --workers N`: N hub processes on one port over one PostgreSQL.

One Python process is one core's worth of hub (the GIL), so a bigger machine runs several. They
share the listening port through SO_REUSEPORT (the kernel spreads new connections among them) and
the database: each has its own ledger writer, all of them take the same row locks and advisory
locks, so nothing about correctness changes with N. Worker 1 alone runs the clearing schedule and
nonce pruning (the database locks would keep two closers from closing one cycle twice anyway; one
runner keeps the work and the logs single).

This process is only the supervisor: it checks the schema once, starts the workers, relays their
output, restarts one that dies (at most MAX_RESTARTS within RESTART_WINDOW_S, else it stops them
all and exits non-zero, so a worker failing at start is not retried forever), and on SIGINT or
SIGTERM stops them all gracefully. SQLite allows one writer, so it has no workers.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import IO

MAX_WORKERS = 64
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
STOP_GRACE_S = 10.0
READY_TIMEOUT_S = 60.0
SERVING = "pointsx hub serving on "


class _Worker:
    def __init__(self, index: int, count: int, argv: Sequence[str]) -> None:
        self.index, self.count, self.argv = index, count, list(argv)
        self.ready = threading.Event()
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.ready.clear()
        self.process = subprocess.Popen(
            [*self.argv, "--worker", f"{self.index}/{self.count}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        assert self.process.stdout is not None
        threading.Thread(target=self._relay, args=(self.process.stdout,), daemon=True).start()

    def _relay(self, stream: IO[str]) -> None:
        for line in stream:
            if line.startswith(SERVING):
                self.ready.set()
            sys.stdout.write(f"[worker {self.index + 1}] {line}")
            sys.stdout.flush()

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()


def supervise(worker_argv: Sequence[str], count: int, listen: str) -> int:
    """Run `count` workers (each `worker_argv --worker i/count`) until a signal; the exit status."""
    workers = [_Worker(i, count, worker_argv) for i in range(count)]
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    restarts: deque[float] = deque()
    status = 0
    try:
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(w.ready.is_set() for w in workers):
            failed = [w for w in workers if w.exited() is not None]
            if failed or time.monotonic() > deadline or stopping.is_set():
                if not stopping.is_set():
                    print(f"error: worker {(failed or workers)[0].index + 1} did not start serving", file=sys.stderr)
                    status = 1
                return status
            time.sleep(0.05)
        print(f"{SERVING}{listen} with {count} workers", flush=True)
        while not stopping.wait(0.5):
            for worker in workers:
                code = worker.exited()
                if code is None:
                    continue
                now = time.monotonic()
                while restarts and now - restarts[0] > RESTART_WINDOW_S:
                    restarts.popleft()
                if len(restarts) >= MAX_RESTARTS:
                    print(f"error: workers keep dying ({MAX_RESTARTS} restarts in {RESTART_WINDOW_S:.0f} s); "
                          "stopping", file=sys.stderr)  # fmt: skip
                    return 1
                restarts.append(now)
                print(f"worker {worker.index + 1} exited with status {code}; restarting it", file=sys.stderr)
                worker.start()
        return 0
    finally:
        _stop_all(workers)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_all(workers: list[_Worker]) -> None:
    running = [w.process for w in workers if w.process is not None and w.process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for process in running:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
