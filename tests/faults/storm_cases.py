"""Every mutating request kind in one scenario, as retry-storm phases (tests/faults/storm.py).

`StormScenario(hub, tag, rotation)` admits merchants named after `tag` (so rounds can share a
database) in EUR (so a bank run's CNY cycles are not touched), sets up what the requests need
through the SDK, and runs four phases, every copy of every case of a phase released at once:

1. operator: RegisterMerchant, SetMerchantStatus, SetRouteTerms, SetNetDebitCap, ReverseConversion;
   merchants: EnrollMember, IssuePoints, RedeemPoints (and a refused one), CreateLinkCode,
   SetRoute, Unlink, SchedulePointValue, AddKey, QuoteConversion, Convert (and a refused one),
   ConvertBatch (two items that apply and one refused);
2. RedeemLinkCode (of phase 1's code), RevokeKey (of phase 1's key), Convert with phase 1's quote,
   a second reversal (refused ALREADY_REVERSED), CloseCycle;
3. AcknowledgeStatement and DisputeItem on the cycle phase 2 closed;
4. MarkSettled of that cycle.

Copies per case rotate through 1..5 with `rotation` (case i of a round sends 1 + (i + rotation) % 5),
so over five rounds every case meets every count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import Message
from sqlalchemy import ColumnElement, Connection, FromClause, func, select

from exchange.config import load_key
from exchange.operator_client import OperatorClient
from exchange.store.engine import make_engine, sqlite_url
from exchange.store.schema import (
    caller_keys,
    conversions,
    cycles,
    disputes,
    link_codes,
    members,
    merchants,
    operations,
    point_values,
    quotes,
    routes,
    statements,
)
from merchant_sdk import MerchantClient, new_request_id
from merchant_sdk._pb.pointsx.v1 import common_pb2, exchange_pb2, ledger_pb2, operator_pb2
from merchant_sdk._requests import MerchantRequests, Rpc
from merchant_sdk.signing import Signer, key_id_of, public_key_bytes
from tests.auditor import check_invariants
from tests.faults.hubproc import HubProcess, logged_failures
from tests.faults.storm import Case, Probe, StormHub, storm
from tests.integration.test_clearing_crash import new_data_dir

M = TypeVar("M", bound=Message)
CURRENCY = "EUR"
VALUE = 10_000
BIG_CAP = 10**12
OPERATOR = "/pointsx.v1.OperatorService/"


def rows(table: FromClause, *where: ColumnElement[bool]) -> Probe:
    """A probe: how many rows of `table` match."""
    return lambda conn: int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def points_of(merchant_id: str, member_ref: str) -> Probe:
    """A probe: the member's stored balance."""
    where = (members.c.merchant_id == merchant_id, members.c.member_ref == member_ref)
    return lambda conn: int(conn.execute(select(members.c.points).where(*where)).scalar_one())


def linked_with(merchant_id: str, member_ref: str) -> Probe:
    """A probe: how many accounts share the member's network member (itself included)."""

    def probe(conn: Connection) -> int:
        network_member = (
            select(members.c.network_member_id)
            .where(members.c.merchant_id == merchant_id, members.c.member_ref == member_ref)
            .scalar_subquery()
        )
        return int(
            conn.execute(
                select(func.count()).select_from(members).where(members.c.network_member_id == network_member)
            ).scalar_one()
        )

    return probe


class StormScenario:
    """One round: its merchants, keys and cases; `run()` returns the problems found."""

    def __init__(self, hub: StormHub, tag: str, rotation: int = 0) -> None:
        self.hub = hub
        self.shop, self.diner, self.spare, self.newco = (f"{tag}-{n}" for n in ("shop", "diner", "spare", "newco"))
        self.keys: dict[str, Ed25519PrivateKey] = {"operator": hub.operator_key}
        for m in (self.shop, self.diner, self.spare):
            self.keys[m] = Ed25519PrivateKey.generate()
        self.rpc = {m: MerchantRequests(Signer(m, key)) for m, key in self.keys.items() if m != "operator"}
        self.rotation = rotation
        self.cases_made = 0
        self.copies_sent = 0
        self.extra_key = Ed25519PrivateKey.generate()
        self.reversed_id = ""

    # --- making cases -------------------------------------------------------------------------------
    def _copies(self) -> int:
        self.cases_made += 1
        return 1 + (self.cases_made - 1 + self.rotation) % 5

    def merchant(
        self, name: str, merchant_id: str, rpc: Rpc[M], probe: Probe | None = None, delta: int = 0, *,
        refusal: str = "",
    ) -> Case:  # fmt: skip
        request_id = getattr(rpc.request, "request_id")  # noqa: B009 - every mutating request has one
        return Case(name, merchant_id, rpc.method, rpc.request, (request_id,), self._copies(), probe, delta,
                    refusal=refusal)  # fmt: skip

    def operator(
        self, name: str, method: str, request: Message, probe: Probe | None = None, delta: int = 0, *,
        refusal: str = "",
    ) -> Case:  # fmt: skip
        request_id = getattr(request, "request_id")  # noqa: B009
        return Case(name, "operator", OPERATOR + method, request, (request_id,), self._copies(), probe, delta,
                    refusal=refusal)  # fmt: skip

    def _storm(self, cases: list[Case]) -> list[str]:
        self.copies_sent += sum(c.copies for c in cases)
        return storm(self.hub.target, self.keys, self.hub.engine, cases)

    # --- the scenario ---------------------------------------------------------------------------------
    def set_up(self) -> None:
        with OperatorClient(self.hub.target, self.hub.operator_key) as op:
            for m in (self.shop, self.diner, self.spare):
                op.register_merchant(m, m, CURRENCY, VALUE, public_key_bytes(self.keys[m].public_key()),
                                     net_debit_cap_micros=BIG_CAP)  # fmt: skip
        shop = MerchantClient(self.hub.target, self.shop, self.keys[self.shop])
        diner = MerchantClient(self.hub.target, self.diner, self.keys[self.diner])
        try:
            shop.set_route(self.diner, "outbound")
            diner.set_route(self.shop, "inbound")
            for ref in ("alice", "bob", "dave", "erin", "frank", "gina", "ivy"):
                shop.enroll_member(ref)
            for ref in ("alice", "bob", "frank", "hank"):
                diner.enroll_member(f"{ref}.d")
            for ref in ("alice", "bob", "frank"):
                diner.redeem_link_code(f"{ref}.d", shop.create_link_code(ref).code)
            for ref, points in (("alice", 10_000), ("erin", 1_000), ("frank", 1_000)):
                shop.issue_points(ref, points)
            self.reversed_id = shop.convert("alice", self.diner, 200).conversion_id
        finally:
            shop.close()
            diner.close()

    def phase_one(self) -> list[Case]:
        shop, diner, rpc = self.shop, self.diner, self.rpc
        new_key = Ed25519PrivateKey.generate()
        soon = datetime.now(UTC) + timedelta(days=2)
        batch_items = [rpc[shop].conversion("frank", diner, points, "", 0, None) for points in (50, 60, 10**6)]
        batch = Case("ConvertBatch", shop, *rpc[shop].convert_batch(batch_items)[:2],
                     tuple(i.request_id for i in batch_items), self._copies(),
                     rows(conversions, conversions.c.source_merchant_id == shop,
                          conversions.c.src_member_ref == "frank"), 2, audited=2)  # fmt: skip
        return [
            self.operator("RegisterMerchant", "RegisterMerchant", operator_pb2.RegisterMerchantRequest(
                request_id=new_request_id(), merchant_id=self.newco, name="Newco", currency=CURRENCY,
                point_value_micros=VALUE, public_key=public_key_bytes(new_key.public_key()),
                net_debit_cap_micros=BIG_CAP), rows(merchants, merchants.c.merchant_id == self.newco), 1),
            self.operator("SetMerchantStatus", "SetMerchantStatus", operator_pb2.SetMerchantStatusRequest(
                request_id=new_request_id(), merchant_id=self.spare, status=common_pb2.MERCHANT_STATUS_SUSPENDED,
                reason="storm"), rows(merchants, merchants.c.merchant_id == self.spare,
                                      merchants.c.status == "suspended"), 1),
            self.operator("SetRouteTerms", "SetRouteTerms", operator_pb2.SetRouteTermsRequest(
                request_id=new_request_id(), source_merchant_id=shop, destination_merchant_id=diner, fee_bps=150),
                rows(routes, routes.c.source_merchant_id == shop, routes.c.fee_bps == 150), 1),
            self.operator("SetNetDebitCap", "SetNetDebitCap", operator_pb2.SetNetDebitCapRequest(
                request_id=new_request_id(), merchant_id=shop, cap_micros=2 * BIG_CAP),
                rows(merchants, merchants.c.merchant_id == shop, merchants.c.net_debit_cap_micros == 2 * BIG_CAP), 1),
            self.operator("ReverseConversion", "ReverseConversion", operator_pb2.ReverseConversionRequest(
                request_id=new_request_id(), conversion_id=self.reversed_id, reason="storm"),
                rows(operations, operations.c.merchant_id == shop, operations.c.kind == "reversal"), 1),
            self.merchant("EnrollMember", shop, rpc[shop].enroll_member("carol", None),
                          rows(members, members.c.merchant_id == shop), 1),
            self.merchant("IssuePoints", shop, rpc[shop].issue_points("dave", 321, "storm", None),
                          points_of(shop, "dave"), 321),
            self.merchant("RedeemPoints", shop, rpc[shop].redeem_points("erin", 50, "", None),
                          points_of(shop, "erin"), -50),
            self.merchant("RedeemPoints refused", shop, rpc[shop].redeem_points("ivy", 10, "", None),
                          points_of(shop, "ivy"), 0, refusal="INSUFFICIENT_POINTS"),
            self.merchant("CreateLinkCode", shop, rpc[shop].create_link_code("gina", None),
                          rows(link_codes, link_codes.c.merchant_id == shop, link_codes.c.member_ref == "gina"), 1),
            self.merchant("SetRoute", diner, rpc[diner].set_route(shop, "outbound", True, None),
                          rows(routes, routes.c.source_merchant_id == diner, routes.c.outbound_open.is_(True)), 1),
            self.merchant("Unlink", diner, rpc[diner].unlink("bob.d", None), linked_with(shop, "bob"), -1),
            self.merchant("SchedulePointValue", shop, rpc[shop].schedule_point_value(12_000, soon, None),
                          rows(point_values, point_values.c.merchant_id == shop), 1),
            self.merchant("AddKey", shop, rpc[shop].add_key(self.extra_key, None),
                          rows(caller_keys, caller_keys.c.caller == shop), 1),
            self.merchant("QuoteConversion", shop, rpc[shop].quote_conversion("alice", diner, 100, None, None),
                          rows(quotes, quotes.c.source_merchant_id == shop), 1),
            self.merchant("Convert", shop, rpc[shop].convert(rpc[shop].conversion("alice", diner, 100, "", 0, None)),
                          rows(conversions, conversions.c.source_merchant_id == shop,
                               conversions.c.src_member_ref == "alice"), 1),
            self.merchant("Convert refused", shop,
                          rpc[shop].convert(rpc[shop].conversion("erin", diner, 100, "", 0, None)),
                          rows(conversions, conversions.c.src_member_ref == "erin"), 0, refusal="NOT_LINKED"),
            batch,
        ]  # fmt: skip

    def phase_two(self, first: dict[str, Case]) -> list[Case]:
        shop, diner, rpc = self.shop, self.diner, self.rpc
        code = ledger_pb2.LinkCode.FromString(first["CreateLinkCode"].response_bytes()).code
        quote = exchange_pb2.Quote.FromString(first["QuoteConversion"].response_bytes())
        extra_key_id = key_id_of(self.extra_key.public_key())
        return [
            self.merchant("RedeemLinkCode", diner, rpc[diner].redeem_link_code("hank.d", code, None),
                          linked_with(shop, "gina"), 1),
            self.merchant("RevokeKey", shop, rpc[shop].revoke_key(extra_key_id, None),
                          rows(caller_keys, caller_keys.c.caller == shop, caller_keys.c.status == "revoked"), 1),
            self.merchant("Convert quoted", shop,
                          rpc[shop].convert(rpc[shop].conversion("alice", diner, 0, quote.quote_id, 0, None)),
                          rows(quotes, quotes.c.quote_id == quote.quote_id,
                               quotes.c.used_by_operation_seq.is_not(None)), 1),
            self.operator("ReverseConversion again", "ReverseConversion", operator_pb2.ReverseConversionRequest(
                request_id=new_request_id(), conversion_id=self.reversed_id, reason="storm"),
                refusal="ALREADY_REVERSED"),
            self.operator("CloseCycle", "CloseCycle", operator_pb2.CloseCycleRequest(
                request_id=new_request_id(), currency=CURRENCY), rows(cycles, cycles.c.currency == CURRENCY), 1),
        ]  # fmt: skip

    def phase_three(self, cycle_id: str) -> list[Case]:
        shop, diner, rpc = self.shop, self.diner, self.rpc
        with MerchantClient(self.hub.target, shop, self.keys[shop]) as client:
            statement_json = client.get_statement(cycle_id).statement_json
        acked = rows(statements, statements.c.cycle_id == cycle_id, statements.c.merchant_id == shop,
                     statements.c.ack_signature.is_not(None))  # fmt: skip
        return [
            self.merchant("AcknowledgeStatement", shop, rpc[shop].acknowledge_statement(cycle_id, statement_json, None),
                          acked, 1),
            self.merchant("DisputeItem", diner, rpc[diner].dispute_item(cycle_id, self.reversed_id, "storm", None),
                          rows(disputes, disputes.c.cycle_id == cycle_id), 1),
        ]  # fmt: skip

    def phase_four(self, cycle_id: str) -> list[Case]:
        request = operator_pb2.MarkSettledRequest(
            request_id=new_request_id(), cycle_id=cycle_id, bank_reference=f"BANK-{self.shop}"
        )
        settled = rows(cycles, cycles.c.cycle_id == cycle_id, cycles.c.status == "settled")
        return [self.operator("MarkSettled", "MarkSettled", request, settled, 1)]

    def run(self) -> list[str]:
        """Set up and storm phase after phase; stops at the first phase with a problem."""
        self.set_up()
        first = self.phase_one()
        problems = self._storm(first)
        if problems:
            return problems
        second = self.phase_two({c.name: c for c in first})
        problems = self._storm(second)
        if problems:
            return problems
        cycle_id = operator_pb2.Cycle.FromString(second[-1].response_bytes()).cycle_id
        problems = self._storm(self.phase_three(cycle_id))
        return problems or self._storm(self.phase_four(cycle_id))


@dataclass
class StormFigures:
    """What rounds of storms sent and found."""

    rounds: int = 0
    cases: int = 0
    copies: int = 0
    problems: list[str] = field(default_factory=list)


def run_storms(
    root: Path, database_url: str | None, *, budget_s: float, workers: int = 1, max_rounds: int = 10_000
) -> StormFigures:
    """Storm rounds against a real `pointsx serve` (with `workers` processes) until `budget_s` is spent."""
    data = new_data_dir(root)
    figures = StormFigures()
    engine = make_engine(database_url or sqlite_url(data / "pointsx.db"))
    try:
        with HubProcess(data, database_url, workers=workers) as hub:
            hub.start()
            storm_hub = StormHub(hub.target, load_key(data / "operator.key"), engine)
            began = time.monotonic()
            while figures.rounds < max_rounds and (not figures.rounds or time.monotonic() - began < budget_s):
                scenario = StormScenario(storm_hub, f"s{figures.rounds}", figures.rounds)
                figures.problems += [f"storm round {figures.rounds}: {p}" for p in scenario.run()]
                figures.rounds += 1
                figures.cases += scenario.cases_made
                figures.copies += scenario.copies_sent
                if figures.problems:
                    break
            try:
                check_invariants(engine)
            except AssertionError as exc:
                figures.problems.append(f"auditor: {exc}")
            figures.problems += [f"the hub logged: {line}" for line in logged_failures(hub.log_text())]
            code = hub.stop()
            if code != 0:
                figures.problems.append(f"the hub exited {code} on SIGTERM")
    finally:
        engine.dispose()
    return figures
