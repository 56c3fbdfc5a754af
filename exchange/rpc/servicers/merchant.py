"""MerchantService: a merchant's profile, point value schedule and keys."""

from __future__ import annotations

from exchange.domain import errors, units
from exchange.ledger import keys, merchants
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
        return await call.mutate(
            request.request_id,
            lambda conn, now: translate.merchant(
                merchants.schedule_point_value(conn, merchant_id, value, effective_at, notice_ms, now)
            ),
        )

    async def AddKey(self, request: merchant_pb2.AddKeyRequest, call: Call) -> bytes:
        merchant_id = call.own_merchant(request.merchant_id)
        public_key = bytes(request.public_key)
        return await call.mutate(
            request.request_id, lambda conn, now: translate.key_info(keys.add(conn, merchant_id, public_key, now))
        )

    async def RevokeKey(self, request: merchant_pb2.RevokeKeyRequest, call: Call) -> bytes:
        merchant_id = call.own_merchant(request.merchant_id)
        key_id = request.key_id
        return await call.mutate(
            request.request_id, lambda conn, now: translate.key_info(keys.revoke(conn, merchant_id, key_id, now))
        )
