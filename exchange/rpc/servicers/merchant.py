"""MerchantService: a merchant's profile, point value schedule, keys and its side of routes."""

from __future__ import annotations

from sqlalchemy import Connection

from exchange.domain import errors, units
from exchange.ledger import keys, merchants, routes
from exchange.rpc import translate
from exchange.rpc.dispatch import Call
from merchant_sdk._pb.pointsx.v1 import common_pb2, merchant_pb2


class MerchantServicer:
    async def GetMerchant(self, request: merchant_pb2.GetMerchantRequest, call: Call) -> common_pb2.Merchant:
        target = request.merchant_id or call.caller
        if target != call.caller:
            units.check_merchant_id(target)
        view = await call.read(lambda conn, now: merchants.view(conn, target, now, private=target == call.caller))
        return translate.merchant(view)

    async def SchedulePointValue(self, request: merchant_pb2.SchedulePointValueRequest, call: Call) -> bytes:
        merchant_id = call.own_merchant(request.merchant_id)
        value = units.check_value_micros(request.value_micros)
        if not request.HasField("effective_at"):
            raise errors.InvalidField("effective_at is required", field="effective_at")
        effective_at = translate.ms_of(request.effective_at, "effective_at")
        notice_ms = call.hub.config.notice_period_s * 1000

        def effect(conn: Connection, now: int) -> common_pb2.Merchant:
            view = merchants.schedule_point_value(conn, merchant_id, value, effective_at, notice_ms, now)
            routes.announce_value_change(conn, merchant_id, value, effective_at)
            return translate.merchant(view)

        return await call.mutate(request.request_id, effect)

    async def AddKey(self, request: merchant_pb2.AddKeyRequest, call: Call) -> bytes:
        merchant_id = call.own_merchant(request.merchant_id)
        public_key = bytes(request.public_key)
        return await call.mutate(
            request.request_id, lambda conn, now: translate.key_info(keys.add(conn, merchant_id, public_key, now))
        )

    async def RevokeKey(self, request: merchant_pb2.RevokeKeyRequest, call: Call) -> bytes:
        merchant_id = call.own_merchant(request.merchant_id)
        key_id = request.key_id
        try:
            return await call.mutate(
                request.request_id, lambda conn, now: translate.key_info(keys.revoke(conn, merchant_id, key_id, now))
            )
        finally:  # committed (or not): this process reads the key afresh on its next use
            call.hub.authenticator.forget(key_id)

    async def SetRoute(self, request: merchant_pb2.SetRouteRequest, call: Call) -> bytes:
        merchant_id = call.own_merchant(request.merchant_id)
        partner_id = units.check_merchant_id(request.partner_id)
        direction = _DIRECTION.get(request.direction)
        if direction is None:
            raise errors.InvalidField("direction must be OUTBOUND or INBOUND", field="direction")
        enabled = request.enabled
        default_fee = call.hub.config.default_fee_bps
        return await call.mutate(
            request.request_id,
            lambda conn, now: translate.route(
                routes.set_side(conn, merchant_id, partner_id, direction, enabled, now, default_fee)
            ),
        )

    async def ListRoutes(self, request: merchant_pb2.ListRoutesRequest, call: Call) -> merchant_pb2.ListRoutesResponse:
        merchant_id = call.own_merchant(request.merchant_id)
        size = translate.page_size(request.page_size)
        after: tuple[str, str] | None = None
        if request.page_token:
            source, _, destination = translate.decode_token(request.page_token).partition("\n")
            if not destination:
                raise errors.InvalidPageToken("page_token is not one this hub issued")
            after = (source, destination)
        default_fee = call.hub.config.default_fee_bps
        found = await call.read(lambda conn, now: routes.list_for(conn, merchant_id, after, size + 1, default_fee))
        page = found[:size]
        token = ""
        if len(found) > size:
            token = translate.encode_token(f"{page[-1].source_merchant_id}\n{page[-1].destination_merchant_id}")
        return merchant_pb2.ListRoutesResponse(routes=[translate.route(r) for r in page], next_page_token=token)


_DIRECTION = {common_pb2.ROUTE_DIRECTION_OUTBOUND: routes.OUTBOUND, common_pb2.ROUTE_DIRECTION_INBOUND: routes.INBOUND}
