"""SDK clients that count what they send: every attempt of every call, so retries = attempts - calls.

The count comes from a gRPC client interceptor on the transport's channel (the `_setup` seam that
`merchant_sdk.transport.BaseTransport` leaves for subclasses); the SDK's own retry loop is untouched.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exchange.operator_client import OperatorClient
from merchant_sdk import MerchantClient
from merchant_sdk.signing import Signer
from merchant_sdk.transport import SignedTransport


class AttemptCounter:
    """Attempts sent on the wire, and calls made by the workload; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.attempts = 0
        self.calls = 0

    def attempt(self) -> None:
        with self._lock:
            self.attempts += 1

    def call(self) -> None:
        with self._lock:
            self.calls += 1

    @property
    def retries(self) -> int:
        return max(0, self.attempts - self.calls)


class _Counting(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, counter: AttemptCounter) -> None:
        self.counter = counter

    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], client_call_details: Any, request: Any
    ) -> Any:
        self.counter.attempt()
        return continuation(client_call_details, request)


class CountingTransport(SignedTransport):
    """`SignedTransport` whose channel counts each attempt into its class's `counter`."""

    counter: AttemptCounter

    def _setup(self) -> None:
        super()._setup()
        self._channel = grpc.intercept_channel(self._channel, _Counting(self.counter))


def _transport_class(counter: AttemptCounter) -> type[CountingTransport]:
    return type("BoundCountingTransport", (CountingTransport,), {"counter": counter})


def merchant_client(
    target: str,
    merchant_id: str,
    key: Ed25519PrivateKey,
    counter: AttemptCounter,
    *,
    max_attempts: int,
    timeout_s: float,
) -> MerchantClient:
    """A `MerchantClient` with the SDK's bounded retry, counting its attempts."""
    cls = type("CountingMerchantClient", (MerchantClient,), {"_transport_cls": _transport_class(counter)})
    client: MerchantClient = cls(target, merchant_id, key, max_attempts=max_attempts, timeout_s=timeout_s)
    return client


class CountingOperatorClient(OperatorClient):
    """`OperatorClient` over a counting transport with a bounded retry budget of its own."""

    def __init__(
        self,
        target: str,
        private_key: Ed25519PrivateKey,
        counter: AttemptCounter,
        *,
        max_attempts: int,
        timeout_s: float,
    ) -> None:
        super().__init__(target, private_key, timeout_s=timeout_s)
        self._transport.close()  # the plain one the parent made: replaced by a counting one
        self.signer = Signer("operator", private_key)
        self._transport = _transport_class(counter)(target, self.signer, timeout_s=timeout_s, max_attempts=max_attempts)
