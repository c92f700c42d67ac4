"""Sealing of a session's bulk data: AES-256-GCM (NIST SP 800-38D) with a per-session key.

The destination makes the key and sends it to the source inside the CURVE-encrypted,
mutually authenticated session channel (``accept``), so only the two nodes know it.  Each
chunk is sealed with a nonce that is unique under the key (file number, then chunk number)
and with its session, file and offset as associated data: a chunk cannot be forged, altered,
replayed into another file or moved to another offset without failing :func:`open_chunk`.
The per-file sha256 of the protocol is checked on top of this, end to end.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from migrate.errors import TransferError

KEY_BYTES = 32


def new_key() -> bytes:
    """A fresh random 256-bit key."""
    return os.urandom(KEY_BYTES)


def _nonce(file: int, seq: int) -> bytes:
    return struct.pack(">IQ", file, seq)


def _aad(session: str, file: int, offset: int) -> bytes:
    return f"{session}/{file}/{offset}".encode()


def seal_chunk(key: bytes, session: str, file: int, seq: int, offset: int, data: bytes) -> bytes:
    """Encrypt and authenticate one chunk (ciphertext with its 16-byte tag)."""
    return AESGCM(key).encrypt(_nonce(file, seq), data, _aad(session, file, offset))


def open_chunk(key: bytes, session: str, file: int, seq: int, offset: int, sealed: bytes) -> bytes:
    """Check and decrypt one chunk.  Raises TransferError when it fails authentication."""
    try:
        return AESGCM(key).decrypt(_nonce(file, seq), sealed, _aad(session, file, offset))
    except InvalidTag:
        raise TransferError(
            f"chunk {seq} of file #{file} at offset {offset} failed its "
            "authentication: corrupted or forged"
        ) from None
