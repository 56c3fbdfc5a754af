"""The load side of `scripts/bench_hub.py`: client processes, the echo baseline, /proc sampling.

`drive()` starts one spawned process per `LoadSpec`; each runs one asyncio loop that keeps its
slots' calls in flight (closed loop: a slot calls again as soon as its last call returns; paced:
calls start on a fixed schedule and latency counts from the scheduled start, so a stalled server
is not hidden by clients that stopped asking). The processes start together once all their
channels are connected, warm up, then count only the calls that finish inside the measured window.

`echo_server()` is the baseline server: a generic grpc.aio unary handler on the same grpcio, bytes
in and bytes out, no database and no auth — or, with keys, one Ed25519 check per call as the hub
makes (DESIGN §6), to show what authentication costs on its own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import multiprocessing as mp
import os
import queue
import re
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import TypeAlias

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import Message

from merchant_sdk import AsyncMerchantClient, AsyncSignedTransport, Signer, exchange_pb2, load_private_key
from merchant_sdk import errors as sdk_errors
from merchant_sdk import signing as sig

ECHO_SERVICE = "pointsx.bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
CALL_TIMEOUT_S = 30.0
SPAWN = mp.get_context("spawn")  # fresh interpreters: no grpc state inherited through fork
CLOCK_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Shape:
    """The load, the same for the hub and its baselines."""

    concurrency: int  # calls in flight, over all processes
    processes: int
    batch_size: int  # items per call of "convert_batch" (and per echoed body, with batch_echo)
    src_points: int
    warmup_s: float
    duration_s: float
    batch_echo: bool = False


@dataclass(frozen=True)
class Network:
    """What the setup made: merchants (id, private key PEM) and the people, each a member at every merchant."""

    merchants: tuple[tuple[str, bytes], ...]
    members: tuple[str, ...]


@dataclass(frozen=True)
class LoadSpec:
    """What one client process does. `kind`: "convert", "convert_batch", or "echo" (the same bytes, echoed)."""

    target: str
    kind: str
    network: Network
    shape: Shape
    slots: tuple[tuple[int, tuple[str, ...]], ...]  # (slot number, its member refs)
    rate: float = 0.0  # calls/s of this process; 0: closed loop


def specs(target: str, kind: str, network: Network, shape: Shape, rate: float = 0.0) -> list[LoadSpec]:
    """The slots dealt over the processes; slot i owns members i, i + concurrency, … (no two share one)."""
    slots = [(i, network.members[i :: shape.concurrency]) for i in range(shape.concurrency)]
    per = shape.processes
    return [LoadSpec(target, kind, network, shape, tuple(slots[p::per]), rate / per) for p in range(per)]


@dataclass
class LoadResult:
    """What happened in the measured window: calls and items that succeeded, refusals, errors, latencies."""

    calls: int = 0
    items: int = 0
    refused: int = 0
    errors: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    failure: str = ""  # a client process that crashed says why here

    def fail(self, error: sdk_errors.PointsxError) -> None:
        """A refusal has a reason the hub gave (INSUFFICIENT_POINTS, …); anything else is an error."""
        if isinstance(error, sdk_errors.TransientError | sdk_errors.InternalError) or not error.reason:
            self.errors += 1
        else:
            self.refused += 1
        self.reasons[error.reason or error.code.name] += 1

    def merge(self, other: LoadResult) -> None:
        self.calls += other.calls
        self.items += other.items
        self.refused += other.refused
        self.errors += other.errors
        self.reasons.update(other.reasons)
        self.latencies_ms.extend(other.latencies_ms)
        self.failure = self.failure or other.failure


def percentile(sorted_ms: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 for none)."""
    return sorted_ms[max(0, math.ceil(q * len(sorted_ms)) - 1)] if sorted_ms else 0.0


# --- one client process ------------------------------------------------------------------------


class _Driver:
    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.ids = [mid for mid, _pem in spec.network.merchants]
        keys = [(mid, load_private_key(pem)) for mid, pem in spec.network.merchants]
        # One attempt per call: a failure is counted, not retried out of sight.
        self.clients = [
            AsyncMerchantClient(spec.target, mid, key, timeout_s=CALL_TIMEOUT_S, max_attempts=1) for mid, key in keys
        ]
        self.echo = [
            AsyncSignedTransport(spec.target, Signer(mid, key), timeout_s=CALL_TIMEOUT_S, max_attempts=1)
            for mid, key in keys
        ]
        self.result = LoadResult()

    def _items(self, src: int, dst: int, members: tuple[str, ...], count: int) -> list[exchange_pb2.ConvertRequest]:
        client, dst_id, points = self.clients[src], self.ids[dst], self.spec.shape.src_points
        return [client.conversion_request(members[j % len(members)], dst_id, points) for j in range(count)]

    async def _call(self, slot: int, k: int, members: tuple[str, ...]) -> LoadResult:
        """The k-th call of a slot: from merchant slot+k to the next, so every member's points go round."""
        n = len(self.clients)
        src, dst = (slot + k) % n, (slot + k + 1) % n
        out, kind, shape = LoadResult(), self.spec.kind, self.spec.shape
        try:
            if kind == "convert":
                await self.clients[src].convert(members[k % len(members)], self.ids[dst], shape.src_points)
                out.items = 1
            elif kind == "convert_batch":
                response = await self.clients[src].convert_batch(self._items(src, dst, members, shape.batch_size))
                for item in response.results:
                    if item.WhichOneof("outcome") == "conversion":
                        out.items += 1
                    else:
                        out.fail(sdk_errors.from_status(item.error))
            else:
                body: Message = self._items(src, dst, members, 1)[0]
                if shape.batch_echo:
                    items = self._items(src, dst, members, shape.batch_size)
                    body = exchange_pb2.ConvertBatchRequest(merchant_id=self.ids[src], items=items)
                await self.echo[src].call(ECHO_METHOD, body, type(body))
                out.items = 1
            out.calls = 1  # answered (a batch may still hold refused items)
        except sdk_errors.PointsxError as error:
            out.fail(error)
        return out

    async def _slot(self, slot: int, members: tuple[str, ...], t0: float, tickets: Iterator[int]) -> None:
        spec, warm_end = self.spec, t0 + self.spec.shape.warmup_s
        end = warm_end + spec.shape.duration_s
        for k in range(1 << 62):
            if spec.rate:
                started = t0 + next(tickets) / spec.rate
                if started >= end:
                    return
                await asyncio.sleep(max(0.0, started - time.monotonic()))
            else:
                started = time.monotonic()
                if started >= end:
                    return
            out = await self._call(slot, k, members)
            finished = time.monotonic()
            if warm_end <= finished <= end:
                out.latencies_ms.append((finished - started) * 1000.0)
                self.result.merge(out)

    async def run(self, go: Event, out: Messages) -> None:
        # Connect every channel (and prove the target answers) before the clock starts.
        if self.spec.kind == "echo":
            await asyncio.gather(*(self._call(i, 0, self.spec.slots[0][1]) for i in range(len(self.echo))))
        else:
            await asyncio.gather(*(client.get_network_info() for client in self.clients))
        out.put(("ready", None))
        await asyncio.to_thread(go.wait)
        t0, tickets = time.monotonic(), iter(range(1 << 62))
        await asyncio.gather(*(self._slot(slot, members, t0, tickets) for slot, members in self.spec.slots))
        for client in self.clients:
            await client.close()
        for transport in self.echo:
            await transport.close()
        out.put(("done", self.result))


Messages: TypeAlias = "mp.Queue[tuple[str, LoadResult | str | None]]"  # ("ready"|"done"|"failed", …)


def _client_main(spec: LoadSpec, go: Event, out: Messages) -> None:
    try:
        asyncio.run(_Driver(spec).run(go, out))
    except BaseException:
        out.put(("failed", traceback.format_exc()))


def _gather(out: Messages, procs: list[SpawnProcess], tag: str, timeout_s: float) -> list[LoadResult | str | None]:
    """One `tag` message from every process; a failure, a process gone, or the time passing raises."""
    got: list[LoadResult | str | None] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < len(procs):
        try:
            kind, value = out.get(timeout=0.5)
        except queue.Empty:
            if dead := [p.exitcode for p in procs if p.exitcode]:
                raise RuntimeError(f"a client process exited with {dead[0]} before it was {tag}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"client processes not {tag} within {timeout_s:.0f} s") from None
            continue
        if kind == "failed":
            raise RuntimeError(f"a client process failed:\n{value}")
        got.append(value)
    return got


def drive(specs: list[LoadSpec], on_start: Callable[[float, list[int]], None]) -> LoadResult:
    """Run the client processes and merge what they measured (`failure` says why, if they did not).

    `on_start(t0, client_pids)` runs here as the processes start their clocks (t0 on the monotonic
    clock, which all processes share): to follow the window, and sample CPU at its ends.
    """
    go, out = SPAWN.Event(), SPAWN.Queue()
    procs = [SPAWN.Process(target=_client_main, args=(spec, go, out), daemon=True) for spec in specs]
    for proc in procs:
        proc.start()
    merged = LoadResult()
    try:
        _gather(out, procs, "ready", 120)
        go.set()
        on_start(time.monotonic(), [p.pid for p in procs if p.pid is not None])
        shape = specs[0].shape
        for result in _gather(out, procs, "done", shape.warmup_s + shape.duration_s + CALL_TIMEOUT_S + 60):
            assert isinstance(result, LoadResult)
            merged.merge(result)
    except RuntimeError as failure:
        merged.failure = str(failure)
    finally:
        for proc in procs:
            proc.join(timeout=0 if merged.failure else 5)
            if proc.is_alive():
                proc.kill()
    return merged


# --- the echo baseline -------------------------------------------------------------------------


async def _serve_echo(port_out: mp.Queue[int], keys: dict[str, bytes]) -> None:
    publics = {caller: Ed25519PublicKey.from_public_bytes(raw) for caller, raw in keys.items()}

    async def echo(body: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        if publics:  # the hub's check (DESIGN §6), without its timestamp window and nonce store
            md = {key: str(value) for key, value in context.invocation_metadata() or ()}
            caller, key_id = md.get(sig.HEADER_CALLER, ""), md.get(sig.HEADER_KEY_ID, "")
            stamp, nonce = md.get(sig.HEADER_TIMESTAMP, ""), md.get(sig.HEADER_NONCE, "")
            try:
                signature = base64.b64decode(md.get(sig.HEADER_SIGNATURE, ""))
                publics[caller].verify(signature, sig.auth_payload(ECHO_METHOD, caller, key_id, stamp, nonce, body))
            except (KeyError, ValueError, InvalidSignature):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad signature")
        return body

    handler = grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    limit = 4 * 1024 * 1024  # as exchange.rpc.server
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        maximum_concurrent_rpcs=1024,
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_out.put(port)
    await server.wait_for_termination()


def _echo_main(port_out: mp.Queue[int], keys: dict[str, bytes]) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_echo(port_out, keys))


@contextlib.contextmanager
def echo_server(keys: dict[str, bytes]) -> Iterator[tuple[str, int]]:
    """An echo server in its own process, as the hub runs in its own: yields (target, pid)."""
    port_out: mp.Queue[int] = SPAWN.Queue()
    proc = SPAWN.Process(target=_echo_main, args=(port_out, keys), daemon=True)
    proc.start()
    try:
        port = port_out.get(timeout=60)
        assert proc.pid is not None
        yield f"127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.join(timeout=10)


# --- /proc: memory and CPU of process trees ---------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces): field 3 (state) first."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants now (from each thread's /proc children list: no scan of /proc)."""
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        with contextlib.suppress(OSError):
            for children in Path(f"/proc/{pid}/task").glob("*/children"):
                todo.extend(int(child) for child in children.read_text().split())
    return tree


def pids_named(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == name:
                    pids.append(int(entry.name))
    return pids


def postgres_pids(database: str) -> list[int]:
    """PostgreSQL's own processes (writer, checkpointer, …) and its backends serving `database` only:
    not the backends of whatever else uses this server meanwhile."""
    pids = []
    for pid in pids_named("postgres"):
        with contextlib.suppress(OSError):
            words = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split()
            client = next((i for i, w in enumerate(words) if w == "[local]" or re.fullmatch(r"\S+\(\d+\)", w)), 0)
            if client < 2 or words[client - 1] == database:  # "postgres: … user database host(port) state"
                pids.append(pid)
    return pids


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """User + system CPU each process has used so far (processes gone by now are left out)."""
    used = {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat_fields(pid)
            used[pid] = (int(fields[11]) + int(fields[12])) * CLOCK_TICK_S
    return used


def rss_mb(pids: Iterable[int], which: str = "VmRSS", path: str = "status") -> float:
    """Memory of the processes together, in MB: VmRSS (resident), VmHWM (each one's peak so far), or
    with path="smaps_rollup" Pss (resident, pages shared among them counted once in all)."""
    total_kb = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
                if line.startswith(which + ":"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


class PeakRss:
    """Samples a process and its children every `every_s` in a thread: the largest RSS and PSS sums seen."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.pid, self.every_s, self.rss_mb, self.pss_mb = pid, every_s, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            tree = process_tree(self.pid)
            self.rss_mb = max(self.rss_mb, rss_mb(tree))
            self.pss_mb = max(self.pss_mb, rss_mb(tree, "Pss", "smaps_rollup"))

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        return self.rss_mb, self.pss_mb


def machine_busy_seconds() -> float:
    """CPU time all cores have spent not idle since boot (/proc/stat), in seconds."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) * CLOCK_TICK_S  # less idle and iowait


class CpuWindow:
    """CPU cores used between `start()` and `stop()` by groups of processes, the machine, and everything else.

    `groups()` names the processes (looked up at both ends: new processes count in full, ones gone are lost).
    """

    def __init__(self, groups: Callable[[], dict[str, list[int]]]) -> None:
        self.groups = groups
        self._t0, self._busy = time.monotonic(), 0.0
        self._before: dict[str, dict[int, float]] = {}

    def start(self) -> None:
        self._before = {group: cpu_seconds(pids) for group, pids in self.groups().items()}
        self._t0, self._busy = time.monotonic(), machine_busy_seconds()

    def stop(self) -> dict[str, float]:
        elapsed, busy = time.monotonic() - self._t0, machine_busy_seconds() - self._busy
        cores = {}
        for group, pids in self.groups().items():
            was = self._before.get(group, {})
            cores[group] = sum(t - was.get(pid, 0.0) for pid, t in cpu_seconds(pids).items()) / elapsed
        cores["other"] = max(0.0, busy / elapsed - sum(cores.values()))  # the kernel, and whatever else runs here
        cores["machine"] = busy / elapsed
        return {group: round(used, 2) for group, used in cores.items()}


def profile_pointsx(out: str, argv: list[str]) -> int:
    """Run `pointsx ARGV` under cProfile in every thread (the ledger writers too, not only the event
    loop's), timed in CPU seconds of each thread (waiting costs nothing), and write the merged stats
    to `out` when it exits: `bench_hub.py --profile-hub`."""
    import cProfile
    import pstats

    from exchange.cli import main

    profiles: list[cProfile.Profile] = []
    thread_run = threading.Thread.run

    def run(self: threading.Thread) -> None:
        profiles.append(profile := cProfile.Profile(time.thread_time))
        profile.enable()
        try:
            thread_run(self)
        finally:
            profile.disable()

    threading.Thread.run = run  # type: ignore[method-assign]
    profiles.append(profile := cProfile.Profile(time.thread_time))
    sys.argv = ["pointsx", *argv]
    profile.enable()
    try:
        return main()
    finally:
        for each in profiles:
            each.disable()  # threads still running when the hub exits (daemons) are cut here
        stats = pstats.Stats(profiles[0])
        for each in profiles[1:]:
            with contextlib.suppress(TypeError):  # a thread that never ran anything has no stats
                stats.add(each)
        stats.dump_stats(out)
