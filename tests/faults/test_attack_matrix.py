"""DESIGN §6's attack matrix for EVERY method of every authenticated service, on SQLite and PostgreSQL.

`tests/integration/test_auth_matrix.py` goes deep on one method (IssuePoints: each malformed
header, window edges on a frozen clock, nonce pruning, concurrent replays, key rotation) and
checks the unsigned call for every unary method. This file goes wide: each of the 34 methods of
MerchantService, LedgerService, ExchangeService, ClearingService and OperatorService (the stream
too), each with a request the hub would otherwise serve, meets each attack —

    unsigned            no x-pointsx-* metadata                       UNAUTHENTICATED MISSING_CREDENTIALS
    bad_signature       the caller's key id, signed by another key     UNAUTHENTICATED BAD_SIGNATURE
    tampered_body       a genuine signature over other bytes           UNAUTHENTICATED BAD_SIGNATURE
    other_method        a genuine signature for another method         UNAUTHENTICATED BAD_SIGNATURE
    another_key         caller A (or the operator) with merchant B's key   UNAUTHENTICATED UNKNOWN_KEY
    stale_timestamp     signed 301 s ago                               UNAUTHENTICATED TIMESTAMP_OUT_OF_WINDOW
    future_timestamp    signed 301 s ahead                             UNAUTHENTICATED TIMESTAMP_OUT_OF_WINDOW
    revoked_key         a revoked key of the caller's                  UNAUTHENTICATED KEY_REVOKED
    replay              the same call again, same nonce                UNAUTHENTICATED NONCE_REPLAYED
    wrong_role          operator methods by a merchant                 PERMISSION_DENIED OPERATOR_ONLY
                        merchant methods by the operator               PERMISSION_DENIED MERCHANT_ONLY
    cross_merchant      merchant B, properly signed, naming A          PERMISSION_DENIED CROSS_MERCHANT_ACCESS

— and is refused with that code and ErrorInfo reason, with nothing changed: every table of the
database is read before and after and compared row for row. (A call that passed authentication
leaves its nonce behind, and only that: `wrong_role` and `cross_merchant` may add exactly that
one row to `nonces`. A replay's first call is the genuine one: the snapshot is taken after it.)
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import descriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import Engine, select

from exchange.ledger import keys
from exchange.store.engine import write_transaction
from exchange.store.schema import metadata as schema
from exchange.store.schema import nonces
from merchant_sdk import MerchantClient
from merchant_sdk._pb.pointsx.v1 import (
    clearing_pb2,
    common_pb2,
    exchange_pb2,
    ledger_pb2,
    merchant_pb2,
    operator_pb2,
)
from merchant_sdk.signing import (
    HEADER_NONCE,
    key_id_of,
    public_key_bytes,
)
from tests import harness
from tests.auditor import check_invariants
from tests.conftest import BACKENDS
from tests.integration.test_auth_matrix import now_ms, sign

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
OPERATOR = "operator"
A, B, C = "am-a", "am-b", "am-c"
WINDOW_MS = 300_000
pytestmark = pytest.mark.timeout(60)  # a hung hub fails its test, not the whole run

SIGNED_SERVICES = [
    file.DESCRIPTOR.services_by_name[name]
    for file, name in (
        (merchant_pb2, "MerchantService"),
        (ledger_pb2, "LedgerService"),
        (exchange_pb2, "ExchangeService"),
        (clearing_pb2, "ClearingService"),
        (operator_pb2, "OperatorService"),
    )
]
METHODS = {m.name: m for s in SIGNED_SERVICES for m in s.methods}

ATTACKS: dict[str, tuple[grpc.StatusCode, str]] = {
    "unsigned": (UNAUTHENTICATED, "MISSING_CREDENTIALS"),
    "bad_signature": (UNAUTHENTICATED, "BAD_SIGNATURE"),
    "tampered_body": (UNAUTHENTICATED, "BAD_SIGNATURE"),
    "other_method": (UNAUTHENTICATED, "BAD_SIGNATURE"),
    "another_key": (UNAUTHENTICATED, "UNKNOWN_KEY"),
    "stale_timestamp": (UNAUTHENTICATED, "TIMESTAMP_OUT_OF_WINDOW"),
    "future_timestamp": (UNAUTHENTICATED, "TIMESTAMP_OUT_OF_WINDOW"),
    "revoked_key": (UNAUTHENTICATED, "KEY_REVOKED"),
    "replay": (UNAUTHENTICATED, "NONCE_REPLAYED"),
    "wrong_role": (PERMISSION_DENIED, "<role>"),
    "cross_merchant": (PERMISSION_DENIED, "CROSS_MERCHANT_ACCESS"),
}
UNKNOWN_FIELD = b"\xc0\x3e\x01"  # field 1000, varint 1
# Attacks that pass authentication: the hub has remembered the nonce when it refuses.
NONCE_SPENT = {"wrong_role", "cross_merchant"}


def is_operator_method(method: descriptor.MethodDescriptor) -> bool:
    return method.containing_service.name == "OperatorService"


def path_of(method: descriptor.MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


# --- the scene ------------------------------------------------------------------------------------


@dataclass
class Scene:
    running: harness.RunningHub
    channel: grpc.Channel
    key_a: Ed25519PrivateKey  # A signs with this one
    revoked_a: Ed25519PrivateKey  # A's first key, revoked
    key_b: Ed25519PrivateKey
    operator_key: Ed25519PrivateKey
    revoked_operator: Ed25519PrivateKey
    spare_a_id: str  # another active key of A's, for RevokeKey
    link_code_b: str  # B's code for its member "brook", for A's RedeemLinkCode
    conversion_id: str  # alice@A -> bob@B
    reversible_id: str  # another, for ReverseConversion
    cycle_id: str  # a closed CNY cycle holding the first conversion
    item_id: str  # that conversion, as a statement item of A's

    @property
    def engine(self) -> Engine:
        return self.running.hub.engine


def _revoked_operator_key(engine: Engine) -> Ed25519PrivateKey:
    """A second operator key, registered and revoked straight in the database (no RPC adds operator keys)."""
    key = Ed25519PrivateKey.generate()
    now = int(time.time() * 1000)
    with write_transaction(engine) as conn:
        key_id = keys.ensure(conn, OPERATOR, public_key_bytes(key.public_key()), now)
        keys.revoke(conn, OPERATOR, key_id, now)
    return key


def _build(running: harness.RunningHub) -> Scene:
    a_first, revoked_a = running.admit(A, cap_micros=10**12)
    key_a = Ed25519PrivateKey.generate()
    a_first.add_key(key_a)
    a_first.revoke_key(a_first.key_id)  # with the new key: the first one is revoked from here on
    a_first.close()
    a = MerchantClient(running.target, A, key_a)
    spare_a_id = a.add_key(Ed25519PrivateKey.generate()).key_id
    b, key_b = running.admit(B, cap_micros=10**12)
    running.admit(C)[0].close()
    a.set_route(B, "outbound")
    b.set_route(A, "inbound")
    a.enroll_member("alice")
    b.enroll_member("bob")
    b.redeem_link_code("bob", a.create_link_code("alice").code)
    a.issue_points("alice", 10**6)
    a.enroll_member("dora")
    b.enroll_member("brook")
    link_code_b = b.create_link_code("brook").code
    a.enroll_member("carol")
    first = a.convert("alice", B, 1_000)
    with running.operator() as op:
        cycle = op.close_cycle("CNY")
    item_id = next(a.iter_statement_items(cycle.cycle_id)).operation_id
    reversible = a.convert("alice", B, 100)
    a.close()
    b.close()
    return Scene(
        running=running,
        channel=grpc.insecure_channel(running.target),
        key_a=key_a,
        revoked_a=revoked_a,
        key_b=key_b,
        operator_key=running.operator_key,
        revoked_operator=_revoked_operator_key(running.hub.engine),
        spare_a_id=spare_a_id,
        link_code_b=link_code_b,
        conversion_id=first.conversion_id,
        reversible_id=reversible.conversion_id,
        cycle_id=cycle.cycle_id,
        item_id=item_id,
    )


@pytest.fixture(scope="module", params=BACKENDS)
def scene(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    backend = str(request.param)
    url, name = harness.fresh_postgres_database() if backend == "postgres" else (None, None)
    running = harness.RunningHub(tmp_path_factory.mktemp(f"attack-{backend}"), url)
    built: Scene | None = None
    try:
        built = _build(running)
        yield built
        check_invariants(running.hub.engine)
    finally:
        if built is not None:
            built.channel.close()
        running.stop()
        if name is not None:
            harness.drop_postgres_database(name)


# --- a request each method would serve ----------------------------------------------------------------


def rid() -> str:
    return str(uuid.uuid4())


def _in_two_days() -> Timestamp:
    return Timestamp(seconds=int(time.time()) + 2 * 86_400)


def _convert_item(m: str) -> exchange_pb2.ConvertRequest:
    return exchange_pb2.ConvertRequest(
        request_id=rid(), merchant_id=m, member_ref="alice", destination_merchant_id=B, src_points=10
    )


# Each builder gets the scene and the merchant the request names (A; for `cross_merchant` too, signed by B).
REQUESTS: dict[str, Callable[[Scene, str], Message]] = {
    "GetMerchant": lambda s, m: merchant_pb2.GetMerchantRequest(merchant_id=m),
    "SchedulePointValue": lambda s, m: merchant_pb2.SchedulePointValueRequest(
        request_id=rid(), merchant_id=m, value_micros=20_000, effective_at=_in_two_days()
    ),
    "AddKey": lambda s, m: merchant_pb2.AddKeyRequest(
        request_id=rid(), merchant_id=m, public_key=public_key_bytes(Ed25519PrivateKey.generate().public_key())
    ),
    "RevokeKey": lambda s, m: merchant_pb2.RevokeKeyRequest(request_id=rid(), merchant_id=m, key_id=s.spare_a_id),
    "SetRoute": lambda s, m: merchant_pb2.SetRouteRequest(
        request_id=rid(), merchant_id=m, partner_id=C, direction=common_pb2.ROUTE_DIRECTION_OUTBOUND, enabled=True
    ),
    "ListRoutes": lambda s, m: merchant_pb2.ListRoutesRequest(merchant_id=m),
    "EnrollMember": lambda s, m: ledger_pb2.EnrollMemberRequest(
        request_id=rid(), merchant_id=m, member_ref=f"m-{secrets.token_hex(4)}"
    ),
    "IssuePoints": lambda s, m: ledger_pb2.IssuePointsRequest(
        request_id=rid(), merchant_id=m, member_ref="alice", points=5
    ),
    "RedeemPoints": lambda s, m: ledger_pb2.RedeemPointsRequest(
        request_id=rid(), merchant_id=m, member_ref="alice", points=1
    ),
    "GetBalance": lambda s, m: ledger_pb2.GetBalanceRequest(merchant_id=m, member_ref="alice"),
    "ListActivity": lambda s, m: ledger_pb2.ListActivityRequest(merchant_id=m, member_ref="alice"),
    "CreateLinkCode": lambda s, m: ledger_pb2.CreateLinkCodeRequest(
        request_id=rid(), merchant_id=m, member_ref="alice"
    ),
    "RedeemLinkCode": lambda s, m: ledger_pb2.RedeemLinkCodeRequest(
        request_id=rid(), merchant_id=m, member_ref="carol", code=s.link_code_b
    ),
    "Unlink": lambda s, m: ledger_pb2.UnlinkRequest(request_id=rid(), merchant_id=m, member_ref="dora"),
    "QuoteConversion": lambda s, m: exchange_pb2.QuoteConversionRequest(
        request_id=rid(), merchant_id=m, member_ref="alice", destination_merchant_id=B, src_points=10
    ),
    "Convert": lambda s, m: _convert_item(m),
    "ConvertBatch": lambda s, m: exchange_pb2.ConvertBatchRequest(merchant_id=m, items=[_convert_item(m)]),
    "GetConversion": lambda s, m: exchange_pb2.GetConversionRequest(merchant_id=m, conversion_id=s.conversion_id),
    "StreamEvents": lambda s, m: exchange_pb2.StreamEventsRequest(merchant_id=m),
    "ListStatements": lambda s, m: clearing_pb2.ListStatementsRequest(merchant_id=m),
    "GetStatement": lambda s, m: clearing_pb2.GetStatementRequest(merchant_id=m, cycle_id=s.cycle_id),
    "ListStatementItems": lambda s, m: clearing_pb2.ListStatementItemsRequest(merchant_id=m, cycle_id=s.cycle_id),
    "AcknowledgeStatement": lambda s, m: clearing_pb2.AcknowledgeStatementRequest(
        request_id=rid(),
        merchant_id=m,
        cycle_id=s.cycle_id,
        key_id=key_id_of(s.key_a.public_key()),
        signature=bytes(64),
    ),
    "DisputeItem": lambda s, m: clearing_pb2.DisputeItemRequest(
        request_id=rid(), merchant_id=m, cycle_id=s.cycle_id, operation_id=s.item_id, reason="not ours"
    ),
    "RegisterMerchant": lambda s, m: operator_pb2.RegisterMerchantRequest(
        request_id=rid(),
        merchant_id=f"am-{secrets.token_hex(4)}",
        name="Newcomer",
        currency="CNY",
        point_value_micros=10_000,
        public_key=public_key_bytes(Ed25519PrivateKey.generate().public_key()),
    ),
    "SetMerchantStatus": lambda s, m: operator_pb2.SetMerchantStatusRequest(
        request_id=rid(), merchant_id=C, status=common_pb2.MERCHANT_STATUS_ACTIVE
    ),
    "ListMerchants": lambda s, m: operator_pb2.ListMerchantsRequest(),
    "SetRouteTerms": lambda s, m: operator_pb2.SetRouteTermsRequest(
        request_id=rid(), source_merchant_id=A, destination_merchant_id=B, fee_bps=100
    ),
    "SetNetDebitCap": lambda s, m: operator_pb2.SetNetDebitCapRequest(
        request_id=rid(), merchant_id=A, cap_micros=10**12
    ),
    "ReverseConversion": lambda s, m: operator_pb2.ReverseConversionRequest(
        request_id=rid(), conversion_id=s.reversible_id, reason="attack matrix"
    ),
    "CloseCycle": lambda s, m: operator_pb2.CloseCycleRequest(request_id=rid(), currency="EUR"),
    "ListCycles": lambda s, m: operator_pb2.ListCyclesRequest(),
    "GetCycle": lambda s, m: operator_pb2.GetCycleRequest(cycle_id=s.cycle_id),
    "MarkSettled": lambda s, m: operator_pb2.MarkSettledRequest(
        request_id=rid(), cycle_id=s.cycle_id, bank_reference="REF-1"
    ),
}


def test_every_signed_method_has_a_request() -> None:
    """A new method joins the matrix by getting a request here (and a row in the table below)."""
    assert set(REQUESTS) == set(METHODS)
    assert len(METHODS) >= 34


def _applies(method: descriptor.MethodDescriptor, attack: str) -> bool:
    if attack != "cross_merchant":
        return True
    # Operator methods are nobody's own; another merchant's public profile is everybody's to read.
    return not is_operator_method(method) and method.name != "GetMerchant"


CASES = [
    pytest.param(name, attack, id=f"{name}-{attack}")
    for name, method in METHODS.items()
    for attack in ATTACKS
    if _applies(method, attack)
]


# --- signing, calling, judging ------------------------------------------------------------------------

Metadata = list[tuple[str, str]]


@dataclass(frozen=True)
class Answer:
    code: grpc.StatusCode
    reason: str
    message: str


def call(scene: Scene, method: descriptor.MethodDescriptor, body: bytes, metadata: Metadata) -> Answer:
    """One call with exactly these bytes and headers; a stream is read to its first message."""
    path = path_of(method)
    try:
        if method.server_streaming:
            stream: Any = scene.channel.unary_stream(path, request_serializer=None, response_deserializer=None)(
                body, metadata=tuple(metadata), timeout=10
            )
            try:
                for raw in stream:
                    GetMessageClass(method.output_type).FromString(raw)
                    break
            finally:
                stream.cancel()
        else:
            raw = scene.channel.unary_unary(path, request_serializer=None, response_deserializer=None)(
                body, metadata=tuple(metadata), timeout=20
            )
            GetMessageClass(method.output_type).FromString(raw)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
        assert status is not None, f"{path}: {code} without google.rpc.Status"
        info = error_details_pb2.ErrorInfo()
        assert len(status.details) == 1 and status.details[0].Unpack(info), f"{path}: {status}"
        assert info.domain == "pointsx.dev", info
        return Answer(code, info.reason, status.message)
    return Answer(grpc.StatusCode.OK, "", "")


Snapshot = dict[str, list[tuple[object, ...]]]


def snapshot(engine: Engine) -> Snapshot:
    """Every row of every table, in a stable order."""
    with engine.connect() as conn:
        return {
            table.name: sorted((tuple(row) for row in conn.execute(select(table))), key=repr)
            for table in schema.sorted_tables
        }


def changed_tables(before: Snapshot, after: Snapshot) -> list[str]:
    return [name for name in before if before[name] != after[name]]


# --- the matrix ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "attack"), CASES)
def test_attack_is_refused_and_changes_nothing(scene: Scene, name: str, attack: str) -> None:
    method = METHODS[name]
    path = path_of(method)
    operator_method = is_operator_method(method)
    caller, key = (OPERATOR, scene.operator_key) if operator_method else (A, scene.key_a)
    body = REQUESTS[name](scene, A).SerializeToString()
    code, reason = ATTACKS[attack]

    if attack == "unsigned":
        metadata: Metadata = []
    elif attack == "bad_signature":
        metadata = sign(path, body, caller, Ed25519PrivateKey.generate(), key_id=key_id_of(key.public_key()))
    elif attack == "tampered_body":
        metadata = sign(path, body, caller, key)
        body += UNKNOWN_FIELD  # bytes any parser skips: only the signature can tell
    elif attack == "other_method":
        siblings = list(method.containing_service.methods)
        other = siblings[(siblings.index(method) + 1) % len(siblings)]  # a real method, the service's next
        metadata = sign(path_of(other), body, caller, key)
    elif attack == "another_key":
        metadata = sign(path, body, caller, scene.key_b)
    elif attack in ("stale_timestamp", "future_timestamp"):
        offset = -(WINDOW_MS + 1_000) if attack == "stale_timestamp" else WINDOW_MS + 1_000
        metadata = sign(path, body, caller, key, timestamp_ms=now_ms() + offset)
    elif attack == "revoked_key":
        metadata = sign(path, body, caller, scene.revoked_operator if operator_method else scene.revoked_a)
    elif attack == "replay":
        metadata = sign(path, body, caller, key)
        first = call(scene, method, body, metadata)
        assert first.code != UNAUTHENTICATED, f"the genuine call was refused: {first}"
    elif attack == "wrong_role":
        if operator_method:
            metadata, reason = sign(path, body, A, scene.key_a), "OPERATOR_ONLY"
        else:
            metadata, reason = sign(path, body, OPERATOR, scene.operator_key), "MERCHANT_ONLY"
    else:
        assert attack == "cross_merchant"
        metadata = sign(path, body, B, scene.key_b)  # B's own key, naming A

    before = snapshot(scene.engine)
    answer = call(scene, method, body, metadata)
    after = snapshot(scene.engine)

    assert (answer.code, answer.reason) == (code, reason), f"{name} / {attack}: {answer}"
    if attack in NONCE_SPENT:
        nonce = dict(metadata)[HEADER_NONCE]
        added = sorted(set(after.pop(nonces.name)) - set(before.pop(nonces.name)))
        assert [row[1] for row in added] == [nonce], f"{name} / {attack}: nonces added {added}"
    assert changed_tables(before, after) == [], f"{name} / {attack} changed {changed_tables(before, after)}"


# --- cross-merchant access the matrix's "naming A" cannot express -------------------------------------


def test_a_batch_item_naming_another_merchant_is_refused_alone(scene: Scene) -> None:
    """B's own batch whose item names A: the call is OK, the item refused CROSS_MERCHANT_ACCESS on
    its own (a batch answers per item), and nothing changes but the call's nonce."""
    method = METHODS["ConvertBatch"]
    body = exchange_pb2.ConvertBatchRequest(merchant_id=B, items=[_convert_item(A)]).SerializeToString()
    before = snapshot(scene.engine)
    raw = scene.channel.unary_unary(path_of(method), request_serializer=None, response_deserializer=None)(
        body, metadata=tuple(sign(path_of(method), body, B, scene.key_b)), timeout=10
    )
    after = snapshot(scene.engine)
    result = exchange_pb2.ConvertBatchResponse.FromString(raw).results[0]
    info = error_details_pb2.ErrorInfo()
    assert result.WhichOneof("outcome") == "error" and result.error.details[0].Unpack(info)
    assert (result.error.code, info.reason) == (PERMISSION_DENIED.value[0], "CROSS_MERCHANT_ACCESS")
    after.pop(nonces.name), before.pop(nonces.name)
    assert changed_tables(before, after) == []


def test_a_conversion_of_others_is_not_readable(scene: Scene) -> None:
    """C asks, in its own name, for a conversion between A and B."""
    method = METHODS["GetConversion"]
    key_c = Ed25519PrivateKey.generate()
    with scene.running.operator() as op:
        op.register_merchant("am-d", "D", "CNY", 10_000, public_key_bytes(key_c.public_key()))
    body = exchange_pb2.GetConversionRequest(conversion_id=scene.conversion_id).SerializeToString()
    answer = call(scene, method, body, sign(path_of(method), body, "am-d", key_c))
    assert (answer.code, answer.reason) == (PERMISSION_DENIED, "CROSS_MERCHANT_ACCESS")


def test_another_merchants_profile_is_public_only(scene: Scene) -> None:
    """GetMerchant naming A, by B: allowed, but without A's keys, bank details or debit cap."""
    method = METHODS["GetMerchant"]
    body = merchant_pb2.GetMerchantRequest(merchant_id=A).SerializeToString()
    raw = scene.channel.unary_unary(path_of(method), request_serializer=None, response_deserializer=None)(
        body, metadata=tuple(sign(path_of(method), body, B, scene.key_b)), timeout=10
    )
    profile = common_pb2.Merchant.FromString(raw)
    assert profile.merchant_id == A
    assert not profile.keys and not profile.HasField("bank") and not profile.HasField("net_debit_cap")


def test_the_scene_still_works_after_the_attacks(scene: Scene) -> None:
    """The genuine callers were never locked out: A issues, the operator lists, and the ledger balances."""
    with MerchantClient(scene.running.target, A, scene.key_a) as a:
        before = a.get_balance("alice").points
        assert a.issue_points("alice", 3).balance_points == before + 3
    with scene.running.operator() as op:
        assert {A, B, C} <= {m.merchant_id for m in op.list_merchants().merchants}
    check_invariants(scene.engine)
