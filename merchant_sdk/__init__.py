"""pointsx merchant SDK: join the network, run your members' points, convert, settle.

`MerchantClient` blocks; `AsyncMerchantClient` is its asyncio twin (`merchant_sdk.aio`).

Depends on nothing else of pointsx (no hub, no SQLAlchemy): install it alone in a merchant's app.
"""

from merchant_sdk import errors
from merchant_sdk._pb.pointsx.v1 import clearing_pb2, common_pb2, exchange_pb2, ledger_pb2, merchant_pb2, network_pb2
from merchant_sdk.aio import AsyncEventStream, AsyncMerchantClient, AsyncSignedTransport
from merchant_sdk.client import MerchantClient, new_request_id
from merchant_sdk.errors import PointsxError
from merchant_sdk.events import EventStream
from merchant_sdk.signing import Signer, key_id_of, load_private_key, load_private_key_file
from merchant_sdk.statements import StatementVerificationError, verify_statement
from merchant_sdk.transport import SignedTransport, TlsOptions

__all__ = [
    "AsyncEventStream",
    "AsyncMerchantClient",
    "AsyncSignedTransport",
    "EventStream",
    "MerchantClient",
    "PointsxError",
    "SignedTransport",
    "Signer",
    "StatementVerificationError",
    "TlsOptions",
    "clearing_pb2",
    "common_pb2",
    "errors",
    "exchange_pb2",
    "key_id_of",
    "ledger_pb2",
    "load_private_key",
    "load_private_key_file",
    "merchant_pb2",
    "network_pb2",
    "new_request_id",
    "verify_statement",
]
