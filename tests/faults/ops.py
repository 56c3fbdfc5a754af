"""The bank workload's network and its operations: who exists, what a client sends, what it was told.

Three merchants of one currency at different point values, every pair of them on a route both
ways (one route with a fee of its own), and `persons` people enrolled and linked at all three. An
`Op` is one request a client made — its kind, caller, request_id and arguments — and what came of
it: acknowledged (`ok`, with the response), refused with a stored reason, or `ambiguous` (the
hub died and the SDK's bounded retries ran out: it may or may not have happened).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exchange.config import load_key
from exchange.operator_client import OperatorClient
from merchant_sdk import MerchantClient, errors, new_request_id
from merchant_sdk._pb.pointsx.v1 import exchange_pb2, ledger_pb2, operator_pb2
from merchant_sdk.signing import public_key_bytes

Kind = Literal["issue", "redeem", "convert", "reverse"]
Outcome = Literal["sent", "ok", "refused", "ambiguous", "unexpected"]
Response = ledger_pb2.PointsMovement | exchange_pb2.Conversion | operator_pb2.ReverseConversionResponse

CURRENCY = "CNY"
VALUES = {"alpha": 10_007, "beta": 30_000, "gamma": 3_333}  # micros per point: uneven on purpose
ROUTE_FEES_BPS = {("beta", "gamma"): 250}  # the others run at the network default
BIG_CAP = 10**12  # net debit caps out of the way: the bank test is about points
INITIAL_POINTS = 5_000
OPERATOR = "operator"

METHODS: dict[Kind, str] = {
    "issue": "/pointsx.v1.LedgerService/IssuePoints",
    "redeem": "/pointsx.v1.LedgerService/RedeemPoints",
    "convert": "/pointsx.v1.ExchangeService/Convert",
    "reverse": "/pointsx.v1.OperatorService/ReverseConversion",
}
OPERATION_KINDS: dict[Kind, str] = {"issue": "issue", "redeem": "redeem", "convert": "convert", "reverse": "reversal"}
RESPONSE_TYPES: dict[Kind, type[Response]] = {
    "issue": ledger_pb2.PointsMovement,
    "redeem": ledger_pb2.PointsMovement,
    "convert": exchange_pb2.Conversion,
    "reverse": operator_pb2.ReverseConversionResponse,
}
# The refusals the workload runs into by design; anything else is worth a look.
EXPECTED_REFUSALS: dict[Kind, frozenset[str]] = {
    "issue": frozenset(),
    "redeem": frozenset({"INSUFFICIENT_POINTS"}),
    "convert": frozenset({"INSUFFICIENT_POINTS"}),
    "reverse": frozenset({"INSUFFICIENT_POINTS", "ALREADY_REVERSED"}),
}


def member_ref(person: int, merchant_id: str) -> str:
    """The person's id at one merchant: distinct at each, so a mix-up of accounts shows."""
    return f"p{person:03d}.{merchant_id}"


@dataclass
class Op:
    """One request and what its client learnt of it."""

    kind: Kind
    caller: str
    request_id: str
    person: int
    merchant_id: str  # issue/redeem: the merchant; convert: the source; reverse: ""
    points: int = 0
    destination: str = ""  # convert
    conversion_id: str = ""  # reverse
    outcome: Outcome = "sent"
    response: Response | None = None
    reason: str = ""  # the refusal's ErrorInfo reason
    error: str = ""  # the last failure as the client saw it
    round: int = 0
    # Set when an ambiguous (or unexpected) outcome was settled by sending the request again:
    # whether the hub already held the request before that second send.
    resolved: bool = False
    held_before_resend: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        return (self.caller, self.request_id)

    def operation_id(self) -> str:
        """The id the hub gave the operation, from its (acknowledged) response."""
        response = self.response
        if isinstance(response, ledger_pb2.PointsMovement):
            return response.operation_id
        if isinstance(response, exchange_pb2.Conversion):
            return response.conversion_id
        assert isinstance(response, operator_pb2.ReverseConversionResponse)
        return response.reversal_operation_id

    def describe(self) -> str:
        what = {
            "issue": f"issue {self.points} to {member_ref(self.person, self.merchant_id)}",
            "redeem": f"redeem {self.points} of {member_ref(self.person, self.merchant_id)}",
            "convert": f"convert {self.points} of {member_ref(self.person, self.merchant_id)} to {self.destination}",
            "reverse": f"reverse {self.conversion_id}",
        }[self.kind]
        return f"{what} ({self.caller} request {self.request_id}, round {self.round}, {self.outcome})"


def send(op: Op, merchants: dict[str, MerchantClient], operator: OperatorClient) -> Response:
    """Send `op` once through the SDK (whose transport retries UNAVAILABLE with the same request_id)."""
    if op.kind == "issue":
        return merchants[op.merchant_id].issue_points(
            member_ref(op.person, op.merchant_id), op.points, request_id=op.request_id
        )
    if op.kind == "redeem":
        return merchants[op.merchant_id].redeem_points(
            member_ref(op.person, op.merchant_id), op.points, request_id=op.request_id
        )
    if op.kind == "convert":
        return merchants[op.merchant_id].convert(
            member_ref(op.person, op.merchant_id), op.destination, op.points, request_id=op.request_id
        )
    return operator.reverse_conversion(op.conversion_id, reason="bank test", request_id=op.request_id)


def settle(op: Op, merchants: dict[str, MerchantClient], operator: OperatorClient) -> None:
    """Send `op` and record its outcome on it: ok, a refusal, ambiguous, or unexpected (a bug?)."""
    try:
        op.response = send(op, merchants, operator)
    except errors.TransientError as exc:
        op.outcome, op.error = "ambiguous", str(exc)
        return
    except errors.PointsxError as exc:
        op.reason, op.error = exc.reason or exc.code.name, str(exc)
        op.outcome = "refused" if exc.reason in EXPECTED_REFUSALS[op.kind] else "unexpected"
        return
    op.outcome = "ok"


@dataclass(frozen=True)
class Network:
    """The merchants' keys and the operator's: enough to make clients for any of them."""

    operator_key: Ed25519PrivateKey
    keys: dict[str, Ed25519PrivateKey]
    persons: int

    @classmethod
    def create(cls, data: Path, persons: int) -> Network:
        return cls(load_key(data / "operator.key"), {m: Ed25519PrivateKey.generate() for m in VALUES}, persons)

    def accounts(self) -> list[tuple[str, str]]:
        return [(m, member_ref(p, m)) for p in range(self.persons) for m in VALUES]

    def set_up(self, target: str) -> list[Op]:
        """Admit, enrol, link and open every route; the initial issues, as acknowledged ops."""
        issued: list[Op] = []
        with OperatorClient(target, self.operator_key) as op:
            for m, value in VALUES.items():
                op.register_merchant(m, m.title(), CURRENCY, value, public_key_bytes(self.keys[m].public_key()),
                                     net_debit_cap_micros=BIG_CAP)  # fmt: skip
            clients = {m: MerchantClient(target, m, key) for m, key in self.keys.items()}
            try:
                for source in VALUES:
                    for destination in VALUES:
                        if source != destination:
                            clients[source].set_route(destination, "outbound")
                            clients[destination].set_route(source, "inbound")
                for (source, destination), fee_bps in ROUTE_FEES_BPS.items():
                    op.set_route_terms(source, destination, fee_bps=fee_bps)
                first, *others = VALUES
                for p in range(self.persons):
                    for m in VALUES:
                        clients[m].enroll_member(member_ref(p, m))
                    for m in others:
                        code = clients[first].create_link_code(member_ref(p, first)).code
                        clients[m].redeem_link_code(member_ref(p, m), code)
                    for m in VALUES:
                        issue = Op("issue", m, new_request_id(), p, m, INITIAL_POINTS)
                        settle(issue, clients, op)
                        assert issue.outcome == "ok", issue.error
                        issued.append(issue)
            finally:
                for client in clients.values():
                    client.close()
        return issued


def conversion_of(op: Op) -> exchange_pb2.Conversion:
    assert isinstance(op.response, exchange_pb2.Conversion), op.describe()
    return op.response
