"""CURVE keypairs for nodes and operators, in ZeroMQ's certificate file format.

Every node service and every operator has one Curve25519 keypair (ZMTP CURVE, ZeroMQ RFC 26
"CurveZMQ"; zguide chapter 5, "Ironhouse").  The files are the ones czmq and pyzmq write
(:func:`zmq.auth.create_certificates`, https://pyzmq.readthedocs.io/en/latest/api/zmq.auth.html),
so other ZeroMQ tools read them too::

    NAME.key           public certificate, mode 0644, safe to copy to every node
        metadata
        curve
            public-key = "<40 z85 characters>"
    NAME.key_secret    secret certificate, mode 0600, never leaves the host it belongs to
        metadata
        curve
            public-key = "<40 z85 characters>"
            secret-key = "<40 z85 characters>"

Keys are handled as their Z85 text (ZeroMQ RFC 32): 40 ASCII characters for 32 bytes.

Beyond what pyzmq checks, loading refuses: a secret file that group or others may read (as
OpenSSH does), a secret key whose public half does not match the file's public key, a key
that is not 40 valid Z85 characters, and a secret certificate where a public one is expected
(the cluster file must never point at secrets).  :func:`generate` never leaves a secret
readable by others, not even for an instant (pyzmq writes with the process umask), and never
overwrites an existing key.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import tempfile
from pathlib import Path

import structlog
import zmq
import zmq.auth
import zmq.utils.z85
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from migrate.errors import NodeConfigError

log = structlog.get_logger(__name__)

Z85_KEY_LEN = 40
"""Length of a CURVE key in Z85 text (32 bytes * 5/4)."""

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
"""Names of nodes, operators and key files: letters, digits, ``_ . -``, at most 63 chars."""

_Z85_CHARS = (
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)
_Z85_ALPHABET = frozenset(_Z85_CHARS)
_Z85_INDEX = {c: i for i, c in enumerate(_Z85_CHARS)}


def is_z85_key(text: str | bytes) -> bool:
    """True when ``text`` is a 40-character Z85 encoding of a 32-byte key (RFC 32)."""
    if isinstance(text, str):
        if not text.isascii():
            return False
        raw = text.encode("ascii")
    else:
        raw = text
    if len(raw) != Z85_KEY_LEN or not set(raw) <= _Z85_ALPHABET:
        return False
    # each 5-character group must encode a value below 2**32
    for i in range(0, Z85_KEY_LEN, 5):
        value = 0
        for c in raw[i : i + 5]:
            value = value * 85 + _Z85_INDEX[c]
        if value >= 2**32:
            return False
    return True


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it matches :data:`NAME_PATTERN`, else raise NodeConfigError."""
    if not NAME_PATTERN.fullmatch(name):
        raise NodeConfigError(
            f"invalid {what} {name!r}: use 1 to 63 letters, digits, '_', "
            "'.' or '-', starting with a letter or digit"
        )
    return name


def key_paths(out_dir: Path, name: str) -> tuple[Path, Path]:
    """The (public, secret) file paths :func:`generate` writes for ``name`` in ``out_dir``."""
    return out_dir / f"{name}.key", out_dir / f"{name}.key_secret"


def generate(out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write a new CURVE keypair as ``out_dir/NAME.key`` and ``out_dir/NAME.key_secret``.

    ``out_dir`` is created (mode 0700) when missing.  The certificates are written by
    :func:`zmq.auth.create_certificates` into a private (0700) temporary directory inside
    ``out_dir``, given their modes (public 0644, secret 0600), fsynced, then hard-linked to
    their names, which fails rather than overwrite an existing file.

    Returns:
        (public file, secret file).

    Raises:
        NodeConfigError: bad name, a key of that name already exists, or the files cannot be
            written (the message names the path).
    """
    check_name(name, "key name")
    public, secret = key_paths(out_dir, name)
    for p in (public, secret):
        if os.path.lexists(p):
            raise NodeConfigError(
                f"{p} already exists: remove it first or choose another "
                "name (jaula never overwrites a key)",
                path=str(p),
            )
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{name}.keygen-") as tmp:
            tmp_public, tmp_secret = (Path(s) for s in zmq.auth.create_certificates(tmp, name))
            os.chmod(tmp_secret, 0o600)
            os.chmod(tmp_public, 0o644)
            for p in (tmp_public, tmp_secret):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.link(tmp_secret, secret)
            try:
                os.link(tmp_public, public)
            except BaseException:
                secret.unlink()
                raise
        dir_fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except FileExistsError as e:
        raise NodeConfigError(
            f"{e.filename2 or e.filename} already exists: remove it first "
            "or choose another name (jaula never overwrites a key)",
            path=str(e.filename2 or e.filename),
        ) from e
    except OSError as e:
        raise NodeConfigError(
            f"cannot write a keypair named {name!r} in {out_dir}: {e.strerror or e}",
            path=str(out_dir),
        ) from e
    return public, secret


def keygen_command(out: Path, name: str) -> tuple[Path, Path]:
    """``jaula node keygen --out DIR [--name NAME]``: :func:`generate`, then log the result.

    The CLI prints the two paths and the public key; this function only logs
    (``keys.generated``).  Errors as :func:`generate`.
    """
    public, secret = generate(out, name)
    log.info(
        "keys.generated",
        public=str(public),
        secret=str(secret),
        public_key=load_public(public).decode("ascii"),
    )
    return public, secret


def _load(path: Path, what: str) -> tuple[bytes, bytes | None]:
    try:
        pub, sec = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        if not path.exists():
            raise NodeConfigError(
                f"{what} {path} does not exist: create it with "
                "`jaula node keygen --out DIR --name NAME` or fix the path",
                path=str(path),
            ) from e
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise NodeConfigError(
            f"cannot read {what} {path}: {detail} (expected a ZeroMQ "
            'certificate with a `public-key = "..."` line, as written by '
            "`jaula node keygen`)",
            path=str(path),
        ) from e
    if not is_z85_key(pub):
        raise NodeConfigError(f"{what} {path}: public-key is not 40 Z85 characters", path=str(path))
    return pub, sec


def load_public(path: Path | str) -> bytes:
    """Read the public key of a ``NAME.key`` certificate; returns its 40 Z85 bytes.

    Raises:
        NodeConfigError: missing or unreadable file, no valid ``public-key``, or the file is
            a secret certificate (point at ``NAME.key``, not ``NAME.key_secret``).
    """
    path = Path(path)
    pub, sec = _load(path, "public key file")
    if sec is not None:
        raise NodeConfigError(
            f"{path} holds a secret key: point at the public certificate "
            f"(NAME.key), never copy a NAME.key_secret to other hosts",
            path=str(path),
        )
    return pub


def load_secret(path: Path | str) -> tuple[bytes, bytes]:
    """Read a ``NAME.key_secret`` certificate; returns (public, secret) as 40 Z85 bytes each.

    Raises:
        NodeConfigError: missing or unreadable file, group or others may read it (run
            ``chmod 600``), no valid ``secret-key``, or the public key does not belong to the
            secret key.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as e:
        raise NodeConfigError(
            f"secret key file {path} does not exist: create it with "
            "`jaula node keygen --out DIR --name NAME` or fix the path",
            path=str(path),
        ) from e
    except OSError as e:
        raise NodeConfigError(
            f"cannot stat secret key file {path}: {e.strerror}", path=str(path)
        ) from e
    if not stat.S_ISREG(mode):
        raise NodeConfigError(f"secret key file {path} is not a regular file", path=str(path))
    if mode & 0o077:
        raise NodeConfigError(
            f"secret key file {path} has mode {stat.S_IMODE(mode):04o}: "
            f"group and others must not read it, run `chmod 600 {path}`",
            path=str(path),
        )
    pub, sec = _load(path, "secret key file")
    if sec is None:
        raise NodeConfigError(
            f"{path} holds no secret-key: point at NAME.key_secret, not the public NAME.key",
            path=str(path),
        )
    if not is_z85_key(sec):
        raise NodeConfigError(
            f"secret key file {path}: secret-key is not 40 Z85 characters", path=str(path)
        )
    if zmq.curve_public(sec) != pub:
        raise NodeConfigError(
            f"secret key file {path}: its public-key does not belong to its "
            "secret-key; regenerate the keypair",
            path=str(path),
        )
    return pub, sec


# -- bundle signing keys ------------------------------------------------------------------------
#
# A node signs the checkpoint bundles it exports (migrate.bundle) with an Ed25519 key derived
# from its CURVE secret: HKDF-SHA256 (RFC 5869) of the 32 secret bytes, info
# SIGNING_KEY_INFO, gives the 32-byte Ed25519 seed (RFC 8032).  No second secret to keep: the
# node's one secret file stays the only one.  The public half goes into the cluster file
# (``signing_key`` of ``[nodes.NAME]``, base64 of its 32 bytes), where importers check it.

SIGNING_KEY_INFO = b"jaula bundle signing key v1"
SIGNING_PUBLIC_B64_LEN = 44
"""Length of an Ed25519 public key in base64 (32 bytes)."""


def signing_key(secret_z85: bytes) -> Ed25519PrivateKey:
    """The Ed25519 bundle-signing key derived from a CURVE secret key (40 Z85 bytes)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    seed = HKDF(hashes.SHA256(), 32, salt=None, info=SIGNING_KEY_INFO).derive(
        zmq.utils.z85.decode(secret_z85)
    )
    return Ed25519PrivateKey.from_private_bytes(seed)


def signing_public(secret_z85: bytes) -> str:
    """The base64 public half of :func:`signing_key` (what the cluster file lists)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = signing_key(secret_z85).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def parse_signing_public(text: str) -> bytes:
    """The 32 raw bytes of a base64 Ed25519 public key.  Raises ValueError saying why."""
    if not isinstance(text, str) or len(text) != SIGNING_PUBLIC_B64_LEN:
        raise ValueError(f"expected {SIGNING_PUBLIC_B64_LEN} base64 characters")
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise ValueError(f"not base64: {e}") from None
    if len(raw) != 32:
        raise ValueError("not 32 bytes")
    return raw
