"""LedgerService: members, their points at the caller's merchant, and linking."""

from __future__ import annotations

from exchange.commands import members
from exchange.domain import units
from exchange.domain.models import ActivityRecord, LinkCodeIssued, PointsMovement
from exchange.rpc import translate
from exchange.rpc.dispatch import Call, folds_nonce, reply
from merchant_sdk._pb.pointsx.v1 import ledger_pb2

_ACTIVITY_KIND = {
    "issue": ledger_pb2.ACTIVITY_KIND_ISSUE,
    "redeem": ledger_pb2.ACTIVITY_KIND_REDEEM,
    "convert_out": ledger_pb2.ACTIVITY_KIND_CONVERT_OUT,
    "convert_in": ledger_pb2.ACTIVITY_KIND_CONVERT_IN,
    "reversal": ledger_pb2.ACTIVITY_KIND_REVERSAL,
}
MAX_MEMO = 200


def _movement(value: PointsMovement) -> ledger_pb2.PointsMovement:
    return ledger_pb2.PointsMovement(
        operation_id=units.format_operation_id(value.operation_seq),
        merchant_id=value.merchant_id,
        member_ref=value.member_ref,
        points=value.points,
        balance_points=value.balance_points,
        created_at=translate.ts(value.created_at_ms),
    )


def _activity(record: ActivityRecord) -> ledger_pb2.Activity:
    return ledger_pb2.Activity(
        operation_id=units.format_operation_id(record.operation_seq),
        kind=_ACTIVITY_KIND[record.kind],
        member_ref=record.member_ref,
        points_delta=record.points_delta,
        counterparty_merchant_id=record.counterparty_merchant_id,
        memo=record.memo,
        created_at=translate.ts(record.created_at_ms),
    )


def _link_code(issued: LinkCodeIssued) -> ledger_pb2.LinkCode:
    return ledger_pb2.LinkCode(code=issued.code, expires_at=translate.ts(issued.expires_at_ms))


class LedgerServicer:
    async def EnrollMember(self, request: ledger_pb2.EnrollMemberRequest, call: Call) -> bytes:
        merchant_id = call.own_merchant(request.merchant_id)
        member_ref = units.check_member_ref(request.member_ref)
        view = await call.mutate(request.request_id, members.enroll, merchant_id, member_ref)
        return reply(view, translate.member)

    @folds_nonce
    async def IssuePoints(self, request: ledger_pb2.IssuePointsRequest, call: Call) -> bytes:
        merchant_id = call.own_merchant(request.merchant_id)
        member_ref = units.check_member_ref(request.member_ref)
        amount = units.check_points(request.points)
        memo = units.check_text(request.memo, "memo", max_len=MAX_MEMO)
        movement = await call.mutate(request.request_id, members.issue, merchant_id, member_ref, amount, memo)
        return reply(movement, _movement)

    @folds_nonce
    async def RedeemPoints(self, request: ledger_pb2.RedeemPointsRequest, call: Call) -> bytes:
        merchant_id = call.own_merchant(request.merchant_id)
        member_ref = units.check_member_ref(request.member_ref)
        amount = units.check_points(request.points)
        memo = units.check_text(request.memo, "memo", max_len=MAX_MEMO)
        movement = await call.mutate(request.request_id, members.redeem, merchant_id, member_ref, amount, memo)
        return reply(movement, _movement)

    async def GetBalance(self, request: ledger_pb2.GetBalanceRequest, call: Call) -> ledger_pb2.Balance:
        merchant_id = call.own_merchant(request.merchant_id)
        member_ref = units.check_member_ref(request.member_ref)
        view = await members.balance(call.hub, merchant_id, member_ref)
        return ledger_pb2.Balance(
            merchant_id=merchant_id,
            member_ref=member_ref,
            points=view.points,
            linked_merchant_ids=view.linked_merchant_ids,
        )

    async def ListActivity(
        self, request: ledger_pb2.ListActivityRequest, call: Call
    ) -> ledger_pb2.ListActivityResponse:
        merchant_id = call.own_merchant(request.merchant_id)
        member_ref = units.check_member_ref(request.member_ref) if request.member_ref else None
        size = translate.page_size(request.page_size)
        before = translate.decode_int_token(request.page_token)
        page, more = await members.activity(call.hub, merchant_id, member_ref, before, size)
        return ledger_pb2.ListActivityResponse(
            activities=[_activity(r) for r in page],
            next_page_token=translate.encode_token(str(page[-1].posting_id)) if more else "",
        )

    async def CreateLinkCode(self, request: ledger_pb2.CreateLinkCodeRequest, call: Call) -> bytes:
        merchant_id = call.own_merchant(request.merchant_id)
        member_ref = units.check_member_ref(request.member_ref)
        issued = await call.mutate(request.request_id, members.create_link_code, merchant_id, member_ref)
        return reply(issued, _link_code)

    async def RedeemLinkCode(self, request: ledger_pb2.RedeemLinkCodeRequest, call: Call) -> bytes:
        merchant_id = call.own_merchant(request.merchant_id)
        member_ref = units.check_member_ref(request.member_ref)
        code = members.check_link_code(request.code)
        view = await call.mutate(request.request_id, members.redeem_link_code, merchant_id, member_ref, code)
        return reply(view, translate.member)

    async def Unlink(self, request: ledger_pb2.UnlinkRequest, call: Call) -> bytes:
        merchant_id = call.own_merchant(request.merchant_id)
        member_ref = units.check_member_ref(request.member_ref)
        view = await call.mutate(request.request_id, members.unlink, merchant_id, member_ref)
        return reply(view, translate.member)
