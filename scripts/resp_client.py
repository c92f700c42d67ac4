"""A Redis client that stays connected: one TCP connection, ``SET key n`` then ``GET key``
(which must give ``n`` back), n = 1, 2, ..., every ``--interval-ms``, until file STOP exists.

Speaks RESP over a plain socket (stdlib only), so it runs as it is in any net namespace
(the demo and the tests start it with ``nsenter --net=<client netns>``).  Every completed
round trip rewrites PROGRESS with its count (atomically).  At the end it prints one line:

    ok <round trips> <longest gap between replies, s>
    FAIL <what happened> after <round trips>    (reset, EOF, wrong value, timeout)

and exits 0 or 1.  Usage: ``resp_client.py HOST PORT STOP PROGRESS [--key K]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import BinaryIO


def command(*args: str) -> bytes:
    """One RESP request: an array of bulk strings."""
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def reply(f: BinaryIO) -> str | None:
    """One simple-string, error, integer or bulk reply read from the file ``f`` (None for a
    nil bulk); EOFError when the server closed the connection."""
    line = f.readline()
    if not line:
        raise EOFError("the server closed the connection (EOF)")
    kind, rest = line[:1], line[1:].rstrip(b"\r\n").decode()
    if kind in (b"+", b":"):
        return rest
    if kind == b"-":
        raise ValueError(f"redis error: {rest}")
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:n].decode()
    raise ValueError(f"unexpected reply {line!r}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="resp_client.py")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("stop")
    p.add_argument("progress")
    p.add_argument("--key", default="jaula:client")
    p.add_argument("--interval-ms", type=float, default=10.0)
    a = p.parse_args(argv)
    n, gap = 0, 0.0
    try:
        s = socket.create_connection((a.host, a.port), timeout=60)
        f: BinaryIO = s.makefile("rwb")  # type: ignore[assignment]
        last = time.monotonic()
        while not os.path.exists(a.stop):
            f.write(command("SET", a.key, str(n + 1)) + command("GET", a.key))
            f.flush()
            if reply(f) != "OK":
                print(f"FAIL SET {n + 1} not OK after {n}")
                return 1
            got = reply(f)
            if got != str(n + 1):
                print(f"FAIL GET gave {got!r}, wrote {n + 1}, after {n}")
                return 1
            now = time.monotonic()
            gap, last = max(gap, now - last), now
            n += 1
            with open(a.progress + ".tmp", "w") as prog:
                prog.write(str(n))
            os.replace(a.progress + ".tmp", a.progress)
            time.sleep(a.interval_ms / 1000)
    except ConnectionResetError as e:
        print(f"FAIL connection reset ({e}) after {n}")
        return 1
    except (OSError, EOFError, ValueError) as e:
        print(f"FAIL {e!r} after {n}")
        return 1
    print(f"ok {n} {gap:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
