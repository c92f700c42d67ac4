"""The source's control channel of one session: a reader task that checks every message
from the destination against :data:`migrate.protocol.SOURCE_TABLE` for the source's current
phase, routes credits to the file sender, turns an ``error`` (or a message out of order)
into the session's failure, and queues the rest for :meth:`SourceLink.expect`."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

from migrate.errors import (
    KeyRefused,
    MigrationError,
    PeerUnavailable,
    ProtocolError,
    TransferError,
)
from migrate.protocol import SOURCE_TABLE, SourcePhase, decode, encode, next_phase
from migrate.stream import FileSender


class SourceLink:
    """Messages of one session, as the source sees them.

    Args:
        client: a connected :class:`migrate.transport.Client` to the destination.
        session: the session id; peer_timeout_s: how long the destination may stay
            silent while the source waits for an answer.
    """

    def __init__(self, client: Any, session: str, peer_timeout_s: float) -> None:
        self.client = client
        self.session = session
        self.timeout = peer_timeout_s
        self.phase = SourcePhase.PREFLIGHT
        self.inbox: dict[str, asyncio.Queue[dict[str, Any]]] = defaultdict(asyncio.Queue)
        self.failure: MigrationError | None = None
        self.failed = asyncio.Event()
        self.last_heard = time.monotonic()
        self.sender = FileSender(self, peer_timeout_s)
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        self.sender.close()
        if self._reader:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):  # noqa: BLE001, S110 - closing
                pass

    async def _read(self) -> None:
        while True:
            try:
                frames = await self.client.recv(timeout_s=1.0)
            except KeyRefused as e:
                self._fail(e)
                return
            except PeerUnavailable:
                continue
            try:
                msg, _ = decode(frames)
            except ProtocolError as e:
                self._fail(ProtocolError(f"the destination sent a bad message: {e}"))
                continue
            if msg.get("session") != self.session:
                continue
            self.last_heard = time.monotonic()
            mtype = msg["type"]
            try:
                next_phase(SOURCE_TABLE, self.phase, mtype, "source")
            except ProtocolError as e:
                self._fail(ProtocolError(f"the destination broke the protocol: {e}"))
                continue
            if mtype == "credit":
                self.sender.grant(msg["n"])
            elif mtype == "error":
                self._fail(TransferError(f"the destination refused: {msg['message']}"))
            else:
                self.inbox[mtype].put_nowait(msg)

    def _fail(self, err: MigrationError) -> None:
        if self.failure is None:
            self.failure = err
        self.failed.set()
        self.sender.wake()

    async def send(self, mtype: str, payload: bytes | None = None, **fields: Any) -> None:
        await self.client.send(encode(mtype, payload, session=self.session, **fields))

    async def expect(
        self, mtype: str, timeout_s: float | None = None, silent_s: float | None = None
    ) -> dict[str, Any]:
        """The next ``mtype`` message.  Raises the session's failure, or PeerUnavailable
        when the destination did not send it within ``timeout_s`` (default: the peer
        timeout), or, with ``silent_s``, sent nothing at all (heartbeats included) for
        ``silent_s`` seconds: a destination that beats while it works and stops beating
        has died or restarted, and the wait ends then instead of at ``timeout_s``."""
        limit = timeout_s if timeout_s is not None else self.timeout
        deadline = time.monotonic() + limit
        get = asyncio.ensure_future(self.inbox[mtype].get())
        fail = asyncio.ensure_future(self.failed.wait())
        try:
            while True:
                left = deadline - time.monotonic()
                if silent_s is not None:
                    left = min(left, self.last_heard + silent_s - time.monotonic())
                done, _ = await asyncio.wait(
                    {get, fail}, timeout=max(left, 0.0), return_when=asyncio.FIRST_COMPLETED
                )
                if done or time.monotonic() >= deadline:
                    break
                if silent_s is not None and time.monotonic() - self.last_heard >= silent_s:
                    raise PeerUnavailable(
                        f"the destination sent nothing for {silent_s:.0f} s while it should "
                        f"have been working on {mtype}: its node service stopped or restarted"
                    )
        finally:
            for t in (get, fail):
                if not t.done():
                    t.cancel()
        if get in done:
            return get.result()
        if self.failure:
            raise self.failure
        raise PeerUnavailable(f"the destination did not answer {mtype} within {limit:.0f} s")
