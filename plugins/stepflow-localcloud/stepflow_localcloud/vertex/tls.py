"""A self-signed certificate for the control plane's TLS port, made at start-up.

The high-level ``google.cloud.aiplatform`` SDK opens only secure gRPC channels, so the control plane
can also listen with TLS. Clients trust the certificate through ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``
(which replaces the process's roots: set it only where nothing else needs the public ones).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Names every certificate covers, whatever host the server binds.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Certificate:
    """A PEM certificate and its private key."""

    cert_pem: bytes
    key_pem: bytes


def self_signed(hosts: tuple[str, ...] = (), *, days: int = 7) -> Certificate:
    """A self-signed server certificate (its own CA) for the loopback names plus ``hosts``.

    P-256 keeps generation in the milliseconds, so every start gets a fresh key.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys((*LOOPBACK_NAMES, *hosts)):  # ordered, no duplicates
        if not host or host in ("0.0.0.0", "::"):
            continue  # a wildcard bind address is no name a client connects to
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "local Vertex AI control plane")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate a little clock skew
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        # CA:TRUE so that the certificate can be its own trust root in a roots file.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Certificate(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
    )
