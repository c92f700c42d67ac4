"""Per-session X.509 identities for CRIU's page server over TLS.

CRIU's page server moves a dump's memory pages straight from the dumping CRIU on the source
to a ``criu page-server`` on the destination (``--page-server``, ``--tls``; CRIU's
Documentation "TLS" on criu.org, criu/tls.c).  Both ends use GnuTLS with a certificate, a
key and a CA file, and each verifies the other's certificate against its CA file.

jaula never uses a long-lived CA for this: each side of a session makes a fresh self-signed
certificate (ECDSA P-256, valid from a day before to 30 days after) and the two certificates are exchanged inside
the session's CURVE-authenticated messages (``offer`` and ``accept``).  Each side's CA file
holds exactly the peer's certificate, so the only TLS peer it accepts is the one that holds
that session's private key.  The host-name check is off (``--tls-no-cn-verify``): the pin
on the exact certificate is stronger than a name.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

#: how long a session's certificate stays valid, seconds (from a day before it was made)
VALIDITY_S = 30 * 86400
#: the largest PEM certificate accepted from a peer, bytes
MAX_CERT_BYTES = 8192


@dataclass(frozen=True)
class TlsFiles:
    """The three files one CRIU end needs (``--tls-cacert``, ``--tls-cert``, ``--tls-key``),
    PEM, mode 0600, in the session's directory."""

    cacert: Path
    cert: Path
    key: Path


def make_identity(directory: Path, name: str) -> tuple[bytes, Path, Path]:
    """Make a key and a self-signed certificate for ``name`` under ``directory``.

    Returns (certificate PEM bytes to send to the peer, certificate path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"jaula {name}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # wide on purpose: the pin on this exact certificate is the security, and a
        # node's clock a few minutes off, or a long pre-copy, must not fail a migration
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(seconds=VALIDITY_S))
        # a self-signed trust anchor: GnuTLS checks the peer's chain against it
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path = directory / f"{name}-cert.pem"
    key_path = directory / f"{name}-key.pem"
    _write_private(cert_path, pem)
    _write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return pem, cert_path, key_path


def trust_peer(directory: Path, peer_pem: bytes) -> Path:
    """Write the peer's certificate as this side's CA file; returns its path.

    Raises ValueError when ``peer_pem`` is not exactly one PEM certificate of a sane size."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if not isinstance(peer_pem, bytes) or len(peer_pem) > MAX_CERT_BYTES:
        raise ValueError("the peer's page-server certificate is missing or too large")
    try:
        found = x509.load_pem_x509_certificates(peer_pem)
    except ValueError as e:
        raise ValueError(f"the peer's page-server certificate does not parse: {e}") from e
    if len(found) != 1 or peer_pem.count(b"-----BEGIN") != 1:
        raise ValueError(
            "the peer sent more than one PEM block for its page-server "
            "certificate: exactly one certificate is trusted"
        )
    path = directory / "peer-ca.pem"
    # written as parsed, so nothing but that one certificate reaches CRIU's CA file
    _write_private(path, found[0].public_bytes(serialization.Encoding.PEM))
    return path


def session_tls(directory: Path, name: str, peer_pem: bytes) -> tuple[TlsFiles, bytes]:
    """Both steps at once: our identity and the peer as our only CA.  Returns the files and
    our certificate PEM (to send to the peer)."""
    pem, cert, key = make_identity(directory, name)
    return TlsFiles(trust_peer(directory, peer_pem), cert, key), pem


def _write_private(path: Path, data: bytes) -> None:
    # a new file renamed into place: never written through a link left there
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
