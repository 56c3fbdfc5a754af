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

from merchant_sdk._pb.pointsx.v1 import common_pb2, ledger_pb2, merchant_pb2, network_pb2
from merchant_sdk.signing import Signer, load_private_key_file, public_key_bytes
from merchant_sdk.transport import DEFAULT_TIMEOUT_S, SignedTransport, TlsOptions

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
        max_attempts: int = 4,
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
