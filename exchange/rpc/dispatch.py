"""Turns servicer classes into gRPC handlers that see the raw request bytes.

Handlers are registered without a deserializer, so the hub verifies the signature over exactly
the bytes it received (DESIGN §6: no re-serialisation), then parses, then calls the servicer.
Domain errors become statuses here — the one place — and a bug becomes a logged INTERNAL.
A servicer only decodes, calls a command (exchange/commands/) and encodes its result; nothing
here knows the database.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor, message
from google.protobuf.message_factory import GetMessageClass

from exchange.auth import Identity
from exchange.domain import errors, outcomes, units
from exchange.domain.requests import MutationContext
from exchange.hub import Hub
from exchange.rpc import status

log = logging.getLogger("pointsx.rpc")
T = TypeVar("T")

# Who may call a service: nobody needs to sign NetworkService; operator methods need the operator.
PUBLIC, MERCHANT, OPERATOR = "public", "merchant", "operator"


@dataclass
class Call:
    """One request in flight: who sent it, what they sent, and the hub to run it on."""

    hub: Hub
    method: str
    raw: bytes
    request: Any
    identity: Identity | None
    # (key_id, nonce, seen_at_ms) still to be stored: a `folds_nonce` handler's write stores it.
    pending_nonce: tuple[str, str, int] | None = None

    @functools.cached_property
    def raw_sha256(self) -> str:
        """The received bytes' digest, once per call (a batch's items all carry it)."""
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def caller(self) -> str:
        assert self.identity is not None
        return self.identity.caller

    def own_merchant(self, requested: str) -> str:
        """A merchant acts only on itself: another merchant's id is PERMISSION_DENIED."""
        if requested and requested != self.caller:
            raise errors.CrossMerchantAccess(
                f"{self.caller} may not act on merchant {requested[:63]}'s members, routes or statements"
            )
        return self.caller

    def mutation_context(
        self,
        request_id: str,
        now_ms: int,
        *,
        method: str | None = None,
        content: message.Message | None = None,
        nonce: tuple[str, str, int] | None = None,
    ) -> MutationContext:
        """Who, what and when of one idempotent write. A batch item is keyed as its unary twin
        (`method`, `content`), so retrying an item alone replays the batch's outcome."""
        assert self.identity is not None
        method = method or self.method
        body = (content or self.request).SerializeToString(deterministic=True)
        return MutationContext(
            caller=self.identity.caller,
            key_id=self.identity.key_id,
            signature=self.identity.signature,
            method=method,
            request_id=units.check_request_id(request_id),
            content_sha256=hashlib.sha256(method.encode() + b"\n" + body).hexdigest(),
            raw_sha256=self.raw_sha256,
            now_ms=now_ms,
            nonce=nonce,
        )

    async def mutate(self, request_id: str, command: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run a write command for this request (its idempotency context built here); its result.

        A `folds_nonce` handler's nonce travels in the context and commits with the write; if the
        write never committed (a bug, a busy database) the dispatcher stores it afterwards."""
        now_ms = self.hub.clock.now_ms()
        nonce, self.pending_nonce = self.pending_nonce, None
        ctx = self.mutation_context(request_id, now_ms, nonce=nonce)
        try:
            return await command(self.hub, ctx, *args)
        except errors.StorageBusy:
            self.pending_nonce = nonce  # rolled back: nothing of it committed
            raise
        except errors.DomainError:
            raise  # committed with its nonce (or refused as a replay of it)
        except BaseException:
            self.pending_nonce = nonce
            raise


def reply(result: Any, encode: Callable[[Any], message.Message]) -> bytes:
    """A write's reply bytes: its result encoded deterministically, so the first answer and every
    replay are the same bytes; a reply stored before results were is served as stored."""
    if isinstance(result, outcomes.LegacyReply):
        return result.raw
    return encode(result).SerializeToString(deterministic=True)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, detail: Any) -> None:
    await context.abort(
        code, detail.message, trailing_metadata=(("grpc-status-details-bin", detail.SerializeToString()),)
    )


def folds_nonce(handler: T) -> T:
    """Mark a handler whose one write is `call.mutate`: the call's nonce is stored in that write's
    commit — one trip through the ledger writer instead of two. Whatever such a handler does
    before its write must change nothing (validation); if it never writes, the dispatcher stores
    the nonce after it, and a replay is refused either way."""
    handler.pointsx_folds_nonce = True  # type: ignore[attr-defined]
    return handler


async def _authenticate(
    hub: Hub, access: str, method: str, context: grpc.aio.ServicerContext[Any, Any], raw: bytes, *, fold: bool
) -> tuple[Identity | None, tuple[str, str, int] | None]:
    """The caller's identity, and its nonce when the handler's write is to store it (`fold`)."""
    if access == PUBLIC:
        return None, None
    metadata = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
    verified = await hub.authenticate(method, metadata, raw)
    identity = verified.identity
    pending = (identity.key_id, verified.nonce, verified.at_ms)
    if not fold:
        await _store_nonce(hub, pending)
    try:
        if access == OPERATOR and identity.caller != units.OPERATOR:
            raise errors.OperatorOnly(f"{method} is for network operators only")
        if access == MERCHANT and identity.caller == units.OPERATOR:
            raise errors.MerchantOnly(f"{method} is called by a merchant with its own key")
    except errors.DomainError:
        if fold:
            await _store_nonce(hub, pending)
        raise
    return identity, pending if fold else None


async def _store_nonce(hub: Hub, pending: tuple[str, str, int]) -> None:
    await hub.spend_nonce(*pending)


def _parse(request_cls: type[message.Message], raw: bytes) -> message.Message:
    try:
        request = request_cls.FromString(raw)
    except message.DecodeError as exc:
        raise errors.MalformedRequest(f"request body is not a valid {request_cls.DESCRIPTOR.name}: {exc}") from None
    if (where := _nul_in(request)) is not None:  # no text column on PostgreSQL can hold one
        raise errors.InvalidField(f"{where} contains a NUL character", field=where)
    # A UUID has one meaning whatever its letter case: the idempotency key, the content hash and
    # every stored copy see the canonical lower-case spelling (the signature covered the raw bytes).
    if "request_id" in request.DESCRIPTOR.fields_by_name:
        request.request_id = request.request_id.lower()  # type: ignore[attr-defined]
    return request


def _nul_in(msg: message.Message, prefix: str = "") -> str | None:
    """The first string field (at any depth, map keys and values too) holding a NUL, by its path."""
    for field, value in msg.ListFields():
        name = prefix + field.name
        if not field.is_repeated:
            items = [value]
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            items = [*value.keys(), *value.values()]
        else:
            items = list(value)
        for item in items:
            if isinstance(item, str) and "\x00" in item:
                return name
            if isinstance(item, message.Message) and (inner := _nul_in(item, name + ".")) is not None:
                return inner
    return None


Handler = Callable[[Any, Call], Awaitable[Any]]
StreamHandler = Callable[[Any, Call, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[message.Message]]


async def _prepare(
    hub: Hub,
    access: str,
    method: str,
    request_cls: type[message.Message],
    handler: object,
    context: grpc.aio.ServicerContext[Any, Any],
    raw: bytes,
) -> Call:
    """Authenticate first, so an unserved method tells an anonymous caller nothing more than a served one."""
    served = handler is not None
    fold = served and getattr(handler, "pointsx_folds_nonce", False)
    identity, pending = await _authenticate(hub, access, method, context, raw, fold=fold)
    if pending is not None:
        try:
            return _call(hub, access, method, request_cls, served, raw, identity, pending)
        except errors.DomainError:
            await _store_nonce(hub, pending)  # refused before any write: the nonce is spent all the same
            raise
    return _call(hub, access, method, request_cls, served, raw, identity, None)


def _call(
    hub: Hub,
    access: str,
    method: str,
    request_cls: type[message.Message],
    served: bool,
    raw: bytes,
    identity: Identity | None,
    pending: tuple[str, str, int] | None,
) -> Call:
    if not served:
        raise errors.NotImplementedYet(f"{method} is part of the contract but not served by this hub version yet")
    request = _parse(request_cls, raw)
    # An omitted merchant_id means the caller: spelled out, so a retry that names it is the same request.
    names_merchant = "merchant_id" in request.DESCRIPTOR.fields_by_name
    if access == MERCHANT and identity is not None and names_merchant and not request.merchant_id:  # type: ignore[attr-defined]
        request.merchant_id = identity.caller  # type: ignore[attr-defined]
    return Call(hub, method, raw, request, identity, pending)


def _unary(
    hub: Hub, access: str, method: str, request_cls: type[message.Message], handler: Handler | None
) -> Callable[..., Awaitable[bytes]]:
    async def serve(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            call = await _prepare(hub, access, method, request_cls, handler, context, raw)
            assert handler is not None
            try:
                result = await handler(call.request, call)
            finally:
                if call.pending_nonce is not None:  # a folding handler that did not write
                    await _store_nonce(hub, call.pending_nonce)
            return result if isinstance(result, bytes) else result.SerializeToString()
        except errors.DomainError as refusal:
            code, detail = status.for_error(refusal)
        except Exception:  # a bug: log it, answer INTERNAL, keep serving
            log.exception("unhandled error in %s", method)
            code, detail = status.internal()
        await _abort(context, code, detail)
        raise AssertionError("abort returned")

    return serve


def _stream(
    hub: Hub, access: str, method: str, request_cls: type[message.Message], handler: StreamHandler | None
) -> Callable[..., AsyncIterator[bytes]]:
    async def serve(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        try:
            call = await _prepare(hub, access, method, request_cls, handler, context, raw)
            assert handler is not None
            async for item in handler(call.request, call, context):
                yield item.SerializeToString()
            return
        except errors.DomainError as refusal:
            code, detail = status.for_error(refusal)
        except Exception:
            log.exception("unhandled error in %s", method)
            code, detail = status.internal()
        await _abort(context, code, detail)

    return serve


def generic_handler(
    hub: Hub, service: descriptor.ServiceDescriptor, servicer: object, access: str
) -> grpc.GenericRpcHandler[Any, Any]:
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        path = f"/{service.full_name}/{method.name}"
        handler = getattr(servicer, method.name, None)
        request_cls = GetMessageClass(method.input_type)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _stream(hub, access, path, request_cls, handler)
            )
            continue
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(_unary(hub, access, path, request_cls, handler))
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
