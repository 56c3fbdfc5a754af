"""Transient database faults (serialization failures, deadlocks, SQLITE_BUSY) under real traffic.

`exchange.store.faults` fails a chosen share of the hub's statements, before they run, with the
errors `exchange.store.mutation.is_retryable` treats as transient: SQLSTATE 40001 / 40P01 raised
by PostgreSQL itself (so the transaction really is aborted), `database is locked` on SQLite.

First the injector itself: off unless asked, seeded, at its rate, transient by the hub's own
test, aborting a PostgreSQL transaction as a real conflict does, never on the migrations' engine,
never on savepoint/commit/rollback statements. Then `pointsx serve` with the variable set, which
should ride out a fault while it starts; and single, chosen faults (one statement of one write)
that the hub must retry into an OK.

Then the storm: a hub whose engine fails a fifth of its statements, concurrent merchants issuing,
redeeming and converting — each operation with its own request_id, through the SDK and its
retries. Each operation must end exactly once: acknowledged and stored once, or refused cleanly
(a domain refusal, or a transient status the caller may retry) and not applied. Nothing may come
back INTERNAL or UNKNOWN. Afterwards, with the faults off, every operation is sent again with its
request_id: an acknowledged one answers the same bytes, a refused one the same refusal, and every
member's balance is what the definitive outcomes add up to; the auditor runs on an engine of its
own, without faults.

The retry budget, worked out. Statements the injector may fail, counted on this hub: an
IssuePoints makes 2 in the auth read (SQLite; 1 on PostgreSQL, which has no BEGIN statement), 3 in
remembering the nonce (2), 13 in its write (12); a Convert 26 in its write. At a fault rate r one
attempt of an n-statement transaction fails with p = 1 - (1 - r)^n, and MAX_ATTEMPTS = 6 attempts
all fail with p^6:

    r = 0.20   issue write  p = 0.945  p^6 = 0.71     convert write  p = 0.997  p^6 = 0.98
    r = 0.05   issue write  p = 0.487  p^6 = 0.013    convert write  p = 0.736  p^6 = 0.16
    r = 0.01   issue write  p = 0.122  p^6 = 3e-6     convert write  p = 0.230  p^6 = 1.5e-4

(0.2^6 = 6.4e-5 would hold only for one-statement transactions.) Keeping a write's failure below
1e-3 at r = 0.2 would take 122 attempts for an issue and about 2,300 for a conversion. So at a
fifth no bounded retry inside the hub saves most writes — and the reads (auth, balances) and the
nonce's own-transaction path are not retried at all. The correct outcome at that rate is a clean,
retryable refusal (UNAVAILABLE with an ErrorInfo: the SDK retries it with the same request_id),
never INTERNAL; the storms below accept exactly that. `test_rare_conflicts_*` shows the writer's
retries do absorb conflicts at 1% on its own thread.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.exc import DBAPIError

from exchange.domain.units import format_operation_id
from exchange.operator_client import OperatorClient
from exchange.store import faults, migrate, mutation
from exchange.store.engine import make_engine, sqlite_url
from exchange.store.schema import operations
from merchant_sdk import MerchantClient, errors
from merchant_sdk._pb.pointsx.v1 import exchange_pb2, ledger_pb2
from merchant_sdk.signing import load_private_key_file
from tests import harness
from tests.auditor import check_invariants
from tests.conftest import BACKENDS

SOURCE, DESTINATION = "df-src", "df-dst"
INITIAL_POINTS = 5_000
MEMBERS = 6
THREADS = 6
OPS_PER_THREAD = int(os.environ.get("POINTSX_FAULT_OPS", "12"))  # per client thread; more for a long run
SDK_ATTEMPTS = 3  # the SDK's retries of UNAVAILABLE, bounded so a refusing hub still ends the test fast
CALL_TIMEOUT_S = 10.0
TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
BROKEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
POINTSX = [sys.executable, "-m", "exchange.cli"]


# --- the injector --------------------------------------------------------------------------------------


@pytest.fixture
def no_fault_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (faults.ENV_RATE, faults.ENV_SEED, faults.ENV_THREADS, faults.ENV_LIMIT):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A migrated database of the backend, as a URL (SQLite: a file in tmp_path)."""
    if backend == "sqlite":
        url = sqlite_url(tmp_path / "faults.db")
        migrate.upgrade(url)
        yield url
        return
    url, name = harness.fresh_postgres_database()
    try:
        yield url
    finally:
        harness.drop_postgres_database(name)


def test_no_injector_without_the_variable(no_fault_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path / "plain.db"))
    assert faults.injector_of(engine) is None
    engine.dispose()


def test_a_bad_rate_is_refused_loudly(no_fault_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for bad in ("a fifth", "1.5", "-0.1"):
        no_fault_env.setenv(faults.ENV_RATE, bad)
        with pytest.raises(ValueError, match=faults.ENV_RATE):
            make_engine(sqlite_url(tmp_path / "bad.db"))


def test_statements_that_never_conflict_are_never_failed() -> None:
    injector = faults.FaultInjector("postgresql", 1.0, seed=1)
    for statement in ("SAVEPOINT sa_savepoint_1", "RELEASE SAVEPOINT sa_savepoint_1", "ROLLBACK TO SAVEPOINT x",
                      "  rollback", "COMMIT", "PRAGMA foreign_keys=ON"):  # fmt: skip
        assert injector._draw(statement) is None, statement
    assert injector._draw("SELECT 1") in (faults.SERIALIZATION_FAILURE, faults.DEADLOCK_DETECTED)
    with injector.paused():
        assert injector._draw("SELECT 1") is None
    assert faults.FaultInjector("sqlite", 1.0)._draw("BEGIN IMMEDIATE") == faults.SQLITE_BUSY_MESSAGE


def _failures(engine: Engine, statements: int) -> list[DBAPIError | None]:
    """Run `SELECT 1` in a transaction each; None where it ran, the error where it was failed."""
    seen: list[DBAPIError | None] = []
    for _ in range(statements):
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except DBAPIError as exc:
            seen.append(exc)
        else:
            seen.append(None)
    return seen


def test_the_environment_installs_a_seeded_injector_of_transient_faults(
    backend: str, db_url: str, no_fault_env: pytest.MonkeyPatch
) -> None:
    no_fault_env.setenv(faults.ENV_RATE, "0.3")
    no_fault_env.setenv(faults.ENV_SEED, "20240611")
    engine, twin = make_engine(db_url), make_engine(db_url)
    try:
        injector = faults.injector_of(engine)
        assert injector is not None and injector.rate == 0.3
        seen = _failures(engine, 300)
        errors_seen = [e for e in seen if e is not None]
        # On SQLite each transaction is two statements (BEGIN, SELECT): about half fail, not 30%.
        expected = 0.3 if backend == "postgres" else 1 - 0.7**2
        assert abs(len(errors_seen) / 300 - expected) < 0.1, len(errors_seen)
        assert all(mutation.is_retryable(e) for e in errors_seen)
        if backend == "postgres":
            assert {type(e.orig) for e in errors_seen} == {psycopg.errors.SerializationFailure,
                                                           psycopg.errors.DeadlockDetected}  # fmt: skip
        else:
            assert {type(e.orig) for e in errors_seen} == {sqlite3.OperationalError}
        # The same seed fails the same statements.
        assert [e is None for e in _failures(twin, 300)] == [e is None for e in seen]
        assert injector.stats.injected == len(errors_seen)
    finally:
        engine.dispose()
        twin.dispose()


def test_a_postgres_fault_aborts_the_transaction_as_a_real_one_does(
    postgres_url: str, no_fault_env: pytest.MonkeyPatch
) -> None:
    """Only a rollback (to a savepoint) goes on after it — the hub cannot carry on by accident."""
    engine = make_engine(postgres_url)
    injector = faults.install(engine, 0.0, seed=1)
    try:
        with engine.connect() as conn, conn.begin():
            savepoint = conn.begin_nested()
            injector.rate = 1.0
            with pytest.raises(DBAPIError) as info:
                conn.execute(text("SELECT 1"))
            injector.rate = 0.0
            assert mutation.is_retryable(info.value)
            with pytest.raises(DBAPIError) as aborted:
                conn.execute(text("SELECT 1"))
            assert isinstance(aborted.value.orig, psycopg.errors.InFailedSqlTransaction)
            savepoint.rollback()
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    if "postgres" not in BACKENDS:
        pytest.skip("PostgreSQL deselected by POINTSX_TEST_BACKENDS")
    url, name = harness.fresh_postgres_database()
    try:
        yield url
    finally:
        harness.drop_postgres_database(name)


def test_migrations_are_never_faulted(no_fault_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every statement of the hub's engine fails at rate 1 — and migrations still run."""
    no_fault_env.setenv(faults.ENV_RATE, "1")
    url = sqlite_url(tmp_path / "migrated.db")
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        with pytest.raises(DBAPIError):
            migrate.current_revision(engine)
        injector = faults.injector_of(engine)
        assert injector is not None
        with injector.paused():
            assert migrate.current_revision(engine) == migrate.head_revision()
    finally:
        engine.dispose()


# --- `pointsx serve` with the variable set ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(120)
def test_pointsx_serve_starts_through_a_transient_fault(
    backend: str, tmp_path: Path, database_url: str | None, no_fault_env: pytest.MonkeyPatch
) -> None:
    """A real `pointsx serve` whose main thread — the one that checks the schema and registers the
    operator key before serving — meets three conflicts (half its statements fail until three have,
    seeded). A hub (re)starting during a database hiccup should retry and come up serving, not exit
    with a traceback; once up, it answers a signed call. (Until 2c72d0d it exited.)"""
    data = tmp_path / "data"
    subprocess.run([*POINTSX, "init", "--data-dir", str(data)], check=True, capture_output=True, timeout=60)
    target = f"127.0.0.1:{_free_port()}"
    argv = [*POINTSX, "serve", "--data-dir", str(data), "--listen", target]
    if database_url:
        argv += ["--database-url", database_url]
    env = os.environ | {
        faults.ENV_RATE: "0.5",
        faults.ENV_SEED: "3",
        faults.ENV_THREADS: "MainThread",
        faults.ENV_LIMIT: "3",
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while b"serving on" not in log.read_bytes() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None and b"serving on" in log.read_bytes(), (
            f"HUB BUG: `pointsx serve` did not survive a transient database fault at startup "
            f"(exit {proc.poll()}):\n{log.read_text()[-3000:]}"
        )
        operator_key = load_private_key_file(data / "operator.key")
        with OperatorClient(target, operator_key) as op:
            assert op.list_merchants().merchants == []
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# --- the storm: a scene, a workload, and what the database must hold afterwards ------------------------


@dataclass
class Outcome:
    """What the caller heard back: an answer, or a refusal's code and reason."""

    kind: str  # issue, redeem, convert; balance (a read)
    request_id: str
    member: int
    points: int
    response: bytes | None = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    reason: str = ""
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.response is not None


@dataclass(repr=False)
class Storm:
    running: harness.RunningHub
    backend: str
    source: MerchantClient
    source_key: Ed25519PrivateKey
    destination: MerchantClient
    outcomes: list[Outcome] = field(default_factory=list)
    heard: list[Outcome] = field(default_factory=list)  # the outcomes as the storm left them
    hub_errors: list[logging.LogRecord] = field(default_factory=list)
    deaths: list[str] = field(default_factory=list)  # threads of the hub that died, with their tracebacks

    def writer_alive(self) -> bool:
        return self.running.hub.writer._thread.is_alive()  # the one thread every write goes through

    def assert_writer_alive(self) -> None:
        assert self.writer_alive(), (
            "HUB BUG: the ledger writer thread died, every write hangs from here on:\n" + "\n".join(self.deaths)
        )


class _Collect(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


@pytest.fixture
def storm(backend: str, tmp_path: Path, database_url: str | None, no_fault_env: pytest.MonkeyPatch) -> Iterator[Storm]:
    running = harness.RunningHub(tmp_path, database_url)
    hub_errors: list[logging.LogRecord] = []
    deaths: list[str] = []
    handler = _Collect(hub_errors)
    logging.getLogger("pointsx").addHandler(handler)

    def died(args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread else "?"
        deaths.append(
            f"{name}: " + "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
        )

    no_fault_env.setattr(threading, "excepthook", died)
    try:
        source, source_key = running.admit(SOURCE, cap_micros=10**15)
        destination, _ = running.admit(DESTINATION, cap_micros=10**15)
        source.set_route(DESTINATION, "outbound")
        destination.set_route(SOURCE, "inbound")
        for i in range(MEMBERS):
            source.enroll_member(f"m{i}")
            destination.enroll_member(f"d{i}")
            destination.redeem_link_code(f"d{i}", source.create_link_code(f"m{i}").code)
            source.issue_points(f"m{i}", INITIAL_POINTS)
        yield Storm(running, backend, source, source_key, destination, hub_errors=hub_errors, deaths=deaths)
        source.close()
        destination.close()
    finally:
        logging.getLogger("pointsx").removeHandler(handler)
        running.stop()


def _send(client: MerchantClient, outcome: Outcome) -> None:
    """One operation through the SDK (its retries included); the outcome records what came back."""
    member = f"m{outcome.member}"
    try:
        if outcome.kind == "issue":
            response: bytes = client.issue_points(
                member, outcome.points, request_id=outcome.request_id
            ).SerializeToString()
        elif outcome.kind == "redeem":
            response = client.redeem_points(member, outcome.points, request_id=outcome.request_id).SerializeToString()
        elif outcome.kind == "balance":
            response = client.get_balance(member).SerializeToString()
        else:
            response = client.convert(
                member, DESTINATION, outcome.points, request_id=outcome.request_id
            ).SerializeToString()
    except errors.PointsxError as exc:
        outcome.response, outcome.code, outcome.reason, outcome.message = None, exc.code, exc.reason, exc.message
        return
    outcome.response, outcome.code, outcome.reason, outcome.message = response, grpc.StatusCode.OK, "", ""


def _workload(seed: int) -> list[list[Outcome]]:
    rng = random.Random(seed)
    plans: list[list[Outcome]] = []
    for _ in range(THREADS):
        plan = []
        for _ in range(OPS_PER_THREAD):
            kind = rng.choice(["issue", "redeem", "convert", "convert", "balance"])
            points = {"issue": rng.randint(1, 100), "redeem": rng.randint(1, 400), "convert": rng.randint(10, 300),
                      "balance": 0}  # fmt: skip
            plan.append(Outcome(kind, str(uuid.uuid4()), rng.randrange(MEMBERS), points[kind]))
        plans.append(plan)
    return plans


def run_storm(storm: Storm, rate: float, *, seed: int, threads: tuple[str, ...] = ()) -> faults.FaultInjector:
    """The workload on THREADS clients at once, the hub's engine failing `rate` of its statements."""
    plans = _workload(seed)
    injector = faults.install(storm.running.hub.engine, rate, seed=seed, threads=threads)
    barrier = threading.Barrier(THREADS)

    def drive(plan: list[Outcome]) -> None:
        with MerchantClient(
            storm.running.target, SOURCE, storm.source_key, max_attempts=SDK_ATTEMPTS, timeout_s=CALL_TIMEOUT_S
        ) as client:
            barrier.wait(30)
            for outcome in plan:
                if not storm.writer_alive():  # a dead writer answers nothing: stop, do not wait out deadlines
                    outcome.code, outcome.reason = grpc.StatusCode.ABORTED, "NOT_SENT"
                    continue
                _send(client, outcome)

    try:
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(drive, plans))
    finally:
        injector.active = False
    storm.outcomes = [o for plan in plans for o in plan]
    storm.heard = [replace(o) for o in storm.outcomes]
    return injector


def _stored(engine: Engine) -> dict[str, list[int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(operations.c.request_id, operations.c.operation_seq).where(operations.c.caller == SOURCE)
        ).all()
    found: dict[str, list[int]] = {}
    for request_id, seq in rows:
        found.setdefault(str(request_id), []).append(int(seq))
    return found


def _operation_id(outcome: Outcome) -> str:
    assert outcome.response is not None
    if outcome.kind == "convert":
        return exchange_pb2.Conversion.FromString(outcome.response).conversion_id
    return ledger_pb2.PointsMovement.FromString(outcome.response).operation_id


def _deltas(outcome: Outcome) -> tuple[int, int]:
    """(source member, destination member) points an acknowledged operation moved."""
    assert outcome.response is not None
    if outcome.kind == "issue":
        return outcome.points, 0
    if outcome.kind == "redeem":
        return -outcome.points, 0
    conversion = exchange_pb2.Conversion.FromString(outcome.response)
    return -conversion.src_points, conversion.dst_points


def _summary(storm: Storm, injector: faults.FaultInjector) -> str:
    heard = Counter(o.reason or o.code.name for o in storm.heard)
    return (
        f"[{storm.backend} rate {injector.rate}] {len(storm.heard)} operations, answers {dict(heard)}; "
        f"faults injected {injector.stats.injected} of {injector.stats.eligible} statements; "
        f"where the hub failed: {dict(Counter(_where(r) for r in storm.hub_errors))}"
    )


def _where(record: logging.LogRecord) -> str:
    """Which path of the hub let an injected fault through, from its logged traceback."""
    if not record.exc_info or record.exc_info[2] is None:
        return record.getMessage()[:60]
    frames = [(Path(f.filename).name, f.name) for f in traceback.extract_tb(record.exc_info[2])]
    for where, label in (
        (("auth.py", "verify"), "auth: key lookup (a read, not retried)"),
        (("nonces.py", "remember"), "auth: nonce run alone (not retried)"),
        (("mutation.py", "run_alone"), "write: MAX_ATTEMPTS attempts all failed"),
        (("hub.py", "run"), "read: Hub.query, e.g. GetBalance (not retried)"),
    ):
        if where in frames:
            return label
    return "other: " + " > ".join(f"{file}:{name}" for file, name in frames[-3:])


def _traceback(storm: Storm) -> str:
    """The first traceback the hub logged for each path it failed on."""
    formatter = logging.Formatter("%(name)s: %(message)s")
    first: dict[str, logging.LogRecord] = {}
    for record in storm.hub_errors:
        first.setdefault(_where(record), record)
    return "\n".join(f"--- {where}:\n{formatter.format(r)}" for where, r in first.items()) or "(nothing logged)"


def check_exactly_once(storm: Storm, injector: faults.FaultInjector) -> None:
    """What the callers heard, against what the database holds; then every operation sent again."""
    summary = _summary(storm, injector)
    storm.assert_writer_alive()
    engine = storm.running.hub.engine
    stored = _stored(engine)
    storm.outcomes = [o for o in storm.outcomes if o.kind != "balance"]  # reads: only their answers count
    for outcome in storm.outcomes:
        seqs = stored.get(outcome.request_id, [])
        if outcome.ok:
            assert [format_operation_id(s) for s in seqs] == [_operation_id(outcome)], (
                f"acknowledged {outcome} stored as {seqs}; {summary}"
            )
        elif outcome.code not in (grpc.StatusCode.DEADLINE_EXCEEDED,):  # only a timeout leaves it open
            assert seqs == [], f"refused {outcome} was applied as {seqs}; {summary}"

    # Faults off: each operation again, same request_id. Stored outcomes replay; the rest run now.
    for outcome in storm.outcomes:
        again = Outcome(outcome.kind, outcome.request_id, outcome.member, outcome.points)
        _send(storm.source, again)
        if outcome.ok:
            assert again.response == outcome.response, f"{outcome.request_id}: a different answer on retry"
        elif outcome.code not in TRANSIENT + BROKEN:
            assert (again.code, again.reason) == (outcome.code, outcome.reason), f"{outcome} then {again}"
        outcome.response, outcome.code, outcome.reason = again.response, again.code, again.reason
    expected = [INITIAL_POINTS] * MEMBERS
    arrived = [0] * MEMBERS
    for outcome in storm.outcomes:
        assert outcome.code not in TRANSIENT + BROKEN, f"still {outcome} without faults"
        if outcome.ok:
            source_delta, destination_delta = _deltas(outcome)
            expected[outcome.member] += source_delta
            arrived[outcome.member] += destination_delta
    for i in range(MEMBERS):
        assert storm.source.get_balance(f"m{i}").points == expected[i], f"m{i}; {summary}"
        assert storm.destination.get_balance(f"d{i}").points == arrived[i], f"d{i}; {summary}"
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(operations).where(operations.c.caller == SOURCE))
        assert total.scalar_one() == MEMBERS + sum(o.ok for o in storm.outcomes)


def audit_without_faults(running: harness.RunningHub) -> None:
    """The auditor on an engine of its own: plain SQLAlchemy, no hooks, no faults."""
    url = running.hub.engine.url
    clean = create_engine(url)
    try:
        check_invariants(clean)
    finally:
        clean.dispose()


def tell(request: pytest.FixtureRequest, line: str) -> None:
    """One line on the terminal, past pytest's capture: what a storm did, passed or not."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\n{line}")


def assert_no_internal(storm: Storm, injector: faults.FaultInjector, broken: list[Outcome]) -> None:
    unclean = [o for o in storm.heard if not o.ok and not o.reason]
    assert not unclean, f"refusals without an ErrorInfo reason: {unclean[:3]}; {_summary(storm, injector)}"
    assert not broken, (
        f"HUB BUG: {len(broken)} operations answered {sorted({o.code.name for o in broken})} for an injected, "
        f"transient database fault (expected a retry inside the hub, or a clean retryable refusal). "
        f"{_summary(storm, injector)}. First: {broken[0]}. The hub logged:\n{_traceback(storm)}"
    )


# --- one conflict, on purpose -------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("statement", ["INSERT INTO postings", "UPDATE idempotency", "INSERT INTO nonces"])
def test_one_conflict_in_a_write_is_retried_and_applied_once(storm: Storm, statement: str) -> None:
    """The first `statement` of the next write fails once (a deadlock, a busy database); the hub
    retries it alone and the caller hears OK, the operation stored once.

    INSERT INTO postings fails inside the mutation's own savepoint (`mutation.apply`), nested in
    the writer's per-item savepoint: until 6603997 the writer rolled back its outer savepoint with
    the inner one still open — SQLAlchemy's "nested transaction already deassociated" warning,
    which under this suite's warnings-as-errors killed the writer thread (every write hung). UPDATE
    idempotency fails outside that savepoint; INSERT INTO nonces is the auth path
    (`Hub.remember_nonce`): its batch item fails and runs again alone, once — a second fault there
    is not retried (see the storms).
    """
    faults.install(storm.running.hub.engine, 1.0, match=statement, limit=1)
    request_id = str(uuid.uuid4())
    outcome = Outcome("issue", request_id, 0, 7)
    with MerchantClient(storm.running.target, SOURCE, storm.source_key, max_attempts=1, timeout_s=5) as client:
        _send(client, outcome)
    storm.assert_writer_alive()
    assert outcome.ok, f"HUB BUG: one transient fault in {statement!r} answered {outcome}:\n{_traceback(storm)}"
    assert [format_operation_id(s) for s in _stored(storm.running.hub.engine)[request_id]] == [_operation_id(outcome)]
    assert storm.source.get_balance("m0").points == INITIAL_POINTS + 7
    audit_without_faults(storm.running)


# --- the storms ---------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_operations_end_exactly_once_when_a_fifth_of_statements_fail(
    storm: Storm, request: pytest.FixtureRequest
) -> None:
    """The brief's storm: every statement of the hub — reads, auth, nonces, writes — at 0.2."""
    injector = run_storm(storm, 0.2, seed=7)
    tell(request, _summary(storm, injector))
    broken = [o for o in storm.heard if o.code in BROKEN]
    assert injector.stats.injected > 0
    check_exactly_once(storm, injector)
    audit_without_faults(storm.running)
    assert_no_internal(storm, injector, broken)
    assert any(o.ok for o in storm.heard), _summary(storm, injector)


@pytest.mark.timeout(240)
def test_writes_end_exactly_once_when_a_fifth_of_the_writers_statements_fail(
    storm: Storm, request: pytest.FixtureRequest
) -> None:
    """The same at 0.2 on the ledger writer's thread only: the retry budget and the nonce path, without the reads."""
    injector = run_storm(storm, 0.2, seed=11, threads=("ledger-writer",))
    tell(request, _summary(storm, injector))
    broken = [o for o in storm.heard if o.code in BROKEN]
    check_exactly_once(storm, injector)
    audit_without_faults(storm.running)
    assert_no_internal(storm, injector, broken)


@pytest.mark.timeout(240)
def test_rare_conflicts_on_the_writer_are_retried_inside_the_hub(storm: Storm, request: pytest.FixtureRequest) -> None:
    """At 1% on the writer's thread the hub's own bounded retries absorb every conflict (see the table)."""
    injector = run_storm(storm, 0.01, seed=13, threads=("ledger-writer",))
    tell(request, _summary(storm, injector))
    broken = [o for o in storm.heard if o.code in BROKEN]
    check_exactly_once(storm, injector)
    audit_without_faults(storm.running)
    assert_no_internal(storm, injector, broken)
    assert not [o for o in storm.heard if o.code in TRANSIENT], _summary(storm, injector)
