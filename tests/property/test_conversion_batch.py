"""The set-based conversion path decides exactly what the single path decides, request by request.

`conversion_batch.convert_many` (the group-commit fast path) must give every request of a batch
the outcome `conversions.convert` gives it when the same requests run one after another: the same
record or the same refusal (type, reason, message, metadata), and leave the same balances,
positions, operations, postings and conversion rows. Hypothesis draws batches over a network
built to reach every check — unknown and suspended merchants, another currency, missing, pending
and closed routes, unlinked and unknown members, route limits, daily caps, a tight net debit cap,
a balance at the ceiling, amounts too small — and runs each batch both ways, on SQLite and on
PostgreSQL, each in a transaction that is rolled back, so every example starts from one state.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, create_engine, select, text, update

from exchange.domain import errors
from exchange.domain.models import ConversionRecord
from exchange.domain.units import MAX_BALANCE_POINTS
from exchange.ledger import conversion_batch, conversions
from exchange.store import outbox
from exchange.store.schema import conversions as conversions_table
from exchange.store.schema import members, merchant_positions, operations, postings
from merchant_sdk import MerchantClient
from merchant_sdk import errors as sdk_errors
from tests.harness import RunningHub
from tests.integration.test_clearing import BIG_CAP

DEFAULT_FEE = 100
MERCHANTS = ["ma", "mb", "mc", "md", "me"]  # md settles in USD, me is suspended
REFS = ["p0", "p1", "p2", "zz"]  # p0, p1 linked everywhere; p2 nowhere; zz never enrolled
NOW_MS = 1_900_000_000_000


def _build(hub: RunningHub) -> dict[str, Ed25519PrivateKey]:
    """The network; each merchant's signing key."""
    clients, signing_keys = {}, {}
    for merchant_id, value, currency, cap in [
        ("ma", 10_000, "CNY", BIG_CAP),
        ("mb", 3_000, "CNY", 2_100_000),  # a tight net debit cap: 700 of its points
        ("mc", 70_000, "CNY", BIG_CAP),
        ("md", 10_000, "USD", BIG_CAP),
        ("me", 10_000, "CNY", BIG_CAP),
    ]:
        client, signing_keys[merchant_id] = hub.admit(
            merchant_id, currency=currency, value_micros=value, cap_micros=cap
        )
        clients[merchant_id] = client
        for ref in REFS[:3]:
            client.enroll_member(f"{merchant_id}-{ref}")
            client.issue_points(f"{merchant_id}-{ref}", {"p0": 5_000, "p1": 200, "p2": 1_000}[ref])
    for ref in ("p0", "p1"):
        for other in MERCHANTS[1:]:
            code = clients["ma"].create_link_code(f"ma-{ref}").code
            clients[other].redeem_link_code(f"{other}-{ref}", code)
    for source, destination in [("ma", "mb"), ("mb", "ma"), ("ma", "mc"), ("mc", "mb"), ("me", "ma"), ("ma", "me")]:
        clients[source].set_route(destination, "outbound")
        clients[destination].set_route(source, "inbound")
    clients["mb"].set_route("mc", "outbound")  # pending: mc has not accepted it
    with hub.operator() as op:
        op.set_route_terms(
            "ma", "mb", fee_bps=250, min_src_points=10, max_src_points=4_000, daily_member_cap_micros=5_000_000
        )
        op.set_route_terms("mc", "mb", closed=True)
        op.set_route_terms("mb", "ma", fee_bps=None)  # the network default
        op.set_merchant_status("me", False)
    for client in clients.values():
        client.close()
    return signing_keys


OPEN = [("ma", "mb"), ("mb", "ma"), ("ma", "mc"), ("mc", "ma")]  # mc -> ma: not opened, so closed
pairs = st.one_of(
    st.sampled_from(OPEN),
    st.tuples(st.sampled_from([*MERCHANTS, "zz"]), st.sampled_from([*MERCHANTS, "nobody"])),
)
requests = st.lists(
    st.tuples(
        pairs,
        st.sampled_from(REFS),
        st.sampled_from([1, 3, 10, 99, 100, 700, 1_000, 3_999, 4_001, 20_000]),
        st.sampled_from([0, 0, 0, 1, 10**6]),
    ),
    min_size=1,
    max_size=24,
)
Drawn = tuple[tuple[str, str], str, int, int]


@contextmanager
def _rolled_back(hub: RunningHub) -> Iterator[Connection]:
    with hub.hub.engine.connect() as raw:
        conn = raw.execution_options(pointsx_write=True)
        transaction = conn.begin()
        try:
            yield conn
        finally:
            transaction.rollback()


def _request(i: int, drawn: Drawn) -> conversion_batch.Request:
    (source, destination), ref, points, min_dst = drawn
    order = conversions.ConvertOrder(source, destination, f"{source}-{ref}", points, None, min_dst)
    return conversion_batch.Request(source, str(uuid.UUID(int=i)), order, NOW_MS + i // 3)


def _one_by_one(conn: Connection, batch: list[conversion_batch.Request]) -> list[Any]:
    out: list[Any] = []
    for r in batch:
        savepoint = conn.begin_nested()
        outbox.begin(conn)
        try:
            out.append(
                conversions.convert(
                    conn, caller=r.caller, request_id=r.request_id, order=r.order, now_ms=r.now_ms,
                    default_fee=DEFAULT_FEE,
                )
            )  # fmt: skip
            savepoint.commit()
        except errors.DomainError as refusal:
            savepoint.rollback()
            out.append(refusal)
        finally:
            outbox.discard(conn)
    return out


def _state(conn: Connection) -> dict[str, Any]:
    """Everything a conversion writes, with operation ids as their rank (PostgreSQL's sequence is
    not rolled back, so the two runs draw different ids for the same operations)."""
    seqs = [s for s in conn.execute(select(operations.c.operation_seq).order_by(operations.c.operation_seq)).scalars()]
    rank = {seq: index for index, seq in enumerate(seqs)}
    ops = [(rank[r[0]], *r[1:]) for r in conn.execute(select(operations).order_by(operations.c.operation_seq))]
    posts = sorted(
        (rank[r.operation_seq], r.asset, r.debit_account_id, r.credit_account_id, r.amount)
        for r in conn.execute(select(postings))
    )
    convs = [
        (rank[r[0]], *r[1:])
        for r in conn.execute(select(conversions_table).order_by(conversions_table.c.operation_seq))
    ]
    return {
        "members": conn.execute(select(members).order_by(members.c.merchant_id, members.c.member_ref)).all(),
        "positions": conn.execute(select(merchant_positions).order_by(merchant_positions.c.merchant_id)).all(),
        "operations": ops,
        "postings": posts,
        "conversions": convs,
        "rank": rank,
    }


def _normalised(outcome: Any, rank: dict[int, int]) -> Any:
    if isinstance(outcome, errors.DomainError):
        return (type(outcome).__name__, outcome.reason, outcome.message, outcome.metadata)
    assert isinstance(outcome, ConversionRecord)
    r = outcome
    return (rank[r.operation_seq], r.amounts, r.created_at_ms, r.src_member_ref, r.dst_member_ref,
            r.source_merchant_id, r.destination_merchant_id, r.currency)  # fmt: skip


def _run(hub: RunningHub, batch: list[conversion_batch.Request], way: Callable[[Connection], list[Any]], *,
         at_ceiling: bool) -> tuple[list[Any], dict[str, Any]]:  # fmt: skip
    with _rolled_back(hub) as conn:
        if at_ceiling:  # mb's p1 one point short of the ceiling: credits to it must be refused
            conn.execute(
                update(members)
                .where(members.c.merchant_id == "mb", members.c.member_ref == "mb-p1")
                .values(points=MAX_BALANCE_POINTS - 1)
            )
        outcomes = way(conn)
        state = _state(conn)
        rank = state.pop("rank")
        return [_normalised(o, rank) for o in outcomes], state


def test_a_batch_decides_as_the_requests_one_by_one(hub: RunningHub) -> None:
    _build(hub)
    with _rolled_back(hub) as conn:  # both runs see the fence where the close left it: nowhere
        assert conn.execute(text("SELECT count(*) FROM clearing_fences")).scalar_one() == 0
    seen: set[str] = set()

    @settings(
        max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(requests, st.booleans())
    # The edges, always: the ceiling, a daily cap passed by the third, mb's cap reached exactly, then passed.
    @example([(("ma", "mb"), "p1", 100, 0), (("ma", "mb"), "p0", 400, 0), (("ma", "mb"), "p0", 200, 0)], True)
    @example([(("mb", "ma"), "p0", 700, 0), (("mb", "ma"), "p1", 1, 0), (("ma", "mb"), "p0", 10, 0)], False)
    def check(drawn: list[Drawn], at_ceiling: bool) -> None:
        batch = [_request(i, d) for i, d in enumerate(drawn)]
        together, state_together = _run(
            hub, batch, lambda c: conversion_batch.convert_many(c, batch, DEFAULT_FEE), at_ceiling=at_ceiling
        )
        alone, state_alone = _run(hub, batch, lambda c: _one_by_one(c, batch), at_ceiling=at_ceiling)
        for index, (a, b) in enumerate(zip(together, alone, strict=True)):
            assert a == b, f"request {index} ({batch[index].order}): together {a}, one by one {b}"
        assert state_together == state_alone
        seen.update(o[0] if isinstance(o[0], str) else "converted" for o in together)

    check()
    # The draw reached the checks it is meant to compare (a coverage floor, not luck).
    wanted = {
        "converted", "InsufficientPoints", "RouteClosed", "NotLinked", "MemberNotFound", "MerchantNotFound",
        "MerchantSuspended", "CurrencyMismatch", "SameMerchant", "AmountTooSmall", "NetDebitCapExceeded",
        "AmountTooLarge", "MinDstPointsNotMet", "DailyLimitExceeded", "BalanceLimitExceeded",
    }  # fmt: skip
    assert wanted <= seen, f"never drawn: {wanted - seen}"


MOVE_MB = text("UPDATE merchant_positions SET open_net_micros = open_net_micros + :delta WHERE merchant_id = 'mb'")


def test_a_position_moved_under_a_batch_sends_its_items_the_single_way(
    postgres_hub: RunningHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Positions are locked only at a batch's end (`_move_positions`). When another hub process
    moved a payer in between so far that the batch would pass the payer's cap, nothing of the
    batch is written and each item is decided again by the guarded single path."""
    hub = postgres_hub
    signing_keys = _build(hub)
    other_process = create_engine(hub.hub.engine.url)
    original = conversion_batch._move_positions

    def meanwhile(conn: Connection, state: Any) -> None:
        with other_process.begin() as other:  # mb pays 1 CNY elsewhere, committed before our lock
            other.execute(
                text(
                    "UPDATE merchant_positions SET open_net_micros = open_net_micros - 1000000 WHERE merchant_id = 'mb'"
                )
            )
        try:
            original(conn, state)
        finally:
            monkeypatch.setattr(conversion_batch, "_move_positions", original)

    monkeypatch.setattr(conversion_batch, "_move_positions", meanwhile)
    fallbacks = hub.hub.writer.stats.bulk_fallbacks
    mb = MerchantClient(hub.target, "mb", signing_keys["mb"])
    with pytest.raises(sdk_errors.NetDebitCapExceeded):  # 600 points = 1.8 CNY: fine at 0, not at -1
        mb.convert("mb-p0", "ma", 600)
    assert hub.hub.writer.stats.bulk_fallbacks == fallbacks + 1
    assert mb.get_balance("mb-p0").points == 5_000
    with other_process.begin() as other:  # undo the stand-in for the other process's conversion
        other.execute(
            text("UPDATE merchant_positions SET open_net_micros = open_net_micros + 1000000 WHERE merchant_id = 'mb'")
        )
    other_process.dispose()
    mb.close()
