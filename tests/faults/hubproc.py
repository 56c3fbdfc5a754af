"""A `pointsx serve` subprocess that is killed with SIGKILL and started again on the same port and database.

Each start runs in a process group of its own, so a kill takes the whole group — with `--workers N`
the supervisor and its workers together, nothing orphaned holding the port. All incarnations write
to one log file, each start marked, so a failure shows what the hub said.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.test_cli import POINTSX, free_port

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class HubDied(AssertionError):
    """The hub exited, or never came to serve, when it should have been serving."""


def logged_failures(text: str) -> list[str]:
    """Tracebacks and warnings a hub wrote: a healthy hub writes none, however often it is killed."""
    found: list[str] = []
    lines = text.splitlines()
    thread = ""
    for n, line in enumerate(lines):
        if line.startswith("Exception in thread"):
            thread = line.removeprefix("Exception in thread").strip(" :") + ": "
        elif line.startswith("Traceback"):
            # Its last line, the first not indented, names the error.
            last = next((lines[k] for k in range(n + 1, len(lines)) if lines[k] and not lines[k][0].isspace()), "")
            found.append(f"{thread}{last.strip() or line.strip()}")
            thread = ""
        elif "Warning: " in line:
            found.append(line.strip())
    return found


class HubProcess:
    """`pointsx serve --data-dir DATA [--database-url URL] [--workers N]` on one fixed port."""

    def __init__(
        self,
        data: Path,
        database_url: str | None,
        *,
        workers: int = 1,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.data = data
        self.env = {**os.environ, **(env or {})}
        self.database_url = database_url
        self.workers = workers
        self.target = f"127.0.0.1:{free_port()}"
        self.log_path = log_path or data.parent / f"serve-{self.target.rsplit(':', 1)[1]}.log"
        self.starts = 0
        self.kills = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def argv(self) -> list[str]:
        args = [*POINTSX, "serve", "--data-dir", str(self.data), "--listen", self.target]
        if self.database_url:
            args += ["--database-url", self.database_url]
        if self.workers > 1:
            args += ["--workers", str(self.workers)]
        return args

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def spawn(self) -> int:
        """Start the hub process without waiting for it; the log offset its output begins at."""
        assert not self.running, "the hub is already running"
        self._close_log()  # of an incarnation that died on its own
        self.starts += 1
        log = self.log_path.open("ab")
        log.write(f"\n=== start {self.starts} ===\n".encode())
        log.flush()
        self._log = log
        self._proc = subprocess.Popen(
            self.argv(), stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        return log.tell()

    def start(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Start the hub and wait until it serves (every worker of it); the seconds that took."""
        began = time.monotonic()
        offset = self.spawn()
        try:
            self._wait_serving(began + timeout_s, offset)
        except BaseException:
            self.kill()
            raise
        return time.monotonic() - began

    def _wait_serving(self, deadline: float, log_offset: int) -> None:
        ready_line = f"with {self.workers} workers" if self.workers > 1 else "pointsx hub serving on"
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    raise HubDied(f"the hub exited {self._proc.returncode} while starting:\n{self.output()}")
                try:
                    serving = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == 1
                except grpc.RpcError:
                    serving = False
                if serving and ready_line in self._log_since(log_offset):
                    return
                if time.monotonic() > deadline:
                    raise HubDied(f"the hub did not serve within the start timeout:\n{self.output()}")
                time.sleep(0.02)

    def _log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL to the hub's whole process group; returns once the hub process is gone."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT_S)
            self.kills += 1
        self._close_log()

    def stop(self) -> int:
        """A clean shutdown (SIGTERM); the exit status (0 expected)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._close_log()
            return 0 if proc is None else proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise HubDied(f"the hub did not stop on SIGTERM:\n{self.output()}") from None
        self._close_log()
        return code

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_text(self, since: int = 0) -> str:
        """Everything every incarnation wrote from byte `since` on."""
        return self._log_since(since) if self.log_path.exists() else ""

    def output(self, tail_chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-tail_chars:] if self.log_path.exists() else ""

    def __enter__(self) -> HubProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # A group the hub left behind (a worker outliving its supervisor) goes too.
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self.kill()
