"""`AsyncMerchantClient`: the asyncio twin of `MerchantClient`, on `grpc.aio`.

The same methods with the same arguments and results, awaited: a merchant's async app (an aiohttp
or FastAPI service, say) converts and settles without a thread per call. Requests are built by the
same code as the blocking client's (`merchant_sdk._requests`), so both send identical bytes; every
mutating call carries a `request_id` (yours, or one made for the call) that its retries reuse, so a
retry never posts twice. Failures raise the exceptions of `merchant_sdk.errors`.

Make and use a client inside one event loop (its channel opens on first use, in that loop)::

    async with AsyncMerchantClient.from_key_file("127.0.0.1:50051", "brew", "brew.key") as client:
        await client.issue_points("alice", 100)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from merchant_sdk._client_base import ClientBase
from merchant_sdk._pb.pointsx.v1 import clearing_pb2, common_pb2, exchange_pb2, ledger_pb2, merchant_pb2, network_pb2
from merchant_sdk._requests import M, Rpc, async_pages
from merchant_sdk.aio.events import AsyncEventStream
from merchant_sdk.aio.transport import AsyncSignedTransport

__all__ = ["AsyncMerchantClient"]


class AsyncMerchantClient(ClientBase[AsyncSignedTransport]):
    """One merchant's asyncio connection to a hub, signing every call with the merchant's Ed25519 key."""

    _transport_cls = AsyncSignedTransport

    async def _call(self, rpc: Rpc[M]) -> M:
        return await self._transport.call(rpc.method, rpc.request, rpc.response_cls)

    async def close(self) -> None:
        """Close the channel; calls and event streams still open are cancelled."""
        await self._transport.close()

    async def __aenter__(self) -> AsyncMerchantClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- network -----------------------------------------------------------------------
    async def get_network_info(self) -> network_pb2.NetworkInfo:
        """The hub's public keys (to verify statements), currencies and notice period."""
        return await self._call(self._rpc.get_network_info())

    # --- merchant ----------------------------------------------------------------------
    async def get_merchant(self, merchant_id: str = "") -> common_pb2.Merchant:
        """This merchant in full, or another merchant's public profile."""
        return await self._call(self._rpc.get_merchant(merchant_id))

    async def schedule_point_value(
        self, value_micros: int, effective_at: datetime, *, request_id: str | None = None
    ) -> common_pb2.Merchant:
        """Announce a new point value; it applies at `effective_at`, at least the notice period away."""
        return await self._call(self._rpc.schedule_point_value(value_micros, effective_at, request_id))

    async def add_key(
        self, public_key: bytes | Ed25519PrivateKey, *, request_id: str | None = None
    ) -> common_pb2.KeyInfo:
        """Register another key (rotation): both work until the old one is revoked."""
        return await self._call(self._rpc.add_key(public_key, request_id))

    async def revoke_key(self, key_id: str, *, request_id: str | None = None) -> common_pb2.KeyInfo:
        """Retire a key (rotated out, or leaked): calls signed with it are refused from now on."""
        return await self._call(self._rpc.revoke_key(key_id, request_id))

    # --- members and points --------------------------------------------------------------
    async def enroll_member(self, member_ref: str, *, request_id: str | None = None) -> ledger_pb2.Member:
        """Open an account, at 0 points, for the member you know as `member_ref`."""
        return await self._call(self._rpc.enroll_member(member_ref, request_id))

    async def issue_points(
        self, member_ref: str, points: int, *, memo: str = "", request_id: str | None = None
    ) -> ledger_pb2.PointsMovement:
        """The member earns `points` (1 .. 10^12)."""
        return await self._call(self._rpc.issue_points(member_ref, points, memo, request_id))

    async def redeem_points(
        self, member_ref: str, points: int, *, memo: str = "", request_id: str | None = None
    ) -> ledger_pb2.PointsMovement:
        """The member spends `points`; refused with InsufficientPoints rather than overdrawn."""
        return await self._call(self._rpc.redeem_points(member_ref, points, memo, request_id))

    async def get_balance(self, member_ref: str) -> ledger_pb2.Balance:
        """The member's points now, as the ledger holds them."""
        return await self._call(self._rpc.get_balance(member_ref))

    async def list_activity_page(
        self, member_ref: str = "", *, page_size: int = 50, page_token: str = ""
    ) -> ledger_pb2.ListActivityResponse:
        """One page of activity, newest first: of one member, or of the whole merchant (no member_ref)."""
        return await self._call(self._rpc.list_activity(member_ref, page_size, page_token))

    async def iter_activity(self, member_ref: str = "", *, page_size: int = 100) -> AsyncIterator[ledger_pb2.Activity]:
        """Every activity entry, newest first, fetching the next page only when this one is consumed."""
        async for page in async_pages(
            lambda token: self.list_activity_page(member_ref, page_size=page_size, page_token=token)
        ):
            for activity in page.activities:
                yield activity

    # --- linking ---------------------------------------------------------------------------
    async def create_link_code(self, member_ref: str, *, request_id: str | None = None) -> ledger_pb2.LinkCode:
        """A one-time code (10 minutes) the member takes to a partner's app to link its account there."""
        return await self._call(self._rpc.create_link_code(member_ref, request_id))

    async def redeem_link_code(self, member_ref: str, code: str, *, request_id: str | None = None) -> ledger_pb2.Member:
        """Link your member `member_ref` to the network member a partner's code names."""
        return await self._call(self._rpc.redeem_link_code(member_ref, code, request_id))

    async def unlink(self, member_ref: str, *, request_id: str | None = None) -> ledger_pb2.Member:
        """Detach your member's account from its partners' (they stay linked to each other): no conversions."""
        return await self._call(self._rpc.unlink(member_ref, request_id))

    # --- routes ------------------------------------------------------------------------------
    async def set_route(
        self, partner_id: str, direction: str, enabled: bool = True, *, request_id: str | None = None
    ) -> common_pb2.Route:
        """Open ("outbound": our members convert to the partner) or accept ("inbound") a route, or withdraw."""
        return await self._call(self._rpc.set_route(partner_id, direction, enabled, request_id))

    async def list_routes_page(self, *, page_size: int = 50, page_token: str = "") -> merchant_pb2.ListRoutesResponse:
        """One page of the routes this merchant is a side of."""
        return await self._call(self._rpc.list_routes(page_size, page_token))

    async def list_routes(self) -> list[common_pb2.Route]:
        """Every route this merchant is a side of, with its state and terms."""
        routes: list[common_pb2.Route] = []
        async for page in async_pages(lambda token: self.list_routes_page(page_size=200, page_token=token)):
            routes.extend(page.routes)
        return routes

    # --- conversions -----------------------------------------------------------------------
    async def quote_conversion(
        self, member_ref: str, destination_merchant_id: str, *,
        src_points: int | None = None, dst_points: int | None = None, request_id: str | None = None,
    ) -> exchange_pb2.Quote:  # fmt: skip
        """Price a conversion by source points, or by the destination points wanted (exactly one)."""
        rpc = self._rpc.quote_conversion(member_ref, destination_merchant_id, src_points, dst_points, request_id)
        return await self._call(rpc)

    async def convert(
        self, member_ref: str, destination_merchant_id: str, src_points: int = 0, *,
        quote_id: str = "", min_dst_points: int = 0, request_id: str | None = None,
    ) -> exchange_pb2.Conversion:  # fmt: skip
        """Convert the member's points to its linked account at the destination: as quoted, or at today's values.

        With `quote_id`, exactly the quoted amounts; without, refused if fewer than `min_dst_points` would arrive.
        """
        item = self.conversion_request(
            member_ref, destination_merchant_id, src_points, quote_id=quote_id, min_dst_points=min_dst_points,
            request_id=request_id,
        )  # fmt: skip
        return await self._call(self._rpc.convert(item))

    async def convert_batch(self, items: list[exchange_pb2.ConvertRequest]) -> exchange_pb2.ConvertBatchResponse:
        """Up to 1000 conversions (from `conversion_request`) in one call; each item succeeds or fails on its own.

        `merchant_sdk.errors.from_status(result.error)` is the exception a single `convert` would raise.
        """
        return await self._call(self._rpc.convert_batch(items))

    async def get_conversion(self, conversion_id: str) -> exchange_pb2.Conversion:
        """A conversion this merchant is a side of, with its current status (e.g. reversed)."""
        return await self._call(self._rpc.get_conversion(conversion_id))

    def events(self, cursor: str = "", *, reconnect: bool = True, heartbeats: bool = False) -> AsyncEventStream:
        """Follow this merchant's events from `cursor` (empty: from now) with `async for`, reconnecting on its own.

        Keep `stream.cursor` to resume later; `stream.close()`, or leaving `async with stream:`, stops it.
        """
        return AsyncEventStream(self._transport, self.merchant_id, cursor, reconnect=reconnect, heartbeats=heartbeats)

    # --- statements --------------------------------------------------------------------------
    async def list_statements_page(
        self, *, page_size: int = 50, page_token: str = ""
    ) -> clearing_pb2.ListStatementsResponse:
        """This merchant's statements, newest first."""
        return await self._call(self._rpc.list_statements(page_size, page_token))

    async def get_statement(self, cycle_id: str) -> clearing_pb2.StatementEnvelope:
        """The statement exactly as the hub signed it: verify it with `merchant_sdk.verify_statement`."""
        return await self._call(self._rpc.get_statement(cycle_id))

    async def iter_statement_items(
        self, cycle_id: str, *, page_size: int = 500
    ) -> AsyncIterator[clearing_pb2.StatementItem]:
        """Every item of a statement, in operation-id order (the order `items_sha256` hashes)."""
        async for page in async_pages(
            lambda token: self._call(self._rpc.list_statement_items(cycle_id, page_size, token))
        ):
            for item in page.items:
                yield item

    async def acknowledge_statement(
        self, cycle_id: str, statement_json: bytes, *, request_id: str | None = None
    ) -> clearing_pb2.StatementAcknowledgement:
        """Sign the statement's bytes with this client's key and send the acknowledgement."""
        return await self._call(self._rpc.acknowledge_statement(cycle_id, statement_json, request_id))

    async def dispute_item(
        self, cycle_id: str, operation_id: str, reason: str, *, request_id: str | None = None
    ) -> clearing_pb2.Dispute:
        """Contest one item of a statement (an operation this merchant is a side of) for the operator."""
        return await self._call(self._rpc.dispute_item(cycle_id, operation_id, reason, request_id))
