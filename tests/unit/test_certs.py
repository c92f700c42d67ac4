"""Unit tests (no root): the per-session page-server identities of :mod:`migrate.certs`:
private files, a self-signed trust anchor GnuTLS accepts, and a CA file that pins exactly
the peer's certificate (anything else from the peer is refused with a ValueError)."""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from migrate import certs


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def peer_pem(tmp_path: Path) -> bytes:
    """The certificate another side of the session would send (made in its own dir)."""
    d = tmp_path / "peer"
    d.mkdir()
    pem, _, _ = certs.make_identity(d, "source")
    return pem


def test_make_identity_writes_private_files_and_a_self_signed_ca(tmp_path: Path) -> None:
    old = os.umask(0)  # even a permissive umask must not widen the modes
    try:
        pem, cert_path, key_path = certs.make_identity(tmp_path, "destination")
    finally:
        os.umask(old)
    assert cert_path.parent == tmp_path and key_path.parent == tmp_path
    assert _mode(cert_path) == 0o600 and _mode(key_path) == 0o600
    assert cert_path.read_bytes() == pem
    cert = x509.load_pem_x509_certificate(pem)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True and bc.value.path_length == 0
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert cert.issuer == cert.subject  # self-signed
    cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    assert "destination" in str(cn)
    now = datetime.datetime.now(datetime.UTC)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    assert cert.not_valid_after_utc - now <= datetime.timedelta(seconds=certs.VALIDITY_S)
    # the key file holds the certificate's private key, unencrypted PEM
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(
        serialization.Encoding.PEM, pub
    ) == cert.public_key().public_bytes(serialization.Encoding.PEM, pub)


def test_two_identities_are_distinct(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, _, ka = certs.make_identity(tmp_path / "a", "source")
    b, _, kb = certs.make_identity(tmp_path / "b", "source")
    assert a != b and ka.read_bytes() != kb.read_bytes()


def test_trust_peer_writes_exactly_the_peers_certificate(tmp_path: Path, peer_pem: bytes) -> None:
    ca = certs.trust_peer(tmp_path, peer_pem)
    assert ca.parent == tmp_path
    assert ca.read_bytes() == peer_pem
    assert _mode(ca) == 0o600


@pytest.mark.parametrize(
    "value, why",
    [
        (None, "missing"),
        ("-----BEGIN CERTIFICATE-----", "missing"),
        (bytearray(b"x" * 100), "missing"),
        (b"", "does not parse"),
        (b"\x00\xff garbage" * 10, "does not parse"),
        (
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
            "does not parse",
        ),
    ],
)
def test_trust_peer_refuses_what_is_not_a_certificate(
    tmp_path: Path, value: object, why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        certs.trust_peer(tmp_path, value)  # type: ignore[arg-type]
    assert not (tmp_path / "peer-ca.pem").exists()


def test_trust_peer_refuses_a_private_key_instead_of_a_certificate(tmp_path: Path) -> None:
    _, _, key = certs.make_identity(tmp_path, "source")
    with pytest.raises(ValueError, match="does not parse"):
        certs.trust_peer(tmp_path, key.read_bytes())
    assert not (tmp_path / "peer-ca.pem").exists()


def test_trust_peer_size_limit(tmp_path: Path, peer_pem: bytes) -> None:
    # up to MAX_CERT_BYTES is accepted (a certificate padded with blank lines) ...
    padded = peer_pem + b"\n" * (certs.MAX_CERT_BYTES - len(peer_pem))
    assert len(padded) == certs.MAX_CERT_BYTES
    assert certs.trust_peer(tmp_path, padded).read_bytes() == peer_pem  # written as parsed
    (tmp_path / "peer-ca.pem").unlink()
    # ... one byte more is refused before anything is parsed or written
    with pytest.raises(ValueError, match="too large"):
        certs.trust_peer(tmp_path, padded + b"\n")
    with pytest.raises(ValueError, match="too large"):
        certs.trust_peer(tmp_path, b"x" * (certs.MAX_CERT_BYTES * 4))
    assert not (tmp_path / "peer-ca.pem").exists()


def test_trust_peer_refuses_more_than_one_certificate(tmp_path: Path, peer_pem: bytes) -> None:
    # the CA file must pin exactly one certificate: GnuTLS would trust every one in it
    other = tmp_path / "other"
    other.mkdir()
    second, _, key = certs.make_identity(other, "stranger")
    for value in (peer_pem + second, peer_pem + key.read_bytes()):
        with pytest.raises(ValueError, match="more than one PEM block"):
            certs.trust_peer(tmp_path, value)
    assert not (tmp_path / "peer-ca.pem").exists()


def test_session_tls_pins_the_peer_and_returns_our_certificate(
    tmp_path: Path, peer_pem: bytes
) -> None:
    d = tmp_path / "dest"
    d.mkdir()
    tls, pem = certs.session_tls(d, "destination", peer_pem)
    assert isinstance(tls, certs.TlsFiles)
    assert tls.cacert.read_bytes() == peer_pem  # the CA file is the peer's cert, nothing else
    assert tls.cert.read_bytes() == pem and pem != peer_pem
    for p in (tls.cacert, tls.cert, tls.key):
        assert p.parent == d and _mode(p) == 0o600
    ours = x509.load_pem_x509_certificate(pem)
    key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(
        serialization.Encoding.PEM, pub
    ) == ours.public_key().public_bytes(serialization.Encoding.PEM, pub)


def test_session_tls_refuses_a_bad_peer_certificate(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not parse"):
        certs.session_tls(tmp_path, "destination", b"not a certificate")
    assert not (tmp_path / "peer-ca.pem").exists()
