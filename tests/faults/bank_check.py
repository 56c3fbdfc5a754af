"""What the bank test checks once the kills stop: the database against what every client was told.

- `resolve`: every ambiguous request is looked up first — the hub holds it completely (an `ok`
  idempotency record, one operation, its postings) or not at all (no record, no operation) — then
  sent again with its request_id: one it held must answer exactly as stored and change nothing,
  one it did not hold runs now. Either way the request ends with a definite outcome.
- `verify`: every acknowledged request is stored exactly once, with the very response the client
  got; every refusal is stored as that refusal, with no operation; no operation exists that no
  client was told of; each account holds what the acknowledged operations give it, in the database
  and over the wire; a conversion is reversed exactly when a reversal of it was acknowledged; and
  the auditor (`tests.auditor.check_invariants`) passes.
- `close_and_check_cycle`: a cycle closed over the result holds exactly the acknowledged
  conversions and reversals, and its nets and settlements sum to zero (DESIGN §5).

Problems are collected as sentences, not raised, so a long run can count them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, select

from exchange.domain import outcomes
from exchange.domain.units import format_operation_id
from exchange.operator_client import OperatorClient
from exchange.rpc import translate
from exchange.rpc.dispatch import reply
from exchange.rpc.servicers import ledger as ledger_servicer
from exchange.rpc.servicers import operator as operator_servicer
from exchange.store.schema import conversions, idempotency, members, operations, postings
from merchant_sdk import MerchantClient, errors
from merchant_sdk._pb.pointsx.v1 import exchange_pb2, operator_pb2
from tests.auditor import check_invariants
from tests.faults.ops import (
    CURRENCY,
    EXPECTED_REFUSALS,
    METHODS,
    OPERATION_KINDS,
    RESPONSE_TYPES,
    Network,
    Op,
    conversion_of,
    member_ref,
    send,
)
from tests.integration.test_clearing import CNY_STEP, Book, assert_cycle

RESOLVE_ATTEMPTS = 10
RESOLVE_TIMEOUT_S = 15.0
MAX_LISTED = 5  # problems of one sort quoted in full; the rest counted


@dataclass(frozen=True)
class Stored:
    """One request as the database holds it."""

    outcome: str | None  # None: no idempotency record at all
    method: str
    response: bytes | None
    reason: str
    operation_seqs: tuple[int, ...]
    postings: int


def stored(engine: Engine, op: Op) -> Stored:
    with engine.connect() as conn:
        record = conn.execute(
            select(
                idempotency.c.outcome,
                idempotency.c.method,
                idempotency.c.response,
                idempotency.c.result,
                idempotency.c.error_reason,
            ).where(idempotency.c.caller == op.caller, idempotency.c.request_id == op.request_id)
        ).one_or_none()
        seqs = tuple(
            int(s)
            for s in conn.execute(
                select(operations.c.operation_seq).where(
                    operations.c.caller == op.caller, operations.c.request_id == op.request_id
                )
            ).scalars()
        )
        legs = 0
        if seqs:
            legs = int(
                conn.execute(
                    select(func.count()).select_from(postings).where(postings.c.operation_seq.in_(seqs))
                ).scalar_one()
            )
    if record is None:
        return Stored(None, "", None, "", seqs, legs)
    outcome, method, response, result, reason = record
    reply_bytes = stored_reply(str(method), op.caller, response, result)
    return Stored(str(outcome), str(method), reply_bytes, reason or "", seqs, legs)


def stored_reply(method: str, caller: str, response: bytes | None, result: bytes | None) -> bytes | None:
    """The reply a stored outcome replays as: its domain result encoded the way the edge encodes it
    (or, for a record stored before results were, the reply bytes as stored)."""
    if result is None:
        return None if response is None else bytes(response)
    encoders: dict[str, Callable[[Any], Any]] = {
        "/pointsx.v1.ExchangeService/Convert": lambda record: translate.conversion(record, caller),
        "/pointsx.v1.LedgerService/IssuePoints": ledger_servicer._movement,
        "/pointsx.v1.LedgerService/RedeemPoints": ledger_servicer._movement,
        "/pointsx.v1.OperatorService/ReverseConversion": operator_servicer._reversal,
    }
    encode = encoders.get(method)  # the bank's own kinds; others (admitting merchants) are not compared
    return None if encode is None else reply(outcomes.decode(bytes(result)), encode)


def _same_response(op: Op, raw: bytes | None) -> bool:
    return raw is not None and op.response is not None and RESPONSE_TYPES[op.kind].FromString(raw) == op.response


def resolve(engine: Engine, network: Network, target: str, pending: list[Op]) -> list[str]:
    """Settle each ambiguous (or unexpected) op by looking it up and sending it again; the problems."""
    problems: list[str] = []
    merchants = {
        m: MerchantClient(target, m, key, max_attempts=RESOLVE_ATTEMPTS, timeout_s=RESOLVE_TIMEOUT_S)
        for m, key in network.keys.items()
    }
    operator = OperatorClient(target, network.operator_key, timeout_s=RESOLVE_TIMEOUT_S)
    try:
        for op in pending:
            problems += _resolve_one(engine, op, merchants, operator)
    finally:
        operator.close()
        for client in merchants.values():
            client.close()
    return problems


def _resolve_one(engine: Engine, op: Op, merchants: dict[str, MerchantClient], operator: OperatorClient) -> list[str]:
    problems: list[str] = []
    before = stored(engine, op)
    held = before.outcome is not None
    if before.outcome == "pending":
        problems.append(f"idempotency record left pending: {op.describe()}")
    if before.operation_seqs and before.outcome != "ok":
        problems.append(f"half-applied: {len(before.operation_seqs)} operation(s) but record {before.outcome}: "
                        f"{op.describe()}")  # fmt: skip
    if before.outcome == "ok" and len(before.operation_seqs) != 1:
        problems.append(f"held as ok with {len(before.operation_seqs)} operations: {op.describe()}")
    first_outcome, first_error = op.outcome, op.error
    if first_outcome == "unexpected":
        problems.append(f"unexpected answer {first_error!r}: {op.describe()}")
    op.response, op.reason = None, ""
    try:
        op.response = send(op, merchants, operator)
        op.outcome = "ok"
    except errors.PointsxError as exc:
        op.outcome, op.reason, op.error = "refused", exc.reason or exc.code.name, str(exc)
        if exc.reason not in EXPECTED_REFUSALS[op.kind]:
            problems.append(f"sent again, it failed ({exc}): {op.describe()}")
    op.resolved, op.held_before_resend = True, held
    op.notes.append(f"first {first_outcome}: {first_error}")
    after = stored(engine, op)
    if before.outcome == "ok":
        if op.outcome != "ok" or not _same_response(op, before.response):
            problems.append(f"a held request answered differently when sent again ({op.error}): {op.describe()}")
        if (after.operation_seqs, after.postings) != (before.operation_seqs, before.postings):
            problems.append(f"sending a held request again changed it: {before} -> {after}: {op.describe()}")
    elif before.outcome == "error" and (op.outcome != "refused" or op.reason != before.reason):
        problems.append(f"a held refusal ({before.reason}) answered {op.outcome} {op.reason}: {op.describe()}")
    return problems


@dataclass
class DbView:
    """The rows `verify` compares, read once."""

    records: dict[tuple[str, str], tuple[str, str, bytes | None, str]]  # -> outcome, method, response, reason
    operations: dict[tuple[str, str], list[tuple[int, str]]]  # -> [(seq, kind)]
    balances: dict[tuple[str, str], int]
    conversion_status: dict[str, str]  # conversion id -> status


def read_view(engine: Engine, merchant_ids: list[str]) -> DbView:
    """The bank's merchants' rows (the operator's requests included), whatever else shares the database."""
    callers = [*merchant_ids, "operator"]
    view = DbView({}, defaultdict(list), {}, {})
    with engine.connect() as conn:
        for caller, rid, outcome, method, response, result, reason in conn.execute(
            select(
                idempotency.c.caller, idempotency.c.request_id, idempotency.c.outcome, idempotency.c.method,
                idempotency.c.response, idempotency.c.result, idempotency.c.error_reason,
            ).where(idempotency.c.caller.in_(callers))
        ):  # fmt: skip
            stored_bytes = stored_reply(method, caller, response, result) if outcome == "ok" else None
            view.records[(caller, rid)] = (outcome, method, stored_bytes, reason or "")
        for caller, rid, seq, kind in conn.execute(
            select(operations.c.caller, operations.c.request_id, operations.c.operation_seq, operations.c.kind).where(
                operations.c.kind.in_(list(OPERATION_KINDS.values())), operations.c.merchant_id.in_(merchant_ids)
            )
        ):
            view.operations[(caller, rid)].append((int(seq), str(kind)))
        for merchant_id, ref, points in conn.execute(
            select(members.c.merchant_id, members.c.member_ref, members.c.points)
        ):
            view.balances[(merchant_id, ref)] = int(points)
        for seq, status in conn.execute(select(conversions.c.operation_seq, conversions.c.status)):
            view.conversion_status[format_operation_id(int(seq))] = str(status)
    return view


def expected_balances(network: Network, ops: list[Op]) -> dict[tuple[str, str], int]:
    """Each account's points as the acknowledged operations give them (refusals move nothing)."""
    balances = dict.fromkeys(network.accounts(), 0)
    converted = {conversion_of(op).conversion_id: op for op in ops if op.kind == "convert" and op.outcome == "ok"}
    for op in ops:
        if op.outcome != "ok":
            continue
        if op.kind == "issue":
            balances[(op.merchant_id, member_ref(op.person, op.merchant_id))] += op.points
        elif op.kind == "redeem":
            balances[(op.merchant_id, member_ref(op.person, op.merchant_id))] -= op.points
        else:
            origin = op if op.kind == "convert" else converted[op.conversion_id]
            conv, sign = conversion_of(origin), 1 if op.kind == "convert" else -1
            balances[(origin.merchant_id, member_ref(origin.person, origin.merchant_id))] -= sign * conv.src_points
            balances[(origin.destination, member_ref(origin.person, origin.destination))] += sign * conv.dst_points
    return balances


class Problems:
    """Problems by sort: the first few of each quoted, the rest counted."""

    def __init__(self) -> None:
        self.by_sort: dict[str, list[str]] = defaultdict(list)

    def add(self, sort: str, detail: str) -> None:
        self.by_sort[sort].append(detail)

    def lines(self) -> list[str]:
        out: list[str] = []
        for sort, details in self.by_sort.items():
            shown = "; ".join(details[:MAX_LISTED])
            more = f" (+{len(details) - MAX_LISTED} more)" if len(details) > MAX_LISTED else ""
            out.append(f"{sort} x{len(details)}: {shown}{more}")
        return out


def verify(engine: Engine, network: Network, target: str, ops: list[Op]) -> list[str]:
    """Everything the clients were told against the database and the wire; the problems."""
    found = Problems()
    view = read_view(engine, list(network.keys))
    for op in ops:
        _check_stored(op, view, found)
    told = {op.key for op in ops if op.outcome == "ok"}
    for key in set(view.operations) - told:
        found.add("operations no client was told of", f"{key}: {view.operations[key]}")
    for op in ops:
        if op.outcome in ("sent", "ambiguous", "unexpected"):
            found.add("left unresolved", op.describe())
        if op.outcome == "ok" and op.kind == "convert" and conversion_of(op).src_points != op.points:
            found.add("converted another amount", f"{conversion_of(op)}: {op.describe()}")
    expected = expected_balances(network, ops)
    for account, points in sorted(expected.items()):
        if view.balances.get(account) != points:
            found.add("balance differs from the acknowledged operations",
                      f"{account}: stored {view.balances.get(account)}, acknowledged ops give {points}")  # fmt: skip
    _check_over_the_wire(network, target, expected, found)
    reversed_ok = [op.conversion_id for op in ops if op.kind == "reverse" and op.outcome == "ok"]
    for conversion_id in {c for c in reversed_ok if reversed_ok.count(c) > 1}:
        found.add("reversed twice", conversion_id)
    for op in ops:
        if op.kind == "convert" and op.outcome == "ok":
            want = "reversed" if conversion_of(op).conversion_id in reversed_ok else "completed"
            if view.conversion_status.get(conversion_of(op).conversion_id) != want:
                found.add("conversion status", f"{view.conversion_status.get(op.operation_id())} not {want}: "
                                               f"{op.describe()}")  # fmt: skip
    try:
        check_invariants(engine)
    except AssertionError as exc:
        found.add("auditor", str(exc))
    return found.lines()


def _check_stored(op: Op, view: DbView, found: Problems) -> None:
    record = view.records.get(op.key)
    rows = view.operations.get(op.key, [])
    if op.outcome == "ok":
        if record is None or record[0] != "ok" or record[1] != METHODS[op.kind]:
            found.add("acknowledged but not stored as ok", f"{record and record[:2]}: {op.describe()}")
        elif not _same_response(op, record[2]):
            found.add("stored response differs from the acknowledged one", op.describe())
        if len(rows) != 1:
            found.add("acknowledged operation not stored exactly once", f"{rows}: {op.describe()}")
        elif (format_operation_id(rows[0][0]), rows[0][1]) != (op.operation_id(), OPERATION_KINDS[op.kind]):
            found.add("acknowledged operation stored under another id", f"{rows}: {op.describe()}")
    elif op.outcome == "refused":
        if record is None or record[0] != "error" or record[3] != op.reason:
            found.add("refusal not stored as told", f"{record and (record[0], record[3])}: {op.describe()}")
        if rows:
            found.add("refused but applied", f"{rows}: {op.describe()}")


def _check_over_the_wire(network: Network, target: str, expected: dict[tuple[str, str], int], found: Problems) -> None:
    clients = {m: MerchantClient(target, m, key, timeout_s=RESOLVE_TIMEOUT_S) for m, key in network.keys.items()}
    try:
        for (m, ref), points in sorted(expected.items()):
            got = clients[m].get_balance(ref).points
            if got != points:
                found.add("GetBalance differs from the acknowledged operations", f"{m}/{ref}: {got} vs {points}")
    finally:
        for client in clients.values():
            client.close()


def close_and_check_cycle(
    network: Network, target: str, ops: list[Op], round_ops: list[Op], opening: dict[str, int]
) -> tuple[list[str], dict[str, int], operator_pb2.Cycle | None]:
    """Close a cycle now over `round_ops` (those since the last cycle); (problems, closing carries, cycle)."""
    conversions_by_id: dict[str, exchange_pb2.Conversion] = {
        conversion_of(op).conversion_id: conversion_of(op) for op in ops if op.kind == "convert" and op.outcome == "ok"
    }
    book = Book()
    for op in round_ops:
        if op.outcome != "ok":
            continue
        if op.kind == "convert":
            book.conversion(conversion_of(op))
        elif op.kind == "reverse":
            assert isinstance(op.response, operator_pb2.ReverseConversionResponse)
            book.reversal(conversions_by_id[op.conversion_id], op.response)
    with OperatorClient(target, network.operator_key, timeout_s=120) as operator:
        try:
            cycle = operator.close_cycle(CURRENCY)
        except errors.PointsxError as exc:
            return [f"closing the cycle failed: {exc}"], opening, None
    try:
        closing = assert_cycle(cycle, book, opening, CNY_STEP)
    except AssertionError as exc:
        return [f"cycle {cycle.cycle_id}: {exc}"], opening, cycle
    return [], closing, cycle
