"""`MerchantClient`: a typed, synchronous client for everything a merchant does on the network.

Every mutating method takes an optional `request_id`; when omitted the client makes a UUID, and
retries of one call reuse it, so a retry never posts twice. Pass your own to make a call
idempotent across process restarts.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import timestamp_pb2

from merchant_sdk._pb.pointsx.v1 import (
    clearing_pb2,
    common_pb2,
    exchange_pb2,
    ledger_pb2,
    merchant_pb2,
    network_pb2,
)
from merchant_sdk.events import EventStream
from merchant_sdk.signing import Signer, load_private_key_file, public_key_bytes
from merchant_sdk.statements import acknowledgement_signature
from merchant_sdk.transport import DEFAULT_MAX_ATTEMPTS, DEFAULT_TIMEOUT_S, SignedTransport, TlsOptions

_CLEARING = "/pointsx.v1.ClearingService/"
_EXCHANGE = "/pointsx.v1.ExchangeService/"
_LEDGER = "/pointsx.v1.LedgerService/"
_MERCHANT = "/pointsx.v1.MerchantService/"
_NETWORK = "/pointsx.v1.NetworkService/"


def new_request_id() -> str:
    return str(uuid.uuid4())


def _timestamp(when: datetime) -> timestamp_pb2.Timestamp:
    if when.tzinfo is None:
        raise ValueError("effective_at must be timezone-aware (UTC)")
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(when)
    return out


class MerchantClient:
    """One merchant's connection to a hub, signing every call with the merchant's Ed25519 key."""

    def __init__(
        self,
        target: str,
        merchant_id: str,
        private_key: Ed25519PrivateKey,
        *,
        tls: TlsOptions | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self.merchant_id = merchant_id
        self.signer = Signer(merchant_id, private_key)
        self._transport = SignedTransport(target, self.signer, tls=tls, timeout_s=timeout_s, max_attempts=max_attempts)

    @classmethod
    def from_key_file(cls, target: str, merchant_id: str, key_file: str | Path, **kwargs: object) -> MerchantClient:
        return cls(target, merchant_id, load_private_key_file(key_file), **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, **kwargs: object) -> MerchantClient:
        """POINTSX_TARGET, POINTSX_MERCHANT_ID, POINTSX_KEY_FILE (and POINTSX_CA_BUNDLE for TLS)."""
        ca = os.environ.get("POINTSX_CA_BUNDLE")
        if ca and "tls" not in kwargs:
            kwargs["tls"] = TlsOptions(ca_bundle=Path(ca))
        return cls.from_key_file(
            os.environ.get("POINTSX_TARGET", "127.0.0.1:50051"),
            os.environ["POINTSX_MERCHANT_ID"],
            os.environ["POINTSX_KEY_FILE"],
            **kwargs,
        )

    @property
    def key_id(self) -> str:
        return self.signer.key_id

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> MerchantClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- network -----------------------------------------------------------------------
    def get_network_info(self) -> network_pb2.NetworkInfo:
        """The hub's public keys (to verify statements), currencies and notice period."""
        return self._transport.call(
            _NETWORK + "GetNetworkInfo", network_pb2.GetNetworkInfoRequest(), network_pb2.NetworkInfo
        )

    # --- merchant ----------------------------------------------------------------------
    def get_merchant(self, merchant_id: str = "") -> common_pb2.Merchant:
        """This merchant in full, or another merchant's public profile."""
        return self._transport.call(
            _MERCHANT + "GetMerchant", merchant_pb2.GetMerchantRequest(merchant_id=merchant_id), common_pb2.Merchant
        )

    def schedule_point_value(
        self, value_micros: int, effective_at: datetime, *, request_id: str | None = None
    ) -> common_pb2.Merchant:
        """Announce a new point value; it applies at `effective_at`, at least the notice period away."""
        request = merchant_pb2.SchedulePointValueRequest(
            request_id=request_id or new_request_id(),
            merchant_id=self.merchant_id,
            value_micros=value_micros,
            effective_at=_timestamp(effective_at),
        )
        return self._transport.call(_MERCHANT + "SchedulePointValue", request, common_pb2.Merchant)

    def add_key(self, public_key: bytes | Ed25519PrivateKey, *, request_id: str | None = None) -> common_pb2.KeyInfo:
        """Register another key (rotation): both work until the old one is revoked."""
        raw = public_key_bytes(public_key.public_key()) if isinstance(public_key, Ed25519PrivateKey) else public_key
        request = merchant_pb2.AddKeyRequest(
            request_id=request_id or new_request_id(), merchant_id=self.merchant_id, public_key=raw
        )
        return self._transport.call(_MERCHANT + "AddKey", request, common_pb2.KeyInfo)

    def revoke_key(self, key_id: str, *, request_id: str | None = None) -> common_pb2.KeyInfo:
        request = merchant_pb2.RevokeKeyRequest(
            request_id=request_id or new_request_id(), merchant_id=self.merchant_id, key_id=key_id
        )
        return self._transport.call(_MERCHANT + "RevokeKey", request, common_pb2.KeyInfo)

    # --- members and points --------------------------------------------------------------
    def enroll_member(self, member_ref: str, *, request_id: str | None = None) -> ledger_pb2.Member:
        request = ledger_pb2.EnrollMemberRequest(
            request_id=request_id or new_request_id(), merchant_id=self.merchant_id, member_ref=member_ref
        )
        return self._transport.call(_LEDGER + "EnrollMember", request, ledger_pb2.Member)

    def issue_points(
        self, member_ref: str, points: int, *, memo: str = "", request_id: str | None = None
    ) -> ledger_pb2.PointsMovement:
        """The member earns `points` (1 .. 10^12)."""
        request = ledger_pb2.IssuePointsRequest(
            request_id=request_id or new_request_id(),
            merchant_id=self.merchant_id,
            member_ref=member_ref,
            points=points,
            memo=memo,
        )
        return self._transport.call(_LEDGER + "IssuePoints", request, ledger_pb2.PointsMovement)

    def redeem_points(
        self, member_ref: str, points: int, *, memo: str = "", request_id: str | None = None
    ) -> ledger_pb2.PointsMovement:
        """The member spends `points`; refused with InsufficientPoints rather than overdrawn."""
        request = ledger_pb2.RedeemPointsRequest(
            request_id=request_id or new_request_id(),
            merchant_id=self.merchant_id,
            member_ref=member_ref,
            points=points,
            memo=memo,
        )
        return self._transport.call(_LEDGER + "RedeemPoints", request, ledger_pb2.PointsMovement)

    def get_balance(self, member_ref: str) -> ledger_pb2.Balance:
        request = ledger_pb2.GetBalanceRequest(merchant_id=self.merchant_id, member_ref=member_ref)
        return self._transport.call(_LEDGER + "GetBalance", request, ledger_pb2.Balance)

    def list_activity_page(
        self, member_ref: str = "", *, page_size: int = 50, page_token: str = ""
    ) -> ledger_pb2.ListActivityResponse:
        request = ledger_pb2.ListActivityRequest(
            merchant_id=self.merchant_id, member_ref=member_ref, page_size=page_size, page_token=page_token
        )
        return self._transport.call(_LEDGER + "ListActivity", request, ledger_pb2.ListActivityResponse)

    def iter_activity(self, member_ref: str = "", *, page_size: int = 100) -> Iterator[ledger_pb2.Activity]:
        """Every activity entry, newest first, fetching pages as needed."""
        token = ""
        while True:
            page = self.list_activity_page(member_ref, page_size=page_size, page_token=token)
            yield from page.activities
            if not page.next_page_token:
                return
            token = page.next_page_token

    # --- linking ---------------------------------------------------------------------------
    def create_link_code(self, member_ref: str, *, request_id: str | None = None) -> ledger_pb2.LinkCode:
        request = ledger_pb2.CreateLinkCodeRequest(
            request_id=request_id or new_request_id(), merchant_id=self.merchant_id, member_ref=member_ref
        )
        return self._transport.call(_LEDGER + "CreateLinkCode", request, ledger_pb2.LinkCode)

    def redeem_link_code(self, member_ref: str, code: str, *, request_id: str | None = None) -> ledger_pb2.Member:
        request = ledger_pb2.RedeemLinkCodeRequest(
            request_id=request_id or new_request_id(), merchant_id=self.merchant_id, member_ref=member_ref, code=code
        )
        return self._transport.call(_LEDGER + "RedeemLinkCode", request, ledger_pb2.Member)

    def unlink(self, member_ref: str, *, request_id: str | None = None) -> ledger_pb2.Member:
        request = ledger_pb2.UnlinkRequest(
            request_id=request_id or new_request_id(), merchant_id=self.merchant_id, member_ref=member_ref
        )
        return self._transport.call(_LEDGER + "Unlink", request, ledger_pb2.Member)

    # --- routes ------------------------------------------------------------------------------
    def set_route(
        self, partner_id: str, direction: str, enabled: bool = True, *, request_id: str | None = None
    ) -> common_pb2.Route:
        """Open ("outbound": our members convert to the partner) or accept ("inbound") a route, or withdraw."""
        directions = {"outbound": common_pb2.ROUTE_DIRECTION_OUTBOUND, "inbound": common_pb2.ROUTE_DIRECTION_INBOUND}
        if direction not in directions:
            raise ValueError("direction is 'outbound' or 'inbound'")
        request = merchant_pb2.SetRouteRequest(
            request_id=request_id or new_request_id(),
            merchant_id=self.merchant_id,
            partner_id=partner_id,
            direction=directions[direction],
            enabled=enabled,
        )
        return self._transport.call(_MERCHANT + "SetRoute", request, common_pb2.Route)

    def list_routes_page(self, *, page_size: int = 50, page_token: str = "") -> merchant_pb2.ListRoutesResponse:
        request = merchant_pb2.ListRoutesRequest(
            merchant_id=self.merchant_id, page_size=page_size, page_token=page_token
        )
        return self._transport.call(_MERCHANT + "ListRoutes", request, merchant_pb2.ListRoutesResponse)

    def list_routes(self) -> list[common_pb2.Route]:
        """Every route this merchant is a side of, with its state and terms."""
        out: list[common_pb2.Route] = []
        token = ""
        while True:
            page = self.list_routes_page(page_size=200, page_token=token)
            out.extend(page.routes)
            if not page.next_page_token:
                return out
            token = page.next_page_token

    # --- conversions -----------------------------------------------------------------------
    def quote_conversion(
        self,
        member_ref: str,
        destination_merchant_id: str,
        *,
        src_points: int | None = None,
        dst_points: int | None = None,
        request_id: str | None = None,
    ) -> exchange_pb2.Quote:
        """Price a conversion by source points, or by the destination points wanted (exactly one)."""
        if (src_points is None) == (dst_points is None):
            raise ValueError("give exactly one of src_points and dst_points")
        request = exchange_pb2.QuoteConversionRequest(
            request_id=request_id or new_request_id(),
            merchant_id=self.merchant_id,
            member_ref=member_ref,
            destination_merchant_id=destination_merchant_id,
        )
        if src_points is not None:
            request.src_points = src_points
        else:
            request.dst_points = dst_points  # type: ignore[assignment]
        return self._transport.call(_EXCHANGE + "QuoteConversion", request, exchange_pb2.Quote)

    def convert(
        self,
        member_ref: str,
        destination_merchant_id: str,
        src_points: int = 0,
        *,
        quote_id: str = "",
        min_dst_points: int = 0,
        request_id: str | None = None,
    ) -> exchange_pb2.Conversion:
        """Convert the member's points to its linked account at the destination.

        With `quote_id`, exactly the quoted amounts (src_points may be left 0); without, the values
        in force, refused if fewer than `min_dst_points` would arrive.
        """
        request = self.conversion_request(
            member_ref, destination_merchant_id, src_points, quote_id=quote_id, min_dst_points=min_dst_points,
            request_id=request_id,
        )  # fmt: skip
        return self._transport.call(_EXCHANGE + "Convert", request, exchange_pb2.Conversion)

    def conversion_request(
        self,
        member_ref: str,
        destination_merchant_id: str,
        src_points: int = 0,
        *,
        quote_id: str = "",
        min_dst_points: int = 0,
        request_id: str | None = None,
    ) -> exchange_pb2.ConvertRequest:
        """One item for `convert_batch` (a request_id is made now, so the batch can be retried)."""
        return exchange_pb2.ConvertRequest(
            request_id=request_id or new_request_id(),
            merchant_id=self.merchant_id,
            member_ref=member_ref,
            destination_merchant_id=destination_merchant_id,
            src_points=src_points,
            quote_id=quote_id,
            min_dst_points=min_dst_points,
        )

    def convert_batch(self, items: list[exchange_pb2.ConvertRequest]) -> exchange_pb2.ConvertBatchResponse:
        """Up to 1000 conversions in one call; each item succeeds or fails on its own.

        A failed item's `error` is a google.rpc.Status; `merchant_sdk.errors.from_status` turns it
        into the same typed exception a single `convert` would raise.
        """
        request = exchange_pb2.ConvertBatchRequest(merchant_id=self.merchant_id, items=items)
        return self._transport.call(_EXCHANGE + "ConvertBatch", request, exchange_pb2.ConvertBatchResponse)

    def get_conversion(self, conversion_id: str) -> exchange_pb2.Conversion:
        request = exchange_pb2.GetConversionRequest(merchant_id=self.merchant_id, conversion_id=conversion_id)
        return self._transport.call(_EXCHANGE + "GetConversion", request, exchange_pb2.Conversion)

    def events(self, cursor: str = "", *, reconnect: bool = True, heartbeats: bool = False) -> EventStream:
        """Follow this merchant's events from `cursor` (empty: from now), reconnecting on its own.

        Iterate the returned stream; keep `stream.cursor` to resume later; `stream.close()` stops it.
        """
        return EventStream(self._transport, self.merchant_id, cursor, reconnect=reconnect, heartbeats=heartbeats)

    # --- statements --------------------------------------------------------------------------
    def list_statements_page(self, *, page_size: int = 50, page_token: str = "") -> clearing_pb2.ListStatementsResponse:
        """This merchant's statements, newest first."""
        request = clearing_pb2.ListStatementsRequest(
            merchant_id=self.merchant_id, page_size=page_size, page_token=page_token
        )
        return self._transport.call(_CLEARING + "ListStatements", request, clearing_pb2.ListStatementsResponse)

    def get_statement(self, cycle_id: str) -> clearing_pb2.StatementEnvelope:
        """The statement exactly as the hub signed it: verify it with `merchant_sdk.verify_statement`."""
        request = clearing_pb2.GetStatementRequest(merchant_id=self.merchant_id, cycle_id=cycle_id)
        return self._transport.call(_CLEARING + "GetStatement", request, clearing_pb2.StatementEnvelope)

    def iter_statement_items(self, cycle_id: str, *, page_size: int = 500) -> Iterator[clearing_pb2.StatementItem]:
        """Every item of a statement, in operation-id order (the order `items_sha256` hashes)."""
        token = ""
        while True:
            request = clearing_pb2.ListStatementItemsRequest(
                merchant_id=self.merchant_id, cycle_id=cycle_id, page_size=page_size, page_token=token
            )
            page = self._transport.call(
                _CLEARING + "ListStatementItems", request, clearing_pb2.ListStatementItemsResponse
            )
            yield from page.items
            if not page.next_page_token:
                return
            token = page.next_page_token

    def acknowledge_statement(
        self, cycle_id: str, statement_json: bytes, *, request_id: str | None = None
    ) -> clearing_pb2.StatementAcknowledgement:
        """Sign the statement's bytes with this client's key and send the acknowledgement."""
        request = clearing_pb2.AcknowledgeStatementRequest(
            request_id=request_id or new_request_id(),
            merchant_id=self.merchant_id,
            cycle_id=cycle_id,
            key_id=self.key_id,
            signature=acknowledgement_signature(self.signer.private_key, statement_json),
        )
        return self._transport.call(_CLEARING + "AcknowledgeStatement", request, clearing_pb2.StatementAcknowledgement)

    def dispute_item(
        self, cycle_id: str, operation_id: str, reason: str, *, request_id: str | None = None
    ) -> clearing_pb2.Dispute:
        request = clearing_pb2.DisputeItemRequest(
            request_id=request_id or new_request_id(),
            merchant_id=self.merchant_id,
            cycle_id=cycle_id,
            operation_id=operation_id,
            reason=reason,
        )
        return self._transport.call(_CLEARING + "DisputeItem", request, clearing_pb2.Dispute)
