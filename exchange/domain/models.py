"""Plain values the hub's use cases return; servicers turn them into protobuf and nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field

from exchange.domain import outcomes
from exchange.domain.conversion import ConversionAmounts


@outcomes.result
@dataclass(frozen=True)
class BankDetails:
    account_name: str = ""
    iban: str = ""
    bic: str = ""
    bank_name: str = ""
    country: str = ""


@outcomes.result
@dataclass(frozen=True)
class PointValue:
    value_micros: int
    effective_at_ms: int


@outcomes.result
@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    caller: str
    public_key: bytes
    status: str  # 'active' | 'revoked'
    created_at_ms: int
    revoked_at_ms: int | None


@outcomes.result
@dataclass(frozen=True)
class MerchantView:
    merchant_id: str
    name: str
    currency: str
    status: str  # 'active' | 'suspended'
    point_value: PointValue
    scheduled_values: list[PointValue]
    net_debit_cap_micros: int
    bank: BankDetails
    keys: list[KeyRecord]
    created_at_ms: int
    private_fields_visible: bool = True


@outcomes.result
@dataclass(frozen=True)
class MemberView:
    merchant_id: str
    member_ref: str
    points: int
    linked_merchant_ids: list[str] = field(default_factory=list)
    enrolled_at_ms: int = 0


@outcomes.result
@dataclass(frozen=True)
class PointsMovement:
    operation_seq: int
    merchant_id: str
    member_ref: str
    points: int
    balance_points: int
    created_at_ms: int


@outcomes.result
@dataclass(frozen=True)
class ActivityRecord:
    posting_id: int
    operation_seq: int
    kind: str  # issue | redeem | convert_out | convert_in | reversal
    member_ref: str
    points_delta: int
    counterparty_merchant_id: str
    memo: str
    created_at_ms: int


@outcomes.result
@dataclass(frozen=True)
class LinkCodeIssued:
    code: str
    expires_at_ms: int


@outcomes.result
@dataclass(frozen=True)
class RouteView:
    source_merchant_id: str
    destination_merchant_id: str
    currency: str
    outbound_open: bool
    inbound_accepted: bool
    operator_closed: bool
    fee_bps: int  # the operator's fee, or the network default when it set none
    min_src_points: int  # 0: none
    max_src_points: int  # 0: none
    daily_member_cap_micros: int  # 0: none

    @property
    def state(self) -> str:
        if self.operator_closed:
            return "closed"
        return "open" if self.outbound_open and self.inbound_accepted else "pending"


@outcomes.result
@dataclass(frozen=True)
class QuoteView:
    quote_id: str
    source_merchant_id: str
    destination_merchant_id: str
    member_ref: str
    currency: str
    amounts: ConversionAmounts
    expires_at_ms: int


@outcomes.result
@dataclass(frozen=True)
class ConversionRecord:
    operation_seq: int
    source_merchant_id: str
    destination_merchant_id: str
    src_member_ref: str
    dst_member_ref: str
    currency: str
    amounts: ConversionAmounts
    quote_id: str | None
    status: str  # 'completed' | 'reversed'
    reversal_operation_seq: int | None
    created_at_ms: int
