"""Credit-based chunked file transfer between the two halves of a migration session.

The source streams each file as ``file_begin``, ``chunk``\\* and ``file_end {size,
sha256}``; the destination writes each chunk, grants one ``credit`` per chunk written and
answers ``file_ok`` once the file's size and digest match.  The source keeps at most
:data:`WINDOW_CHUNKS` chunks unacknowledged (the zguide, chapter 7, "File transfer").

When the destination offers a bulk data channel (``accept.data_endpoint``, a plain
socket, :class:`migrate.transport.DataSender`), chunks go there, each sealed with
AES-256-GCM under the session's ``data_key`` (:mod:`migrate.sealing`: nonce from file and
sequence number, AAD from session, file and offset), while ``file_begin``/``file_end``
stay on the CURVE channel: a chunk may then overtake its ``file_begin`` (kept until it
comes) and a ``file_end`` its last chunks (the check waits for them).

Files a destination takes, by name (:data:`NAME_RE`)::

    layers/<64 hex>.tar     an image layer the destination lacks (pre-copy)
    rootfs-base.tar         the upperdir while the container runs (pre-copy)
    criu-images.tar         the small CRIU images, packed (migrate.image_pack)
    criu/<name>             a large CRIU image
    rootfs-delta.tar        what changed in the upperdir since the pre-copy
    ctr.log                 the container's log
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from migrate.errors import MigrationError, PeerUnavailable, ProtocolError, TransferError
from migrate.protocol import CHUNK_BYTES, encode

#: chunks the source may send ahead of the destination's credits
WINDOW_CHUNKS = 16

NAME_RE = re.compile(
    r"^(criu/[A-Za-z0-9_.\-]{1,200}|layers/[0-9a-f]{64}\.tar|"
    r"criu-images\.tar|rootfs-base\.tar|rootfs-delta\.tar|ctr\.log)$"
)


class Channel(Protocol):
    """What a :class:`FileSender` sends through: the session's control channel."""

    session: str
    failure: MigrationError | None

    async def send(self, mtype: str, payload: bytes | None = None, **fields: Any) -> None: ...

    async def expect(self, mtype: str, timeout_s: float | None = None) -> dict[str, Any]: ...


def _hash_and_seal(
    h: Any, key: bytes, session: str, file: int, seq: int, offset: int, data: bytes
) -> bytes:
    from migrate.sealing import seal_chunk

    h.update(data)
    return seal_chunk(key, session, file, seq, offset, data)


class FileSender:
    """The source's side: streams files under the credit window.

    Args:
        channel: the session's control channel; timeout_s: how long the destination may
            go without granting a credit before :class:`PeerUnavailable` is raised.
    """

    def __init__(self, channel: Channel, timeout_s: float) -> None:
        self.channel = channel
        self.timeout_s = timeout_s
        self.credits = WINDOW_CHUNKS
        self._credit = asyncio.Event()
        self.bytes_sent = 0
        self.files = 0
        self._acked = 0
        self.data: Any = None  # DataSender of the bulk channel, when the destination has one
        self.data_key = b""

    def open_data_channel(self, endpoint: str, key: bytes) -> None:
        """Send chunks on the destination's bulk channel from now on, sealed with ``key``."""
        from migrate.transport import DataSender

        self.data = DataSender.connect(endpoint)
        self.data_key = key

    def close(self) -> None:
        if self.data is not None:
            self.data.close()
            self.data = None

    def grant(self, n: int) -> None:
        """``credit {n}`` arrived."""
        self.credits += n
        self._credit.set()

    def wake(self) -> None:
        """The session failed: stop waiting for credits (the failure is raised)."""
        self._credit.set()

    async def _take_credit(self) -> None:
        while self.credits <= 0:
            if self.channel.failure:
                raise self.channel.failure
            self._credit.clear()
            try:
                await asyncio.wait_for(self._credit.wait(), self.timeout_s)
            except TimeoutError:
                raise PeerUnavailable(
                    f"the destination stopped acknowledging data for {self.timeout_s:.0f} s"
                ) from None
        if self.channel.failure:
            raise self.channel.failure
        self.credits -= 1

    async def send_file(
        self, path: Path, name: str, kind: str, progress: Callable[[int], None] | None = None
    ) -> int:
        """Stream one file in chunks under the credit window; returns its size in bytes.
        Raises the session's failure, PeerUnavailable, OSError (reading ``path``)."""
        ch = self.channel
        fid = self.files
        self.files += 1
        await ch.send("file_begin", file=fid, name=name, kind=kind)
        h = hashlib.sha256()
        off = 0
        seq = 0
        with open(path, "rb") as f:  # noqa: ASYNC230 - chunk-sized reads, from memory
            while data := f.read(CHUNK_BYTES):
                await self._take_credit()
                # hashlib and AES-GCM let go of the GIL: on a worker, while the loop goes on
                if self.data is not None:
                    sealed = await asyncio.to_thread(
                        _hash_and_seal, h, self.data_key, ch.session, fid, seq, off, data
                    )
                    await self.data.send(
                        encode("chunk", sealed, session=ch.session, file=fid, offset=off, seq=seq)
                    )
                else:
                    await asyncio.to_thread(h.update, data)
                    await ch.send("chunk", data, file=fid, offset=off)
                seq += 1
                off += len(data)
                self.bytes_sent += len(data)
                if progress:
                    progress(len(data))
        await ch.send("file_end", file=fid, size=off, sha256=h.hexdigest())
        return off

    async def wait_files_ok(self) -> None:
        """Wait until every file sent so far was confirmed whole (``file_ok``)."""
        while self._acked < self.files:
            await self.channel.expect("file_ok")
            self._acked += 1


def _unseal_write_hash(
    fd: int, h: Any, data: bytes, key: bytes, session: str, m: dict[str, Any]
) -> int:
    if "seq" in m:
        from migrate.sealing import open_chunk

        data = open_chunk(key, session, m["file"], m["seq"], m["offset"], data)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    h.update(data)
    return len(data)


@dataclass
class IncomingFile:
    """A file being received: its fd (-1 once closed), name, kind, bytes so far, digest."""

    fd: int
    name: str
    kind: str
    size: int = 0
    h: Any = field(default_factory=hashlib.sha256)
    pending_end: dict[str, Any] | None = None


class FileReceiver:
    """The destination's side: writes files into ``staging``, checks each whole.

    Args:
        staging: the session's staging directory; session: its id.
        send: sends a message back to the source (``credit``, ``file_ok``).
        on_complete: called with each file once its digest matched, before ``file_ok``
            (it may unpack and remove the file).
    """

    def __init__(
        self,
        staging: Path,
        session: str,
        send: Callable[..., Awaitable[None]],
        on_complete: Callable[[IncomingFile], Awaitable[None]],
    ) -> None:
        self.staging = staging
        self.session = session
        self._send = send
        self._on_complete = on_complete
        self.files: dict[int, IncomingFile] = {}
        self.early: dict[int, list[tuple[dict[str, Any], bytes]]] = {}
        self.data_key = b""
        self.bulk = False

    def all_complete(self) -> bool:
        return not any(f.fd >= 0 for f in self.files.values())

    async def on_file_begin(self, m: dict[str, Any]) -> None:
        name = m["name"]
        if not NAME_RE.match(name) or m["file"] in self.files:
            raise ProtocolError(f"unexpected file {name!r} (#{m['file']}) in the session")
        fd = os.open(
            self.staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        self.files[m["file"]] = IncomingFile(fd, name, m["kind"])
        for cm, data in self.early.pop(m["file"], []):
            await self.on_chunk(cm, data)

    async def on_chunk(self, m: dict[str, Any], data: bytes) -> None:
        f = self.files.get(m["file"])
        if f is None and "seq" in m and m["file"] >= 0:
            # the bulk channel overtook file_begin on the control channel: keep it for then
            self.early.setdefault(m["file"], []).append((m, data))
            return
        if f is None or f.fd < 0 or m["offset"] != f.size:
            raise ProtocolError(
                f"chunk at offset {m['offset']} of file #{m['file']} is out of order"
            )
        if "seq" in m and not self.data_key:
            raise ProtocolError("a sealed chunk in a session without a bulk channel")
        if "seq" not in m and self.data_key:
            raise ProtocolError("an unsealed chunk in a session with a bulk channel")
        await self._send("credit", n=1)  # the write below is ours: the window moves on
        try:
            n = await asyncio.to_thread(
                _unseal_write_hash, f.fd, f.h, data, self.data_key, self.session, m
            )
        except OSError as e:
            raise TransferError(f"cannot write {f.name} here: {e.strerror}") from e
        f.size += n
        if f.pending_end is not None:  # file_end came first, on the other channel
            await self.on_file_end(f.pending_end)

    async def on_file_end(self, m: dict[str, Any]) -> None:
        f = self.files.get(m["file"])
        if f is None or f.fd < 0:
            raise ProtocolError(f"file_end for unknown file #{m['file']}")
        if f.size < m["size"] and self.bulk:
            f.pending_end = m  # chunks still on their way on the bulk channel
            return
        f.pending_end = None
        os.close(f.fd)
        f.fd = -1
        if f.size != m["size"] or f.h.hexdigest() != m["sha256"]:
            raise TransferError(
                f"{f.name} arrived corrupt: {f.size} bytes with sha256 "
                f"{f.h.hexdigest()[:16]}..., the source sent {m['size']} bytes "
                f"with {m['sha256'][:16]}..."
            )
        await self._on_complete(f)
        await self._send("file_ok", file=m["file"])

    def close(self) -> None:
        """Close every file still open (an aborted session)."""
        for f in self.files.values():
            if f.fd >= 0:
                os.close(f.fd)
                f.fd = -1
