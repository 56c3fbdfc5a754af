"""Every domain refusal has a gRPC status in the hub's table and an exception class in the SDK."""

from __future__ import annotations

import grpc
import pytest

from exchange.domain import errors as domain
from exchange.rpc import status
from merchant_sdk import errors as sdk


@pytest.mark.parametrize("error_cls", domain.all_error_classes(), ids=lambda c: c.reason)
def test_every_domain_error_has_status_and_sdk_class(error_cls: type[domain.DomainError]) -> None:
    assert error_cls.category in status.STATUS_BY_CATEGORY
    code, detail = status.for_error(error_cls("message"))
    assert detail.code == code.value[0]
    assert error_cls.reason in sdk.REASONS, f"SDK has no exception for {error_cls.reason}"
    sdk_cls = sdk.REASONS[error_cls.reason]
    expected_base = {
        grpc.StatusCode.INVALID_ARGUMENT: sdk.InvalidRequest,
        grpc.StatusCode.NOT_FOUND: sdk.NotFoundError,
        grpc.StatusCode.ALREADY_EXISTS: sdk.AlreadyExistsError,
        grpc.StatusCode.FAILED_PRECONDITION: sdk.PreconditionFailed,
        grpc.StatusCode.OUT_OF_RANGE: sdk.OutOfRangeError,
        grpc.StatusCode.PERMISSION_DENIED: sdk.PermissionDeniedError,
        grpc.StatusCode.UNAUTHENTICATED: sdk.AuthenticationError,
        grpc.StatusCode.UNIMPLEMENTED: sdk.NotImplementedByHub,
        grpc.StatusCode.UNAVAILABLE: sdk.TransientError,
    }[code]
    assert issubclass(sdk_cls, expected_base)


def test_reasons_are_unique_upper_snake() -> None:
    reasons = [c.reason for c in domain.all_error_classes()]
    assert len(reasons) == len(set(reasons))
    assert all(r.replace("_", "").isalpha() and r.isupper() for r in reasons)


def test_sdk_has_no_reason_the_hub_never_sends() -> None:
    hub_reasons = {c.reason for c in domain.all_error_classes()}
    assert set(sdk.REASONS) <= hub_reasons
