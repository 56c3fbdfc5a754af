"""The bank workload, after Jepsen's bank test: many clients move points while the hub is SIGKILLed.

`run_bank` starts a real `pointsx serve` (tests/faults/hubproc.py) on a data directory and
database, sets up the network of tests/faults/ops.py, then for each round:

1. `clients` threads, each with its own SDK clients (its own channels) and a bounded retry budget
   (`max_attempts` drawn per client, `timeout_s` per attempt), issue, redeem, convert and — as the
   operator — reverse at random, recording every request and what they were told;
2. meanwhile a nemesis SIGKILLs the hub at random moments (`kill_every_s` apart on average, at
   least `min_kills` times), now and then waits long enough that clients' retries run out (their
   requests become ambiguous), now and then kills it again while it is still starting, and starts
   it again on the same port and database;
3. once the clients stop, ambiguous requests are resolved, everything is verified and a clearing
   cycle is closed (tests/faults/bank_check.py).

The test (tests/faults/test_bank.py) runs a short round per backend; scripts/reliability.py runs
rounds for minutes and prints the figures. Randomness is seeded (`seed`): the choices repeat,
the interleavings of course do not.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

from exchange.store.engine import make_engine, sqlite_url
from merchant_sdk import MerchantClient, new_request_id
from merchant_sdk._pb.pointsx.v1 import exchange_pb2
from tests.faults import bank_check
from tests.faults.clients import AttemptCounter, CountingOperatorClient, merchant_client
from tests.faults.hubproc import HubDied, HubProcess, logged_failures
from tests.faults.ops import VALUES, Network, Op, settle
from tests.integration.test_clearing_crash import new_data_dir  # its clearing cron never fires

JOIN_S = 90.0  # a client still busy this long after the stop is hung


@dataclass(frozen=True)
class BankConfig:
    duration_s: float = 20.0  # chaos per round (longer if min_kills needs it)
    rounds: int = 1
    clients: int = 8
    persons: int = 12
    kill_every_s: float = 1.0  # mean time serving between kills
    min_kills: int = 0  # per round: keep going past duration_s until this many
    outage_probability: float = 0.1  # a kill followed by a pause longer than the clients' retries
    outage_s: tuple[float, float] = (2.5, 4.0)
    start_kill_probability: float = 0.05  # a kill while the hub is still starting up
    attempts_choices: tuple[int, ...] = (2, 3, 4, 6)  # each client's SDK max_attempts
    timeout_s: float = 3.0  # each attempt's deadline
    pause_after_giving_up_s: tuple[float, float] = (0.1, 0.5)
    seed: int = 1
    # Injected transient database conflicts in the hub (exchange/store/faults.py), a share of its statements.
    db_fault_rate: float = 0.0


@dataclass
class BankFigures:
    """What a run did and found; rounds add up."""

    backend: str = ""
    rounds: int = 0
    acknowledged: int = 0  # answered ok while the hub was being killed
    refused: int = 0  # answered with a (stored) refusal
    ambiguous: int = 0  # the client gave up: resolved afterwards
    ambiguous_held: int = 0  # ... of which the hub had already applied (or refused)
    unexpected: int = 0  # any other answer (e.g. INTERNAL): a problem too
    kills: int = 0  # SIGKILLs the hub came back from
    kills_while_starting: int = 0  # ... of which before it was serving
    outages: int = 0  # kills followed by a pause the retries could not ride out
    back_to_serving_s: list[float] = field(default_factory=list)  # restart -> serving, per kill
    calls: int = 0
    retries: int = 0
    cycles: int = 0
    chaos_s: float = 0.0
    phases_s: dict[str, float] = field(default_factory=dict)  # where the time went
    problems: list[str] = field(default_factory=list)

    def add(self, other: BankFigures) -> None:
        for name in ("rounds", "acknowledged", "refused", "ambiguous", "ambiguous_held", "unexpected", "kills",
                     "kills_while_starting", "outages", "calls", "retries", "cycles"):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.chaos_s += other.chaos_s
        for phase, seconds in other.phases_s.items():
            self.phases_s[phase] = self.phases_s.get(phase, 0.0) + seconds
        self.back_to_serving_s += other.back_to_serving_s
        self.problems += other.problems

    def serving_p50_s(self) -> float:
        return statistics.median(self.back_to_serving_s) if self.back_to_serving_s else 0.0

    def serving_max_s(self) -> float:
        return max(self.back_to_serving_s, default=0.0)


class Bank:
    """One network on one hub process and database, and the log of every request sent to it."""

    def __init__(self, hub: HubProcess, engine: Engine, network: Network, cfg: BankConfig) -> None:
        self.hub, self.engine, self.network, self.cfg = hub, engine, network, cfg
        self.ops: list[Op] = []
        self.opening: dict[str, int] = {}  # the last cycle's closing carries
        self._lock = threading.Lock()
        self._conversions: list[str] = []  # acknowledged conversion ids: what reversals aim at
        self._problems: list[str] = []

    def set_up(self) -> None:
        self.ops += self.network.set_up(self.hub.target)

    # --- the clients ------------------------------------------------------------------------------
    def _next_op(self, rng: random.Random, round_: int) -> Op:
        person = rng.randrange(self.network.persons)
        merchant_id = rng.choice(list(VALUES))
        roll = rng.random()
        if roll < 0.08:
            with self._lock:
                target = rng.choice(self._conversions) if self._conversions else ""
            if target:
                return Op("reverse", "operator", new_request_id(), -1, "", conversion_id=target, round=round_)
        if roll < 0.35:
            return Op("issue", merchant_id, new_request_id(), person, merchant_id, rng.randint(1, 400), round=round_)
        if roll < 0.6:
            return Op("redeem", merchant_id, new_request_id(), person, merchant_id, rng.randint(1, 900), round=round_)
        destination = rng.choice([m for m in VALUES if m != merchant_id])
        return Op("convert", merchant_id, new_request_id(), person, merchant_id, rng.randint(20, 700),
                  destination=destination, round=round_)  # fmt: skip

    def _client(self, index: int, round_: int, stop: threading.Event, counter: AttemptCounter) -> None:
        rng = random.Random(f"{self.cfg.seed}/{round_}/{index}")
        attempts = rng.choice(self.cfg.attempts_choices)
        timeout_s = self.cfg.timeout_s
        target, keys = self.hub.target, self.network.keys
        merchants: dict[str, MerchantClient] = {
            m: merchant_client(target, m, key, counter, max_attempts=attempts, timeout_s=timeout_s)
            for m, key in keys.items()
        }
        operator = CountingOperatorClient(
            target, self.network.operator_key, counter, max_attempts=attempts, timeout_s=timeout_s
        )
        try:
            while not stop.is_set():
                op = self._next_op(rng, round_)
                with self._lock:
                    self.ops.append(op)  # logged before it is sent: a crash here leaves it "sent"
                counter.call()
                settle(op, merchants, operator)
                if op.outcome == "ok" and isinstance(op.response, exchange_pb2.Conversion):
                    with self._lock:
                        self._conversions.append(op.response.conversion_id)
                elif op.outcome == "ambiguous":  # the hub is down: back off, as an app would
                    stop.wait(rng.uniform(*self.cfg.pause_after_giving_up_s))
        except Exception as exc:  # a crash of the workload itself: reported, the others go on
            with self._lock:
                self._problems.append(f"client {index} crashed: {exc!r}")
        finally:
            operator.close()
            for client in merchants.values():
                client.close()

    # --- the nemesis -------------------------------------------------------------------------------
    def _nemesis(self, rng: random.Random, figures: BankFigures) -> None:
        cfg = self.cfg
        began = time.monotonic()
        hard_stop = began + max(cfg.duration_s * 4, cfg.duration_s + 120)
        while True:
            now = time.monotonic()
            if (now - began >= cfg.duration_s and figures.kills >= cfg.min_kills) or now >= hard_stop:
                return
            time.sleep(rng.uniform(0.3, 1.7) * cfg.kill_every_s)
            if not self.hub.running:
                figures.problems.append(f"the hub died on its own:\n{self.hub.output()}")
            self.hub.kill()
            figures.kills += 1
            if rng.random() < cfg.outage_probability:
                figures.outages += 1
                time.sleep(rng.uniform(*cfg.outage_s))
            if rng.random() < cfg.start_kill_probability:
                self.hub.spawn()
                time.sleep(rng.uniform(0.05, 0.9))  # somewhere in imports, migrations check, recovery
                self.hub.kill()
                figures.kills += 1
                figures.kills_while_starting += 1
            figures.back_to_serving_s.append(self.hub.start())

    def chaos_round(self, round_: int) -> BankFigures:
        """One round of clients against the nemesis; then resolution, verification and a cycle."""
        figures = BankFigures(rounds=1)
        first_op = len(self.ops)
        log_from = self.hub.log_size()
        counter = AttemptCounter()
        stop = threading.Event()
        threads = [
            threading.Thread(target=self._client, args=(i, round_, stop, counter), name=f"bank-client-{i}", daemon=True)
            for i in range(self.cfg.clients)
        ]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        try:
            self._nemesis(random.Random(f"{self.cfg.seed}/{round_}/nemesis"), figures)
        except HubDied as exc:
            figures.problems.append(f"the hub did not come back after a kill: {exc}")
        finally:
            stop.set()
            for thread in threads:
                thread.join(JOIN_S)
        figures.chaos_s = time.monotonic() - began
        figures.phases_s["chaos"] = figures.chaos_s
        hung = [t.name for t in threads if t.is_alive()]
        if hung:
            figures.problems.append(f"clients hung past {JOIN_S:.0f} s after the stop: {hung}")
        if not self.hub.running:
            try:
                self.hub.start()
            except HubDied as exc:
                figures.problems.append(f"the hub does not start any more: {exc}")
                return figures
        with self._lock:
            figures.problems += self._problems
            self._problems.clear()
            round_ops = self.ops[first_op:]
        figures.calls, figures.retries = counter.calls, counter.retries
        self._count(round_ops, figures)
        pending = [op for op in round_ops if op.outcome in ("ambiguous", "unexpected", "sent")]
        mark = time.monotonic()
        figures.problems += bank_check.resolve(self.engine, self.network, self.hub.target, pending)
        figures.ambiguous_held = sum(op.held_before_resend for op in pending)
        mark = _phase(figures, "resolve", mark)
        figures.problems += bank_check.verify(self.engine, self.network, self.hub.target, self.ops)
        mark = _phase(figures, "verify", mark)
        problems, self.opening, cycle = bank_check.close_and_check_cycle(
            self.network, self.hub.target, self.ops, round_ops, self.opening
        )
        _phase(figures, "cycle", mark)
        figures.problems += [f"the hub logged: {line}" for line in logged_failures(self.hub.log_text(log_from))]
        figures.problems += problems
        figures.cycles += cycle is not None
        return figures

    @staticmethod
    def _count(round_ops: list[Op], figures: BankFigures) -> None:
        figures.acknowledged = sum(op.outcome == "ok" for op in round_ops)
        figures.refused = sum(op.outcome == "refused" for op in round_ops)
        figures.ambiguous = sum(op.outcome in ("ambiguous", "sent") for op in round_ops)
        figures.unexpected = sum(op.outcome == "unexpected" for op in round_ops)


def _phase(figures: BankFigures, name: str, since: float) -> float:
    now = time.monotonic()
    figures.phases_s[name] = figures.phases_s.get(name, 0.0) + now - since
    return now


def run_bank(
    root: Path, database_url: str | None, cfg: BankConfig, *, backend: str = "", budget_s: float | None = None
) -> BankFigures:
    """The whole bank test in `root` on `database_url` (None: the data directory's SQLite file).

    `cfg.rounds` rounds; or, given `budget_s`, rounds until that many seconds are spent (at least one).
    """
    data = new_data_dir(root)
    figures = BankFigures(backend=backend or ("sqlite" if database_url is None else "postgres"))
    engine = make_engine(database_url or sqlite_url(data / "pointsx.db"))
    try:
        env = {
            "POINTSX_FAULT_DB_RATE": str(cfg.db_fault_rate),
            "POINTSX_FAULT_DB_SEED": str(cfg.seed),
            "POINTSX_FAULT_DB_THREADS": "ledger-writer",
        }  # start-up and clearing run unfaulted
        with HubProcess(data, database_url, env=env if cfg.db_fault_rate else None) as hub:
            mark = time.monotonic()
            hub.start()
            bank = Bank(hub, engine, Network.create(data, cfg.persons), cfg)
            bank.set_up()
            _phase(figures, "setup", mark)
            began, round_ = time.monotonic(), 0
            while True:
                round_ += 1
                figures.add(bank.chaos_round(round_))
                spent = time.monotonic() - began
                if figures.problems or (budget_s is None and round_ >= cfg.rounds):
                    break
                if budget_s is not None and spent * (round_ + 1) / round_ > budget_s:
                    break  # another round like these would overrun the budget
            mark = time.monotonic()
            code = hub.stop()
            _phase(figures, "stop", mark)
            if code != 0:
                figures.problems.append(f"the hub exited {code} on SIGTERM:\n{hub.output()}")
    finally:
        engine.dispose()
    return figures
