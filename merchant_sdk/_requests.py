"""The request of every merchant-facing RPC, built in one place for both clients.

`MerchantRequests` turns a method's arguments into an `Rpc`: the method path, the request message
and the response class. Mutating requests get their `request_id` here, made once when the caller
gave none, so every retry of the call carries the same one. `MerchantClient` sends an `Rpc` with
the blocking transport, `AsyncMerchantClient` with the asyncio one: the two cannot drift apart on
what goes on the wire.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from typing import Generic, NamedTuple, Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from merchant_sdk._pb.pointsx.v1 import clearing_pb2, common_pb2, exchange_pb2, ledger_pb2, merchant_pb2, network_pb2
from merchant_sdk.signing import Signer, public_key_bytes
from merchant_sdk.statements import acknowledgement_signature

M = TypeVar("M", bound=Message)

_CLEARING = "/pointsx.v1.ClearingService/"
_EXCHANGE = "/pointsx.v1.ExchangeService/"
_LEDGER = "/pointsx.v1.LedgerService/"
_MERCHANT = "/pointsx.v1.MerchantService/"
_NETWORK = "/pointsx.v1.NetworkService/"
_DIRECTIONS = {"outbound": common_pb2.ROUTE_DIRECTION_OUTBOUND, "inbound": common_pb2.ROUTE_DIRECTION_INBOUND}


def new_request_id() -> str:
    """A fresh idempotency key (a UUID, DESIGN §2); keep it to retry a call across restarts."""
    return str(uuid.uuid4())


def _timestamp(when: datetime) -> timestamp_pb2.Timestamp:
    if when.tzinfo is None:
        raise ValueError("effective_at must be timezone-aware (UTC)")
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(when)
    return out


class Rpc(NamedTuple, Generic[M]):
    """One call, ready to send: what a transport's `call(method, request, response_cls)` takes."""

    method: str
    request: Message
    response_cls: type[M]


class Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


P = TypeVar("P", bound=Page)


def pages(fetch: Callable[[str], P]) -> Iterator[P]:
    """Every page of a listing, `fetch(page_token)` after `fetch(page_token)` until the last."""
    token = ""
    while True:
        page = fetch(token)
        yield page
        if not page.next_page_token:
            return
        token = page.next_page_token


async def async_pages(fetch: Callable[[str], Awaitable[P]]) -> AsyncIterator[P]:
    """`pages` for the asyncio client: each page is awaited before the next is asked for."""
    token = ""
    while True:
        page = await fetch(token)
        yield page
        if not page.next_page_token:
            return
        token = page.next_page_token


class MerchantRequests:
    """One merchant's requests: the merchant id filled in, request ids made, acknowledgements signed."""

    def __init__(self, signer: Signer) -> None:
        self.signer = signer
        self.merchant_id = signer.caller

    # --- network and merchant ----------------------------------------------------------------
    @staticmethod
    def get_network_info() -> Rpc[network_pb2.NetworkInfo]:
        return Rpc(_NETWORK + "GetNetworkInfo", network_pb2.GetNetworkInfoRequest(), network_pb2.NetworkInfo)

    @staticmethod
    def get_merchant(merchant_id: str) -> Rpc[common_pb2.Merchant]:
        request = merchant_pb2.GetMerchantRequest(merchant_id=merchant_id)
        return Rpc(_MERCHANT + "GetMerchant", request, common_pb2.Merchant)

    def schedule_point_value(
        self, value_micros: int, effective_at: datetime, request_id: str | None
    ) -> Rpc[common_pb2.Merchant]:
        request = merchant_pb2.SchedulePointValueRequest(
            request_id=request_id or new_request_id(),
            merchant_id=self.merchant_id,
            value_micros=value_micros,
            effective_at=_timestamp(effective_at),
        )
        return Rpc(_MERCHANT + "SchedulePointValue", request, common_pb2.Merchant)

    def add_key(self, public_key: bytes | Ed25519PrivateKey, request_id: str | None) -> Rpc[common_pb2.KeyInfo]:
        raw = public_key_bytes(public_key.public_key()) if isinstance(public_key, Ed25519PrivateKey) else public_key
        request = merchant_pb2.AddKeyRequest(
            request_id=request_id or new_request_id(), merchant_id=self.merchant_id, public_key=raw
        )
        return Rpc(_MERCHANT + "AddKey", request, common_pb2.KeyInfo)

    def revoke_key(self, key_id: str, request_id: str | None) -> Rpc[common_pb2.KeyInfo]:
        request = merchant_pb2.RevokeKeyRequest(
            request_id=request_id or new_request_id(), merchant_id=self.merchant_id, key_id=key_id
        )
        return Rpc(_MERCHANT + "RevokeKey", request, common_pb2.KeyInfo)

    # --- members, points and linking -----------------------------------------------------------
    def enroll_member(self, member_ref: str, request_id: str | None) -> Rpc[ledger_pb2.Member]:
        request = ledger_pb2.EnrollMemberRequest(
            request_id=request_id or new_request_id(), merchant_id=self.merchant_id, member_ref=member_ref
        )
        return Rpc(_LEDGER + "EnrollMember", request, ledger_pb2.Member)

    def issue_points(
        self, member_ref: str, points: int, memo: str, request_id: str | None
    ) -> Rpc[ledger_pb2.PointsMovement]:
        request = ledger_pb2.IssuePointsRequest(
            request_id=request_id or new_request_id(),
            merchant_id=self.merchant_id,
            member_ref=member_ref,
            points=points,
            memo=memo,
        )
        return Rpc(_LEDGER + "IssuePoints", request, ledger_pb2.PointsMovement)

    def redeem_points(
        self, member_ref: str, points: int, memo: str, request_id: str | None
    ) -> Rpc[ledger_pb2.PointsMovement]:
        request = ledger_pb2.RedeemPointsRequest(
            request_id=request_id or new_request_id(),
            merchant_id=self.merchant_id,
            member_ref=member_ref,
            points=points,
            memo=memo,
        )
        return Rpc(_LEDGER + "RedeemPoints", request, ledger_pb2.PointsMovement)

    def get_balance(self, member_ref: str) -> Rpc[ledger_pb2.Balance]:
        request = ledger_pb2.GetBalanceRequest(merchant_id=self.merchant_id, member_ref=member_ref)
        return Rpc(_LEDGER + "GetBalance", request, ledger_pb2.Balance)

    def list_activity(self, member_ref: str, page_size: int, page_token: str) -> Rpc[ledger_pb2.ListActivityResponse]:
        request = ledger_pb2.ListActivityRequest(
            merchant_id=self.merchant_id, member_ref=member_ref, page_size=page_size, page_token=page_token
        )
        return Rpc(_LEDGER + "ListActivity", request, ledger_pb2.ListActivityResponse)

    def create_link_code(self, member_ref: str, request_id: str | None) -> Rpc[ledger_pb2.LinkCode]:
        request = ledger_pb2.CreateLinkCodeRequest(
            request_id=request_id or new_request_id(), merchant_id=self.merchant_id, member_ref=member_ref
        )
        return Rpc(_LEDGER + "CreateLinkCode", request, ledger_pb2.LinkCode)

    def redeem_link_code(self, member_ref: str, code: str, request_id: str | None) -> Rpc[ledger_pb2.Member]:
        request = ledger_pb2.RedeemLinkCodeRequest(
            request_id=request_id or new_request_id(), merchant_id=self.merchant_id, member_ref=member_ref, code=code
        )
        return Rpc(_LEDGER + "RedeemLinkCode", request, ledger_pb2.Member)

    def unlink(self, member_ref: str, request_id: str | None) -> Rpc[ledger_pb2.Member]:
        request = ledger_pb2.UnlinkRequest(
            request_id=request_id or new_request_id(), merchant_id=self.merchant_id, member_ref=member_ref
        )
        return Rpc(_LEDGER + "Unlink", request, ledger_pb2.Member)

    # --- routes ----------------------------------------------------------------------------------
    def set_route(
        self, partner_id: str, direction: str, enabled: bool, request_id: str | None
    ) -> Rpc[common_pb2.Route]:
        if direction not in _DIRECTIONS:
            raise ValueError("direction is 'outbound' or 'inbound'")
        request = merchant_pb2.SetRouteRequest(
            request_id=request_id or new_request_id(),
            merchant_id=self.merchant_id,
            partner_id=partner_id,
            direction=_DIRECTIONS[direction],
            enabled=enabled,
        )
        return Rpc(_MERCHANT + "SetRoute", request, common_pb2.Route)

    def list_routes(self, page_size: int, page_token: str) -> Rpc[merchant_pb2.ListRoutesResponse]:
        request = merchant_pb2.ListRoutesRequest(
            merchant_id=self.merchant_id, page_size=page_size, page_token=page_token
        )
        return Rpc(_MERCHANT + "ListRoutes", request, merchant_pb2.ListRoutesResponse)

    # --- conversions -------------------------------------------------------------------------------
    def quote_conversion(
        self,
        member_ref: str,
        destination_merchant_id: str,
        src_points: int | None,
        dst_points: int | None,
        request_id: str | None,
    ) -> Rpc[exchange_pb2.Quote]:
        if (src_points is None) == (dst_points is None):
            raise ValueError("give exactly one of src_points and dst_points")
        request = exchange_pb2.QuoteConversionRequest(
            request_id=request_id or new_request_id(),
            merchant_id=self.merchant_id,
            member_ref=member_ref,
            destination_merchant_id=destination_merchant_id,
        )
        # The `amount` oneof is set even to 0, so the hub names that amount in its refusal.
        if src_points is not None:
            request.src_points = src_points
        elif dst_points is not None:
            request.dst_points = dst_points
        return Rpc(_EXCHANGE + "QuoteConversion", request, exchange_pb2.Quote)

    def conversion(
        self,
        member_ref: str,
        destination_merchant_id: str,
        src_points: int,
        quote_id: str,
        min_dst_points: int,
        request_id: str | None,
    ) -> exchange_pb2.ConvertRequest:
        return exchange_pb2.ConvertRequest(
            request_id=request_id or new_request_id(),
            merchant_id=self.merchant_id,
            member_ref=member_ref,
            destination_merchant_id=destination_merchant_id,
            src_points=src_points,
            quote_id=quote_id,
            min_dst_points=min_dst_points,
        )

    @staticmethod
    def convert(item: exchange_pb2.ConvertRequest) -> Rpc[exchange_pb2.Conversion]:
        return Rpc(_EXCHANGE + "Convert", item, exchange_pb2.Conversion)

    def convert_batch(self, items: list[exchange_pb2.ConvertRequest]) -> Rpc[exchange_pb2.ConvertBatchResponse]:
        request = exchange_pb2.ConvertBatchRequest(merchant_id=self.merchant_id, items=items)
        return Rpc(_EXCHANGE + "ConvertBatch", request, exchange_pb2.ConvertBatchResponse)

    def get_conversion(self, conversion_id: str) -> Rpc[exchange_pb2.Conversion]:
        request = exchange_pb2.GetConversionRequest(merchant_id=self.merchant_id, conversion_id=conversion_id)
        return Rpc(_EXCHANGE + "GetConversion", request, exchange_pb2.Conversion)

    # --- statements ----------------------------------------------------------------------------------
    def list_statements(self, page_size: int, page_token: str) -> Rpc[clearing_pb2.ListStatementsResponse]:
        request = clearing_pb2.ListStatementsRequest(
            merchant_id=self.merchant_id, page_size=page_size, page_token=page_token
        )
        return Rpc(_CLEARING + "ListStatements", request, clearing_pb2.ListStatementsResponse)

    def get_statement(self, cycle_id: str) -> Rpc[clearing_pb2.StatementEnvelope]:
        request = clearing_pb2.GetStatementRequest(merchant_id=self.merchant_id, cycle_id=cycle_id)
        return Rpc(_CLEARING + "GetStatement", request, clearing_pb2.StatementEnvelope)

    def list_statement_items(
        self, cycle_id: str, page_size: int, page_token: str
    ) -> Rpc[clearing_pb2.ListStatementItemsResponse]:
        request = clearing_pb2.ListStatementItemsRequest(
            merchant_id=self.merchant_id, cycle_id=cycle_id, page_size=page_size, page_token=page_token
        )
        return Rpc(_CLEARING + "ListStatementItems", request, clearing_pb2.ListStatementItemsResponse)

    def acknowledge_statement(
        self, cycle_id: str, statement_json: bytes, request_id: str | None
    ) -> Rpc[clearing_pb2.StatementAcknowledgement]:
        """Signed with the merchant's own key over the statement's exact bytes (DESIGN §5)."""
        request = clearing_pb2.AcknowledgeStatementRequest(
            request_id=request_id or new_request_id(),
            merchant_id=self.merchant_id,
            cycle_id=cycle_id,
            key_id=self.signer.key_id,
            signature=acknowledgement_signature(self.signer.private_key, statement_json),
        )
        return Rpc(_CLEARING + "AcknowledgeStatement", request, clearing_pb2.StatementAcknowledgement)

    def dispute_item(
        self, cycle_id: str, operation_id: str, reason: str, request_id: str | None
    ) -> Rpc[clearing_pb2.Dispute]:
        request = clearing_pb2.DisputeItemRequest(
            request_id=request_id or new_request_id(),
            merchant_id=self.merchant_id,
            cycle_id=cycle_id,
            operation_id=operation_id,
            reason=reason,
        )
        return Rpc(_CLEARING + "DisputeItem", request, clearing_pb2.Dispute)
