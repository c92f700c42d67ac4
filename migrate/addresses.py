"""Host and endpoint helpers shared by the page-server and post-copy connections."""

from __future__ import annotations

import socket


def resolve(host: str) -> str:
    """An IP address of ``host``, IPv4 first (ZeroMQ binds a host name's IPv4 address).

    Raises OSError (socket.gaierror) when it has none."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    infos.sort(key=lambda i: i[0] != socket.AF_INET)
    return str(infos[0][4][0])


def endpoint_host(endpoint: str) -> str:
    """``HOST`` of ``tcp://HOST:PORT`` (brackets of an IPv6 address removed)."""
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
    return host.strip("[]")


def bind_address(listen: str) -> tuple[str, str]:
    """For a node's ``tcp://HOST:PORT`` listen endpoint: (the address to bind, the address
    to tell a peer).  A wildcard ``*`` binds 0.0.0.0 and is told as ``*`` (the peer then
    uses the host it reached us on).  Raises OSError when HOST does not resolve."""
    host = endpoint_host(listen)
    if host == "*":
        return "0.0.0.0", "*"
    address = resolve(host)
    return address, address
