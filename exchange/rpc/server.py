"""The server factory: `create_server(hub, address) -> (server, port)`, as the gRPC examples do.

Plaintext is allowed on loopback only unless told otherwise; with a certificate the hub serves
TLS, and with a client CA it requires client certificates too.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from exchange.hub import Hub
from exchange.rpc.dispatch import MERCHANT, OPERATOR, PUBLIC, generic_handler
from exchange.rpc.servicers.clearing import ClearingServicer
from exchange.rpc.servicers.exchange import ExchangeServicer
from exchange.rpc.servicers.ledger import LedgerServicer
from exchange.rpc.servicers.merchant import MerchantServicer
from exchange.rpc.servicers.network import NetworkServicer
from exchange.rpc.servicers.operator import OperatorServicer
from merchant_sdk._pb.pointsx.v1 import (
    clearing_pb2,
    exchange_pb2,
    ledger_pb2,
    merchant_pb2,
    network_pb2,
    operator_pb2,
)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None


class InsecureListenError(ValueError):
    """Plaintext on a non-loopback address was asked for without --insecure."""


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _services(hub: Hub) -> list[tuple[object, object, str]]:
    return [
        (network_pb2.DESCRIPTOR.services_by_name["NetworkService"], NetworkServicer(), PUBLIC),
        (merchant_pb2.DESCRIPTOR.services_by_name["MerchantService"], MerchantServicer(), MERCHANT),
        (ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"], LedgerServicer(), MERCHANT),
        (exchange_pb2.DESCRIPTOR.services_by_name["ExchangeService"], ExchangeServicer(), MERCHANT),
        (clearing_pb2.DESCRIPTOR.services_by_name["ClearingService"], ClearingServicer(), MERCHANT),
        (operator_pb2.DESCRIPTOR.services_by_name["OperatorService"], OperatorServicer(), OPERATOR),
    ]


def create_server(
    hub: Hub, address: str, *, tls: TlsFiles | None = None, allow_insecure: bool = False, reuse_port: bool = False
) -> tuple[grpc.aio.Server, int]:
    if tls is None and not allow_insecure and not _is_loopback(address):
        raise InsecureListenError(f"refusing plaintext on {address}: give --tls-cert/--tls-key, or --insecure")
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
        maximum_concurrent_rpcs=1024,
    )
    names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    for service, servicer, access in _services(hub):
        server.add_generic_rpc_handlers((generic_handler(hub, service, servicer, access),))  # type: ignore[arg-type]
        names.append(service.full_name)  # type: ignore[attr-defined]
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(names, server)
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        credentials = grpc.ssl_server_credentials(
            [(tls.key.read_bytes(), tls.cert.read_bytes())],
            root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
            require_client_auth=tls.client_ca is not None,
        )
        port = server.add_secure_port(address, credentials)
    server.health_servicer = health_servicer  # type: ignore[attr-defined]
    return server, port


SERVICE_NAMES = tuple(
    f"pointsx.v1.{name}"
    for name in (
        "NetworkService",
        "MerchantService",
        "LedgerService",
        "ExchangeService",
        "ClearingService",
        "OperatorService",
    )
)


async def mark_serving(server: grpc.aio.Server) -> None:
    """Health answers SERVING only once the hub is listening: "" and every pointsx service."""
    servicer = server.health_servicer  # type: ignore[attr-defined]
    for service in ("", *SERVICE_NAMES):
        await servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
