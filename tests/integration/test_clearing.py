"""Clearing over real gRPC (DESIGN §1 settlement rounding and carries, §5 clearing and statements).

Every figure is computed here from the hub's Conversion responses, independently of `clearing.*`:
each merchant's payable and receivable, the platform's fees, nets, settlements rounded toward zero
in minor units and the carries into the next cycle. Statements are checked the way a merchant
checks them (the SDK's verify_statement with the key from GetNetworkInfo, the items hashed again
here, the canonical JSON, the previous_sha256 chain) and the way an outsider would (openssl over the
raw hub key). The operator's side runs through OperatorClient and through the real command line.

The hubs run on a manual clock started at the wall clock, with a wide signature window so the SDK's
real-time signatures still pass: operations get exact timestamps and cutoffs fall exactly between
them.

Convention (clearing/items.py, DESIGN §2 "a new operation"): a reversal is an item of its own, the
mirror of its conversion — `in` src_cash for the source, `out` dst_cash for the destination — so it
adds to the source's receivable and the destination's payable of the cycle it lands in.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import queue
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.protobuf import json_format
from sqlalchemy import Engine, select

from exchange import runtime
from exchange.config import load_key
from exchange.domain.clock import ManualClock
from exchange.operator_client import OperatorClient
from exchange.store import migrate
from exchange.store.engine import make_engine, sqlite_url
from exchange.store.schema import accounts, operations, postings
from merchant_sdk import MerchantClient, SignedTransport, errors, verify_statement
from merchant_sdk._pb.pointsx.v1 import clearing_pb2, common_pb2, exchange_pb2, operator_pb2
from merchant_sdk.signing import public_key_bytes
from merchant_sdk.statements import StatementVerificationError
from tests import harness
from tests.auditor import account_balances, check_invariants, cycle_of_operations
from tests.conftest import BACKENDS
from tests.harness import RunningHub
from tests.integration.test_cli import POINTSX, free_port, run, wait_serving

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
CLOSED, SETTLED = operator_pb2.CYCLE_STATUS_CLOSED, operator_pb2.CYCLE_STATUS_SETTLED
STATEMENT_READY = exchange_pb2.EVENT_TYPE_STATEMENT_READY

PLATFORM = "platform"
CNY_STEP = 10_000  # micros per fen (2 minor digits)
JPY_STEP = 1_000_000  # micros per yen (0 minor digits)
FEE_BPS = 250
BIG_CAP = 10**12
TICK_MS = 10  # the manual clock moves this much before each operation
SIGNING_PREFIX = b"pointsx-statement-v1\n"
STATEMENT_KEYS = {
    "network", "cycle_id", "currency", "period_start", "cutoff", "merchant", "opening_carry", "payable",
    "receivable", "net", "settlement_minor", "closing_carry", "counterparties", "item_count", "items_sha256",
    "hub_key_id", "previous_sha256",
}  # fmt: skip
AMOUNT_KEYS = ("opening_carry", "payable", "receivable", "net", "settlement_minor", "closing_carry")
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Real-format IBANs with valid mod-97 check digits (ISO 13616 examples).
DEBTOR_IBAN, DEBTOR_BIC = "DE89370400440532013000", "COBADEFFXXX"
BANKS = {
    "alpha": common_pb2.BankDetails(account_name="Alpha Ltd", iban="GB82WEST12345698765432", bic="NWBKGB2L"),
    "beta": common_pb2.BankDetails(account_name="Beta SA", iban="FR1420041010050500013M02606", bic="BNPAFRPP"),
    "gamma": common_pb2.BankDetails(account_name="Gamma AG", iban="DE44500105175407324931"),
}


# --- what the test expects, from the hub's responses -------------------------------------------------


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def ms_of(text: str) -> int:
    """An RFC 3339 UTC instant ('Z') to Unix milliseconds, exactly."""
    assert text.endswith("Z"), f"{text!r} is not UTC with 'Z'"
    moment = datetime.fromisoformat(text[:-1] + "+00:00")
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return (moment - epoch) // timedelta(milliseconds=1)


def iso(ms: int) -> str:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def toward_zero(net: int, step: int) -> int:
    """Settlement in minor units: the net truncated toward zero."""
    whole = abs(net) // step
    return whole if net >= 0 else -whole


def minor_text(amount_minor: int, digits: int) -> str:
    whole, fraction = divmod(amount_minor, 10**digits)
    return f"{whole}.{fraction:0{digits}d}" if digits else str(whole)


@dataclass(frozen=True)
class Item:
    operation_id: str
    direction: str
    counterparty: str
    points: int
    cash_micros: int

    def line(self) -> bytes:
        return f"{self.operation_id},{self.direction},{self.counterparty},{self.points},{self.cash_micros}\n".encode()


def items_hash(items: Iterable[Item]) -> str:
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda i: i.operation_id):
        digest.update(item.line())
    return digest.hexdigest()


@dataclass
class Book:
    """One cycle's operations as the test saw them: statement items per merchant and platform fees."""

    items: dict[str, list[Item]] = field(default_factory=lambda: defaultdict(list))
    fees: int = 0
    first_ms: int | None = None

    def conversion(self, conv: exchange_pb2.Conversion) -> None:
        src, dst = conv.source_merchant_id, conv.destination_merchant_id
        self.items[src].append(Item(conv.conversion_id, "out", dst, conv.src_points, conv.src_cash.micros))
        self.items[dst].append(Item(conv.conversion_id, "in", src, conv.dst_points, conv.dst_cash.micros))
        self.fees += conv.src_cash.micros - conv.dst_cash.micros
        self._seen(conv.created_at.ToMilliseconds())

    def reversal(self, conv: exchange_pb2.Conversion, reversal: operator_pb2.ReverseConversionResponse) -> None:
        src, dst, op_id = conv.source_merchant_id, conv.destination_merchant_id, reversal.reversal_operation_id
        self.items[src].append(Item(op_id, "in", dst, conv.src_points, conv.src_cash.micros))
        self.items[dst].append(Item(op_id, "out", src, conv.dst_points, conv.dst_cash.micros))
        self.fees -= conv.src_cash.micros - conv.dst_cash.micros
        self._seen(reversal.created_at.ToMilliseconds())

    def _seen(self, ms: int) -> None:
        self.first_ms = ms if self.first_ms is None else min(self.first_ms, ms)

    def payable(self, merchant: str) -> int:
        return sum(i.cash_micros for i in self.items.get(merchant, []) if i.direction == "out")

    def receivable(self, merchant: str) -> int:
        return sum(i.cash_micros for i in self.items.get(merchant, []) if i.direction == "in")

    def counterparties(self, merchant: str) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for item in self.items.get(merchant, []):
            pay, recv = out.get(item.counterparty, (0, 0))
            if item.direction == "out":
                out[item.counterparty] = (pay + item.cash_micros, recv)
            else:
                out[item.counterparty] = (pay, recv + item.cash_micros)
        return out

    def operation_ids(self) -> set[str]:
        return {i.operation_id for items in self.items.values() for i in items}


@dataclass(frozen=True)
class Row:
    opening_carry: int
    payable: int
    receivable: int
    fees: int
    net: int
    settlement_minor: int
    closing_carry: int


def expected_rows(book: Book, opening: dict[str, int], step: int) -> dict[str, Row]:
    """DESIGN §5, by hand: merchants with items or a carry, then the platform's row."""
    rows: dict[str, Row] = {}
    for m in sorted((set(book.items) | {m for m, c in opening.items() if c}) - {PLATFORM}):
        pay, recv, carry = book.payable(m), book.receivable(m), opening.get(m, 0)
        net = recv - pay + carry
        settle = toward_zero(net, step)
        rows[m] = Row(carry, pay, recv, 0, net, settle, net - settle * step)
    carry = opening.get(PLATFORM, 0)
    settle = -sum(r.settlement_minor for r in rows.values())
    rows[PLATFORM] = Row(carry, 0, 0, book.fees, book.fees + carry, settle, book.fees + carry - settle * step)
    return rows


def positions(cycle: operator_pb2.Cycle) -> dict[str, Row]:
    return {
        p.merchant_id: Row(
            p.opening_carry_micros, p.payable_micros, p.receivable_micros, p.fees_micros, p.net_micros,
            p.settlement_minor, p.closing_carry_micros,
        )
        for p in cycle.positions
    }  # fmt: skip


def assert_cycle(cycle: operator_pb2.Cycle, book: Book, opening: dict[str, int], step: int) -> dict[str, int]:
    """The cycle's rows are DESIGN §5's; returns the closing carries (the next cycle's opening)."""
    want = expected_rows(book, opening, step)
    got = positions(cycle)
    assert got == want, f"{cycle.cycle_id} positions:\n got  {got}\n want {want}"
    assert sum(r.net for r in got.values()) == 0
    assert sum(r.settlement_minor for r in got.values()) == 0
    for m, r in got.items():
        assert r.net == r.settlement_minor * step + r.closing_carry, m
        if m != PLATFORM:  # the platform's settlement is minus the merchants': its carry takes either sign
            assert abs(r.closing_carry) < step, f"{m}: carry {r.closing_carry} holds a whole minor unit"
            assert r.closing_carry == 0 or (r.closing_carry > 0) == (r.net > 0), f"{m}: rounded away from zero"
    assert cycle.operation_count == len(book.operation_ids())
    pairs = {(c.merchant_id, c.counterparty_id): (c.payable_micros, c.receivable_micros) for c in cycle.counterparties}
    assert pairs == {(m, cp): v for m in book.items for cp, v in book.counterparties(m).items()}
    return {m: r.closing_carry for m, r in got.items()}


# --- the network under test --------------------------------------------------------------------------


class Network:
    """Merchants on one hub, one person ("ann") linked at each, routes at FEE_BPS, a manual clock."""

    def __init__(self, running: RunningHub, clock: ManualClock) -> None:
        self.running = running
        self.clock = clock
        self.clients: dict[str, MerchantClient] = {}
        self.values: dict[str, int] = {}
        self._linked_from: str | None = None

    def merchant(
        self, merchant_id: str, value_micros: int, *, currency: str = "CNY", issued: int = 0
    ) -> MerchantClient:
        client, _key = self.running.admit(merchant_id, currency=currency, value_micros=value_micros, cap_micros=BIG_CAP)
        self.clients[merchant_id] = client
        self.values[merchant_id] = value_micros
        client.enroll_member(self.ref(merchant_id))
        if issued:
            client.issue_points(self.ref(merchant_id), issued)
        return client

    @staticmethod
    def ref(merchant_id: str) -> str:
        return f"ann-{merchant_id}"

    def link(self, first: str, *others: str) -> None:
        for other in others:
            code = self.clients[first].create_link_code(self.ref(first)).code
            self.clients[other].redeem_link_code(self.ref(other), code)

    def route(self, source: str, destination: str, fee_bps: int = FEE_BPS) -> None:
        self.clients[source].set_route(destination, "outbound")
        self.clients[destination].set_route(source, "inbound")
        with self.running.operator() as op:
            op.set_route_terms(source, destination, fee_bps=fee_bps)

    def convert(
        self, book: Book, source: str, destination: str, points: int, *, at_ms: int | None = None
    ) -> exchange_pb2.Conversion:
        """Convert ann's points TICK_MS after the last operation (or at `at_ms`), checked against DESIGN §1."""
        self.clock.advance(TICK_MS if at_ms is None else at_ms - self.clock.now_ms())
        conv = self.clients[source].convert(self.ref(source), destination, points)
        # DESIGN §1 by hand, so the book below rests on figures checked here.
        src_cash = points * self.values[source]
        fee = -(-src_cash * conv.fee_bps // 10_000)
        dst_points = (src_cash - fee) // self.values[destination]
        assert (conv.src_cash.micros, conv.fee.micros, conv.dst_points) == (src_cash, fee, dst_points)
        assert conv.dst_cash.micros == dst_points * self.values[destination]
        assert conv.platform.micros == src_cash - conv.dst_cash.micros
        assert conv.created_at.ToMilliseconds() == self.clock.now_ms() == (at_ms or self.clock.now_ms())
        book.conversion(conv)
        return conv

    def reverse(self, book: Book, conv: exchange_pb2.Conversion) -> operator_pb2.ReverseConversionResponse:
        self.clock.advance(TICK_MS)
        with self.running.operator() as op:
            reversal = op.reverse_conversion(conv.conversion_id, reason="test reversal")
        book.reversal(conv, reversal)
        return reversal

    def close_cycle(self, currency: str, cutoff_ms: int | None = None) -> operator_pb2.Cycle:
        with self.running.operator() as op:
            return op.close_cycle(currency, cutoff_ms)

    def get_cycle(self, cycle_id: str) -> operator_pb2.Cycle:
        with self.running.operator() as op:
            return op.get_cycle(cycle_id)

    def hub_keys(self) -> dict[str, bytes]:
        info = next(iter(self.clients.values())).get_network_info()
        return {k.key_id: bytes(k.public_key) for k in info.hub_keys}

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


@contextmanager
def network_on(tmp_path: Path, database_url: str | None) -> Iterator[Network]:
    clock = ManualClock(wall_ms())
    running = RunningHub(
        tmp_path, database_url, clock=clock, config_overrides={"auth_window_s": 3600, "event_poll_s": 0.05}
    )
    net = Network(running, clock)
    try:
        yield net
        net.close()
        check_invariants(running.hub.engine)
    finally:
        net.close()
        running.stop()


@pytest.fixture
def net(tmp_path: Path, database_url: str | None) -> Iterator[Network]:
    with network_on(tmp_path, database_url) as network:
        yield network


@contextmanager
def refused(cls: type[errors.PointsxError], code: grpc.StatusCode, reason: str) -> Iterator[None]:
    with pytest.raises(errors.PointsxError) as info:
        yield
    error = info.value
    assert type(error) is cls, f"expected {cls.__name__}, got {type(error).__name__}: {error}"
    assert (error.code, error.reason) == (code, reason), f"{error.code} {error.reason}: {error}"


# --- statements, checked as a merchant would -----------------------------------------------------------


def check_statement(
    net: Network,
    merchant_id: str,
    cycle: operator_pb2.Cycle,
    book: Book,
    previous_json: bytes | None,
) -> clearing_pb2.StatementEnvelope:
    """Signature, items, canonical bytes, every DESIGN §5 key and figure, and the chain link."""
    client = net.clients[merchant_id]
    envelope = client.get_statement(cycle.cycle_id)
    items = list(client.iter_statement_items(cycle.cycle_id, page_size=2))  # pages of 2: paging is exercised
    hub_keys = net.hub_keys()
    verified = verify_statement(envelope, hub_keys, items)
    assert verified.items_checked and verified.cycle_id == cycle.cycle_id
    assert envelope.key_id == hashlib.sha256(hub_keys[envelope.key_id]).hexdigest()[:16]
    assert hub_keys[envelope.key_id] == net.running.hub.hub_public_key
    assert len(envelope.signature) == 64

    raw = bytes(envelope.statement_json)
    fields = json.loads(raw)
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert canonical == raw, "statement_json is not canonical JSON"
    assert set(fields) >= STATEMENT_KEYS, f"missing keys {STATEMENT_KEYS - set(fields)}"

    listed = [Item(i.operation_id, i.direction, i.counterparty, i.points, i.cash_micros) for i in items]
    assert [i.operation_id for i in listed] == sorted(i.operation_id for i in listed), "items not in id order"
    assert sorted(listed, key=lambda i: i.operation_id) == sorted(
        book.items.get(merchant_id, []), key=lambda i: i.operation_id
    )
    assert fields["items_sha256"] == items_hash(listed)
    assert int(fields["item_count"]) == len(listed)

    row = positions(cycle)[merchant_id]
    step = 10 ** (6 - cycle.minor_units)
    for key in AMOUNT_KEYS:
        assert isinstance(fields[key], str) and fields[key].lstrip("-").isdigit(), f"{key}: {fields[key]!r}"
    figures = {key: int(fields[key]) for key in AMOUNT_KEYS}
    assert figures == {
        "opening_carry": row.opening_carry, "payable": row.payable, "receivable": row.receivable, "net": row.net,
        "settlement_minor": row.settlement_minor, "closing_carry": row.closing_carry,
    }  # fmt: skip
    if "settlement" in fields:
        assert int(fields["settlement"]) == row.settlement_minor * step
    assert fields["counterparties"] == {
        cp: {"payable": str(p), "receivable": str(r)} for cp, (p, r) in book.counterparties(merchant_id).items()
    }
    assert (fields["network"], fields["cycle_id"], fields["currency"], fields["merchant"]) == (
        net.running.config.network_name, cycle.cycle_id, cycle.currency, merchant_id,
    )  # fmt: skip
    assert ms_of(fields["period_start"]) == cycle.period_start.ToMilliseconds()
    assert ms_of(fields["cutoff"]) == cycle.cutoff.ToMilliseconds()
    assert fields["hub_key_id"] == envelope.key_id
    want_previous = "" if previous_json is None else hashlib.sha256(previous_json).hexdigest()
    assert fields["previous_sha256"] == want_previous, f"{merchant_id}: chain broken"
    return envelope


def openssl_verify(
    tmp_path: Path, public_key: bytes, message: bytes, signature: bytes
) -> subprocess.CompletedProcess[str]:
    pem = Ed25519PublicKey.from_public_bytes(public_key).public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "pub.pem").write_bytes(pem)
    (tmp_path / "msg.bin").write_bytes(message)
    (tmp_path / "sig.bin").write_bytes(signature)
    return subprocess.run(
        ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(tmp_path / "pub.pem"), "-rawin",
         "-in", str(tmp_path / "msg.bin"), "-sigfile", str(tmp_path / "sig.bin")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def first_statement_ready(client: MerchantClient, timeout_s: float = 10.0) -> exchange_pb2.Event:
    """The first STATEMENT_READY on the merchant's stream from the beginning ("0.0"), bounded wait."""
    arrived: queue.Queue[exchange_pb2.Event | BaseException] = queue.Queue()
    stream = client.events(cursor="0.0")

    def drain() -> None:
        try:
            for event in stream:
                arrived.put(event)
        except BaseException as exc:  # handed to the test thread
            arrived.put(exc)

    thread = threading.Thread(target=drain, name="statement-events", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                got = arrived.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no STATEMENT_READY for {client.merchant_id} within {timeout_s} s") from None
            if isinstance(got, BaseException):
                raise AssertionError(f"the event stream failed: {got!r}") from got
            if got.type == STATEMENT_READY:
                return got
    finally:
        stream.close()
        thread.join(5)


def cash_balances(engine: Engine, currency: str) -> dict[str, int]:
    """Balances of the currency's cash accounts from the postings: merchant clearing, platform, settlement."""
    balances = account_balances(engine)
    out: dict[str, int] = {}
    with engine.connect() as conn:
        for account_id, kind, merchant_id in conn.execute(
            select(accounts.c.account_id, accounts.c.kind, accounts.c.merchant_id).where(
                accounts.c.asset == f"cash:{currency}"
            )
        ):
            out[merchant_id if kind == "clearing" else kind] = balances.get(int(account_id), 0)
    return out


# --- one cycle, looked at from every side ----------------------------------------------------------------


def test_cycle_figures_statements_and_what_merchants_do_with_them(net: Network, tmp_path: Path) -> None:
    # Point values that leave sub-fen amounts: 10,007 and 3,333 micros a point, 250 bps.
    net.merchant("alpha", 10_007, issued=100_000)
    net.merchant("beta", 30_000, issued=10_000)
    net.merchant("gamma", 3_333, issued=10_000)
    net.merchant("delta", 10_000)  # admitted, never trades: has no statement
    net.link("alpha", "beta", "gamma", "delta")
    for source, destination in (("alpha", "beta"), ("alpha", "gamma"), ("beta", "alpha"), ("gamma", "beta")):
        net.route(source, destination)

    book = Book()
    net.convert(book, "alpha", "beta", 1_234)
    net.convert(book, "alpha", "gamma", 500)
    b_to_a = net.convert(book, "beta", "alpha", 100)
    g_to_b = net.convert(book, "gamma", "beta", 999)
    undone = net.convert(book, "alpha", "gamma", 77)
    net.reverse(book, undone)
    net.clock.advance(1_000)
    cutoff = net.clock.now_ms()
    cycle = net.close_cycle("CNY", cutoff)

    assert cycle.cycle_id.startswith("CNY-") and cycle.currency == "CNY" and cycle.minor_units == 2
    assert cycle.status == CLOSED and cycle.cutoff.ToMilliseconds() == cutoff
    assert cycle.period_start.ToMilliseconds() == book.first_ms  # the first cycle starts at its first operation
    carries = assert_cycle(cycle, book, {}, CNY_STEP)
    rows = positions(cycle)
    assert set(rows) == {"alpha", "beta", "gamma", PLATFORM}
    assert rows[PLATFORM].fees == book.fees > 0
    # Rounding toward zero, both signs, with a sub-fen rest carried.
    assert any(r.net < 0 and r.net % CNY_STEP for m, r in rows.items() if m != PLATFORM), rows
    assert any(r.net > 0 and r.net % CNY_STEP for m, r in rows.items() if m != PLATFORM), rows
    # By hand: alpha pays 12,348,638 + 5,003,500 + 770,539 (1,234, 500 and 77 points at 10,007), is paid back
    # 770,539 by the reversal and receives 2,922,044 (beta's 3,000,000 less 75,000 fee: 292 points at 10,007):
    # -14,430,094 micros, settled -1,443 fen toward zero, -94 carried. gamma: 4,876,179 in, 3,329,667 out.
    assert rows["alpha"].net == -14_430_094 and rows["alpha"].settlement_minor == -1_443
    assert carries["alpha"] == -94
    assert rows["gamma"].net == 1_546_512 and (rows["gamma"].settlement_minor, carries["gamma"]) == (154, 6_512)
    assert net.get_cycle(cycle.cycle_id) == cycle

    # Statements: verified, items hashed here, canonical, complete; each merchant's first has no previous.
    envelopes = {m: check_statement(net, m, cycle, book, None) for m in ("alpha", "beta", "gamma")}
    summaries = net.clients["gamma"].list_statements_page().statements
    assert [(s.cycle_id, s.net.micros, s.settlement_minor, s.acknowledged) for s in summaries] == [
        (cycle.cycle_id, rows["gamma"].net, rows["gamma"].settlement_minor, False)
    ]
    event = first_statement_ready(net.clients["alpha"])
    assert (event.cycle_id, event.merchant_id) == (cycle.cycle_id, "alpha")

    # Anyone can check the signature with stock tools: openssl over the raw 32-byte hub key.
    alpha = envelopes["alpha"]
    hub_key = net.hub_keys()[alpha.key_id]
    message = SIGNING_PREFIX + bytes(alpha.statement_json)
    ok = openssl_verify(tmp_path, hub_key, message, bytes(alpha.signature))
    assert ok.returncode == 0 and "Signature Verified Successfully" in ok.stdout, ok.stdout + ok.stderr
    tampered = bytearray(message)
    tampered[len(SIGNING_PREFIX) + 10] ^= 0x01
    bad = openssl_verify(tmp_path, hub_key, bytes(tampered), bytes(alpha.signature))
    assert bad.returncode != 0 and "Signature Verified Successfully" not in bad.stdout
    forged = clearing_pb2.StatementEnvelope(statement_json=bytes(tampered[len(SIGNING_PREFIX) :]),
                                            signature=alpha.signature, key_id=alpha.key_id)  # fmt: skip
    with pytest.raises(StatementVerificationError):
        verify_statement(forged, net.hub_keys())

    # Acknowledgement: stored, the first one stands; a signature over other bytes is refused.
    ack = net.clients["alpha"].acknowledge_statement(cycle.cycle_id, bytes(alpha.statement_json))
    assert (ack.cycle_id, ack.merchant_id, ack.key_id) == (cycle.cycle_id, "alpha", net.clients["alpha"].key_id)
    again = net.clients["alpha"].acknowledge_statement(cycle.cycle_id, bytes(alpha.statement_json))
    assert again.acknowledged_at == ack.acknowledged_at
    with refused(errors.BadStatementSignature, INVALID_ARGUMENT, "BAD_STATEMENT_SIGNATURE"):
        net.clients["beta"].acknowledge_statement(cycle.cycle_id, bytes(envelopes["beta"].statement_json) + b" ")
    stored = net.get_cycle(cycle.cycle_id)
    assert {p.merchant_id: p.acknowledged for p in stored.positions if p.merchant_id != PLATFORM} == {
        "alpha": True, "beta": False, "gamma": False,
    }  # fmt: skip
    assert net.clients["alpha"].list_statements_page().statements[0].acknowledged

    # Disputes: one item, counted; an operation gamma is no party to, and a second dispute, refused. (Its own
    # outbound conversion: disputing an inbound one trips the bug test_every_item_of_a_statement_can_be_disputed
    # shows.)
    dispute = net.clients["gamma"].dispute_item(cycle.cycle_id, g_to_b.conversion_id, "member says never asked")
    assert (dispute.cycle_id, dispute.merchant_id, dispute.operation_id) == (
        cycle.cycle_id, "gamma", g_to_b.conversion_id,
    )  # fmt: skip
    assert dispute.status == clearing_pb2.DISPUTE_STATUS_OPEN
    with refused(errors.ItemNotInStatement, NOT_FOUND, "ITEM_NOT_IN_STATEMENT"):
        net.clients["gamma"].dispute_item(cycle.cycle_id, b_to_a.conversion_id, "not ours")
    with refused(errors.DisputeExists, ALREADY_EXISTS, "DISPUTE_EXISTS"):
        net.clients["gamma"].dispute_item(cycle.cycle_id, g_to_b.conversion_id, "again")
    stored = net.get_cycle(cycle.cycle_id)
    assert {p.merchant_id: p.open_disputes for p in stored.positions} == {
        "alpha": 0, "beta": 0, "gamma": 1, PLATFORM: 0,
    }  # fmt: skip
    assert [(d.merchant_id, d.operation_id) for d in stored.disputes] == [("gamma", g_to_b.conversion_id)]
    assert net.clients["gamma"].list_statements_page().statements[0].open_disputes == 1
    assert positions(stored) == rows, "acknowledging and disputing changed a closed cycle's figures"

    # Another merchant's statement: refused for naming it, absent for a merchant without one.
    snoop = SignedTransport(net.running.target, net.clients["alpha"].signer)
    try:
        for method, request, response in (
            ("GetStatement", clearing_pb2.GetStatementRequest(merchant_id="beta", cycle_id=cycle.cycle_id),
             clearing_pb2.StatementEnvelope),
            ("ListStatementItems", clearing_pb2.ListStatementItemsRequest(merchant_id="beta", cycle_id=cycle.cycle_id),
             clearing_pb2.ListStatementItemsResponse),
            ("ListStatements", clearing_pb2.ListStatementsRequest(merchant_id="beta"),
             clearing_pb2.ListStatementsResponse),
        ):  # fmt: skip
            with refused(errors.CrossMerchantAccess, PERMISSION_DENIED, "CROSS_MERCHANT_ACCESS"):
                snoop.call(f"/pointsx.v1.ClearingService/{method}", request, response)
        with refused(errors.CrossMerchantAccess, PERMISSION_DENIED, "CROSS_MERCHANT_ACCESS"):
            snoop.call(
                "/pointsx.v1.ClearingService/DisputeItem",
                clearing_pb2.DisputeItemRequest(request_id=str(uuid.uuid4()), merchant_id="beta",
                                                cycle_id=cycle.cycle_id, operation_id=b_to_a.conversion_id,
                                                reason="not mine to dispute"),
                clearing_pb2.Dispute,
            )  # fmt: skip
    finally:
        snoop.close()
    with refused(errors.StatementNotFound, NOT_FOUND, "STATEMENT_NOT_FOUND"):
        net.clients["delta"].get_statement(cycle.cycle_id)
    with refused(errors.StatementNotFound, NOT_FOUND, "STATEMENT_NOT_FOUND"):
        net.clients["alpha"].get_statement("CNY-19700101T000000Z")

    # Settlement: each clearing account is discharged down to its carry; the settlement account nets to zero.
    before = cash_balances(net.running.hub.engine, "CNY")
    assert {m: before[m] for m in ("alpha", "beta", "gamma")} == {m: rows[m].net for m in ("alpha", "beta", "gamma")}
    assert before[PLATFORM] == rows[PLATFORM].net
    with net.running.operator() as op:
        request_id = str(uuid.uuid4())
        settled = op.mark_settled(cycle.cycle_id, "BANK-REF-0001", request_id=request_id)
        assert op.mark_settled(cycle.cycle_id, "BANK-REF-0001", request_id=request_id) == settled  # a retry
        assert settled.status == SETTLED and settled.bank_reference == "BANK-REF-0001"
        assert settled.settled_at.ToMilliseconds() == net.clock.now_ms()
        assert positions(settled) == rows
        with refused(errors.CycleAlreadySettled, FAILED_PRECONDITION, "CYCLE_ALREADY_SETTLED"):
            op.mark_settled(cycle.cycle_id, "BANK-REF-0002")
        assert op.get_cycle(cycle.cycle_id).bank_reference == "BANK-REF-0001"
    after = cash_balances(net.running.hub.engine, "CNY")
    assert {m: after[m] for m in ("alpha", "beta", "gamma", PLATFORM)} == carries
    assert after["settlement"] == 0
    with net.running.hub.engine.connect() as conn:
        settlement_ops = conn.execute(select(operations.c.operation_seq).where(operations.c.kind == "settlement")).all()
        assert len(settlement_ops) == 1
        legs = conn.execute(
            select(postings.c.amount).where(postings.c.operation_seq == settlement_ops[0].operation_seq)
        ).scalars()
        assert sorted(legs) == sorted(abs(r.settlement_minor) * CNY_STEP for r in rows.values() if r.settlement_minor)


# --- disputes find every item of the statement -----------------------------------------------------------


def test_every_item_of_a_statement_can_be_disputed(net: Network) -> None:
    net.merchant("alpha", 10_000, issued=10_000)
    net.merchant("beta", 10_000, issued=10_000)
    net.link("alpha", "beta")
    net.route("alpha", "beta")
    net.route("beta", "alpha")
    book = Book()
    net.convert(book, "alpha", "beta", 100)  # beta: in
    net.convert(book, "beta", "alpha", 50)  # beta: out, a later operation id
    net.clock.advance(1_000)
    cycle = net.close_cycle("CNY", net.clock.now_ms())
    items = list(net.clients["beta"].iter_statement_items(cycle.cycle_id))
    assert [i.direction for i in items] == ["in", "out"]
    for item in items:
        dispute = net.clients["beta"].dispute_item(cycle.cycle_id, item.operation_id, "checking every item")
        assert dispute.operation_id == item.operation_id


# --- carries and cutoffs over three cycles ---------------------------------------------------------------


def test_carries_cutoffs_and_the_statement_chain_over_three_cycles(net: Network) -> None:
    net.merchant("alpha", 10_007, issued=100_000)
    net.merchant("beta", 30_000, issued=10_000)
    net.merchant("gamma", 3_333, issued=10_000)
    net.link("alpha", "beta", "gamma")
    for source, destination in (("alpha", "beta"), ("alpha", "gamma"), ("beta", "alpha"), ("gamma", "beta")):
        net.route(source, destination)

    # Cycle 1, and two conversions on either side of its cutoff T1: at T1 - 1 (in) and at exactly T1 (next).
    books = [Book(), Book(), Book()]
    net.convert(books[0], "alpha", "beta", 1_234)
    first_a_to_g = net.convert(books[0], "alpha", "gamma", 501)
    net.convert(books[0], "gamma", "beta", 999)
    net.convert(books[0], "beta", "alpha", 333)
    t1 = net.clock.now_ms() + 2 * TICK_MS
    net.convert(books[0], "alpha", "gamma", 7, at_ms=t1 - 1)
    at_cutoff = net.convert(books[1], "gamma", "beta", 11, at_ms=t1)
    net.clock.advance(1_000)
    cycle1 = net.close_cycle("CNY", t1)
    assert cycle1.cutoff.ToMilliseconds() == t1 and cycle1.period_start.ToMilliseconds() == books[0].first_ms
    carries1 = assert_cycle(cycle1, books[0], {}, CNY_STEP)

    # Closing the same cutoff again finds the same cycle; earlier or future cutoffs are refused.
    assert net.close_cycle("CNY", t1) == cycle1
    with refused(errors.CutoffBeforeLastCycle, FAILED_PRECONDITION, "CUTOFF_BEFORE_LAST_CYCLE"):
        net.close_cycle("CNY", t1 - 1)
    with refused(errors.CutoffInFuture, INVALID_ARGUMENT, "CUTOFF_IN_FUTURE"):
        net.close_cycle("CNY", net.clock.now_ms() + 60_000)
    with net.running.operator() as op:
        assert [c.cycle_id for c in op.list_cycles("CNY").cycles] == [cycle1.cycle_id]

    # Cycle 2: new conversions and the reversal of a cycle-1 conversion, which lands here (finality).
    net.convert(books[1], "beta", "alpha", 120)
    net.convert(books[1], "alpha", "gamma", 4_321)
    net.reverse(books[1], first_a_to_g)
    net.convert(books[1], "alpha", "beta", 10)
    net.clock.advance(1_000)
    t2 = net.clock.now_ms()
    cycle2 = net.close_cycle("CNY", t2)
    assert cycle2.period_start.ToMilliseconds() == t1
    assert positions(net.get_cycle(cycle1.cycle_id)) == positions(cycle1), "a closed cycle changed"
    carries2 = assert_cycle(cycle2, books[1], carries1, CNY_STEP)

    # Cycle 3: gamma does nothing, but its carry still makes it a row and a statement. Cutoff: now.
    assert carries2["gamma"] != 0, "scenario premise: gamma carries a sub-fen rest into cycle 3"
    net.convert(books[2], "alpha", "beta", 1_001)
    net.convert(books[2], "beta", "alpha", 7)
    net.clock.advance(1_000)
    cycle3 = net.close_cycle("CNY")
    assert cycle3.cutoff.ToMilliseconds() == net.clock.now_ms() and cycle3.period_start.ToMilliseconds() == t2
    carries3 = assert_cycle(cycle3, books[2], carries2, CNY_STEP)
    gamma3 = positions(cycle3)["gamma"]
    assert (gamma3.payable, gamma3.receivable, gamma3.net) == (0, 0, carries2["gamma"])

    cycles = [cycle1, cycle2, cycle3]
    # Each operation in exactly one cycle, the one its time says.
    seen = {
        cycle.cycle_id: {
            i.operation_id
            for p in cycle.positions
            if p.merchant_id != PLATFORM
            for i in net.clients[p.merchant_id].iter_statement_items(cycle.cycle_id)
        }
        for cycle in cycles
    }
    assert [seen[c.cycle_id] for c in cycles] == [b.operation_ids() for b in books]
    assert at_cutoff.conversion_id in seen[cycle2.cycle_id]
    with net.running.hub.engine.connect() as conn:
        assigned = cycle_of_operations(conn)  # by the windows in the database, as the auditor reads them
    assert assigned == {int(op[3:]): c.cycle_id for c, b in zip(cycles, books, strict=True) for op in b.operation_ids()}

    # No micro lost: per party, what was settled plus what is still carried is everything it earned.
    for m in ("alpha", "beta", "gamma"):
        settled = sum(positions(c)[m].settlement_minor for c in cycles if m in positions(c))
        earned = sum(b.receivable(m) - b.payable(m) for b in books)
        assert settled * CNY_STEP + carries3[m] == earned, m
    settled = sum(positions(c)[PLATFORM].settlement_minor for c in cycles)
    assert settled * CNY_STEP + carries3[PLATFORM] == sum(b.fees for b in books)

    # Every statement verifies, and each merchant's statements chain by previous_sha256.
    for m in ("alpha", "beta", "gamma"):
        previous: bytes | None = None
        for cycle, book in zip(cycles, books, strict=True):
            envelope = check_statement(net, m, cycle, book, previous)
            previous = bytes(envelope.statement_json)
        listed = net.clients[m].list_statements_page(page_size=2)
        assert [s.cycle_id for s in listed.statements] == [cycle3.cycle_id, cycle2.cycle_id]
        rest = net.clients[m].list_statements_page(page_size=2, page_token=listed.next_page_token)
        assert [s.cycle_id for s in rest.statements] == [cycle1.cycle_id] and not rest.next_page_token
    gamma_fields = json.loads(net.clients["gamma"].get_statement(cycle3.cycle_id).statement_json)
    assert (gamma_fields["item_count"], gamma_fields["items_sha256"]) == (0, EMPTY_SHA256)


# --- the scheduler, and a currency without minor units ----------------------------------------------------


def test_scheduler_closes_one_cycle_per_currency_and_jpy_settles_in_whole_yen(net: Network) -> None:
    net.merchant("alpha", 10_007, issued=10_000)
    net.merchant("beta", 30_000)
    net.link("alpha", "beta")
    net.route("alpha", "beta")
    # JPY: 0.333333 and 1.7 yen a point, so nets fall between whole yen.
    net.merchant("kappa", 333_333, currency="JPY", issued=100_000)
    net.merchant("lambda", 1_700_000, currency="JPY", issued=10_000)
    net.link("kappa", "lambda")
    net.route("kappa", "lambda", fee_bps=100)
    net.route("lambda", "kappa", fee_bps=100)
    cny, jpy = Book(), Book()
    net.convert(cny, "alpha", "beta", 777)
    net.convert(jpy, "kappa", "lambda", 12_345)
    net.convert(jpy, "lambda", "kappa", 101)
    net.clock.advance(1_000)
    cutoff = net.clock.now_ms()

    first = runtime.close_all_for(net.running.hub)(cutoff)
    second = runtime.close_all_for(net.running.hub)(cutoff)
    assert first == second and len(first) == 2 and [c.split("-")[0] for c in first] == ["CNY", "JPY"]
    with net.running.operator() as op:
        listed = op.list_cycles().cycles
    assert sorted(c.cycle_id for c in listed) == sorted(first)
    by_currency = {c.currency: c for c in listed}
    assert_cycle(by_currency["CNY"], cny, {}, CNY_STEP)
    cycle = by_currency["JPY"]
    assert cycle.minor_units == 0 and cycle.cutoff.ToMilliseconds() == cutoff
    carries = assert_cycle(cycle, jpy, {}, JPY_STEP)
    rows = positions(cycle)
    assert any(r.net % JPY_STEP for m, r in rows.items() if m != PLATFORM), "scenario premise: sub-yen nets"
    assert all(abs(carries[m]) < JPY_STEP for m in ("kappa", "lambda"))
    for m in ("kappa", "lambda"):
        fields = json.loads(check_statement(net, m, cycle, jpy, None).statement_json)
        assert int(fields["settlement_minor"]) == rows[m].settlement_minor == toward_zero(rows[m].net, JPY_STEP)


# --- merchant order must not depend on the database's collation (PostgreSQL) --------------------------------


@pytest.fixture
def icu_database() -> Iterator[str]:
    """A fresh PostgreSQL database whose default collation is ICU English, as many installations are."""
    if "postgres" not in BACKENDS:
        pytest.skip("PostgreSQL deselected by POINTSX_TEST_BACKENDS")
    name = f"pointsx_icu_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(harness.PG_ADMIN_DSN, autocommit=True) as admin:
        try:
            admin.execute(
                f"CREATE DATABASE \"{name}\" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
            )
        except psycopg.Error as exc:  # a server without ICU (or before PostgreSQL 15) cannot show this
            pytest.skip(f"cannot create an ICU-collated database here: {exc}")
    try:
        url = harness._url(name)
        migrate.upgrade(url)
        yield url
    finally:
        harness.drop_postgres_database(name)


def test_merchant_ids_that_collate_differently_still_clear(tmp_path: Path, icu_database: str) -> None:
    with network_on(tmp_path, icu_database) as net:
        net.merchant("shop0", 10_000, issued=10_000)
        net.merchant("shop_a", 10_007, issued=10_000)
        net.link("shop0", "shop_a")
        net.route("shop0", "shop_a")
        net.route("shop_a", "shop0")
        book = Book()
        net.convert(book, "shop0", "shop_a", 100)
        net.convert(book, "shop_a", "shop0", 33)
        net.clock.advance(1_000)
        cycle = net.close_cycle("CNY", net.clock.now_ms())
        assert_cycle(cycle, book, {}, CNY_STEP)
        for m in ("shop0", "shop_a"):
            check_statement(net, m, cycle, book, None)


# --- the operator's command line against a served hub ---------------------------------------------------------


def minor_of(text: str, digits: int) -> int:
    """Decimal text ("123.45") to integer minor units, without floats."""
    whole, _, fraction = text.partition(".")
    assert len(fraction) == digits, text
    return int(whole + fraction)


@pytest.mark.timeout(120)
def test_clearing_command_line_close_list_show_export_settle(tmp_path: Path, database_url: str | None) -> None:
    data = tmp_path / "data"
    run("init", "--data-dir", str(data))
    config = (data / "config.toml").read_text()
    assert 'iban = ""' in config and 'bic = ""' in config
    (data / "config.toml").write_text(
        config.replace('iban = ""', f'iban = "{DEBTOR_IBAN}"', 1).replace('bic = ""', f'bic = "{DEBTOR_BIC}"', 1)
    )
    target = f"127.0.0.1:{free_port()}"
    serve = ["serve", "--data-dir", str(data), "--listen", target]
    if database_url:
        serve += ["--database-url", database_url]
    proc = subprocess.Popen([*POINTSX, *serve], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    clients: list[MerchantClient] = []
    try:
        wait_serving(target)
        hub = ["--data-dir", str(data), "--hub", target, "--json"]
        operator_key = load_key(data / "operator.key")
        keys: dict[str, Ed25519PrivateKey] = {}
        with OperatorClient(target, operator_key) as op:
            for merchant_id, value in (("alpha", 10_007), ("beta", 30_000), ("gamma", 3_333)):
                keys[merchant_id] = Ed25519PrivateKey.generate()
                op.register_merchant(merchant_id, merchant_id.title(), "CNY", value,
                                     public_key_bytes(keys[merchant_id].public_key()),
                                     net_debit_cap_micros=BIG_CAP, bank=BANKS[merchant_id])  # fmt: skip
        a, b, g = (MerchantClient(target, m, keys[m]) for m in ("alpha", "beta", "gamma"))
        clients += [a, b, g]
        for client, issued in ((a, 100_000), (b, 10_000), (g, 0)):
            client.enroll_member(f"ann-{client.merchant_id}")
            if issued:
                client.issue_points(f"ann-{client.merchant_id}", issued)
        for other in (b, g):
            other.redeem_link_code(f"ann-{other.merchant_id}", a.create_link_code("ann-alpha").code)
        for source, destination in ((a, b), (a, g), (b, a)):
            source.set_route(destination.merchant_id, "outbound")
            destination.set_route(source.merchant_id, "inbound")
        book = Book()
        for source, destination, points in ((a, b, 1_234), (a, g, 500), (b, a, 100)):
            book.conversion(source.convert(f"ann-{source.merchant_id}", destination.merchant_id, points))
        time.sleep(0.05)
        cutoff_ms = wall_ms() - 10  # after every conversion, before now at the hub

        closed = json.loads(run("clearing", "close", *hub, "--currency", "CNY", "--cutoff", iso(cutoff_ms)).stdout)
        cycle = json_format.ParseDict(closed, operator_pb2.Cycle())
        assert cycle.cutoff.ToMilliseconds() == cutoff_ms and cycle.status == CLOSED
        rows = positions(cycle)
        assert_cycle(cycle, book, {}, CNY_STEP)
        again = json.loads(run("clearing", "close", *hub, "--currency", "CNY", "--cutoff", iso(cutoff_ms)).stdout)
        assert again == closed
        earlier = run("clearing", "close", *hub, "--currency", "CNY", "--cutoff", iso(cutoff_ms - 1), check=False)
        assert earlier.returncode == 1 and "CUTOFF_BEFORE_LAST_CYCLE" in earlier.stderr

        listed = json.loads(run("clearing", "list", *hub).stdout)
        assert [c["cycle_id"] for c in listed] == [cycle.cycle_id]
        shown = json.loads(run("clearing", "show", *hub, cycle.cycle_id).stdout)
        assert shown == closed

        # CSV: one row per non-zero merchant settlement, then the pay and collect totals.
        out_csv = tmp_path / "cycle.csv"
        run("clearing", "export", *hub, cycle.cycle_id, "--format", "csv", "--out", str(out_csv))
        table = list(csv.reader(io.StringIO(out_csv.read_text())))
        assert table[0] == ["cycle_id", "merchant_id", "direction", "amount", "currency", "account_name", "iban", "bic"]
        body, totals = table[1:-2], table[-2:]
        want = {m: r.settlement_minor for m, r in rows.items() if m != PLATFORM and r.settlement_minor}
        assert {r[1]: (1 if r[2] == "pay" else -1) * minor_of(r[3], 2) for r in body} == want
        for r in body:
            assert (r[0], r[4], r[6]) == (cycle.cycle_id, "CNY", BANKS[r[1]].iban)
        assert [t[:3] for t in totals] == [["TOTAL", "", "pay"], ["TOTAL", "", "collect"]]
        pay, collect = minor_of(totals[0][3], 2), minor_of(totals[1][3], 2)
        assert pay == sum(v for v in want.values() if v > 0) and collect == -sum(v for v in want.values() if v < 0)
        assert pay - collect == -rows[PLATFORM].settlement_minor

        # pain.001: the network's payables as credit transfers; NbOfTxs and CtrlSum agree with them.
        out_xml = tmp_path / "cycle.xml"
        run("clearing", "export", *hub, cycle.cycle_id, "--format", "pain001", "--out", str(out_xml))
        ns = {"p": "urn:iso:std:iso:20022:tech:xsd:pain.001.001.09"}
        root = ET.fromstring(out_xml.read_bytes())
        payees = {m: v for m, v in want.items() if v > 0}
        assert payees, "scenario premise: the network pays someone"
        assert root.findtext("p:CstmrCdtTrfInitn/p:GrpHdr/p:NbOfTxs", namespaces=ns) == str(len(payees))
        assert root.findtext("p:CstmrCdtTrfInitn/p:GrpHdr/p:CtrlSum", namespaces=ns) == minor_text(
            sum(payees.values()), 2
        )
        payment = root.find("p:CstmrCdtTrfInitn/p:PmtInf", ns)
        assert payment is not None
        assert payment.findtext("p:DbtrAcct/p:Id/p:IBAN", namespaces=ns) == DEBTOR_IBAN
        assert payment.findtext("p:NbOfTxs", namespaces=ns) == str(len(payees))
        transfers: dict[str, int] = {}
        for tx in payment.findall("p:CdtTrfTxInf", ns):
            amount = tx.find("p:Amt/p:InstdAmt", ns)
            assert amount is not None and amount.get("Ccy") == "CNY" and amount.text is not None
            iban = tx.findtext("p:CdtrAcct/p:Id/p:IBAN", namespaces=ns)
            merchant = next(m for m, bank in BANKS.items() if bank.iban == iban)
            transfers[merchant] = minor_of(amount.text, 2)
        assert transfers == payees

        settled = json.loads(run("clearing", "settle", *hub, cycle.cycle_id, "--bank-reference", "SEPA-42").stdout)
        assert (settled["status"], settled["bank_reference"]) == ("CYCLE_STATUS_SETTLED", "SEPA-42")
        twice = run("clearing", "settle", *hub, cycle.cycle_id, "--bank-reference", "SEPA-43", check=False)
        assert twice.returncode == 1 and "CYCLE_ALREADY_SETTLED" in twice.stderr
    finally:
        for client in clients:
            client.close()
        proc.terminate()
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    assert proc.returncode == 0, output
    engine = make_engine(database_url or sqlite_url(data / "pointsx.db"))
    try:
        check_invariants(engine)
    finally:
        engine.dispose()
