"""The database schema (SQLAlchemy Core). Migrations in `migrations/` must match it (`alembic check`).

Money invariants the database itself enforces: a member's points never go below zero or above the
ceiling (CHECK), a posting moves a positive amount, one (caller, request_id) is stored once.
Merchant-level accounts (issuance, clearing) keep no balance column: their balance is derived
from postings, so no request ever waits on a merchant's hot row (DESIGN §2, hot rows).
Timestamps are Unix milliseconds in BIGINT: exact and identical on both databases.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from exchange.domain.units import MAX_BALANCE_POINTS

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING)

# BIGINT on PostgreSQL, INTEGER (rowid alias, autoincrement) on SQLite.
Serial = BigInteger().with_variant(Integer(), "sqlite")

merchants = Table(
    "merchants",
    metadata,
    Column("merchant_id", String(63), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("status", String(16), nullable=False),
    Column("net_debit_cap_micros", BigInteger, nullable=False),
    Column("bank_json", Text, nullable=False),
    Column("issuance_account_id", BigInteger, nullable=False),
    Column("clearing_account_id", BigInteger, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    CheckConstraint("status IN ('active', 'suspended')", name="status"),
)

point_values = Table(
    "point_values",
    metadata,
    Column("merchant_id", String(63), ForeignKey("merchants.merchant_id"), primary_key=True),
    Column("effective_at_ms", BigInteger, primary_key=True),
    Column("value_micros", BigInteger, nullable=False),
    Column("scheduled_at_ms", BigInteger, nullable=False),
    CheckConstraint("value_micros > 0", name="value_positive"),
)

caller_keys = Table(
    "caller_keys",
    metadata,
    Column("key_id", String(16), primary_key=True),
    Column("caller", String(63), nullable=False, index=True),
    Column("public_key", LargeBinary(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("revoked_at_ms", BigInteger, nullable=True),
    CheckConstraint("status IN ('active', 'revoked')", name="status"),
)

accounts = Table(
    "accounts",
    metadata,
    Column("account_id", Serial, primary_key=True, autoincrement=True),
    Column("asset", String(80), nullable=False),  # "points:<merchant>" or "cash:<currency>"
    Column("kind", String(16), nullable=False),
    Column("merchant_id", String(63), nullable=True),
    Column("member_ref", String(128), nullable=True),
    UniqueConstraint("asset", "kind", "merchant_id", "member_ref", name="uq_accounts_identity"),
    # NULLs are distinct in the constraint above: the network's own accounts need their own guard.
    Index(
        "uq_accounts_network",
        "asset",
        "kind",
        unique=True,
        postgresql_where=text("merchant_id IS NULL AND member_ref IS NULL"),
        sqlite_where=text("merchant_id IS NULL AND member_ref IS NULL"),
    ),
    CheckConstraint("kind IN ('member', 'issuance', 'clearing', 'platform', 'settlement')", name="kind"),
)

members = Table(
    "members",
    metadata,
    Column("merchant_id", String(63), ForeignKey("merchants.merchant_id"), primary_key=True),
    Column("member_ref", String(128), primary_key=True),
    Column("account_id", BigInteger, ForeignKey("accounts.account_id"), nullable=False, unique=True),
    Column("network_member_id", String(36), nullable=False),
    Column("points", BigInteger, nullable=False),
    Column("enrolled_at_ms", BigInteger, nullable=False),
    # A person holds at most one account per merchant within one network member.
    UniqueConstraint("network_member_id", "merchant_id", name="uq_members_network_member_merchant"),
    CheckConstraint(f"points >= 0 AND points <= {MAX_BALANCE_POINTS}", name="points_range"),
)

operations = Table(
    "operations",
    metadata,
    Column("operation_seq", Serial, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("caller", String(63), nullable=False),
    Column("request_id", String(36), nullable=False),
    Column("merchant_id", String(63), nullable=False),
    Column("member_ref", String(128), nullable=True),
    Column("points", BigInteger, nullable=False),
    Column("counterparty_merchant_id", String(63), nullable=True),
    Column("memo", String(200), nullable=False),
    # For operations that move cash between merchants (conversions, reversals), the clearing time:
    # the cycle of `currency` whose window holds it is the one that clears it (exchange/store/fences.py).
    Column("created_at_ms", BigInteger, nullable=False),
    Column("currency", String(3), nullable=True),
    UniqueConstraint("caller", "request_id", name="uq_operations_caller_request"),
    Index("ix_operations_merchant_seq", "merchant_id", "operation_seq"),
    # Reversals are few: a partial index finds a window's reversals without touching conversions.
    Index(
        "ix_operations_reversals",
        "currency",
        "created_at_ms",
        postgresql_where=text("kind = 'reversal'"),
        sqlite_where=text("kind = 'reversal'"),
    ),
)

# The ledger's legs. No foreign keys, on purpose (migration 0006): every conversion wrote four legs,
# and each key check took a KEY SHARE lock on an operation or account row — the merchants' issuance
# and clearing accounts and the platform's are the network's hottest rows. A posting is written
# only with an operation and accounts read or made in the same transaction, and the tests' auditor
# (tests/auditor.py) checks after every scenario that each leg names an existing operation and two
# accounts of its own asset.
postings = Table(
    "postings",
    metadata,
    Column("posting_id", Serial, primary_key=True, autoincrement=True),
    Column("operation_seq", BigInteger, nullable=False, index=True),
    Column("asset", String(80), nullable=False),
    Column("debit_account_id", BigInteger, nullable=False, index=True),
    Column("credit_account_id", BigInteger, nullable=False, index=True),
    Column("amount", BigInteger, nullable=False),
    CheckConstraint("amount > 0", name="amount_positive"),
    CheckConstraint("debit_account_id <> credit_account_id", name="distinct_accounts"),
)

idempotency = Table(
    "idempotency",
    metadata,
    Column("caller", String(63), primary_key=True),
    Column("request_id", String(36), primary_key=True),
    Column("method", String(120), nullable=False),
    Column("request_sha256", String(64), nullable=False),
    Column("outcome", String(8), nullable=False),  # 'pending' | 'ok' | 'error'
    Column("response", LargeBinary, nullable=True),  # reply bytes of records stored before `result` (0005)
    Column("result", LargeBinary, nullable=True),  # the domain result, canonical JSON (domain/outcomes.py)
    Column("error_category", String(32), nullable=True),
    Column("error_reason", String(64), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("error_metadata", Text, nullable=True),  # JSON object: the ErrorInfo metadata
    Column("created_at_ms", BigInteger, nullable=False),
)

link_codes = Table(
    "link_codes",
    metadata,
    Column("code_sha256", String(64), primary_key=True),
    Column("merchant_id", String(63), nullable=False),
    Column("member_ref", String(128), nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("expires_at_ms", BigInteger, nullable=False),
    Column("redeemed_at_ms", BigInteger, nullable=True),
    Column("redeemed_by", String(63), nullable=True),
)

nonces = Table(
    "nonces",
    metadata,
    Column("key_id", String(16), primary_key=True),
    Column("nonce", String(32), primary_key=True),
    Column("seen_at_ms", BigInteger, nullable=False, index=True),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("at_ms", BigInteger, nullable=False),
    Column("caller", String(63), nullable=False),
    Column("key_id", String(16), nullable=False),
    Column("signature", String(100), nullable=False),
    Column("method", String(120), nullable=False),
    Column("request_id", String(36), nullable=False),
    Column("request_sha256", String(64), nullable=False),
    Column("response_sha256", String(64), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("record_hash", String(64), nullable=False),
)

# One row: the chain's head. Appending locks it, so records chain in commit order.
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("record_hash", String(64), nullable=False),
)

# --- conversions (DESIGN §4) ----------------------------------------------------------------

# A route S -> D: S opens it outbound, D accepts it inbound, the operator may close it and sets
# its terms. fee_bps NULL means the network default in force at conversion time.
routes = Table(
    "routes",
    metadata,
    Column("source_merchant_id", String(63), ForeignKey("merchants.merchant_id"), primary_key=True),
    Column("destination_merchant_id", String(63), ForeignKey("merchants.merchant_id"), primary_key=True),
    Column("outbound_open", Boolean, nullable=False),
    Column("inbound_accepted", Boolean, nullable=False),
    Column("operator_closed", Boolean, nullable=False),
    Column("fee_bps", Integer, nullable=True),
    Column("min_src_points", BigInteger, nullable=False),  # 0: none
    Column("max_src_points", BigInteger, nullable=False),  # 0: none
    Column("daily_member_cap_micros", BigInteger, nullable=False),  # 0: none
    Column("updated_at_ms", BigInteger, nullable=False),
    CheckConstraint("fee_bps IS NULL OR (fee_bps >= 0 AND fee_bps <= 10000)", name="fee_bps_range"),
    CheckConstraint("source_merchant_id <> destination_merchant_id", name="two_merchants"),
)

# A quote fixes values and fee until it expires; it is spent by exactly one conversion.
quotes = Table(
    "quotes",
    metadata,
    Column("quote_id", String(36), primary_key=True),
    Column("source_merchant_id", String(63), nullable=False),
    Column("destination_merchant_id", String(63), nullable=False),
    Column("member_ref", String(128), nullable=False),
    Column("src_points", BigInteger, nullable=False),
    Column("dst_points", BigInteger, nullable=False),
    Column("src_value_micros", BigInteger, nullable=False),
    Column("dst_value_micros", BigInteger, nullable=False),
    Column("fee_bps", Integer, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("expires_at_ms", BigInteger, nullable=False),
    Column("used_by_operation_seq", BigInteger, nullable=True),
)

# The business record of a conversion; its postings are in `postings` under the same operation.
conversions = Table(
    "conversions",
    metadata,
    Column("operation_seq", BigInteger, primary_key=True, autoincrement=False),  # its operation's; no FK (0006)
    Column("source_merchant_id", String(63), nullable=False),
    Column("destination_merchant_id", String(63), nullable=False),
    Column("src_member_ref", String(128), nullable=False),
    Column("dst_member_ref", String(128), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("src_points", BigInteger, nullable=False),
    Column("dst_points", BigInteger, nullable=False),
    Column("src_value_micros", BigInteger, nullable=False),
    Column("dst_value_micros", BigInteger, nullable=False),
    Column("fee_bps", Integer, nullable=False),
    Column("src_cash_micros", BigInteger, nullable=False),
    Column("fee_micros", BigInteger, nullable=False),
    Column("dst_cash_micros", BigInteger, nullable=False),
    Column("residue_micros", BigInteger, nullable=False),
    Column("quote_id", String(36), nullable=True),
    Column("status", String(16), nullable=False),
    Column("reversal_operation_seq", BigInteger, nullable=True),
    Column("created_at_ms", BigInteger, nullable=False),
    CheckConstraint("status IN ('completed', 'reversed')", name="status"),
    CheckConstraint("src_cash_micros = dst_cash_micros + fee_micros + residue_micros", name="conserved"),
    CheckConstraint("dst_points >= 1", name="dst_points_positive"),
    Index(
        "ix_conversions_member_day", "source_merchant_id", "src_member_ref", "destination_merchant_id", "created_at_ms"
    ),
    Index("ix_conversions_destination", "destination_merchant_id", "operation_seq"),
    Index("ix_conversions_clearing", "currency", "created_at_ms"),
    # Partial (0006): most conversions have neither a quote nor a reversal, and need no entry for it.
    Index(
        "uq_conversions_quote_id",
        "quote_id",
        unique=True,
        postgresql_where=text("quote_id IS NOT NULL"),
        sqlite_where=text("quote_id IS NOT NULL"),
    ),
    Index(
        "ix_conversions_reversal",
        "reversal_operation_seq",
        postgresql_where=text("reversal_operation_seq IS NOT NULL"),
        sqlite_where=text("reversal_operation_seq IS NOT NULL"),
    ),
)

# Each merchant's open-cycle net position (receivable - payable), kept by guarded updates so the
# net debit cap holds against racing conversions. Clearing moves closed amounts out of it.
merchant_positions = Table(
    "merchant_positions",
    metadata,
    Column("merchant_id", String(63), ForeignKey("merchants.merchant_id"), primary_key=True),
    Column("open_net_micros", BigInteger, nullable=False),
)

# The outbox behind StreamEvents: written in the transaction of the change it reports, keyed by
# the audit record of that transaction. Audit sequence numbers are assigned under the audit head
# lock, so they follow commit order and a reader that has seen key K will never see a new key < K.
events = Table(
    "events",
    metadata,
    Column("audit_seq", BigInteger, primary_key=True, autoincrement=False),
    Column("idx", Integer, primary_key=True, autoincrement=False),
    Column("merchant_id", String(63), nullable=False),
    Column("event_type", String(32), nullable=False),
    Column("subject_merchant_id", String(63), nullable=False),
    Column("conversion_seq", BigInteger, nullable=True),
    Column("value_micros", BigInteger, nullable=True),
    Column("effective_at_ms", BigInteger, nullable=True),
    Column("cycle_id", String(64), nullable=True),
    Column("created_at_ms", BigInteger, nullable=False),
    Index("ix_events_merchant_key", "merchant_id", "audit_seq", "idx"),
)


# --- clearing (DESIGN §5) -------------------------------------------------------------------

# One row per (currency, cutoff): closing the same cutoff again finds it instead of a second cycle.
cycles = Table(
    "cycles",
    metadata,
    Column("cycle_id", String(64), primary_key=True),
    Column("currency", String(3), nullable=False),
    Column("period_start_ms", BigInteger, nullable=False),
    Column("cutoff_ms", BigInteger, nullable=False),
    # The cycle clears every operation of its currency stamped in [window_start_ms, cutoff_ms): the
    # previous cycle's cutoff (0 for the first) up to its own. Windows of a currency tile time.
    Column("window_start_ms", BigInteger, nullable=False),
    # Bounds of the operation ids in the window (NULL when empty): per-merchant item scans stay
    # inside the cycle's stretch of the merchant's operations.
    Column("first_operation_seq", BigInteger, nullable=True),
    Column("last_operation_seq", BigInteger, nullable=True),
    Column("status", String(16), nullable=False),
    Column("operation_count", BigInteger, nullable=False),
    Column("closed_at_ms", BigInteger, nullable=False),
    Column("settled_at_ms", BigInteger, nullable=True),
    Column("bank_reference", String(140), nullable=True),
    Column("settlement_operation_seq", BigInteger, nullable=True),
    UniqueConstraint("currency", "cutoff_ms", name="uq_cycles_currency_cutoff"),
    CheckConstraint("status IN ('closed', 'settled')", name="status"),
)

# The clearing fence of each currency: no operation of that currency may be stamped before
# `fenced_before_ms`. Closing a cycle raises it to the cutoff (and waits for writers in flight)
# before it reads the window, so nothing can land in a window once it is being cleared.
clearing_fences = Table(
    "clearing_fences",
    metadata,
    Column("currency", String(3), primary_key=True),
    Column("fenced_before_ms", BigInteger, nullable=False),
)

cycle_positions = Table(
    "cycle_positions",
    metadata,
    Column("cycle_id", String(64), ForeignKey("cycles.cycle_id"), primary_key=True),
    Column("merchant_id", String(63), primary_key=True),  # or 'platform'
    Column("opening_carry_micros", BigInteger, nullable=False),
    Column("payable_micros", BigInteger, nullable=False),
    Column("receivable_micros", BigInteger, nullable=False),
    Column("fees_micros", BigInteger, nullable=False),
    Column("net_micros", BigInteger, nullable=False),
    Column("settlement_minor", BigInteger, nullable=False),
    Column("closing_carry_micros", BigInteger, nullable=False),
)

# The signed bytes exactly as served; the merchant's acknowledgement signs the same bytes.
statements = Table(
    "statements",
    metadata,
    Column("cycle_id", String(64), ForeignKey("cycles.cycle_id"), primary_key=True),
    Column("merchant_id", String(63), primary_key=True),
    Column("currency", String(3), nullable=False),
    Column("cutoff_ms", BigInteger, nullable=False),
    Column("statement_json", LargeBinary, nullable=False),
    Column("statement_sha256", String(64), nullable=False),
    Column("signature", LargeBinary(64), nullable=False),
    Column("key_id", String(16), nullable=False),
    Column("item_count", BigInteger, nullable=False),
    Column("net_micros", BigInteger, nullable=False),
    Column("settlement_minor", BigInteger, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("ack_key_id", String(16), nullable=True),
    Column("ack_signature", LargeBinary(64), nullable=True),
    Column("acked_at_ms", BigInteger, nullable=True),
    Index("ix_statements_merchant_cutoff", "merchant_id", "cutoff_ms"),
)

disputes = Table(
    "disputes",
    metadata,
    Column("dispute_id", String(36), primary_key=True),
    Column("cycle_id", String(64), ForeignKey("cycles.cycle_id"), nullable=False),
    Column("merchant_id", String(63), nullable=False),
    Column("operation_seq", BigInteger, nullable=False),
    Column("reason", String(500), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    UniqueConstraint("cycle_id", "merchant_id", "operation_seq", name="uq_disputes_item"),
    CheckConstraint("status IN ('open', 'resolved')", name="status"),
)
