"""Quotes (DESIGN §4): the values and fee fixed for a short time, spent by one conversion only."""

from __future__ import annotations

import uuid

from sqlalchemy import Connection, insert

from exchange.domain.conversion import ConversionAmounts
from exchange.domain.models import QuoteView
from exchange.store.schema import quotes


def create(
    conn: Connection,
    *,
    source: str,
    destination: str,
    member_ref: str,
    currency: str,
    amounts: ConversionAmounts,
    now_ms: int,
    ttl_ms: int,
) -> QuoteView:
    quote_id = str(uuid.uuid4())
    conn.execute(
        insert(quotes).values(
            quote_id=quote_id,
            source_merchant_id=source,
            destination_merchant_id=destination,
            member_ref=member_ref,
            src_points=amounts.src_points,
            dst_points=amounts.dst_points,
            src_value_micros=amounts.src_value_micros,
            dst_value_micros=amounts.dst_value_micros,
            fee_bps=amounts.fee_bps,
            created_at_ms=now_ms,
            expires_at_ms=now_ms + ttl_ms,
        )
    )
    return QuoteView(quote_id, source, destination, member_ref, currency, amounts, now_ms + ttl_ms)
