"""Fuzzing every RPC of every service over real gRPC (DESIGN §6, §7), on SQLite and PostgreSQL.

For each method in the service descriptors, hypothesis builds request messages from the method's
input descriptor: int64/int32 bounds, 0, negatives, DESIGN §1's limits and one past them; empty,
unicode, control-character and huge strings (to the hub's 4 MiB limit and beyond); ids the hub
knows (members, cycles, conversions, keys, quotes, link codes, cursors) and ids it does not;
nested messages and repeated fields. Each is signed properly — as a real merchant, the operator,
or the wrong one of the two — so the fuzz reaches the domain code and not only the auth layer.
A deterministic sweep then puts a NUL byte into every string field of a plausible request, one
field at a time (PostgreSQL's text type cannot hold one, so an unvalidated NUL surfaces there as
INTERNAL). Then the same methods get random bytes as the body (signed over those bytes) and wrong
metadata: headers missing, duplicated, malformed, sent as binary (`-bin`) headers, oversized.

Every answer must be OK (and parse as the method's response) or a well-formed refusal: a status
code other than INTERNAL and UNKNOWN, with one `google.rpc.ErrorInfo` of domain "pointsx.dev" and
an UPPER_SNAKE reason. The one allowed exception is gRPC's own size limit: a body over 4 MiB is
refused RESOURCE_EXHAUSTED by the transport before the hub sees it (so no ErrorInfo can ride it).
Afterwards the hub still answers (health, a real signed issue) and the auditor's invariants hold.

One hub per backend for the whole module. The CI form keeps `max_examples` small and
derandomized (deterministic); POINTSX_FUZZ_EXAMPLES=N runs N examples per RPC and kind, random.
"""

from __future__ import annotations

import base64
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import descriptor
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exchange.rpc.server import MAX_MESSAGE_BYTES
from merchant_sdk import MerchantClient
from merchant_sdk._pb.pointsx.v1 import (
    clearing_pb2,
    exchange_pb2,
    ledger_pb2,
    merchant_pb2,
    network_pb2,
    operator_pb2,
)
from merchant_sdk.signing import (
    HEADER_CALLER,
    HEADER_KEY_ID,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    Signer,
    public_key_bytes,
)
from tests import harness
from tests.auditor import check_invariants
from tests.conftest import BACKENDS

pytestmark = pytest.mark.timeout(120)  # a hung hub fails its test, not the whole run

# --- settings -------------------------------------------------------------------------------------

LONG_RUN = int(os.environ.get("POINTSX_FUZZ_EXAMPLES", "0") or 0)
MESSAGE_EXAMPLES = LONG_RUN or 24
BYTES_EXAMPLES = LONG_RUN or 4
METADATA_EXAMPLES = LONG_RUN or 4


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=not LONG_RUN,  # CI: the same examples every run; the long run explores
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


# --- the contract, from the descriptors -----------------------------------------------------------

PUBLIC, MERCHANT, OPERATOR = "public", "merchant", "operator"
ACCESS = {
    "pointsx.v1.NetworkService": PUBLIC,
    "pointsx.v1.MerchantService": MERCHANT,
    "pointsx.v1.LedgerService": MERCHANT,
    "pointsx.v1.ExchangeService": MERCHANT,
    "pointsx.v1.ClearingService": MERCHANT,
    "pointsx.v1.OperatorService": OPERATOR,
}
SERVICES: list[descriptor.ServiceDescriptor] = [
    service
    for file in (network_pb2, merchant_pb2, ledger_pb2, exchange_pb2, clearing_pb2, operator_pb2)
    for service in file.DESCRIPTOR.services_by_name.values()
]
METHODS: list[descriptor.MethodDescriptor] = [m for s in SERVICES for m in s.methods]
HEADERS = (HEADER_CALLER, HEADER_KEY_ID, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)
REASON = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*")
ERROR_DOMAIN = "pointsx.dev"
# Default gRPC limit on a request's headers: bigger metadata is the transport's to refuse.
MAX_METADATA_BYTES = 8 * 1024
# Refusals that end in the state of the world rather than in the request: restore it after.
RESTORE_AFTER = {"SetMerchantStatus", "SetRouteTerms", "SetNetDebitCap", "SetRoute", "RevokeKey", "CloseCycle"}


def path_of(method: descriptor.MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def access_of(method: descriptor.MethodDescriptor) -> str:
    return ACCESS[method.containing_service.full_name]


def test_every_service_is_classified() -> None:
    """A new service must say who may call it before it is fuzzed."""
    assert {s.full_name for s in SERVICES} == set(ACCESS)
    assert len(METHODS) >= 35, [m.name for m in METHODS]


# --- the world the fuzz runs in -------------------------------------------------------------------

A, B, C, SENTINEL = "fz-a", "fz-b", "fz-c", "fz-sentinel"
REUSED_REQUEST_ID = "0b6f8c1e-5d0a-4c7e-9a43-3f1c2d4e5f60"  # the same id, whatever method: REQUEST_ID_REUSED


@dataclass
class Party:
    merchant_id: str
    key: Ed25519PrivateKey
    signer: Signer


@dataclass
class World:
    """A hub with merchants, linked members, routes, conversions, a closed cycle — and what it knows."""

    running: harness.RunningHub
    backend: str
    channel: grpc.Channel
    a: Party
    b: Party
    sentinel: Party
    operator: Signer
    pools: dict[str, tuple[list[str], list[str]]]  # per kind of id: (what real callers send, near misses)
    keys: list[bytes]
    outcomes: Counter[str] = field(default_factory=Counter)
    cases: Counter[str] = field(default_factory=Counter)
    by_method: Counter[str] = field(default_factory=Counter)
    _strategies: dict[str, st.SearchStrategy[Message]] = field(default_factory=dict)

    def signer(self, role: str) -> Signer:
        return {"a": self.a.signer, "b": self.b.signer, "operator": self.operator}[role]

    def restore(self) -> None:
        """Undo what a fuzzed operator or merchant call may have done to the scene (not to the ledger)."""
        with self.running.operator() as op:
            for merchant_id in (A, B, C):
                op.set_merchant_status(merchant_id, True)
                op.set_net_debit_cap(merchant_id, 10**15)
            for source, destination in ((A, B), (B, A)):
                op.set_route_terms(source, destination)
        with (
            MerchantClient(self.running.target, A, self.a.key) as a,
            MerchantClient(self.running.target, B, self.b.key) as b,
        ):
            a.set_route(B, "outbound")
            a.set_route(B, "inbound")
            b.set_route(A, "outbound")
            b.set_route(A, "inbound")

    def assert_serving(self) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        )
        info = network_pb2.NetworkInfo.FromString(
            self.channel.unary_unary(
                "/pointsx.v1.NetworkService/GetNetworkInfo", request_serializer=None, response_deserializer=None
            )(b"", timeout=10)
        )
        assert info.version


def _build_world(running: harness.RunningHub, backend: str) -> World:
    a_client, a_key = running.admit(A, cap_micros=10**15)
    b_client, b_key = running.admit(B, cap_micros=10**15)
    c_client, _c_key = running.admit(C, currency="USD", cap_micros=10**15)
    s_client, s_key = running.admit(SENTINEL)
    # Second keys of A's and B's: the fuzz may revoke these, never the keys A and B sign with.
    spare = Ed25519PrivateKey.generate()
    spare_id = a_client.add_key(spare).key_id
    b_spare_id = b_client.add_key(Ed25519PrivateKey.generate()).key_id
    for source, destination in ((a_client, B), (b_client, A)):
        source.set_route(destination, "outbound")
        source.set_route(destination, "inbound")
    a_client.enroll_member("alice")
    b_client.enroll_member("bob")
    a_client.enroll_member("carol")
    c_client.enroll_member("dave")
    b_client.redeem_link_code("bob", a_client.create_link_code("alice").code)
    a_client.issue_points("alice", 10**9)
    b_client.issue_points("bob", 10**9)
    s_client.enroll_member("sam")
    s_client.issue_points("sam", 1)
    first = a_client.convert("alice", B, 1_000)
    back = b_client.convert("bob", A, 500)
    quote = a_client.quote_conversion("alice", B, src_points=100)
    code = a_client.create_link_code("carol").code
    with running.operator() as op:
        cycle = op.close_cycle("CNY")
    later = a_client.convert("alice", B, 2_000)
    events = a_client.events(heartbeats=True)
    cursor = next(iter(events)).cursor
    events.close()
    activity = a_client.list_activity_page("alice", page_size=1)
    operator = Signer("operator", running.operator_key)
    # Each pool: (the ids a real caller sends, near misses and strangers). Never the sentinel's ids:
    # it is the merchant that checks, afterwards, that the hub still serves.
    pools = {
        "own": (["", A, A], [B, C, "ghost-shop", "operator", "Fz-A", "x" * 64, " fz-a"]),
        "merchant": ([B, A, C], ["ghost-shop", "operator", "platform", "settlement", "Fz-A", "x" * 63,
                                 "x" * 64, "a", "fz-a\n", " fz-a"]),
        "member": (["alice", "carol", "bob"], ["dave", "sam", "ghost", "", "a" * 128, "a" * 129, "alice ", "ALICE"]),
        "cycle": ([cycle.cycle_id], [cycle.cycle_id.upper(), "cyc_0", "", "x" * 64, "x" * 65]),
        "operation": ([first.conversion_id, later.conversion_id, back.conversion_id],
                      ["op_0000000000000000", "op_9999999999999999", "op_1", "op_-000000000000001", ""]),
        "key": ([spare_id, b_spare_id], [operator.key_id, "0" * 16, "g" * 16, "", "0" * 64]),
        "quote": ([quote.quote_id, ""], [quote.quote_id.upper(), str(uuid.uuid4()), "not-a-uuid"]),
        "code": ([code], [code.lower(), "ABCDEFGH", "", "0" * 8, code + " "]),
        "currency": (["CNY", "USD"], ["JPY", "EUR", "KWD", "XXX", "cny", ""]),
        "token": (["", activity.next_page_token],
                  [token("1"), "MTIz", "=", "\x00", token(str(2**63)), "x" * 201, token("a\x00b"),
                   token("1 a\x00b"), token("a\x00\nb"), token("-1"), token("1 "), token(" x")]),
        "cursor": (["", cursor], ["0.0", "1.0", f"{2**63 - 1}.0", f"{2**63}.0", "1.99999999999", "-1.0", "."]),
    }  # fmt: skip
    keys = [public_key_bytes(spare.public_key()), public_key_bytes(a_key.public_key()), bytes(32), b"\x01" * 32]
    for client in (a_client, b_client, c_client, s_client):
        client.close()
    channel = grpc.insecure_channel(running.target, options=[("grpc.max_receive_message_length", 64 << 20)])
    return World(
        running=running,
        backend=backend,
        channel=channel,
        a=Party(A, a_key, Signer(A, a_key)),
        b=Party(B, b_key, Signer(B, b_key)),
        sentinel=Party(SENTINEL, s_key, Signer(SENTINEL, s_key)),
        operator=operator,
        pools=pools,
        keys=keys,
    )


@pytest.fixture(scope="module", params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    backend = str(request.param)
    url, name = harness.fresh_postgres_database() if backend == "postgres" else (None, None)
    running = harness.RunningHub(tmp_path_factory.mktemp(f"fuzz-{backend}"), url)
    built: World | None = None
    try:
        built = _build_world(running, backend)
        yield built
        check_invariants(running.hub.engine)
    finally:
        if built is not None:
            built.channel.close()
            _report(request, built)
        running.stop()
        if name is not None:
            harness.drop_postgres_database(name)


def _report(request: pytest.FixtureRequest, world: World) -> None:
    """How many calls the fuzz made and what came back, on the terminal (not captured)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    cases = ", ".join(f"{kind} {n}" for kind, n in sorted(world.cases.items()))
    outcomes = ", ".join(f"{reason} {n}" for reason, n in world.outcomes.most_common())
    if os.environ.get("POINTSX_FUZZ_REPORT"):
        Path(os.environ["POINTSX_FUZZ_REPORT"]).write_text(
            "\n".join(f"{k} {v}" for k, v in sorted(world.by_method.items()))
        )
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"\nfuzz [{world.backend}]: {sum(world.cases.values())} calls ({cases})")
        reporter.write_line(f"fuzz [{world.backend}] answers: {outcomes}")


# --- strategies from field descriptors ------------------------------------------------------------

INT_EDGES = [0, 1, -1, 2, 49, 50, 500, 501, 1_000, 1_001, 10_000, 10_001, 10**6, 10**9, 10**9 + 1, 10**12,
             10**12 + 1, 10**15, 10**15 + 1, 2**31 - 1, -(2**31), 2**32 - 1, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1,
             253402300799, 253402300800, int(time.time()), int(time.time() * 1000)]  # fmt: skip
NASTY_TEXT = ["", " ", "\x00", "a\x00b", "\t", "\n", "\x7f", "\u202e", "\ufeff", "Ω", "😀", "é", "%s%n", "' OR 1=1 --",
              "../../etc/passwd", "null", "${jndi:x}", "\\", "\u0000" * 8, "\U0010ffff"]  # fmt: skip
HUGE_SIZES = [129, 201, 501, 4_097, 65_537, 1 << 20, MAX_MESSAGE_BYTES + 1]


NOW_S = int(time.time())
# Plausible values by field name: what a real client would send, so the fuzz gets past validation
# into the ledger; the wild mode draws from the whole range of the field's type instead.
PLAUSIBLE_INTS: dict[str, list[int]] = {
    "seconds": [NOW_S, NOW_S - 3_600, NOW_S + 2 * 86_400, NOW_S + 400 * 86_400, 0, 253402300799],
    "nanos": [0, 1, 999_999_999],
    "page_size": [0, 1, 2, 50, 500, 501],
    "fee_bps": [0, 1, 100, 10_000, 10_001],
    "cap_micros": [0, 1, 10**6, 10**15, 10**15 + 1],
}
PLAUSIBLE_AMOUNTS = [1, 2, 10, 99, 100, 1_000, 10**6, 10**12, 10**12 + 1, 0]
PLAUSIBLE_TEXT = ["", "ok", "Fuzz Shop", "refund", "BANKREF-1", "DE89370400440532013000", "DEUTDEFF", "DE", "Ω"]


def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(sorted({e for e in INT_EDGES if lo <= e <= hi})), st.integers(lo, hi))


def plausible_int(name: str, lo: int, hi: int) -> st.SearchStrategy[int]:
    values = next((v for key, v in PLAUSIBLE_INTS.items() if name.endswith(key)), PLAUSIBLE_AMOUNTS)
    return st.sampled_from([v for v in values if lo <= v <= hi])


def huge_text() -> st.SearchStrategy[str]:
    return st.tuples(st.sampled_from(HUGE_SIZES), st.sampled_from("xé😀")).map(lambda t: t[1] * t[0])


def generic_text() -> st.SearchStrategy[str]:
    return st.one_of(st.text(max_size=40), st.sampled_from(NASTY_TEXT), huge_text())


def _pool_for(name: str) -> str | None:
    if name == "request_id":
        return "request_id"
    if name == "merchant_id":
        return "own"  # the caller's own (or, for the operator, any merchant)
    if "merchant_id" in name or name in ("partner_id", "counterparty_id"):
        return "merchant"
    if name.endswith("member_ref"):
        return "member"
    for suffix, pool in (("cycle_id", "cycle"), ("conversion_id", "operation"), ("operation_id", "operation"),
                         ("key_id", "key"), ("quote_id", "quote"), ("currency", "currency"),
                         ("page_token", "token"), ("cursor", "cursor")):  # fmt: skip
        if name.endswith(suffix):
            return pool
    return "code" if name == "code" else None


def text_for(world: World, name: str, wild: bool) -> st.SearchStrategy[str]:
    pool = _pool_for(name)
    if pool == "request_id":
        # A new id each draw (hypothesis's own uuids repeat on purpose: that is the reuse case).
        fresh = st.builds(lambda: str(uuid.uuid4()))
        if not wild:
            return st.one_of(fresh, fresh, fresh, fresh.map(str.upper), st.just(REUSED_REQUEST_ID))
        return st.one_of(st.uuids().map(str), fresh.map(str.upper), st.just(REUSED_REQUEST_ID), generic_text())
    if pool is None:
        return st.one_of(st.sampled_from(PLAUSIBLE_TEXT), generic_text()) if wild else st.sampled_from(PLAUSIBLE_TEXT)
    usual, odd = world.pools[pool]
    if wild:
        return st.one_of(st.sampled_from(usual + odd), generic_text())
    # Mostly right; sometimes a near miss — a stranger, or a right id with a NUL byte in it.
    return st.one_of(*[st.sampled_from(usual)] * 3, st.sampled_from(odd), st.sampled_from(usual).map(with_nul))


def with_nul(value: str) -> str:
    """A NUL byte inside: fine for SQLite and Python, refused by PostgreSQL's text type."""
    return value[:1] + "\x00" + value[1:]


def token(text: str) -> str:
    """A page token as the hub makes them (URL-safe base64, unpadded) of any text."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def bytes_for(world: World, name: str, wild: bool) -> st.SearchStrategy[bytes]:
    generic = st.one_of(st.binary(max_size=80), st.sampled_from(HUGE_SIZES).map(lambda n: b"\xff" * n))
    if name == "public_key":
        fresh = st.builds(lambda: public_key_bytes(Ed25519PrivateKey.generate().public_key()))
        known = st.one_of(fresh, fresh, st.sampled_from(world.keys))
        return st.one_of(known, st.binary(min_size=32, max_size=32), generic) if wild else known
    if name == "signature":
        return st.one_of(st.binary(min_size=64, max_size=64), generic) if wild else st.binary(min_size=64, max_size=64)
    return generic if wild else st.binary(max_size=16)


_INT_RANGES = {
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
}
MAX_DEPTH = 3


def value_for(world: World, fd: FieldDescriptor, depth: int, wild: bool) -> st.SearchStrategy[Any]:
    if fd.type in _INT_RANGES:
        lo, hi = _INT_RANGES[fd.type]
        return ints(lo, hi) if wild else plausible_int(fd.name, lo, hi)
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if fd.type == FieldDescriptor.TYPE_ENUM:
        assert fd.enum_type is not None
        declared = st.sampled_from([v.number for v in fd.enum_type.values])
        return st.one_of(declared, ints(-(2**31), 2**31 - 1)) if wild else declared  # proto3 enums are open
    if fd.type == FieldDescriptor.TYPE_STRING:
        return text_for(world, fd.name, wild)
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return bytes_for(world, fd.name, wild)
    if fd.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if fd.type == FieldDescriptor.TYPE_FLOAT else 64)
    assert fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type is not None, fd.full_name
    return message_for(world, fd.message_type, depth + 1, wild)


def message_for(world: World, desc: descriptor.Descriptor, depth: int, wild: bool) -> st.SearchStrategy[Message]:
    """Any message of this type: each field absent or drawn; repeated ones short, or past a limit."""
    cache_key = f"{desc.full_name}@{depth}/{wild}"
    cached = world._strategies.get(cache_key)
    if cached is not None:
        return cached
    cls = GetMessageClass(desc)
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for fd in desc.fields:
        nested = fd.message_type if fd.type == FieldDescriptor.TYPE_MESSAGE else None
        if nested is not None and (depth >= MAX_DEPTH or nested.GetOptions().map_entry):
            continue
        value = value_for(world, fd, depth, wild)
        if fd.is_repeated:
            few = st.lists(value, max_size=4 if wild else 3)
            # Sometimes one more than a batch holds (ConvertBatch: at most 1000).
            value = st.one_of(few, value.map(lambda v: [v] * 1_001)) if wild else few
        optional[fd.name] = value

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, value in values.items():
            fd = desc.fields_by_name[name]
            target = getattr(message, name)
            if fd.is_repeated:
                target.extend(value)
            elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                target.CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    if wild:
        strategy = st.fixed_dictionaries({}, optional=optional).map(build)
    else:  # every scalar field set, as a real client sets them; sub-messages (timestamps …) or not
        required = {k: v for k, v in optional.items() if desc.fields_by_name[k].type != FieldDescriptor.TYPE_MESSAGE}
        messages = {k: v for k, v in optional.items() if k not in required}
        strategy = st.fixed_dictionaries(required, optional=messages).map(build)
    world._strategies[cache_key] = strategy
    return strategy


def requests_for(world: World, desc: descriptor.Descriptor) -> st.SearchStrategy[Message]:
    """Two thirds plausible (past validation, into the ledger), a third wild (every edge of every type)."""
    plausible = message_for(world, desc, 0, False)
    return st.one_of(plausible, plausible, message_for(world, desc, 0, True))


def roles_for(method: descriptor.MethodDescriptor) -> st.SearchStrategy[str | None]:
    """Who signs: mostly the caller the method is for, sometimes the wrong one (or nobody)."""
    access = access_of(method)
    if access == PUBLIC:
        return st.sampled_from([None, None, "a", "operator"])
    if access == OPERATOR:
        return st.sampled_from(["operator"] * 5 + ["a"])
    return st.sampled_from(["a"] * 6 + ["b", "operator"])


# --- calling and judging --------------------------------------------------------------------------

Metadata = list[tuple[str, str | bytes]]


@dataclass(frozen=True)
class Answer:
    ok: bool
    code: grpc.StatusCode
    reason: str  # "" for OK and for the transport's own size refusal


def call(world: World, method: descriptor.MethodDescriptor, body: bytes, metadata: Metadata) -> Answer:
    """Send `body` as is; an OK must parse as the method's response, a refusal must be well-formed."""
    path = path_of(method)
    response_cls = GetMessageClass(method.output_type)
    try:
        if method.server_streaming:
            stream: Any = world.channel.unary_stream(path, request_serializer=None, response_deserializer=None)(
                body, metadata=tuple(metadata), timeout=10
            )
            try:
                for raw in stream:
                    response_cls.FromString(raw)
                    break
            finally:
                stream.cancel()
        else:
            response_cls.FromString(
                world.channel.unary_unary(path, request_serializer=None, response_deserializer=None)(
                    body, metadata=tuple(metadata), timeout=20
                )
            )
    except grpc.RpcError as exc:
        answer = judge(exc, len(body), sum(len(k) + len(v) for k, v in metadata), path)
        world.outcomes[answer.reason or answer.code.name] += 1
        world.by_method[f"{method.name} {answer.reason or answer.code.name}"] += 1
        return answer
    world.outcomes["OK"] += 1
    world.by_method[f"{method.name} OK"] += 1
    return Answer(True, grpc.StatusCode.OK, "")


def judge(exc: grpc.RpcError, body_len: int, metadata_len: int, path: str) -> Answer:
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    details = exc.details()  # type: ignore[attr-defined]
    where = f"{path} (body {body_len} bytes): {code.name} {details!r}"
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), f"HUB BUG: {where}"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and (
        body_len > MAX_MESSAGE_BYTES or metadata_len > MAX_METADATA_BYTES
    ):
        return Answer(False, code, "")  # gRPC's own limit, before any handler runs
    if code == grpc.StatusCode.CANCELLED and path.endswith("/StreamEvents"):
        return Answer(False, code, "")  # we cancelled the stream after its first message
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None, f"{where}: no google.rpc.Status in the trailers"
    assert status.code == code.value[0], where
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert len(infos) == 1, f"{where}: {len(infos)} ErrorInfo details"
    assert infos[0].domain == ERROR_DOMAIN, f"{where}: domain {infos[0].domain!r}"
    assert REASON.fullmatch(infos[0].reason), f"{where}: reason {infos[0].reason!r} is not UPPER_SNAKE"
    return Answer(False, code, infos[0].reason)


def signed(signer: Signer | None, method: descriptor.MethodDescriptor, body: bytes) -> Metadata:
    return list(signer.metadata(path_of(method), body)) if signer else []


IDS = [path_of(m).removeprefix("/pointsx.v1.") for m in METHODS]


# --- 1. generated messages --------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_fuzzed_messages_get_ok_or_a_well_formed_refusal(world: World, method: descriptor.MethodDescriptor) -> None:
    requests = requests_for(world, method.input_type)

    @fuzz_settings(MESSAGE_EXAMPLES)
    @given(request=requests, role=roles_for(method))
    def run(request: Message, role: str | None) -> None:
        body = request.SerializeToString()
        world.cases["messages"] += 1
        answer = call(world, method, body, signed(world.signer(role) if role else None, method, body))
        if access_of(method) == OPERATOR and role == "a" and body and len(body) <= MAX_MESSAGE_BYTES:
            assert (answer.code, answer.reason) == (grpc.StatusCode.PERMISSION_DENIED, "OPERATOR_ONLY"), answer
        if access_of(method) == MERCHANT and role == "operator" and len(body) <= MAX_MESSAGE_BYTES:
            assert (answer.code, answer.reason) == (grpc.StatusCode.PERMISSION_DENIED, "MERCHANT_ONLY"), answer

    try:
        run()
    finally:
        if method.name in RESTORE_AFTER:
            world.restore()
    world.assert_serving()


# --- 1b. a NUL byte in every string field, one field at a time ----------------------------------------


def baseline(world: World, desc: descriptor.Descriptor, access: str) -> Message:
    """A request a real caller could send: every string and number set to what the pools hold first."""
    message = GetMessageClass(desc)()
    for fd in desc.fields:
        pool = _pool_for(fd.name)
        if pool == "own" and access == OPERATOR:
            pool = "merchant"  # the operator names merchants, it has none of its own
        if fd.type == FieldDescriptor.TYPE_STRING and not fd.is_repeated:
            value = str(uuid.uuid4()) if pool == "request_id" else world.pools[pool][0][0] if pool else "ok"
            setattr(message, fd.name, value)
        elif fd.type in _INT_RANGES and not fd.is_repeated:
            lo, hi = _INT_RANGES[fd.type]
            setattr(message, fd.name, next(v for v in PLAUSIBLE_AMOUNTS if lo <= v <= hi))
        elif fd.type == FieldDescriptor.TYPE_ENUM and fd.enum_type is not None and not fd.is_repeated:
            setattr(message, fd.name, max(v.number for v in fd.enum_type.values[:2]))
        elif fd.type == FieldDescriptor.TYPE_BYTES and fd.name == "public_key":
            setattr(message, fd.name, public_key_bytes(Ed25519PrivateKey.generate().public_key()))
        elif fd.type == FieldDescriptor.TYPE_BYTES and fd.name == "signature":
            setattr(message, fd.name, bytes(64))
        elif fd.is_repeated and fd.message_type is not None and fd.message_type.name == "ConvertRequest":
            getattr(message, fd.name).add().CopyFrom(baseline(world, fd.message_type, access))
    return message


def nul_variants(message: Message) -> Iterator[tuple[str, Message]]:
    """Copies of `message` with one string field (top level, or of its first repeated item) holding a NUL."""
    for fd in message.DESCRIPTOR.fields:
        if fd.type == FieldDescriptor.TYPE_STRING and not fd.is_repeated:
            value = getattr(message, fd.name)
            texts = [with_nul(value or "x"), "\x00"]
            if fd.name.endswith("page_token"):
                texts += [token("a\x00b"), token("1 a\x00b"), token("a\x00\nb"), token("1\x00")]
            for text in texts:
                copy = type(message)()
                copy.CopyFrom(message)
                setattr(copy, fd.name, text)
                yield f"{fd.name}={text!r}", copy
        elif fd.is_repeated and fd.type == FieldDescriptor.TYPE_MESSAGE and getattr(message, fd.name):
            for label, item in nul_variants(getattr(message, fd.name)[0]):
                copy = type(message)()
                copy.CopyFrom(message)
                getattr(copy, fd.name)[0].CopyFrom(item)
                yield f"{fd.name}[0].{label}", copy


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_a_nul_byte_in_any_string_field_is_refused_cleanly(world: World, method: descriptor.MethodDescriptor) -> None:
    """PostgreSQL's text type cannot hold U+0000 (psycopg refuses to send it): a NUL that is not
    validated away reaches the database as a DataError — INTERNAL. Every field, one at a time."""
    access = access_of(method)
    signer = {PUBLIC: None, MERCHANT: world.a.signer, OPERATOR: world.operator}[access]
    broken: list[str] = []
    for label, request in nul_variants(baseline(world, method.input_type, access)):
        body = request.SerializeToString()
        world.cases["nul"] += 1
        try:
            call(world, method, body, signed(signer, method, body))
        except AssertionError as exc:
            broken.append(f"{label}: {str(exc).splitlines()[0]}")
    if method.name in RESTORE_AFTER:
        world.restore()
    world.assert_serving()
    assert not broken, f"HUB BUG ({world.backend}): " + "; ".join(broken)


# --- 2. random bytes as the body ---------------------------------------------------------------------

NASTY_BODIES = [
    b"\xff\xff\xff\xff",  # an invalid wire type
    b"\x08\x80",  # a truncated varint
    b"\x0a\x05abc",  # a length running past the end
    b"\x0a\x02\xff\xfe",  # field 1 (a string in every request that has one) that is not UTF-8
    b"\x12\x02\xc3\x28",  # field 2, invalid UTF-8
    b"\x08" + b"\xff" * 10 + b"\x01",  # an 11-byte varint
    b"\x0a\xff\xff\xff\xff\x0f",  # a length of 4 GiB
    b"\x0b\x0c",  # a group start and a mismatched group end
    b"\x00",  # field number 0
]


def parses(method: descriptor.MethodDescriptor, body: bytes) -> bool:
    try:
        GetMessageClass(method.input_type).FromString(body)
    except DecodeError:
        return False
    return True


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_random_bodies_get_a_well_formed_answer(world: World, method: descriptor.MethodDescriptor) -> None:
    role = {PUBLIC: None, MERCHANT: "a", OPERATOR: "operator"}[access_of(method)]
    signer = world.signer(role) if role else None

    @fuzz_settings(BYTES_EXAMPLES)
    @given(body=st.one_of(st.binary(max_size=300), st.sampled_from(NASTY_BODIES)))
    def run(body: bytes) -> None:
        world.cases["bodies"] += 1
        call(world, method, body, signed(signer, method, body))

    for body in NASTY_BODIES:  # every one of them, whatever hypothesis picks
        world.cases["bodies"] += 1
        answer = call(world, method, body, signed(signer, method, body))
        if role is not None and not parses(method, body):
            assert (answer.code, answer.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST"), (
                body,
                answer,
            )
    run()
    world.assert_serving()


# --- 3. wrong metadata ---------------------------------------------------------------------------------

PRINTABLE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=100)
HEADER_VALUES = st.one_of(
    PRINTABLE,
    st.sampled_from(["", "0", "-1", " ", "operator", A, B, "0" * 32, "f" * 16, str(2**63), "1e3", "=" * 88]),
)
# What to do to each of the five headers: keep it, drop it, replace it, add a second one before or
# after it, or send it as a binary header (a different key on the wire).
ACTIONS = st.sampled_from(["keep", "keep", "drop", "replace", "before", "after", "binary", "upper"])


def mangle(metadata: Metadata, plan: list[tuple[str, str, str]]) -> Metadata:
    out: Metadata = []
    by_name = dict(metadata)
    for header, (action, value, _) in zip(HEADERS, plan, strict=True):
        real = by_name[header]
        if action == "keep":
            out.append((header, real))
        elif action == "replace":
            out.append((header, value))
        elif action == "before":
            out += [(header, value), (header, real)]
        elif action == "after":
            out += [(header, real), (header, value)]
        elif action == "binary":
            out.append((header + "-bin", value.encode()))
        elif action == "upper":
            out.append((header, str(real).upper()))
    return out


def effective(metadata: Metadata) -> dict[str, str]:
    """What the hub reads: text headers, the last value of each (dispatch builds a dict)."""
    return {k: v for k, v in metadata if isinstance(v, str)}


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_wrong_metadata_is_refused_well_formed(world: World, method: descriptor.MethodDescriptor) -> None:
    access = access_of(method)
    signer = world.operator if access == OPERATOR else world.a.signer
    body = GetMessageClass(method.input_type)().SerializeToString()
    plans = st.lists(st.tuples(ACTIONS, HEADER_VALUES, st.just("")), min_size=5, max_size=5)
    extras = st.lists(
        st.tuples(st.sampled_from(["x-pointsx-caller-x", "x-pointsx-", "authorization", "x-pointsx-nonce-bin"]),
                  PRINTABLE),
        max_size=2,
    )  # fmt: skip

    @fuzz_settings(METADATA_EXAMPLES)
    @given(plan=plans, extra=extras)
    def run(plan: list[tuple[str, str, str]], extra: list[tuple[str, str]]) -> None:
        world.cases["metadata"] += 1
        real = signed(signer, method, body)
        sent = mangle(real, plan) + [(k, v.encode() if k.endswith("-bin") else v) for k, v in extra]
        answer = call(world, method, body, sent)
        size = sum(len(k) + len(v) for k, v in sent)
        if (
            access != PUBLIC
            and size <= MAX_METADATA_BYTES
            and any(effective(sent).get(h) != dict(real)[h] for h in HEADERS)
        ):
            assert answer.code == grpc.StatusCode.UNAUTHENTICATED, (plan, answer)

    # The fixed cases first: nothing at all, each header alone missing, every header binary.
    real = signed(signer, method, body)
    fixed: list[Metadata] = [[], [(h + "-bin", str(v).encode()) for h, v in real]]
    fixed += [[(h, v) for h, v in real if h != missing] for missing in HEADERS]
    for metadata in fixed:
        world.cases["metadata"] += 1
        answer = call(world, method, body, metadata)
        if access != PUBLIC:
            assert (answer.code, answer.reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS"), answer
    run()
    world.assert_serving()


def test_oversized_metadata_is_refused_by_the_transport(world: World) -> None:
    """Headers past gRPC's limit never reach the hub: the transport refuses them (on a channel of
    its own — the server drops the connection, and the fuzz channel should not wait to reconnect)."""
    method = next(m for m in METHODS if m.name == "GetBalance")
    body = ledger_pb2.GetBalanceRequest(member_ref="alice").SerializeToString()
    metadata = [*signed(world.a.signer, method, body), ("x-pointsx-padding", "9" * 20_000)]
    with grpc.insecure_channel(world.running.target) as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(path_of(method), request_serializer=None, response_deserializer=None)(
            body, metadata=tuple(metadata), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    world.cases["metadata"] += 1
    world.assert_serving()


# --- afterwards ------------------------------------------------------------------------------------------


def test_the_hub_still_serves_and_the_ledger_still_balances(world: World) -> None:
    """Runs after the fuzz of its backend: health, a real signed call, and the auditor."""
    world.assert_serving()
    with MerchantClient(world.running.target, SENTINEL, world.sentinel.key) as sentinel:
        before = sentinel.get_balance("sam").points
        assert sentinel.issue_points("sam", 7).balance_points == before + 7
    check_invariants(world.running.hub.engine)
