"""`MerchantClient`: a typed, synchronous client for everything a merchant does on the network.

Every mutating method takes an optional `request_id`; when omitted the client makes a UUID, and
retries of one call reuse it, so a retry never posts twice. Pass your own to make a call
idempotent across process restarts. (`merchant_sdk.aio.AsyncMerchantClient` is the asyncio twin:
the same methods, building the same requests in `merchant_sdk._requests`.)
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from merchant_sdk._client_base import ClientBase
from merchant_sdk._pb.pointsx.v1 import clearing_pb2, common_pb2, exchange_pb2, ledger_pb2, merchant_pb2, network_pb2
from merchant_sdk._requests import M, Rpc, new_request_id, pages
from merchant_sdk.events import EventStream
from merchant_sdk.transport import SignedTransport

__all__ = ["MerchantClient", "new_request_id"]


class MerchantClient(ClientBase[SignedTransport]):
    """One merchant's connection to a hub, signing every call with the merchant's Ed25519 key."""

    _transport_cls = SignedTransport

    def _call(self, rpc: Rpc[M]) -> M:
        return self._transport.call(rpc.method, rpc.request, rpc.response_cls)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> MerchantClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- network -----------------------------------------------------------------------
    def get_network_info(self) -> network_pb2.NetworkInfo:
        """The hub's public keys (to verify statements), currencies and notice period."""
        return self._call(self._rpc.get_network_info())

    # --- merchant ----------------------------------------------------------------------
    def get_merchant(self, merchant_id: str = "") -> common_pb2.Merchant:
        """This merchant in full, or another merchant's public profile."""
        return self._call(self._rpc.get_merchant(merchant_id))

    def schedule_point_value(
        self, value_micros: int, effective_at: datetime, *, request_id: str | None = None
    ) -> common_pb2.Merchant:
        """Announce a new point value; it applies at `effective_at`, at least the notice period away."""
        return self._call(self._rpc.schedule_point_value(value_micros, effective_at, request_id))

    def add_key(self, public_key: bytes | Ed25519PrivateKey, *, request_id: str | None = None) -> common_pb2.KeyInfo:
        """Register another key (rotation): both work until the old one is revoked."""
        return self._call(self._rpc.add_key(public_key, request_id))

    def revoke_key(self, key_id: str, *, request_id: str | None = None) -> common_pb2.KeyInfo:
        """Retire a key (rotated out, or leaked): calls signed with it are refused from now on."""
        return self._call(self._rpc.revoke_key(key_id, request_id))

    # --- members and points --------------------------------------------------------------
    def enroll_member(self, member_ref: str, *, request_id: str | None = None) -> ledger_pb2.Member:
        """Open an account, at 0 points, for the member you know as `member_ref`."""
        return self._call(self._rpc.enroll_member(member_ref, request_id))

    def issue_points(
        self, member_ref: str, points: int, *, memo: str = "", request_id: str | None = None
    ) -> ledger_pb2.PointsMovement:
        """The member earns `points` (1 .. 10^12)."""
        return self._call(self._rpc.issue_points(member_ref, points, memo, request_id))

    def redeem_points(
        self, member_ref: str, points: int, *, memo: str = "", request_id: str | None = None
    ) -> ledger_pb2.PointsMovement:
        """The member spends `points`; refused with InsufficientPoints rather than overdrawn."""
        return self._call(self._rpc.redeem_points(member_ref, points, memo, request_id))

    def get_balance(self, member_ref: str) -> ledger_pb2.Balance:
        """The member's points now, as the ledger holds them."""
        return self._call(self._rpc.get_balance(member_ref))

    def list_activity_page(
        self, member_ref: str = "", *, page_size: int = 50, page_token: str = ""
    ) -> ledger_pb2.ListActivityResponse:
        """One page of activity, newest first: of one member, or of the whole merchant (no member_ref)."""
        return self._call(self._rpc.list_activity(member_ref, page_size, page_token))

    def iter_activity(self, member_ref: str = "", *, page_size: int = 100) -> Iterator[ledger_pb2.Activity]:
        """Every activity entry, newest first, fetching pages as needed."""
        for page in pages(lambda token: self.list_activity_page(member_ref, page_size=page_size, page_token=token)):
            yield from page.activities

    # --- linking ---------------------------------------------------------------------------
    def create_link_code(self, member_ref: str, *, request_id: str | None = None) -> ledger_pb2.LinkCode:
        """A one-time code (10 minutes) the member takes to a partner's app to link its account there."""
        return self._call(self._rpc.create_link_code(member_ref, request_id))

    def redeem_link_code(self, member_ref: str, code: str, *, request_id: str | None = None) -> ledger_pb2.Member:
        """Link your member `member_ref` to the network member a partner's code names."""
        return self._call(self._rpc.redeem_link_code(member_ref, code, request_id))

    def unlink(self, member_ref: str, *, request_id: str | None = None) -> ledger_pb2.Member:
        """Detach your member's account from its partners' (they stay linked to each other): no conversions."""
        return self._call(self._rpc.unlink(member_ref, request_id))

    # --- routes ------------------------------------------------------------------------------
    def set_route(
        self, partner_id: str, direction: str, enabled: bool = True, *, request_id: str | None = None
    ) -> common_pb2.Route:
        """Open ("outbound": our members convert to the partner) or accept ("inbound") a route, or withdraw."""
        return self._call(self._rpc.set_route(partner_id, direction, enabled, request_id))

    def list_routes_page(self, *, page_size: int = 50, page_token: str = "") -> merchant_pb2.ListRoutesResponse:
        """One page of the routes this merchant is a side of."""
        return self._call(self._rpc.list_routes(page_size, page_token))

    def list_routes(self) -> list[common_pb2.Route]:
        """Every route this merchant is a side of, with its state and terms."""
        routes: list[common_pb2.Route] = []
        for page in pages(lambda token: self.list_routes_page(page_size=200, page_token=token)):
            routes.extend(page.routes)
        return routes

    # --- conversions -----------------------------------------------------------------------
    def quote_conversion(
        self, member_ref: str, destination_merchant_id: str, *,
        src_points: int | None = None, dst_points: int | None = None, request_id: str | None = None,
    ) -> exchange_pb2.Quote:  # fmt: skip
        """Price a conversion by source points, or by the destination points wanted (exactly one)."""
        return self._call(
            self._rpc.quote_conversion(member_ref, destination_merchant_id, src_points, dst_points, request_id)
        )

    def convert(
        self, member_ref: str, destination_merchant_id: str, src_points: int = 0, *,
        quote_id: str = "", min_dst_points: int = 0, request_id: str | None = None,
    ) -> exchange_pb2.Conversion:  # fmt: skip
        """Convert the member's points to its linked account at the destination.

        With `quote_id`, exactly the quoted amounts (src_points may be left 0); without, the values
        in force, refused if fewer than `min_dst_points` would arrive.
        """
        item = self._rpc.conversion(
            member_ref, destination_merchant_id, src_points, quote_id, min_dst_points, request_id
        )
        return self._call(self._rpc.convert(item))

    def convert_batch(self, items: list[exchange_pb2.ConvertRequest]) -> exchange_pb2.ConvertBatchResponse:
        """Up to 1000 conversions in one call; each item succeeds or fails on its own.

        A failed item's `error` is a google.rpc.Status; `merchant_sdk.errors.from_status` turns it
        into the same typed exception a single `convert` would raise.
        """
        return self._call(self._rpc.convert_batch(items))

    def get_conversion(self, conversion_id: str) -> exchange_pb2.Conversion:
        """A conversion this merchant is a side of, with its current status (e.g. reversed)."""
        return self._call(self._rpc.get_conversion(conversion_id))

    def events(self, cursor: str = "", *, reconnect: bool = True, heartbeats: bool = False) -> EventStream:
        """Follow this merchant's events from `cursor` (empty: from now), reconnecting on its own.

        Iterate the returned stream; keep `stream.cursor` to resume later; `stream.close()` stops it.
        """
        return EventStream(self._transport, self.merchant_id, cursor, reconnect=reconnect, heartbeats=heartbeats)

    # --- statements --------------------------------------------------------------------------
    def list_statements_page(self, *, page_size: int = 50, page_token: str = "") -> clearing_pb2.ListStatementsResponse:
        """This merchant's statements, newest first."""
        return self._call(self._rpc.list_statements(page_size, page_token))

    def get_statement(self, cycle_id: str) -> clearing_pb2.StatementEnvelope:
        """The statement exactly as the hub signed it: verify it with `merchant_sdk.verify_statement`."""
        return self._call(self._rpc.get_statement(cycle_id))

    def iter_statement_items(self, cycle_id: str, *, page_size: int = 500) -> Iterator[clearing_pb2.StatementItem]:
        """Every item of a statement, in operation-id order (the order `items_sha256` hashes)."""
        for page in pages(lambda token: self._call(self._rpc.list_statement_items(cycle_id, page_size, token))):
            yield from page.items

    def acknowledge_statement(
        self, cycle_id: str, statement_json: bytes, *, request_id: str | None = None
    ) -> clearing_pb2.StatementAcknowledgement:
        """Sign the statement's bytes with this client's key and send the acknowledgement."""
        return self._call(self._rpc.acknowledge_statement(cycle_id, statement_json, request_id))

    def dispute_item(
        self, cycle_id: str, operation_id: str, reason: str, *, request_id: str | None = None
    ) -> clearing_pb2.Dispute:
        """Contest one item of a statement (an operation this merchant is a side of) for the operator."""
        return self._call(self._rpc.dispute_item(cycle_id, operation_id, reason, request_id))
