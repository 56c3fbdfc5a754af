"""Small protobuf <-> plain value helpers shared by the servicers (timestamps, tokens, views)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from google.protobuf import timestamp_pb2

from exchange.domain import errors
from exchange.domain.conversion import ConversionAmounts
from exchange.domain.models import (
    ConversionRecord,
    KeyRecord,
    MemberView,
    MerchantView,
    PointValue,
    QuoteView,
    RouteView,
)
from exchange.domain.units import format_operation_id
from merchant_sdk._pb.pointsx.v1 import common_pb2, exchange_pb2, ledger_pb2

MAX_TIMESTAMP_MS = 253402300799000  # 9999-12-31T23:59:59Z
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50
MAX_INT64 = 2**63 - 1


def ts(ms: int) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromMilliseconds(ms)
    return out


def ms_of(value: timestamp_pb2.Timestamp, field: str) -> int:
    if not 0 <= value.seconds <= MAX_TIMESTAMP_MS // 1000 or not 0 <= value.nanos < 1_000_000_000:
        raise errors.InvalidField(f"{field} is not a valid timestamp", field=field)
    return value.seconds * 1000 + value.nanos // 1_000_000


def page_size(requested: int) -> int:
    if requested < 0:
        raise errors.InvalidField("page_size must not be negative", field="page_size")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def decode_token(token: str) -> str:
    if len(token) > 200:
        raise errors.InvalidPageToken("page_token is not one this hub issued")
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise errors.InvalidPageToken("page_token is not one this hub issued") from None
    if not text.isprintable():  # the hub's tokens are plain text; a NUL would even reach the database
        raise errors.InvalidPageToken("page_token is not one this hub issued")
    return text


def decode_int_token(token: str) -> int | None:
    if not token:
        return None
    text = decode_token(token)
    if not text.isascii() or not text.isdigit() or len(text) > 19 or int(text) > MAX_INT64:
        raise errors.InvalidPageToken("page_token is not one this hub issued")
    return int(text)


def point_value(value: PointValue) -> common_pb2.PointValue:
    return common_pb2.PointValue(value_micros=value.value_micros, effective_at=ts(value.effective_at_ms))


def key_info(record: KeyRecord) -> common_pb2.KeyInfo:
    out = common_pb2.KeyInfo(
        key_id=record.key_id,
        public_key=record.public_key,
        status=common_pb2.KEY_STATUS_ACTIVE if record.status == "active" else common_pb2.KEY_STATUS_REVOKED,
        created_at=ts(record.created_at_ms),
    )
    if record.revoked_at_ms is not None:
        out.revoked_at.CopyFrom(ts(record.revoked_at_ms))
    return out


def merchant(view: MerchantView) -> common_pb2.Merchant:
    out = common_pb2.Merchant(
        merchant_id=view.merchant_id,
        name=view.name,
        currency=view.currency,
        status=common_pb2.MERCHANT_STATUS_ACTIVE if view.status == "active" else common_pb2.MERCHANT_STATUS_SUSPENDED,
        point_value=point_value(view.point_value),
        scheduled_values=[point_value(v) for v in view.scheduled_values],
        created_at=ts(view.created_at_ms),
    )
    if view.private_fields_visible:
        out.net_debit_cap.CopyFrom(common_pb2.Cash(currency=view.currency, micros=view.net_debit_cap_micros))
        out.bank.CopyFrom(
            common_pb2.BankDetails(
                account_name=view.bank.account_name,
                iban=view.bank.iban,
                bic=view.bank.bic,
                bank_name=view.bank.bank_name,
                country=view.bank.country,
            )
        )
        out.keys.extend(key_info(k) for k in view.keys)
    return out


def member(view: MemberView) -> ledger_pb2.Member:
    return ledger_pb2.Member(
        merchant_id=view.merchant_id,
        member_ref=view.member_ref,
        points=view.points,
        linked_merchant_ids=view.linked_merchant_ids,
        enrolled_at=ts(view.enrolled_at_ms),
    )


_ROUTE_STATE = {
    "pending": common_pb2.ROUTE_STATE_PENDING,
    "open": common_pb2.ROUTE_STATE_OPEN,
    "closed": common_pb2.ROUTE_STATE_CLOSED,
}


def cash(currency: str, micros: int) -> common_pb2.Cash:
    return common_pb2.Cash(currency=currency, micros=micros)


def route(view: RouteView) -> common_pb2.Route:
    return common_pb2.Route(
        source_merchant_id=view.source_merchant_id,
        destination_merchant_id=view.destination_merchant_id,
        outbound_open=view.outbound_open,
        inbound_accepted=view.inbound_accepted,
        operator_closed=view.operator_closed,
        state=_ROUTE_STATE[view.state],
        fee_bps=view.fee_bps,
        min_src_points=view.min_src_points,
        max_src_points=view.max_src_points,
        daily_member_cap=cash(view.currency, view.daily_member_cap_micros),
    )


def _amounts(currency: str, a: ConversionAmounts) -> dict[str, Any]:
    """The amount fields Quote and Conversion share, by the same names."""
    return {
        "src_points": a.src_points,
        "dst_points": a.dst_points,
        "src_value_micros": a.src_value_micros,
        "dst_value_micros": a.dst_value_micros,
        "fee_bps": a.fee_bps,
        "src_cash": cash(currency, a.src_cash),
        "fee": cash(currency, a.fee),
        "dst_cash": cash(currency, a.dst_cash),
        "residue": cash(currency, a.residue),
        "platform": cash(currency, a.platform),
    }


def quote(view: QuoteView) -> exchange_pb2.Quote:
    return exchange_pb2.Quote(
        quote_id=view.quote_id,
        source_merchant_id=view.source_merchant_id,
        destination_merchant_id=view.destination_merchant_id,
        member_ref=view.member_ref,
        **_amounts(view.currency, view.amounts),
        expires_at=ts(view.expires_at_ms),
    )


def conversion(
    record: ConversionRecord, viewer: str | None, *, as_of_completion: bool = False
) -> exchange_pb2.Conversion:
    """A conversion as `viewer` may see it: each side sees only its own member's ref (None: operator).

    `as_of_completion` renders it as it stood when it completed (for the events of that moment).
    """
    reversed_now = record.status == "reversed" and not as_of_completion
    out = exchange_pb2.Conversion(
        conversion_id=format_operation_id(record.operation_seq),
        source_merchant_id=record.source_merchant_id,
        destination_merchant_id=record.destination_merchant_id,
        src_member_ref=record.src_member_ref if viewer in (None, record.source_merchant_id) else "",
        dst_member_ref=record.dst_member_ref if viewer in (None, record.destination_merchant_id) else "",
        **_amounts(record.currency, record.amounts),
        status=exchange_pb2.CONVERSION_STATUS_REVERSED if reversed_now else exchange_pb2.CONVERSION_STATUS_COMPLETED,
        quote_id=record.quote_id or "",
        created_at=ts(record.created_at_ms),
    )
    if reversed_now and record.reversal_operation_seq is not None:
        out.reversal_operation_id = format_operation_id(record.reversal_operation_seq)
    return out
