"""The post-copy page connection: one TCP connection per post-copy session, from the
source's CRIU (``criu dump --lazy-pages``, given the socket: patch 0007) to the
destination's ``criu lazy-pages`` daemon, over TLS with the session's pinned certificates.

The destination listens on an ephemeral port and tells the source the port and a random
token inside the (CURVE) ``accept``; the source connects and sends the token first.  A
connection that sends anything else, or nothing for a few seconds, is dropped and the wait
goes on, so a stranger on the port can neither take the source's place nor hold it up.
Both ends get TCP_USER_TIMEOUT and keepalive: a peer that vanishes fails the transfer
instead of leaving a post-copy waiting forever.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
from typing import Any

import structlog

log = structlog.get_logger(__name__)

#: TCP_USER_TIMEOUT and keepalive of the post-copy page connection, both ends (seconds):
#: a peer gone silent fails the transfer instead of leaving a post-copy waiting
LAZY_CONN_TIMEOUT_S = 30
#: bytes of the token that the source sends first on its post-copy page connection
LAZY_TOKEN_BYTES = 32


def listen(address: str) -> tuple[socket.socket, bytes]:
    """A listening, non-blocking socket on an ephemeral port of ``address`` and a fresh
    token for :func:`accept_with_token`.  Raises OSError."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    lsock = socket.socket(family, socket.SOCK_STREAM)
    try:
        lsock.bind((address, 0))
        lsock.listen(8)
        lsock.setblocking(False)
    except OSError:
        lsock.close()
        raise
    return lsock, secrets.token_bytes(LAZY_TOKEN_BYTES)


async def accept_with_token(
    lsock: socket.socket, token: bytes, session: str = "", first_bytes_timeout_s: float = 5.0
) -> socket.socket:
    """Accept connections on the listening, non-blocking ``lsock`` until one sends
    ``token`` first; return it (blocking, the token read) and close ``lsock``.  Each
    connection is checked on its own, so a stranger on the port of a post-copy can neither
    take the source's place nor hold up its connection; one that sends something else is
    closed and logged at once, one that sends nothing after ``first_bytes_timeout_s``."""
    loop = asyncio.get_running_loop()
    winner: asyncio.Future[socket.socket] = loop.create_future()
    checks: set[asyncio.Task[None]] = set()

    async def check(conn: socket.socket, peer: Any) -> None:
        kept = False
        try:
            got = b""
            async with asyncio.timeout(first_bytes_timeout_s):
                while len(got) < len(token):
                    more = await loop.sock_recv(conn, len(token) - len(got))
                    if not more:
                        break
                    got += more
            if len(got) == len(token) and secrets.compare_digest(got, token) and not winner.done():
                winner.set_result(conn)
                kept = True
        except (TimeoutError, OSError):
            pass
        finally:
            if not kept:
                log.warning("migration.lazy.stranger", session=session, peer=str(peer))
                conn.close()

    async def accept() -> None:
        while True:
            conn, peer = await loop.sock_accept(lsock)
            task = asyncio.ensure_future(check(conn, peer))
            checks.add(task)
            task.add_done_callback(checks.discard)

    acceptor = asyncio.ensure_future(accept())
    try:
        conn = await winner
        conn.setblocking(True)
        return conn
    finally:
        acceptor.cancel()
        for task in list(checks):
            task.cancel()
        lsock.close()


def set_conn_timeouts(sock: socket.socket) -> None:
    """TCP_USER_TIMEOUT and keepalive (:data:`LAZY_CONN_TIMEOUT_S`) on a post-copy page
    connection: the side that waits for pages notices a peer that vanished."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, LAZY_CONN_TIMEOUT_S * 1000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, LAZY_CONN_TIMEOUT_S // 5))


def connect(address: str, port: int, token: bytes) -> socket.socket:
    """Open the post-copy page connection to the destination and authenticate it with
    ``token`` (its listener drops any connection that does not start with it).  The
    socket gets 30 s send and receive limits and TCP_USER_TIMEOUT, as CRIU's own
    page-server client (patch 0005): a destination gone silent fails the transfer rather
    than hold the source's CRIU forever.  Raises OSError."""
    sock = socket.create_connection((address, port), timeout=10.0)
    try:
        sock.sendall(token)
        sock.settimeout(None)
        tmo = struct.pack("ll", LAZY_CONN_TIMEOUT_S, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tmo)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tmo)
        set_conn_timeouts(sock)
    except OSError:
        sock.close()
        raise
    return sock
