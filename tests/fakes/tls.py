"""Throw-away key material for the protocol fakes.

Everything here is generated on the fly with `cryptography` into a directory the caller
owns (usually a pytest tmp dir): a CA, a server certificate for 127.0.0.1 / localhost, a
client certificate for APNs certificate auth, an APNs-style .p8 signing key and a Google
service-account JSON. Nothing is cached across processes and nothing is secret.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "TLSMaterial",
    "make_tls_material",
    "make_apns_key",
    "make_service_account",
    "server_ssl_context",
    "client_ssl_context",
]

_VALIDITY = datetime.timedelta(days=30)


@dataclass(frozen=True)
class TLSMaterial:
    """Paths of the PEM files written by `make_tls_material`.

    Only `ca_cert`, `server_cert` and `server_key` are needed to run a fake; the client
    fields are None when a TLSMaterial is built by hand from existing files (the
    `python -m tests.fakes.apns` entry point does that).
    """

    directory: Path
    ca_cert: Optional[Path]
    server_cert: Path
    server_key: Path
    ca_key: Optional[Path] = None
    client_cert: Optional[Path] = None
    client_key: Optional[Path] = None
    client_pem: Optional[Path] = None  # client cert + key in one file (aioapns's client_cert)

    def server_context(
        self, *, alpn: Sequence[str] = (), require_client_cert: bool = False
    ) -> ssl.SSLContext:
        return server_ssl_context(
            self.server_cert,
            self.server_key,
            ca_cert=self.ca_cert,
            alpn=alpn,
            require_client_cert=require_client_cert,
        )

    def client_context(
        self, *, alpn: Sequence[str] = (), with_client_cert: bool = False
    ) -> ssl.SSLContext:
        if self.ca_cert is None:
            raise ValueError("TLSMaterial has no CA certificate to trust")
        cert = None
        if with_client_cert:
            if self.client_pem is None:
                raise ValueError("TLSMaterial has no client certificate")
            cert = self.client_pem
        return client_ssl_context(self.ca_cert, alpn=alpn, client_pem=cert)


def server_ssl_context(
    cert: Path,
    key: Path,
    *,
    ca_cert: Optional[Path] = None,
    alpn: Sequence[str] = (),
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if require_client_cert:
        if ca_cert is None:
            raise ValueError("require_client_cert needs ca_cert")
        ctx.load_verify_locations(cafile=str(ca_cert))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_ssl_context(
    ca_cert: Path, *, alpn: Sequence[str] = (), client_pem: Optional[Path] = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_cert))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if client_pem is not None:
        ctx.load_cert_chain(str(client_pem))
    return ctx


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_public(key) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _leaf(
    subject: x509.Name,
    key,
    ca_cert: x509.Certificate,
    ca_key,
    *,
    server: bool,
    san: Optional[x509.SubjectAlternativeName] = None,
) -> x509.Certificate:
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def make_tls_material(directory: Path, *, client_topic: Optional[str] = None) -> TLSMaterial:
    """Write a CA, a server cert (127.0.0.1 / localhost) and a client cert into `directory`.

    `client_topic`, when given, is put in the client certificate's subject as UID, which
    is where Apple puts the bundle id and where aioapns reads the topic from when it is
    given a certificate and no topic.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = _now()

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Push fakes test CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Push fakes test root"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _leaf(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
        server_key,
        ca_cert,
        ca_key,
        server=True,
        san=x509.SubjectAlternativeName(
            [
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]
        ),
    )

    client_key = ec.generate_private_key(ec.SECP256R1())
    client_attrs = []
    if client_topic:
        client_attrs.append(x509.NameAttribute(NameOID.USER_ID, client_topic))
    client_attrs.append(
        x509.NameAttribute(NameOID.COMMON_NAME, f"Apple Push Services: {client_topic or 'test'}")
    )
    client_cert = _leaf(x509.Name(client_attrs), client_key, ca_cert, ca_key, server=False)

    pem = serialization.Encoding.PEM
    client_cert_pem = client_cert.public_bytes(pem)
    return TLSMaterial(
        directory=directory,
        ca_cert=_write(directory / "ca.pem", ca_cert.public_bytes(pem)),
        ca_key=_write(directory / "ca.key", _pem_key(ca_key)),
        server_cert=_write(directory / "server.pem", server_cert.public_bytes(pem)),
        server_key=_write(directory / "server.key", _pem_key(server_key)),
        client_cert=_write(directory / "client.pem", client_cert_pem),
        client_key=_write(directory / "client.key", _pem_key(client_key)),
        client_pem=_write(directory / "client-combined.pem", client_cert_pem + _pem_key(client_key)),
    )


def make_apns_key(directory: Path, *, key_id: str = "TESTKEY001") -> Tuple[Path, bytes]:
    """An EC P-256 private key in PKCS#8 PEM, the format of Apple's AuthKey_<KEYID>.p8.

    Returns (path of the .p8, public key PEM) — the fake verifies provider tokens with the
    public key.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    path = _write(directory / f"AuthKey_{key_id}.p8", _pem_key(key))
    return path, _pem_public(key)


def make_service_account(
    directory: Path,
    token_uri: str,
    *,
    project_id: str = "test-project",
    client_email: Optional[str] = None,
    filename: str = "service-account.json",
) -> Tuple[Path, bytes]:
    """A Google service-account JSON whose token_uri points at the FCM fake.

    Returns (path of the JSON, public key PEM of its RSA 2048 key).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    email = client_email or f"fcm-sender@{project_id}.iam.gserviceaccount.com"
    info = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": secrets.token_hex(20),
        "private_key": _pem_key(key).decode("ascii"),
        "client_email": email,
        "client_id": str(secrets.randbelow(10**20)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "universe_domain": "googleapis.com",
    }
    path = _write(directory / filename, json.dumps(info, indent=2).encode("utf-8"))
    return path, _pem_public(key)
