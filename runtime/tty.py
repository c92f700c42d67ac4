"""Terminals for ``run -t`` and ``attach``: a pty pair owned by the container's monitor.

The monitor (``-t``: the file ``tty`` in the container directory) opens a pty, gives its slave
side to the init as stdin, stdout, stderr and controlling terminal, and keeps the master side
for the container's life (across restarts), so a client may come and go::

    client (jaula run -it / attach)        monitor                      init
      connect attach.sock  ------------->  accept
      4 bytes: rows, cols (u16, u16) --->  TIOCSWINSZ on the master
      keystrokes  ---------------------->  write(master)  ----------->  the shell reads
      output  <-------------------------  read(master) (and ctr.log)  <- the shell writes
      ctrl-p ctrl-q: close (detach)       the init keeps running
      EOF <----------------------------  the init exited

``attach.sock`` is bound and connected through ``/proc/self/fd/DIRFD/attach.sock`` (a
container directory's path may be longer than the 108 bytes of ``sun_path``).  Everything the
terminal prints also goes to ``ctr.log`` (stream ``stdout``), so ``logs`` works as without
``-t``.

Checkpoint and restore (:mod:`migrate.checkpoint`, :mod:`migrate.restorer`): the pty's slave
is declared external to CRIU (``--external tty[RDEV:DEV]``, :func:`criu_key`) and its
settings are saved with the dump (:class:`TerminalState`, :func:`capture`).  The monitor that
restores makes a fresh pair, the restorer applies the saved settings to its slave
(:func:`apply`) and hands it to CRIU (``--inherit-fd fd[N]:tty[RDEV:DEV]``, the old key), and
CRIU makes it the restored session's controlling terminal again.  What sat unread in the
old pty's buffers is lost (CRIU does not dump it either).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import socket
import struct
import sys
import termios
import time
import tty as stdlib_tty
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from runtime.store import ATTACH_SOCK

#: Podman's default detach keys: ctrl-p ctrl-q
DETACH_KEYS = b"\x10\x11"


class _Log(Protocol):
    def feed(self, stream: str, data: bytes) -> None: ...


def _path(dirfd: int) -> str:
    return f"/proc/self/fd/{dirfd}/{ATTACH_SOCK}"


def listen(cdir: Path) -> socket.socket:
    """The monitor's listening socket ``attach.sock`` in ``cdir`` (removed first)."""
    dirfd = os.open(cdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ATTACH_SOCK, dir_fd=dirfd)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        srv.bind(_path(dirfd))
        os.chmod(ATTACH_SOCK, 0o600, dir_fd=dirfd)
        srv.listen(8)
        srv.setblocking(False)
        return srv
    finally:
        os.close(dirfd)


#: major numbers of Unix98 pty slaves, /dev/pts/N (linux/major.h UNIX98_PTY_SLAVE_MAJOR, and
#: the 7 majors after it that the kernel may also give them)
PTS_MAJORS = range(136, 144)


def criu_key(rdev: int, dev: int) -> str:
    """CRIU's name of a terminal (its ``--external`` and ``--inherit-fd`` key):
    ``tty[RDEV:DEV]`` in hex, ``st_rdev`` and ``st_dev`` of the open device."""
    return f"tty[{rdev:x}:{dev:x}]"


@dataclass(frozen=True)
class TerminalState:
    """What a terminal's line discipline keeps of its settings, as :func:`termios.tcgetattr`
    gives it (flags as ints, ``cc`` the control characters as ints: NCCS of them) and its
    window size (rows, columns; pixels as the kernel keeps them)."""

    iflag: int
    oflag: int
    cflag: int
    lflag: int
    ispeed: int
    ospeed: int
    cc: tuple[int, ...]
    rows: int = 0
    cols: int = 0
    xpixel: int = 0
    ypixel: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "termios": [self.iflag, self.oflag, self.cflag, self.lflag, self.ispeed, self.ospeed],
            "cc": list(self.cc),
            "winsize": [self.rows, self.cols, self.xpixel, self.ypixel],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TerminalState:
        """Raises ValueError when ``d`` is not what :meth:`to_json` wrote."""
        try:
            flags = [int(x) for x in d["termios"]]
            rows, cols, xp, yp = (int(x) for x in d["winsize"])
            cc = tuple(int(x) for x in d["cc"])
            if len(flags) != 6 or not all(0 <= c < 256 for c in cc):
                raise ValueError("bad termios")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a saved terminal state: {e}") from e
        iflag, oflag, cflag, lflag, ispeed, ospeed = flags
        return cls(iflag, oflag, cflag, lflag, ispeed, ospeed, cc, rows, cols, xp, yp)


def capture(fd: int) -> TerminalState:
    """The settings and window size of the terminal open at ``fd``.  Raises OSError
    (ENOTTY: not a terminal)."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = termios.tcgetattr(fd)
    rows, cols, xp, yp = struct.unpack(
        "HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
    )
    return TerminalState(
        iflag,
        oflag,
        cflag,
        lflag,
        ispeed,
        ospeed,
        tuple(c if isinstance(c, int) else c[0] for c in cc),
        rows,
        cols,
        xp,
        yp,
    )


def apply(fd: int, state: TerminalState) -> None:
    """Give the terminal at ``fd`` (a pty's slave: a pty keeps one window size for both
    sides) the settings and window size of ``state``, at once.  Raises OSError, and
    termios.error when the kernel refuses the settings."""
    attrs: list[Any] = [
        state.iflag,
        state.oflag,
        state.cflag,
        state.lflag,
        state.ispeed,
        state.ospeed,
        list(state.cc),
    ]
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    fcntl.ioctl(
        fd,
        termios.TIOCSWINSZ,
        struct.pack("HHHH", state.rows, state.cols, state.xpixel, state.ypixel),
    )


#: what the terminal printed before its first client came, kept for that client (bytes)
BACKLOG_MAX = 1 << 20


class Backlog:
    """The output of a terminal nobody has attached to yet: ``run -it`` connects just after
    the init started, and must see the shell's first prompt.  Later clients see only new
    output, as with ``podman attach``."""

    def __init__(self) -> None:
        self.data: bytearray | None = bytearray()

    def add(self, data: bytes) -> None:
        if self.data is not None:
            self.data += data
            del self.data[:-BACKLOG_MAX]

    def take(self) -> bytes:
        out, self.data = bytes(self.data or b""), None
        return out


def pump(pid: int, log: _Log, master: int, srv: socket.socket, backlog: Backlog) -> int:
    """The monitor's loop with a terminal: copy the master's output to ``log`` and every
    attached client (the first one also gets ``backlog``), clients' input to the master,
    until the init ``pid`` exits; then close the clients (they see EOF).  Returns the
    init's wait status."""
    pidfd = os.pidfd_open(pid)
    sel = selectors.DefaultSelector()
    sel.register(master, selectors.EVENT_READ, "master")
    sel.register(srv, selectors.EVENT_READ, "listen")
    sel.register(pidfd, selectors.EVENT_READ, "exit")
    clients: dict[int, tuple[socket.socket, bytearray]] = {}
    status: int | None = None
    while status is None:
        for key, _ in sel.select():
            if key.data == "exit":
                _, status = os.waitpid(pid, 0)
            elif key.data == "listen":
                with contextlib.suppress(BlockingIOError):
                    conn, _ = srv.accept()
                    conn.setblocking(True)
                    if early := backlog.take():
                        with contextlib.suppress(OSError):
                            conn.sendall(early)
                    clients[conn.fileno()] = (conn, bytearray())
                    sel.register(conn, selectors.EVENT_READ, "client")
            elif key.data == "master":
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: no slave open right now
                    data = b""
                if data:
                    log.feed("stdout", data)
                    backlog.add(data)
                    for conn, _ in list(clients.values()):
                        try:
                            conn.sendall(data)
                        except OSError:
                            _drop(sel, clients, conn)
            else:
                conn, header = clients[key.fd]
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    _drop(sel, clients, conn)
                    continue
                if len(header) < 4:  # the window size comes first
                    need = 4 - len(header)
                    header += data[:need]
                    data = data[need:]
                    if len(header) == 4:
                        rows, cols = struct.unpack("!HH", bytes(header))
                        with contextlib.suppress(OSError):
                            fcntl.ioctl(
                                master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0)
                            )
                if data:
                    with contextlib.suppress(OSError):
                        os.write(master, data)
    os.close(pidfd)
    _drain(master, log, clients)
    for conn, _ in list(clients.values()):
        _drop(sel, clients, conn)
    sel.unregister(master)
    sel.unregister(srv)
    return status


def _drain(master: int, log: _Log, clients: dict[int, tuple[socket.socket, bytearray]]) -> None:
    """What the init wrote just before it exited."""
    os.set_blocking(master, False)
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except (BlockingIOError, OSError):
                break
            if not data:
                break
            log.feed("stdout", data)
            for conn, _ in clients.values():
                with contextlib.suppress(OSError):
                    conn.sendall(data)
    finally:
        os.set_blocking(master, True)


def _drop(
    sel: selectors.BaseSelector,
    clients: dict[int, tuple[socket.socket, bytearray]],
    conn: socket.socket,
) -> None:
    fd = conn.fileno()
    if fd in clients:
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(conn)
        del clients[fd]
    conn.close()


def connect(cdir: Path, timeout_s: float = 10.0) -> socket.socket:
    """A client's connection to the monitor's terminal.  Raises OSError when there is no
    terminal to attach to (the container runs without ``-t``, or it is gone)."""
    dirfd = os.open(cdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(_path(dirfd))
                return s
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
    finally:
        os.close(dirfd)


def relay(sock: socket.socket, stdin: int = 0, stdout: int = 1, send_input: bool = True) -> bool:
    """The client side: the caller's terminal (raw mode when it is one) to and from the
    container's.  Returns True when the user detached (ctrl-p ctrl-q), False when the
    container's terminal closed (its init exited)."""
    try:
        rows, cols = os.get_terminal_size(stdin)
    except OSError:
        rows, cols = 24, 80
    sock.sendall(struct.pack("!HH", rows, cols))
    saved = None
    if send_input and os.isatty(stdin):
        saved = termios.tcgetattr(stdin)
        stdlib_tty.setraw(stdin, termios.TCSANOW)  # not TCSAFLUSH: keep what was typed ahead
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "sock")
    if send_input:
        sel.register(stdin, selectors.EVENT_READ, "stdin")
    pending = b""  # a ctrl-p waiting to see whether ctrl-q follows
    try:
        while True:
            for key, _ in sel.select():
                if key.data == "sock":
                    data = sock.recv(65536)
                    if not data:
                        return False
                    os.write(stdout, data)
                    continue
                data = os.read(stdin, 4096)
                if not data:
                    sel.unregister(stdin)  # stdin closed: keep showing the output
                    continue
                data = pending + data
                pending = b""
                if DETACH_KEYS in data:
                    before = data[: data.index(DETACH_KEYS)]
                    if before:
                        sock.sendall(before)
                    return True
                if data.endswith(DETACH_KEYS[:1]):
                    pending, data = data[-1:], data[:-1]
                if data:
                    sock.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        sock.close()
        with contextlib.suppress(OSError):
            sys.stdout.flush()


def relay_pty(
    master: int, stop_r: int, stdin: int = 0, stdout: int = 1, send_input: bool = True
) -> None:
    """``exec -it``: relay the caller's terminal (raw mode when it is one) to and from the
    pty ``master`` whose slave the exec'd program holds, until ``stop_r`` becomes readable
    (the program exited); what it printed last is drained first."""
    with contextlib.suppress(OSError):
        rows, cols = os.get_terminal_size(stdin)
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    saved = None
    if send_input and os.isatty(stdin):
        saved = termios.tcgetattr(stdin)
        stdlib_tty.setraw(stdin, termios.TCSANOW)
    sel = selectors.DefaultSelector()
    sel.register(master, selectors.EVENT_READ, "master")
    if send_input:
        sel.register(stdin, selectors.EVENT_READ, "stdin")
    sel.register(stop_r, selectors.EVENT_READ, "stop")
    try:
        while True:
            for key, _ in sel.select():
                if key.data == "stop":
                    os.set_blocking(master, False)
                    with contextlib.suppress(OSError):
                        while data := os.read(master, 65536):
                            os.write(stdout, data)
                    return
                if key.data == "master":
                    try:
                        data = os.read(master, 65536)
                    except OSError:
                        data = b""
                    if data:
                        os.write(stdout, data)
                    else:
                        sel.unregister(master)
                    continue
                data = os.read(stdin, 4096)
                if not data:
                    sel.unregister(stdin)
                    continue
                os.write(master, data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
