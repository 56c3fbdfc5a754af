"""MerchantService: a merchant's profile, point value schedule, keys and its side of routes."""

from __future__ import annotations

from exchange.commands import merchants
from exchange.domain import errors, units
from exchange.rpc import translate
from exchange.rpc.dispatch import Call, reply
from merchant_sdk._pb.pointsx.v1 import common_pb2, merchant_pb2


class MerchantServicer:
    async def GetMerchant(self, request: merchant_pb2.GetMerchantRequest, call: Call) -> common_pb2.Merchant:
        target = request.merchant_id or call.caller
        if target != call.caller:
            units.check_merchant_id(target)
        view = await merchants.get(call.hub, call.caller, target)
        return translate.merchant(view)

    async def SchedulePointValue(self, request: merchant_pb2.SchedulePointValueRequest, call: Call) -> bytes:
        merchant_id = call.own_merchant(request.merchant_id)
        value = units.check_value_micros(request.value_micros)
        if not request.HasField("effective_at"):
            raise errors.InvalidField("effective_at is required", field="effective_at")
        effective_at = translate.ms_of(request.effective_at, "effective_at")
        view = await call.mutate(request.request_id, merchants.schedule_point_value, merchant_id, value, effective_at)
        return reply(view, translate.merchant)

    async def AddKey(self, request: merchant_pb2.AddKeyRequest, call: Call) -> bytes:
        merchant_id = call.own_merchant(request.merchant_id)
        public_key = bytes(request.public_key)
        record = await call.mutate(request.request_id, merchants.add_key, merchant_id, public_key)
        return reply(record, translate.key_info)

    async def RevokeKey(self, request: merchant_pb2.RevokeKeyRequest, call: Call) -> bytes:
        merchant_id = call.own_merchant(request.merchant_id)
        record = await call.mutate(request.request_id, merchants.revoke_key, merchant_id, request.key_id)
        return reply(record, translate.key_info)

    async def SetRoute(self, request: merchant_pb2.SetRouteRequest, call: Call) -> bytes:
        merchant_id = call.own_merchant(request.merchant_id)
        partner_id = units.check_merchant_id(request.partner_id)
        direction = _DIRECTION.get(request.direction)
        if direction is None:
            raise errors.InvalidField("direction must be OUTBOUND or INBOUND", field="direction")
        route = await call.mutate(
            request.request_id, merchants.set_route, merchant_id, partner_id, direction, request.enabled
        )
        return reply(route, translate.route)

    async def ListRoutes(self, request: merchant_pb2.ListRoutesRequest, call: Call) -> merchant_pb2.ListRoutesResponse:
        merchant_id = call.own_merchant(request.merchant_id)
        size = translate.page_size(request.page_size)
        after: tuple[str, str] | None = None
        if request.page_token:
            source, _, destination = translate.decode_token(request.page_token).partition("\n")
            if not destination:
                raise errors.InvalidPageToken("page_token is not one this hub issued")
            after = (source, destination)
        page, more = await merchants.list_routes(call.hub, merchant_id, after, size)
        token = ""
        if more:
            token = translate.encode_token(f"{page[-1].source_merchant_id}\n{page[-1].destination_merchant_id}")
        return merchant_pb2.ListRoutesResponse(routes=[translate.route(r) for r in page], next_page_token=token)


_DIRECTION = {
    common_pb2.ROUTE_DIRECTION_OUTBOUND: merchants.OUTBOUND,
    common_pb2.ROUTE_DIRECTION_INBOUND: merchants.INBOUND,
}
