"""Every expected refusal of the hub, as a typed error with a stable reason code.

The tree (the category decides the gRPC status, in `exchange.rpc.status` — the one table):

    DomainError
    ├── InvalidArgument        INVALID_ARGUMENT     malformed ids, amounts, keys, tokens, bodies
    ├── NotFound               NOT_FOUND            unknown merchant, member, key, link code
    ├── AlreadyExists          ALREADY_EXISTS       duplicates, REQUEST_ID_REUSED
    ├── FailedPrecondition     FAILED_PRECONDITION  INSUFFICIENT_POINTS, MERCHANT_SUSPENDED, linking rules
    ├── OutOfRange             OUT_OF_RANGE         a balance would pass its ceiling
    ├── PermissionDenied       PERMISSION_DENIED    another merchant's data, operator-only methods
    ├── Unauthenticated        UNAUTHENTICATED      missing/bad signature, stale timestamp, replayed nonce
    └── NotImplementedYet      UNIMPLEMENTED        declared in the contract, not served yet

`reason` is the UPPER_SNAKE code clients key on (DESIGN §7); the SDK mirrors each reason as an
exception class, and a test proves both tables cover every leaf here.
"""

from __future__ import annotations

from typing import ClassVar


class DomainError(Exception):
    """Base of every refusal; carries a reason code and a human message."""

    category: ClassVar[str] = "INTERNAL"
    reason: ClassVar[str] = "DOMAIN_ERROR"

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = {k: str(v) for k, v in metadata.items()}


class InvalidArgument(DomainError):
    category = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"


class NotFound(DomainError):
    category = "NOT_FOUND"
    reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    category = "ALREADY_EXISTS"
    reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    category = "FAILED_PRECONDITION"
    reason = "FAILED_PRECONDITION"


class OutOfRange(DomainError):
    category = "OUT_OF_RANGE"
    reason = "OUT_OF_RANGE"


class PermissionDenied(DomainError):
    category = "PERMISSION_DENIED"
    reason = "PERMISSION_DENIED"


class Unauthenticated(DomainError):
    category = "UNAUTHENTICATED"
    reason = "UNAUTHENTICATED"


class NotImplementedYet(DomainError):
    category = "UNIMPLEMENTED"
    reason = "NOT_IMPLEMENTED"


# --- invalid input -------------------------------------------------------------------------
class MalformedRequest(InvalidArgument):
    reason = "MALFORMED_REQUEST"


class InvalidRequestId(InvalidArgument):
    reason = "INVALID_REQUEST_ID"


class InvalidMerchantId(InvalidArgument):
    reason = "INVALID_MERCHANT_ID"


class InvalidMemberRef(InvalidArgument):
    reason = "INVALID_MEMBER_REF"


class InvalidAmount(InvalidArgument):
    reason = "INVALID_AMOUNT"


class InvalidPointValue(InvalidArgument):
    reason = "INVALID_POINT_VALUE"


class InvalidPublicKey(InvalidArgument):
    reason = "INVALID_PUBLIC_KEY"


class UnsupportedCurrency(InvalidArgument):
    reason = "UNSUPPORTED_CURRENCY"


class InvalidPageToken(InvalidArgument):
    reason = "INVALID_PAGE_TOKEN"


class InvalidField(InvalidArgument):
    """A text or enum field outside its allowed shape (name, memo, bank details, status)."""

    reason = "INVALID_FIELD"


# --- not found -----------------------------------------------------------------------------
class MerchantNotFound(NotFound):
    reason = "MERCHANT_NOT_FOUND"


class MemberNotFound(NotFound):
    reason = "MEMBER_NOT_FOUND"


class KeyNotFound(NotFound):
    reason = "KEY_NOT_FOUND"


class LinkCodeInvalid(NotFound):
    reason = "LINK_CODE_INVALID"


# --- already exists ------------------------------------------------------------------------
class MerchantExists(AlreadyExists):
    reason = "MERCHANT_EXISTS"


class MemberExists(AlreadyExists):
    reason = "MEMBER_EXISTS"


class KeyExists(AlreadyExists):
    reason = "KEY_EXISTS"


class RequestIdReused(AlreadyExists):
    reason = "REQUEST_ID_REUSED"


# --- failed precondition -------------------------------------------------------------------
class InsufficientPoints(FailedPrecondition):
    reason = "INSUFFICIENT_POINTS"


class MerchantSuspended(FailedPrecondition):
    reason = "MERCHANT_SUSPENDED"


class NoticePeriodTooShort(FailedPrecondition):
    reason = "NOTICE_PERIOD_TOO_SHORT"


class LinkCodeExpired(FailedPrecondition):
    reason = "LINK_CODE_EXPIRED"


class AlreadyLinked(FailedPrecondition):
    reason = "ALREADY_LINKED"


class NotLinked(FailedPrecondition):
    reason = "NOT_LINKED"


class LastActiveKey(FailedPrecondition):
    reason = "LAST_ACTIVE_KEY"


class KeyAlreadyRevoked(FailedPrecondition):
    reason = "KEY_ALREADY_REVOKED"


class AmountTooSmall(FailedPrecondition):
    """At today's values the conversion yields no whole destination point, or is under the route minimum."""

    reason = "AMOUNT_TOO_SMALL"


class AmountTooLarge(FailedPrecondition):
    """Over the route maximum, or over the network's ceiling for one conversion's cash."""

    reason = "AMOUNT_TOO_LARGE"


class InvalidCursor(InvalidArgument):
    reason = "INVALID_CURSOR"


class BatchTooLarge(InvalidArgument):
    reason = "BATCH_TOO_LARGE"


class SameMerchant(InvalidArgument):
    """A route or conversion needs two different merchants."""

    reason = "SAME_MERCHANT"


class QuoteNotFound(NotFound):
    reason = "QUOTE_NOT_FOUND"


class ConversionNotFound(NotFound):
    reason = "CONVERSION_NOT_FOUND"


class RouteClosed(FailedPrecondition):
    """The route is not open: a side has not agreed, or the operator closed it."""

    reason = "ROUTE_CLOSED"


class CurrencyMismatch(FailedPrecondition):
    reason = "CURRENCY_MISMATCH"


class QuoteExpired(FailedPrecondition):
    reason = "QUOTE_EXPIRED"


class QuoteAlreadyUsed(FailedPrecondition):
    reason = "QUOTE_ALREADY_USED"


class QuoteMismatch(FailedPrecondition):
    """The conversion names another member, destination or amount than its quote."""

    reason = "QUOTE_MISMATCH"


class MinDstPointsNotMet(FailedPrecondition):
    reason = "MIN_DST_POINTS_NOT_MET"


class DailyLimitExceeded(FailedPrecondition):
    reason = "DAILY_LIMIT_EXCEEDED"


class NetDebitCapExceeded(FailedPrecondition):
    reason = "NET_DEBIT_CAP_EXCEEDED"


class AlreadyReversed(FailedPrecondition):
    reason = "ALREADY_REVERSED"


class ReversalWindowClosed(FailedPrecondition):
    reason = "REVERSAL_WINDOW_CLOSED"


class CutoffInFuture(InvalidArgument):
    reason = "CUTOFF_IN_FUTURE"


class BadStatementSignature(InvalidArgument):
    """The acknowledgement's signature does not verify over the statement's signed bytes."""

    reason = "BAD_STATEMENT_SIGNATURE"


class CycleNotFound(NotFound):
    reason = "CYCLE_NOT_FOUND"


class StatementNotFound(NotFound):
    reason = "STATEMENT_NOT_FOUND"


class ItemNotInStatement(NotFound):
    reason = "ITEM_NOT_IN_STATEMENT"


class DisputeExists(AlreadyExists):
    reason = "DISPUTE_EXISTS"


class CutoffBeforeLastCycle(FailedPrecondition):
    """A cycle already closed at a later cutoff: a closed period never changes."""

    reason = "CUTOFF_BEFORE_LAST_CYCLE"


class CycleAlreadySettled(FailedPrecondition):
    reason = "CYCLE_ALREADY_SETTLED"


# --- out of range --------------------------------------------------------------------------
class BalanceLimitExceeded(OutOfRange):
    reason = "BALANCE_LIMIT_EXCEEDED"


# --- permission denied ---------------------------------------------------------------------
class CrossMerchantAccess(PermissionDenied):
    reason = "CROSS_MERCHANT_ACCESS"


class OperatorOnly(PermissionDenied):
    reason = "OPERATOR_ONLY"


class MerchantOnly(PermissionDenied):
    reason = "MERCHANT_ONLY"


# --- unauthenticated -----------------------------------------------------------------------
class MissingCredentials(Unauthenticated):
    reason = "MISSING_CREDENTIALS"


class MalformedCredentials(Unauthenticated):
    reason = "MALFORMED_CREDENTIALS"


class UnknownKey(Unauthenticated):
    reason = "UNKNOWN_KEY"


class KeyRevoked(Unauthenticated):
    reason = "KEY_REVOKED"


class BadSignature(Unauthenticated):
    reason = "BAD_SIGNATURE"


class TimestampOutOfWindow(Unauthenticated):
    reason = "TIMESTAMP_OUT_OF_WINDOW"


class NonceReplayed(Unauthenticated):
    reason = "NONCE_REPLAYED"


# --- the hub's own state ---------------------------------------------------------------------
class StorageBusy(DomainError):
    """Database conflicts (serialization, deadlock, a busy SQLite) outlasted the hub's own retries.

    Nothing of the request was applied — the conflicting transaction rolled back — so the caller
    retries it as it is, with the same request_id (the SDK does so by itself).
    """

    category = "UNAVAILABLE"
    reason = "STORAGE_BUSY"


def all_error_classes() -> list[type[DomainError]]:
    """Every concrete refusal declared here (the leaves), for the status and SDK table tests."""
    found: list[type[DomainError]] = []
    stack: list[type[DomainError]] = [DomainError]
    while stack:
        cls = stack.pop()
        subs = [s for s in cls.__subclasses__() if s.__module__ == __name__]
        if not subs and cls is not DomainError:
            found.append(cls)
        stack.extend(subs)
    return sorted(found, key=lambda c: c.reason)
