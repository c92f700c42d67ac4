"""The destination's hold: restored tasks stopped at CRIU's ``pre-resume`` until the source
has committed, across three processes.

::

    node service (DestinationSession)   monitor (runtime.monitor)   restorer (in the monitor)
    ─────────────────────────────────   ─────────────────────────   ─────────────────────────
    offer: Runtime.arm ───────────────► starts, imports the
                                        restorer, waits on go.fifo
    restore: HoldServer.start on
      /run/jaula/hold-<tag>-<session>.sock
    Runtime.revive ── "go" on go.fifo ► calls criu_restorer ──────► criu swrk: restore ...
                                                                    pre-resume notification:
                     ◄──────────────────────── "held\\n" on the hold socket (connect as root)
    ready ──► source; the source commits (its durable record says migrated)
    resume ──► HoldServer.decide(True) ─────────────────────────────► "resume\\n": CRIU
                                                                    resumes the tasks; the
                                        the init is the monitor's   restored init's pid goes
    Runtime.revive returns ◄─────────── child: pid to the service   back through the monitor
    (abort: decide(False) ─────────────────────────────────────────► "abort\\n": the restorer
                                                                    kills the held tree and
                                                                    ends CRIU, StopCriu)

The restorer never gives up on its own: when the socket is gone (the service died) it
keeps the tasks held and reconnects every 0.5 s, and the restarted service answers from
the source's durable record (``outcome``), never from a timeout alone.  Only root may
answer (``SO_PEERCRED``).  Socket paths are short (unix socket paths are limited to 107
bytes) and named after the node's state root: several nodes may share a host.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from pathlib import Path

from migrate.scratch import root_tag
from runtime.container import Runtime

#: where held restores talk to their node service
HOLD_DIR = Path("/run/jaula")
#: the file in an incoming session's staging dir where the held restorer writes the
#: decision it was given ("resume" or "abort") before it acts on it: a service that died
#: right after answering finds it there on restart (the restorer will not ask again)
HOLD_DECISION = "hold-decision"


def given_decision(staging: Path) -> bool | None:
    """The decision the held restore of ``staging`` was already given (True: resume), or
    None if it was given none (it is still held, or never was)."""
    try:
        word = json.loads((staging / HOLD_DECISION).read_text()).get("decision")
    except (OSError, ValueError, AttributeError):
        return None
    return {"resume": True, "abort": False}.get(word)


def hold_socket_path(rt: Runtime, session: str) -> Path:
    """The unix socket on which a held restore of ``session`` on ``rt``'s node waits for
    its decision (made: /run/jaula, mode 0700)."""
    HOLD_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    return HOLD_DIR / f"hold-{root_tag(rt)}-{session}.sock"


def stale_hold_sockets(rt: Runtime, active: set[str]) -> list[Path]:
    """This node's hold sockets whose session is not in ``active`` (left by a crash)."""
    if not HOLD_DIR.is_dir():
        return []
    prefix = f"hold-{root_tag(rt)}-"
    return [
        p
        for p in HOLD_DIR.glob(prefix + "*.sock")
        if p.name[len(prefix) : -len(".sock")] not in active
    ]


def from_root(writer: asyncio.StreamWriter) -> bool:
    """Whether the peer of a unix socket connection runs as root (SO_PEERCRED)."""
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == 0)


class HoldServer:
    """The service's end of one held restore: learns when the tasks are held, and answers
    the decision once it is made (:meth:`decide`), to every connection that says ``held``
    (a restorer that reconnects is answered again).

    Args:
        path: the hold socket (:func:`hold_socket_path`).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = asyncio.Event()
        self.answered = asyncio.Event()  #: the decision reached a restorer
        self.decision: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen (a stale socket at the path is replaced).  Raises OSError."""
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._on_conn, path=str(self.path))

    def decide(self, resume: bool) -> None:
        """Answer the held restore: resume (True) or abort (False).  Only the first
        decision counts."""
        if not self.decision.done():
            self.decision.set_result(resume)

    @property
    def decided(self) -> bool:
        return self.decision.done()

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not from_root(writer):
                return
            line = await reader.readline()
            if not line.startswith(b"held"):
                return
            self.held.set()
            ok = await self.decision
            writer.write(b"resume\n" if ok else b"abort\n")
            await writer.drain()
            self.answered.set()
        finally:
            writer.close()

    def close(self) -> None:
        """Stop listening and remove the socket."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self.path.unlink(missing_ok=True)
