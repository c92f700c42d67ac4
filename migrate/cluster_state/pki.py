"""The etcd cluster's X.509 identities, and how each is bound to a node's CURVE key.

Files (PEM; keys mode 0600), as ``jaula cluster init --state etcd`` and the test fixtures
write them under ``DIR/etcd/``::

    ca.crt, ca.key        the cluster's etcd CA (ECDSA P-256, 10 years).  ca.key signs new
                          members and nodes: keep it with the operator, not on the nodes.
    member-NAME.crt/.key  one etcd member: serverAuth and clientAuth (etcd's gRPC gateway
                          dials its own member with this certificate), SANs for its hosts.
    NAME.crt/.key         one node or operator as an etcd client (clientAuth only).

How a node's etcd identity is tied to its CURVE key:

- The client certificate carries two URI SANs, ``urn:jaula:name:NAME`` and
  ``urn:jaula:curve:HEX`` (the 32 bytes of NAME's CURVE public key in hex), and an empty
  subject: etcd 3.4 refuses requests through its gRPC gateway from a certificate with a
  CommonName when auth is on (its CN would be ignored there, embed/serve.go).  A node checks
  at start that its certificate names it and its key (:func:`check_client_cert`).
- etcd authenticates a request by user and password (RBAC, ``auth enable``); the password of
  user NAME is derived from NAME's CURVE **secret** key (:func:`etcd_password`), so only the
  holder of that key can act as NAME, and a certificate alone (lost, or issued to a
  stranger) gives no right at all.
- etcd's ``--client-cert-auth --trusted-ca-file ca.crt`` refuses any TLS connection without
  a certificate of this CA: a stranger cannot even send a request.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from migrate import keys
from migrate.errors import NodeConfigError

CA_VALIDITY_DAYS = 3650
CERT_VALIDITY_DAYS = 825
_URN_NAME = "urn:jaula:name:"
_URN_CURVE = "urn:jaula:curve:"
_PASSWORD_INFO = b"jaula etcd password v1\x00"


@dataclass(frozen=True)
class CertFiles:
    """A certificate and its private key, PEM files."""

    cert: Path
    key: Path


def make_ca(directory: Path, common_name: str = "jaula etcd CA") -> CertFiles:
    """Write ``directory/ca.crt`` and ``ca.key`` (a new CA); FileExistsError if present."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    out = CertFiles(directory / "ca.crt", directory / "ca.key")
    _write(out.key, _key_pem(key), 0o600)
    _write(out.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return out


def issue_member(ca: CertFiles, directory: Path, name: str, hosts: list[str]) -> CertFiles:
    """Write ``directory/member-NAME.crt/.key``: an etcd member's certificate for ``hosts``
    (IP addresses or DNS names), valid as server and as client."""
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"etcd member {name}")])
    return _issue(
        ca,
        directory / f"member-{name}",
        subject,
        sans,
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    )


def issue_client(ca: CertFiles, directory: Path, name: str, curve_public: bytes) -> CertFiles:
    """Write ``directory/NAME.crt/.key``: the etcd client certificate of node or operator
    ``name`` whose CURVE public key is ``curve_public`` (40 Z85 bytes)."""
    keys.check_name(name)
    raw = _z85_raw(curve_public)
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(_URN_NAME + name),
        x509.UniformResourceIdentifier(_URN_CURVE + raw.hex()),
    ]
    return _issue(ca, directory / name, x509.Name([]), sans, [ExtendedKeyUsageOID.CLIENT_AUTH])


def client_identity(cert_path: Path) -> tuple[str | None, bytes | None]:
    """The (name, CURVE public key as 40 Z85 bytes) a client certificate is bound to; either
    is None when the certificate does not say.  NodeConfigError when it cannot be read."""
    cert = _load_cert(cert_path)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None, None
    name = curve = None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(_URN_NAME):
            name = uri[len(_URN_NAME) :]
        elif uri.startswith(_URN_CURVE):
            try:
                curve = _z85_encode(bytes.fromhex(uri[len(_URN_CURVE) :]))
            except ValueError:
                curve = None
    return name, curve


def check_client_cert(cert_path: Path, name: str, curve_public: bytes) -> None:
    """Check that the client certificate ``cert_path`` is bound to ``name`` and its CURVE
    public key ``curve_public`` (as the cluster file lists it).

    Raises:
        NodeConfigError: unreadable, or bound to another name or key, naming both.
    """
    got_name, got_key = client_identity(cert_path)
    if got_name != name or got_key != curve_public:
        raise NodeConfigError(
            f"{cert_path}: this etcd client certificate is for {got_name or 'no jaula name'} "
            f"with CURVE key {got_key.decode() if got_key else 'none'}, not {name} with "
            f"{curve_public.decode()}: issue {name}'s certificate again "
            "(migrate.cluster_state.pki.issue_client)",
            path=str(cert_path),
        )


def etcd_password(name: str, curve_secret: bytes) -> str:
    """The etcd password of user ``name``: HMAC-SHA256 keyed by the raw 32 bytes of its
    CURVE secret key (40 Z85 bytes) over a fixed label and the name, in hex."""
    raw = _z85_raw(curve_secret)
    return hmac.new(raw, _PASSWORD_INFO + name.encode(), hashlib.sha256).hexdigest()


def fingerprint(cert_path: Path) -> str:
    """``sha256:HEX`` of a certificate (DER), as operators compare them."""
    return "sha256:" + _load_cert(cert_path).fingerprint(hashes.SHA256()).hex()


# -- helpers ----------------------------------------------------------------------------------


def _issue(
    ca: CertFiles,
    stem: Path,
    subject: x509.Name,
    sans: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
) -> CertFiles:
    ca_cert = _load_cert(ca.cert)
    loaded = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise NodeConfigError(f"{ca.key} is not an EC private key", path=str(ca.key))
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        # RFC 5280 4.2.1.6: with an empty subject the SAN extension is critical
        .add_extension(x509.SubjectAlternativeName(sans), critical=not subject)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(loaded.public_key()), False
        )
        .sign(loaded, hashes.SHA256())
    )
    out = CertFiles(stem.with_name(stem.name + ".crt"), stem.with_name(stem.name + ".key"))
    _write(out.key, _key_pem(key), 0o600)
    _write(out.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return out


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except OSError as e:
        raise NodeConfigError(f"cannot read {path}: {e.strerror or e}", path=str(path)) from e
    except ValueError as e:
        raise NodeConfigError(f"{path} is not a PEM certificate: {e}", path=str(path)) from e


def _z85_raw(z85: bytes) -> bytes:
    if not keys.is_z85_key(z85):
        raise ValueError("not a 40-character Z85 CURVE key")
    return _z85_decode(z85)


_Z85 = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_Z85_IDX = {c: i for i, c in enumerate(_Z85)}


def _z85_decode(z: bytes) -> bytes:
    out = bytearray()
    for i in range(0, len(z), 5):
        v = 0
        for c in z[i : i + 5]:
            v = v * 85 + _Z85_IDX[c]
        out += v.to_bytes(4, "big")
    return bytes(out)


def _z85_encode(raw: bytes) -> bytes:
    if len(raw) != 32:
        raise ValueError("a CURVE key has 32 bytes")
    out = bytearray()
    for i in range(0, 32, 4):
        v = int.from_bytes(raw[i : i + 4], "big")
        chunk = bytearray()
        for _ in range(5):
            v, r = divmod(v, 85)
            chunk.insert(0, _Z85[r])
        out += chunk
    return bytes(out)


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
