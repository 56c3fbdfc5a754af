"""The asyncio merchant SDK: `AsyncMerchantClient`, the `grpc.aio` twin of `MerchantClient`.

Same methods, same requests (built by shared code), same retry policy and the same exceptions;
only the waiting is different.
"""

from merchant_sdk.aio.client import AsyncMerchantClient
from merchant_sdk.aio.events import AsyncEventStream
from merchant_sdk.aio.transport import AsyncSignedTransport

__all__ = ["AsyncEventStream", "AsyncMerchantClient", "AsyncSignedTransport"]
