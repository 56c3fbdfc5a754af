"""Property tests of clearing's arithmetic and statement bytes (DESIGN §1 settlement rounding, §5).

Oracles are independent of `clearing`: settlement by Decimal quantisation toward zero, conservation
summed here over chains of cycles, item lines and hashes written out by hand, and the SQL that
builds item lines compared byte for byte with the Python that does (SQLite, and PostgreSQL unless
deselected).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import replace
from decimal import ROUND_DOWN, Decimal

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import BigInteger, Engine, String, create_engine, literal, select

from clearing import items as items_mod
from clearing import netting
from clearing.statement import StatementFacts, StatementItem, items_sha256, sign, statement_json
from exchange.domain.units import MINOR_UNITS, format_operation_id
from merchant_sdk._pb.pointsx.v1 import clearing_pb2
from merchant_sdk.signing import key_id_of, public_key_bytes
from merchant_sdk.statements import items_sha256 as sdk_items_sha256
from merchant_sdk.statements import verify_statement
from tests import harness
from tests.conftest import BACKENDS

CURRENCIES = sorted(MINOR_UNITS)
MAX_MICROS = 10**15
MERCHANTS = ["m0", "m1", "m2", "m3"]


def step_of(currency: str) -> int:
    return int(10 ** (6 - MINOR_UNITS[currency]))


# --- settlement rounding ---------------------------------------------------------------------------


@given(st.integers(min_value=-MAX_MICROS, max_value=MAX_MICROS), st.sampled_from(CURRENCIES))
def test_settlement_truncates_toward_zero_and_carries_the_rest(net: int, currency: str) -> None:
    minor, carry = netting.settle_toward_zero(net, currency)
    digits = MINOR_UNITS[currency]
    want = (Decimal(net) / 10**6).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_DOWN)
    assert Decimal(minor).scaleb(-digits) == want
    assert minor * step_of(currency) + carry == net
    assert abs(carry) < step_of(currency)
    assert carry == 0 or (carry > 0) == (net > 0)


# --- nets, settlements and carries over chains of cycles ---------------------------------------------

Conversion = tuple[int, int, int, int]  # source index, destination index, src_cash, dst_cash


@st.composite
def conversion(draw: st.DrawFn) -> Conversion:
    src, dst = draw(st.lists(st.sampled_from(range(len(MERCHANTS))), min_size=2, max_size=2, unique=True))
    src_cash = draw(st.integers(min_value=1, max_value=10**12))
    dst_cash = draw(st.integers(min_value=0, max_value=src_cash))
    return src, dst, src_cash, dst_cash


@settings(max_examples=200)
@given(st.sampled_from(CURRENCIES), st.lists(st.lists(conversion(), max_size=8), min_size=1, max_size=5))
def test_cycles_net_and_settle_to_zero_and_no_micro_is_lost(currency: str, cycles: list[list[Conversion]]) -> None:
    step = step_of(currency)
    carries: dict[str, int] = {}
    settled: dict[str, int] = {}
    earned: dict[str, int] = {}
    for cycle in cycles:
        pay = dict.fromkeys(MERCHANTS, 0)
        recv = dict.fromkeys(MERCHANTS, 0)
        fees = 0
        for src, dst, src_cash, dst_cash in cycle:
            pay[MERCHANTS[src]] += src_cash
            recv[MERCHANTS[dst]] += dst_cash
            fees += src_cash - dst_cash
        active = [m for m in MERCHANTS if pay[m] or recv[m] or carries.get(m, 0)]
        rows = netting.net_cycle(
            currency,
            [netting.PositionInput(m, carries.get(m, 0), pay[m], recv[m]) for m in active],
            fees,
            carries.get(netting.PLATFORM, 0),
        )
        assert [r.merchant_id for r in rows] == [*active, netting.PLATFORM]
        assert sum(r.net for r in rows) == 0 and sum(r.settlement_minor for r in rows) == 0
        for r in rows:
            assert r.opening_carry == carries.get(r.merchant_id, 0)
            assert r.net == r.settlement_minor * step + r.closing_carry
            if r.merchant_id != netting.PLATFORM:
                assert (r.payable, r.receivable, r.fees) == (pay[r.merchant_id], recv[r.merchant_id], 0)
                assert r.net == r.receivable - r.payable + r.opening_carry
                whole = abs(r.net) // step
                assert r.settlement_minor == (whole if r.net >= 0 else -whole)  # toward zero
                assert abs(r.closing_carry) < step
                assert r.closing_carry == 0 or (r.closing_carry > 0) == (r.net > 0)
        platform = rows[-1]
        assert (platform.fees, platform.net) == (fees, fees + platform.opening_carry)
        assert platform.closing_carry == -sum(r.closing_carry for r in rows[:-1])
        carries = {r.merchant_id: r.closing_carry for r in rows}
        for r in rows:
            settled[r.merchant_id] = settled.get(r.merchant_id, 0) + r.settlement_minor
        for m in MERCHANTS:
            earned[m] = earned.get(m, 0) + recv[m] - pay[m]
        earned[netting.PLATFORM] = earned.get(netting.PLATFORM, 0) + fees
    for party, total in earned.items():
        assert settled.get(party, 0) * step + carries.get(party, 0) == total, party


# --- statement items and bytes -------------------------------------------------------------------------


@st.composite
def statement_items(draw: st.DrawFn) -> list[StatementItem]:
    seqs = draw(st.lists(st.integers(min_value=1, max_value=10**15), max_size=12, unique=True))
    return [
        StatementItem(
            format_operation_id(seq),
            draw(st.sampled_from(["out", "in"])),
            draw(st.sampled_from(MERCHANTS)),
            draw(st.integers(min_value=1, max_value=10**12)),
            draw(st.integers(min_value=0, max_value=MAX_MICROS)),
        )
        for seq in seqs
    ]


@given(statement_items(), st.randoms())
def test_items_hash_is_the_sorted_lines_whatever_the_order(items: list[StatementItem], rnd: random.Random) -> None:
    by_hand = hashlib.sha256(
        "".join(
            f"{i.operation_id},{i.direction},{i.counterparty},{i.points},{i.cash_micros}\n"
            for i in sorted(items, key=lambda i: int(i.operation_id[3:]))
        ).encode()
    ).hexdigest()
    shuffled = list(items)
    rnd.shuffle(shuffled)
    wire = [
        clearing_pb2.StatementItem(operation_id=i.operation_id, direction=i.direction, counterparty=i.counterparty,
                                   points=i.points, cash_micros=i.cash_micros)
        for i in shuffled
    ]  # fmt: skip
    assert items_sha256(shuffled) == sdk_items_sha256(wire) == by_hand


@st.composite
def facts(draw: st.DrawFn) -> StatementFacts:
    currency = draw(st.sampled_from(CURRENCIES))
    amount = st.integers(min_value=-MAX_MICROS, max_value=MAX_MICROS)
    partners = draw(st.dictionaries(st.sampled_from(MERCHANTS), st.tuples(amount, amount), max_size=3))
    minor = draw(st.integers(min_value=-(10**9), max_value=10**9))
    cutoff = draw(st.integers(min_value=0, max_value=4_102_444_800_000))
    return StatementFacts(
        network=draw(st.text(min_size=1, max_size=20)),
        cycle_id=f"{currency}-x",
        currency=currency,
        minor_units=MINOR_UNITS[currency],
        period_start_ms=draw(st.integers(min_value=0, max_value=cutoff)),
        cutoff_ms=cutoff,
        merchant=draw(st.sampled_from(MERCHANTS)),
        opening_carry=draw(amount),
        payable=draw(amount),
        receivable=draw(amount),
        net=draw(amount),
        settlement_micros=minor * step_of(currency),
        settlement_minor=minor,
        closing_carry=draw(amount),
        counterparties=dict(sorted(partners.items())),
        item_count=draw(st.integers(min_value=0, max_value=10**6)),
        items_sha256=hashlib.sha256(draw(st.binary(max_size=8))).hexdigest(),
        hub_key_id="0123456789abcdef",
        previous_sha256=draw(st.sampled_from(["", hashlib.sha256(b"x").hexdigest()])),
    )


_HUB_KEY = Ed25519PrivateKey.generate()


@given(facts())
def test_statement_json_is_canonical_and_verifies_with_the_sdk(f: StatementFacts) -> None:
    raw = statement_json(f)
    fields = json.loads(raw)
    assert json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() == raw
    for key in ("opening_carry", "payable", "receivable", "net", "settlement_minor", "closing_carry"):
        assert fields[key] == str(getattr(f, key))
    assert fields["counterparties"] == {
        p: {"payable": str(a), "receivable": str(b)} for p, (a, b) in f.counterparties.items()
    }
    public = public_key_bytes(_HUB_KEY.public_key())
    key_id = key_id_of(public)
    raw = statement_json(replace(f, hub_key_id=key_id))
    envelope = clearing_pb2.StatementEnvelope(statement_json=raw, signature=sign(_HUB_KEY, raw), key_id=key_id)
    assert verify_statement(envelope, {key_id: public}).fields["hub_key_id"] == key_id


# --- item lines built in SQL are the Python lines -----------------------------------------------------------


def _engines() -> Iterator[tuple[str, Engine]]:
    yield "sqlite", create_engine("sqlite://")
    if "postgres" in BACKENDS:
        yield "postgresql", create_engine(harness._url("postgres"))


@pytest.fixture(scope="module")
def engines() -> Iterator[list[tuple[str, Engine]]]:
    made = list(_engines())
    yield made
    for _name, engine in made:
        engine.dispose()


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(statement_items())
def test_item_lines_built_in_sql_match_python(engines: list[tuple[str, Engine]], items: list[StatementItem]) -> None:
    for item in items:
        row = select(
            literal(int(item.operation_id[3:]), BigInteger).label("operation_seq"),
            literal(item.direction, String).label("direction"),
            literal(item.counterparty, String).label("counterparty"),
            literal(item.points, BigInteger).label("points"),
            literal(item.cash_micros, BigInteger).label("cash_micros"),
        ).subquery("item")
        for dialect, engine in engines:
            with engine.connect() as conn:
                line = conn.execute(select(items_mod.item_line(row, dialect))).scalar_one()
            assert line.encode() == item.line(), dialect
