"""TLS: the SDK verifies the hub with a CA bundle, and presents a client certificate when asked."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from exchange.background import BackgroundHub
from exchange.config import init_data_dir, load_key
from exchange.operator_client import OperatorClient
from exchange.rpc.server import InsecureListenError, TlsFiles, create_server
from exchange.runtime import open_hub
from merchant_sdk import MerchantClient, TlsOptions, errors
from merchant_sdk.signing import public_key_bytes
from tests.integration.test_cli import run


def _write_pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _issue(tmp: Path, name: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return (
        _write_pem(tmp / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM)),
        _write_pem(tmp / f"{name}.key", key_pem),
    )


def _ca(tmp: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pointsx test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert, _write_pem(tmp / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))


@pytest.mark.parametrize("require_client_cert", [False, True])
def test_sdk_over_tls(tmp_path: Path, require_client_cert: bool) -> None:
    ca_key, ca_cert, ca_path = _ca(tmp_path)
    server_cert, server_key = _issue(tmp_path, "hub", ca_key, ca_cert)
    client_cert, client_key = _issue(tmp_path, "brew-client", ca_key, ca_cert)
    cfg = init_data_dir(tmp_path / "data")
    tls = TlsFiles(server_cert, server_key, ca_path if require_client_cert else None)
    background = BackgroundHub(open_hub(cfg), "localhost:0", tls=tls)
    try:
        options = TlsOptions(ca_bundle=ca_path, client_cert=client_cert, client_key=client_key)
        merchant_key = Ed25519PrivateKey.generate()
        with OperatorClient(background.target, load_key(cfg.operator_key_path), tls=options) as operator:
            operator.register_merchant("brew", "Brew", "CNY", 10_000, public_key_bytes(merchant_key.public_key()))
        with MerchantClient(background.target, "brew", merchant_key, tls=options) as client:
            client.enroll_member("alice")
            assert client.issue_points("alice", 5).balance_points == 5
        if require_client_cert:
            no_cert = TlsOptions(ca_bundle=ca_path)
            c = MerchantClient(background.target, "brew", merchant_key, tls=no_cert, max_attempts=1, timeout_s=3)
            with c, pytest.raises(errors.PointsxError):
                c.get_balance("alice")
    finally:
        background.stop()


def test_plaintext_off_loopback_is_refused(tmp_path: Path) -> None:
    cfg = init_data_dir(tmp_path / "data")
    hub = open_hub(cfg)
    try:
        with pytest.raises(InsecureListenError):
            create_server(hub, "0.0.0.0:0")
    finally:
        hub.close()
        hub.engine.dispose()


def test_operator_commands_present_a_client_certificate(tmp_path: Path) -> None:
    """A hub that requires client certificates is operated from the command line with --client-cert."""
    ca_key, ca_cert, ca_path = _ca(tmp_path)
    server_cert, server_key = _issue(tmp_path, "hub", ca_key, ca_cert)
    client_cert, client_key = _issue(tmp_path, "operator-client", ca_key, ca_cert)
    data = tmp_path / "data"
    cfg = init_data_dir(data)
    background = BackgroundHub(open_hub(cfg), "localhost:0", tls=TlsFiles(server_cert, server_key, ca_path))
    common = ["--data-dir", str(data), "--hub", background.target, "--ca-bundle", str(ca_path)]
    try:
        listed = run("operator", "list-merchants", *common, "--client-cert", str(client_cert),
                     "--client-key", str(client_key), "--json")  # fmt: skip
        assert listed.stdout.strip().startswith("[")
        refused = run("operator", "list-merchants", *common, check=False)
        assert refused.returncode == 1 and "could not reach the hub" in refused.stderr, refused.stderr
        half = run("operator", "list-merchants", *common, "--client-cert", str(client_cert), check=False)
        assert half.returncode == 1 and "--client-cert and --client-key go together" in half.stderr, half.stderr
    finally:
        background.stop()
