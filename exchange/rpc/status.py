"""The one table from domain error categories to gRPC status codes, with ErrorInfo details.

Every refusal leaves the hub as `code + message + google.rpc.ErrorInfo(reason, domain
"pointsx.dev", metadata)` in `grpc-status-details-bin`, so clients in any language can key on the
reason. The SDK's `merchant_sdk.errors` mirrors this table.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from exchange.domain import errors

ERROR_DOMAIN = "pointsx.dev"

STATUS_BY_CATEGORY: dict[str, grpc.StatusCode] = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "OUT_OF_RANGE": grpc.StatusCode.OUT_OF_RANGE,
    "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "UNIMPLEMENTED": grpc.StatusCode.UNIMPLEMENTED,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}


def status_proto(
    code: grpc.StatusCode, reason: str, message: str, metadata: dict[str, str] | None = None
) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata or {})
    detail = any_pb2.Any()
    detail.Pack(info, deterministic=True)  # map order fixed: a replayed refusal is byte-identical
    return status_pb2.Status(code=code.value[0], message=message, details=[detail])


def for_error(error: errors.DomainError) -> tuple[grpc.StatusCode, status_pb2.Status]:
    category = getattr(error, "stored_category", None) or error.category
    reason = getattr(error, "stored_reason", None) or error.reason
    code = STATUS_BY_CATEGORY[category]
    return code, status_proto(code, reason, error.message, error.metadata)


def internal(message: str = "internal error") -> tuple[grpc.StatusCode, status_pb2.Status]:
    return grpc.StatusCode.INTERNAL, status_proto(grpc.StatusCode.INTERNAL, "INTERNAL", message)


assert grpc.StatusCode.INVALID_ARGUMENT.value[0] == code_pb2.INVALID_ARGUMENT
