"""Quotes (DESIGN §4): the values and fee fixed for a short time, spent by one conversion only."""

from __future__ import annotations

import uuid

from sqlalchemy import Connection, insert, select, update

from exchange.domain import errors
from exchange.domain.conversion import ConversionAmounts, convert_amounts
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


def redeem(
    conn: Connection, *, quote_id: str, source: str, destination: str, member_ref: str, src_points: int, now_ms: int
) -> ConversionAmounts:
    """The quoted amounts, if this conversion is the one the quote was for and it is still live."""
    # Locked: of two conversions racing on one quote, the second waits here and then sees it spent.
    row = conn.execute(select(quotes).where(quotes.c.quote_id == quote_id).with_for_update()).mappings().one_or_none()
    if row is None or row["source_merchant_id"] != source:
        raise errors.QuoteNotFound(f"quote {quote_id} does not exist", quote_id=quote_id)
    mismatches = [
        name
        for name, ok in (
            ("destination_merchant_id", row["destination_merchant_id"] == destination),
            ("member_ref", row["member_ref"] == member_ref),
            ("src_points", src_points in (0, row["src_points"])),
        )
        if not ok
    ]
    if mismatches:
        raise errors.QuoteMismatch(
            f"quote {quote_id} was for another {', '.join(mismatches)}", quote_id=quote_id, fields=",".join(mismatches)
        )
    if row["used_by_operation_seq"] is not None:
        raise errors.QuoteAlreadyUsed(f"quote {quote_id} has already been converted", quote_id=quote_id)
    if now_ms >= row["expires_at_ms"]:
        raise errors.QuoteExpired(
            f"quote {quote_id} expired; ask for a new one", quote_id=quote_id, expired_at_ms=str(row["expires_at_ms"])
        )
    return convert_amounts(
        int(row["src_points"]), int(row["src_value_micros"]), int(row["dst_value_micros"]), int(row["fee_bps"])
    )


def mark_used(conn: Connection, quote_id: str, operation_seq: int) -> None:
    """Guarded: of two conversions racing on one quote, only the first to commit spends it."""
    spent = conn.execute(
        update(quotes)
        .where(quotes.c.quote_id == quote_id, quotes.c.used_by_operation_seq.is_(None))
        .values(used_by_operation_seq=operation_seq)
    ).rowcount
    if spent != 1:
        raise errors.QuoteAlreadyUsed(f"quote {quote_id} has already been converted", quote_id=quote_id)
