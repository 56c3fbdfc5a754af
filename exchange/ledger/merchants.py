"""Merchants: admission, status, point values (scheduled, never rewritten) and the public profile."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from sqlalchemy import Connection, bindparam, insert, select, update

from exchange.domain import errors, units
from exchange.domain.models import BankDetails, MerchantView, PointValue
from exchange.domain.refusals import check_active
from exchange.ledger import accounts, keys
from exchange.store.schema import merchant_positions, merchants, point_values

STATUSES = ("active", "suspended")


@dataclass(frozen=True)
class MerchantAdmission:
    merchant_id: str
    name: str
    currency: str
    point_value_micros: int
    public_key: bytes
    net_debit_cap_micros: int
    bank: BankDetails


def check_bank(bank: BankDetails) -> BankDetails:
    for name, value in asdict(bank).items():
        units.check_text(value, f"bank.{name}", max_len=140)
    return bank


def register(conn: Connection, admission: MerchantAdmission, now_ms: int) -> MerchantView:
    if conn.execute(select(merchants.c.merchant_id).where(merchants.c.merchant_id == admission.merchant_id)).first():
        raise errors.MerchantExists(f"merchant {admission.merchant_id} is already registered")
    issuance = accounts.get_or_create_account(
        conn, accounts.points_asset(admission.merchant_id), "issuance", admission.merchant_id
    )
    clearing = accounts.get_or_create_account(
        conn, accounts.cash_asset(admission.currency), "clearing", admission.merchant_id
    )
    # The platform's fee account and the settlement account exist once per currency.
    accounts.get_or_create_account(conn, accounts.cash_asset(admission.currency), "platform")
    accounts.get_or_create_account(conn, accounts.cash_asset(admission.currency), "settlement")
    conn.execute(
        insert(merchants).values(
            merchant_id=admission.merchant_id,
            name=admission.name,
            currency=admission.currency,
            status="active",
            net_debit_cap_micros=admission.net_debit_cap_micros,
            bank_json=json.dumps(asdict(admission.bank), sort_keys=True),
            issuance_account_id=issuance,
            clearing_account_id=clearing,
            created_at_ms=now_ms,
        )
    )
    conn.execute(insert(merchant_positions).values(merchant_id=admission.merchant_id, open_net_micros=0))
    conn.execute(
        insert(point_values).values(
            merchant_id=admission.merchant_id,
            effective_at_ms=now_ms,
            value_micros=admission.point_value_micros,
            scheduled_at_ms=now_ms,
        )
    )
    keys.add(conn, admission.merchant_id, admission.public_key, now_ms)
    return view(conn, admission.merchant_id, now_ms)


# Built once (hot path): statement building and cache keys cost more than the database's work.
_STATUS = select(merchants.c.status, merchants.c.currency).where(merchants.c.merchant_id == bindparam("m"))
_VALUES = select(point_values.c.value_micros, point_values.c.effective_at_ms).where(
    point_values.c.merchant_id == bindparam("m")
)
_VALUE_AT = (
    _VALUES.where(point_values.c.effective_at_ms <= bindparam("at"))
    .order_by(point_values.c.effective_at_ms.desc())
    .limit(1)
)
_FIRST_VALUE = _VALUES.order_by(point_values.c.effective_at_ms).limit(1)


def require(conn: Connection, merchant_id: str) -> tuple[str, str]:
    """(status, currency) of a merchant, or MERCHANT_NOT_FOUND."""
    row = conn.execute(_STATUS, {"m": merchant_id}).one_or_none()
    if row is None:
        raise errors.MerchantNotFound(f"merchant {merchant_id} is not registered", merchant_id=merchant_id)
    return str(row.status), str(row.currency)


def require_active(conn: Connection, merchant_id: str) -> str:
    return check_active(merchant_id, require(conn, merchant_id))


def set_status(conn: Connection, merchant_id: str, status: str, now_ms: int) -> MerchantView:
    if status not in STATUSES:
        raise errors.InvalidField(f"status must be one of {STATUSES}", field="status")
    require(conn, merchant_id)
    conn.execute(update(merchants).where(merchants.c.merchant_id == merchant_id).values(status=status))
    return view(conn, merchant_id, now_ms)


def set_net_debit_cap(conn: Connection, merchant_id: str, cap_micros: int, now_ms: int) -> MerchantView:
    require(conn, merchant_id)
    conn.execute(
        update(merchants).where(merchants.c.merchant_id == merchant_id).values(net_debit_cap_micros=cap_micros)
    )
    return view(conn, merchant_id, now_ms)


def schedule_point_value(
    conn: Connection, merchant_id: str, value_micros: int, effective_at_ms: int, notice_ms: int, now_ms: int
) -> MerchantView:
    """A value change never applies sooner than the notice period: partners must be able to react."""
    require_active(conn, merchant_id)
    if effective_at_ms < now_ms + notice_ms:
        raise errors.NoticePeriodTooShort(
            f"a new point value takes effect no earlier than now + {notice_ms // 1000} s",
            notice_s=str(notice_ms // 1000),
        )
    existing = conn.execute(
        select(point_values.c.value_micros).where(
            point_values.c.merchant_id == merchant_id, point_values.c.effective_at_ms == effective_at_ms
        )
    ).scalar_one_or_none()
    if existing is not None:
        # Rescheduling the same instant replaces a value that has not taken effect yet.
        conn.execute(
            update(point_values)
            .where(point_values.c.merchant_id == merchant_id, point_values.c.effective_at_ms == effective_at_ms)
            .values(value_micros=value_micros, scheduled_at_ms=now_ms)
        )
    else:
        conn.execute(
            insert(point_values).values(
                merchant_id=merchant_id,
                effective_at_ms=effective_at_ms,
                value_micros=value_micros,
                scheduled_at_ms=now_ms,
            )
        )
    return view(conn, merchant_id, now_ms)


def value_at(conn: Connection, merchant_id: str, at_ms: int) -> PointValue:
    """The value in force at `at_ms`. A time before admission (a hub process whose clock is a
    little behind the one that admitted the merchant) gets the value it was admitted with."""
    row = conn.execute(_VALUE_AT, {"m": merchant_id, "at": at_ms}).one_or_none()
    if row is None:
        row = conn.execute(_FIRST_VALUE, {"m": merchant_id}).one()
    return PointValue(int(row.value_micros), int(row.effective_at_ms))


def view(conn: Connection, merchant_id: str, now_ms: int, *, private: bool = True) -> MerchantView:
    row = conn.execute(select(merchants).where(merchants.c.merchant_id == merchant_id)).mappings().one_or_none()
    if row is None:
        raise errors.MerchantNotFound(f"merchant {merchant_id} is not registered", merchant_id=merchant_id)
    scheduled = conn.execute(
        select(point_values.c.value_micros, point_values.c.effective_at_ms)
        .where(point_values.c.merchant_id == merchant_id, point_values.c.effective_at_ms > now_ms)
        .order_by(point_values.c.effective_at_ms)
    ).all()
    return MerchantView(
        merchant_id=merchant_id,
        name=row["name"],
        currency=row["currency"],
        status=row["status"],
        point_value=value_at(conn, merchant_id, now_ms),
        scheduled_values=[PointValue(int(v), int(t)) for v, t in scheduled],
        net_debit_cap_micros=int(row["net_debit_cap_micros"]) if private else 0,
        bank=BankDetails(**json.loads(row["bank_json"])) if private else BankDetails(),
        keys=keys.list_for(conn, merchant_id) if private else [],
        created_at_ms=int(row["created_at_ms"]),
        private_fields_visible=private,
    )


def list_ids(conn: Connection, after: str, limit: int) -> list[str]:
    return list(
        conn.execute(
            select(merchants.c.merchant_id)
            .where(merchants.c.merchant_id > after)
            .order_by(merchants.c.merchant_id)
            .limit(limit)
        ).scalars()
    )
