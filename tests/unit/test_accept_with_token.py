"""The post-copy page connection's listener (migrate.lazy_conn.accept_with_token) on real
loopback sockets: strangers who connect first, with a wrong token, a short one or none
at all, are dropped, and a silent one does not hold up the others; the connection that
starts with the token is the one returned."""

from __future__ import annotations

import asyncio
import socket

from migrate.lazy_conn import accept_with_token

TOKEN = bytes(range(32))


async def _run() -> tuple[bytes, bool]:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    lsock.setblocking(False)
    port = lsock.getsockname()[1]
    waiting = asyncio.ensure_future(accept_with_token(lsock, TOKEN, "t", first_bytes_timeout_s=30))
    strangers = []
    for first in (b"\0" * 32, TOKEN[:16], b""):  # wrong, short then closed, silent
        s = socket.create_connection(("127.0.0.1", port))
        if first:
            s.sendall(first)
        if first == TOKEN[:16]:
            s.shutdown(socket.SHUT_WR)
        strangers.append(s)
    await asyncio.sleep(0.05)
    assert not waiting.done()  # none of them was taken
    good = socket.create_connection(("127.0.0.1", port))
    good.sendall(TOKEN + b"after")
    # the silent stranger (checked for up to 30 s) does not hold the good one up
    conn = await asyncio.wait_for(waiting, 5)
    got = conn.recv(5)
    conn.close()
    good.close()
    for s in strangers:
        s.close()
    return got, lsock.fileno() == -1


def test_only_the_token_holder_is_taken() -> None:
    got, listener_closed = asyncio.run(_run())
    assert got == b"after"  # the bytes after the token, on the connection that sent it
    assert listener_closed  # nobody else can connect afterwards
