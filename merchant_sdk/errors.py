"""Exceptions a merchant sees, one per `ErrorInfo.reason` the hub sends (DESIGN §7).

    PointsxError                      every failure of a call: .code, .reason, .message, .metadata
    ├── InvalidRequest                INVALID_ARGUMENT (MalformedRequest, InvalidAmount, …)
    ├── NotFoundError                 NOT_FOUND (MemberNotFound, MerchantNotFound, …)
    ├── AlreadyExistsError            ALREADY_EXISTS (MemberExists, RequestIdReused, …)
    ├── PreconditionFailed            FAILED_PRECONDITION (InsufficientPoints, MerchantSuspended, …)
    ├── OutOfRangeError               OUT_OF_RANGE (BalanceLimitExceeded)
    ├── PermissionDeniedError         PERMISSION_DENIED (CrossMerchantAccess, OperatorOnly, …)
    ├── AuthenticationError           UNAUTHENTICATED (BadSignature, NonceReplayed, …)
    ├── NotImplementedByHub           UNIMPLEMENTED
    └── TransientError                UNAVAILABLE, DEADLINE_EXCEEDED — safe to retry, same request_id

`REASONS` maps every reason code to its class; a test proves it covers every reason the hub has.
"""

from __future__ import annotations

from typing import ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "pointsx.dev"


class PointsxError(Exception):
    reason: ClassVar[str] = ""

    def __init__(
        self, code: grpc.StatusCode, reason: str, message: str, metadata: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{reason or code.name}: {message}")
        self.code = code
        self.reason = reason  # type: ignore[misc]
        self.message = message
        self.metadata = metadata or {}


class InvalidRequest(PointsxError): ...


class NotFoundError(PointsxError): ...


class AlreadyExistsError(PointsxError): ...


class PreconditionFailed(PointsxError): ...


class OutOfRangeError(PointsxError): ...


class PermissionDeniedError(PointsxError): ...


class AuthenticationError(PointsxError): ...


class NotImplementedByHub(PointsxError): ...


class TransientError(PointsxError): ...


class InternalError(PointsxError): ...


def _leaf(name: str, base: type[PointsxError], reason: str) -> type[PointsxError]:
    return type(name, (base,), {"reason": reason, "__doc__": f"The hub refused with reason {reason}."})


# fmt: off
MalformedRequest = _leaf("MalformedRequest", InvalidRequest, "MALFORMED_REQUEST")
InvalidRequestId = _leaf("InvalidRequestId", InvalidRequest, "INVALID_REQUEST_ID")
InvalidMerchantId = _leaf("InvalidMerchantId", InvalidRequest, "INVALID_MERCHANT_ID")
InvalidMemberRef = _leaf("InvalidMemberRef", InvalidRequest, "INVALID_MEMBER_REF")
InvalidAmount = _leaf("InvalidAmount", InvalidRequest, "INVALID_AMOUNT")
InvalidPointValue = _leaf("InvalidPointValue", InvalidRequest, "INVALID_POINT_VALUE")
InvalidPublicKey = _leaf("InvalidPublicKey", InvalidRequest, "INVALID_PUBLIC_KEY")
UnsupportedCurrency = _leaf("UnsupportedCurrency", InvalidRequest, "UNSUPPORTED_CURRENCY")
InvalidPageToken = _leaf("InvalidPageToken", InvalidRequest, "INVALID_PAGE_TOKEN")
InvalidField = _leaf("InvalidField", InvalidRequest, "INVALID_FIELD")
MerchantNotFound = _leaf("MerchantNotFound", NotFoundError, "MERCHANT_NOT_FOUND")
MemberNotFound = _leaf("MemberNotFound", NotFoundError, "MEMBER_NOT_FOUND")
KeyNotFound = _leaf("KeyNotFound", NotFoundError, "KEY_NOT_FOUND")
LinkCodeInvalid = _leaf("LinkCodeInvalid", NotFoundError, "LINK_CODE_INVALID")
MerchantExists = _leaf("MerchantExists", AlreadyExistsError, "MERCHANT_EXISTS")
MemberExists = _leaf("MemberExists", AlreadyExistsError, "MEMBER_EXISTS")
KeyExists = _leaf("KeyExists", AlreadyExistsError, "KEY_EXISTS")
RequestIdReused = _leaf("RequestIdReused", AlreadyExistsError, "REQUEST_ID_REUSED")
InsufficientPoints = _leaf("InsufficientPoints", PreconditionFailed, "INSUFFICIENT_POINTS")
MerchantSuspended = _leaf("MerchantSuspended", PreconditionFailed, "MERCHANT_SUSPENDED")
NoticePeriodTooShort = _leaf("NoticePeriodTooShort", PreconditionFailed, "NOTICE_PERIOD_TOO_SHORT")
LinkCodeExpired = _leaf("LinkCodeExpired", PreconditionFailed, "LINK_CODE_EXPIRED")
AlreadyLinked = _leaf("AlreadyLinked", PreconditionFailed, "ALREADY_LINKED")
NotLinked = _leaf("NotLinked", PreconditionFailed, "NOT_LINKED")
LastActiveKey = _leaf("LastActiveKey", PreconditionFailed, "LAST_ACTIVE_KEY")
KeyAlreadyRevoked = _leaf("KeyAlreadyRevoked", PreconditionFailed, "KEY_ALREADY_REVOKED")
AmountTooSmall = _leaf("AmountTooSmall", PreconditionFailed, "AMOUNT_TOO_SMALL")
AmountTooLarge = _leaf("AmountTooLarge", PreconditionFailed, "AMOUNT_TOO_LARGE")
BalanceLimitExceeded = _leaf("BalanceLimitExceeded", OutOfRangeError, "BALANCE_LIMIT_EXCEEDED")
CrossMerchantAccess = _leaf("CrossMerchantAccess", PermissionDeniedError, "CROSS_MERCHANT_ACCESS")
OperatorOnly = _leaf("OperatorOnly", PermissionDeniedError, "OPERATOR_ONLY")
MerchantOnly = _leaf("MerchantOnly", PermissionDeniedError, "MERCHANT_ONLY")
MissingCredentials = _leaf("MissingCredentials", AuthenticationError, "MISSING_CREDENTIALS")
MalformedCredentials = _leaf("MalformedCredentials", AuthenticationError, "MALFORMED_CREDENTIALS")
UnknownKey = _leaf("UnknownKey", AuthenticationError, "UNKNOWN_KEY")
KeyRevoked = _leaf("KeyRevoked", AuthenticationError, "KEY_REVOKED")
BadSignature = _leaf("BadSignature", AuthenticationError, "BAD_SIGNATURE")
TimestampOutOfWindow = _leaf("TimestampOutOfWindow", AuthenticationError, "TIMESTAMP_OUT_OF_WINDOW")
NonceReplayed = _leaf("NonceReplayed", AuthenticationError, "NONCE_REPLAYED")
InvalidCursor = _leaf("InvalidCursor", InvalidRequest, "INVALID_CURSOR")
BatchTooLarge = _leaf("BatchTooLarge", InvalidRequest, "BATCH_TOO_LARGE")
SameMerchant = _leaf("SameMerchant", InvalidRequest, "SAME_MERCHANT")
QuoteNotFound = _leaf("QuoteNotFound", NotFoundError, "QUOTE_NOT_FOUND")
ConversionNotFound = _leaf("ConversionNotFound", NotFoundError, "CONVERSION_NOT_FOUND")
RouteClosed = _leaf("RouteClosed", PreconditionFailed, "ROUTE_CLOSED")
CurrencyMismatch = _leaf("CurrencyMismatch", PreconditionFailed, "CURRENCY_MISMATCH")
QuoteExpired = _leaf("QuoteExpired", PreconditionFailed, "QUOTE_EXPIRED")
QuoteAlreadyUsed = _leaf("QuoteAlreadyUsed", PreconditionFailed, "QUOTE_ALREADY_USED")
QuoteMismatch = _leaf("QuoteMismatch", PreconditionFailed, "QUOTE_MISMATCH")
MinDstPointsNotMet = _leaf("MinDstPointsNotMet", PreconditionFailed, "MIN_DST_POINTS_NOT_MET")
DailyLimitExceeded = _leaf("DailyLimitExceeded", PreconditionFailed, "DAILY_LIMIT_EXCEEDED")
NetDebitCapExceeded = _leaf("NetDebitCapExceeded", PreconditionFailed, "NET_DEBIT_CAP_EXCEEDED")
AlreadyReversed = _leaf("AlreadyReversed", PreconditionFailed, "ALREADY_REVERSED")
ReversalWindowClosed = _leaf("ReversalWindowClosed", PreconditionFailed, "REVERSAL_WINDOW_CLOSED")
CutoffInFuture = _leaf("CutoffInFuture", InvalidRequest, "CUTOFF_IN_FUTURE")
BadStatementSignature = _leaf("BadStatementSignature", InvalidRequest, "BAD_STATEMENT_SIGNATURE")
CycleNotFound = _leaf("CycleNotFound", NotFoundError, "CYCLE_NOT_FOUND")
StatementNotFound = _leaf("StatementNotFound", NotFoundError, "STATEMENT_NOT_FOUND")
ItemNotInStatement = _leaf("ItemNotInStatement", NotFoundError, "ITEM_NOT_IN_STATEMENT")
DisputeExists = _leaf("DisputeExists", AlreadyExistsError, "DISPUTE_EXISTS")
CutoffBeforeLastCycle = _leaf("CutoffBeforeLastCycle", PreconditionFailed, "CUTOFF_BEFORE_LAST_CYCLE")
CycleAlreadySettled = _leaf("CycleAlreadySettled", PreconditionFailed, "CYCLE_ALREADY_SETTLED")
NotImplementedReason = _leaf("NotImplementedReason", NotImplementedByHub, "NOT_IMPLEMENTED")
StorageBusy = _leaf("StorageBusy", TransientError, "STORAGE_BUSY")
# fmt: on

_BY_CODE: dict[grpc.StatusCode, type[PointsxError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionFailed,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.UNIMPLEMENTED: NotImplementedByHub,
    grpc.StatusCode.UNAVAILABLE: TransientError,
    grpc.StatusCode.DEADLINE_EXCEEDED: TransientError,
}

REASONS: dict[str, type[PointsxError]] = {
    cls.reason: cls
    for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, PointsxError) and cls.reason
}


def _error_info(status: status_pb2.Status | None) -> tuple[str, dict[str, str]]:
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info) and info.domain == ERROR_DOMAIN:
            return info.reason, dict(info.metadata)
    return "", {}


def _typed(code: grpc.StatusCode, message: str, status: status_pb2.Status | None) -> PointsxError:
    reason, metadata = _error_info(status)
    cls = REASONS.get(reason) or _BY_CODE.get(code, InternalError)
    return cls(code, reason, message, metadata)


def from_rpc_error(error: grpc.RpcError) -> PointsxError:
    """The typed exception for a failed call, keyed on ErrorInfo.reason, else on the status code."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
    message = error.details() if hasattr(error, "details") else str(error)  # type: ignore[attr-defined]
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:
        status = None
    return _typed(code, message or "", status)


def from_status(status: status_pb2.Status) -> PointsxError:
    """The typed exception for a google.rpc.Status (e.g. a failed item of ConvertBatch)."""
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    return _typed(code, status.message, status)
