"""Drive the real ``jaula`` CLI through a pseudo-terminal, as a user at a keyboard would
(the standard library's :mod:`pty`; no pexpect needed): :class:`Terminal` starts
``jaula --state-root ROOT ARGS...`` on a new pty, sends keystrokes and waits for output."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import termios
import time
from pathlib import Path
from typing import Self

from runtime.poll import wait_for
from tests.helpers.jaula import JAULA, REPO, Jaula

#: "where is the cursor?" (DSR 6), which busybox's line editor asks at each prompt, and the
#: answer a terminal emulator gives (row 24, column 1)
CURSOR_QUERY = b"\x1b[6n"
CURSOR_REPLY = b"\x1b[24;1R"
#: busybox sh's prompt as root
PROMPT = b"# "


class Terminal:
    """One CLI process on its own pty.  :meth:`close` (or the ``with`` block's end) kills it
    if it still runs."""

    def __init__(self, root: Path, *args: str) -> None:
        argv = [*JAULA, "--state-root", str(root), *args]
        pid, fd = pty.fork()
        if pid == 0:  # pragma: no cover - the child
            os.chdir(REPO)
            os.execv(argv[0], argv)
        self.pid, self.fd = pid, fd
        self.seen = b""
        self.code: int | None = None

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def expect(self, needle: bytes, timeout_s: float = 20.0) -> bytes:
        """Read until ``needle`` shows (after what earlier calls consumed); returns what was
        read up to and including it.  A cursor position query read meanwhile is answered
        (unless it is the needle: the caller answers it then).  Raises AssertionError with the output on a time-out
        or when the process closed its terminal first."""
        deadline = time.monotonic() + timeout_s
        while needle not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} did not show; the terminal had {self.seen!r}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if not ready:
                continue
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # EIO: the process closed the terminal
                data = b""
            if not data:
                raise AssertionError(f"{needle!r} did not show before the end: {self.seen!r}")
            if CURSOR_QUERY in data and needle != CURSOR_QUERY:
                self.send(CURSOR_REPLY)  # as a terminal emulator answers busybox's line editor
            self.seen += data
        i = self.seen.index(needle) + len(needle)
        out, self.seen = self.seen[:i], self.seen[i:]
        return out

    def wait_raw(self, timeout_s: float = 20.0) -> None:
        """Wait until the CLI has put its terminal in raw mode (``attach`` and ``run -it``
        do so once connected): what is typed before that is echoed by this pty itself.
        The settings of a pty master's are its slave's (tty_ioctl.c, tty_mode_ioctl)."""

        def raw() -> bool:
            return not termios.tcgetattr(self.fd)[3] & (termios.ECHO | termios.ICANON)

        assert wait_for(raw, timeout_s, 0.01), "the CLI did not put its terminal in raw mode"

    def wait(self, timeout_s: float = 30.0) -> int:
        """The CLI's exit code (its terminal's output is drained meanwhile)."""
        deadline = time.monotonic() + timeout_s
        while self.code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"jaula still runs after {timeout_s} s: {self.seen!r}")
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                with contextlib.suppress(OSError):
                    self.seen += os.read(self.fd, 4096)
        return self.code

    def close(self) -> None:
        if self.code is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.code = -9
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def prompt(t: Terminal) -> None:
    """Wait for the shell's prompt and answer the cursor query that follows it (busybox's
    line editor reads nothing else until it has its answer)."""
    t.expect(PROMPT)
    t.expect(CURSOR_QUERY)
    t.send(CURSOR_REPLY)


def _running(jaula: Jaula, name: str, comm: str) -> bool:
    return any(ln.split()[-2:] == comm.split() for ln in jaula.out("exec", name, "ps").splitlines())


def set_up_shell(t: Terminal) -> None:
    """A command and its output, a shell variable, and a line-discipline setting: no echo
    (busybox's line editor then leaves the line to the kernel and asks no cursor query)."""
    prompt(t)
    t.send(b"echo $((6*7))\r")
    t.expect(b"42\r\n")
    prompt(t)
    t.send(b"X=kept; stty -echo\r")
    t.expect(b"stty -echo\r\n")
    t.expect(PROMPT)
    t.send(b"\x10\x11")  # ctrl-p ctrl-q
    t.expect(b"detached from")
    assert t.wait() == 0


def check_shell_came_back(jaula: Jaula, t: Terminal, name: str) -> None:
    """Attached to the restored shell: the variable is set, ``-echo`` holds (what is typed
    is not echoed), ^C reaches its foreground job, and detach still works."""
    t.wait_raw()  # else this pty's own echo would show what is typed
    t.send(b"echo v=$X\r")
    out = t.expect(b"v=kept\r\n")
    assert b"echo" not in out, out  # not echoed: the terminal's settings came back
    t.expect(PROMPT)
    t.send(b"sleep 100\r")
    assert wait_for(lambda: _running(jaula, name, "sleep 100"), 20), jaula.out("exec", name, "ps")
    t.send(b"\x03")  # ^C: the restored shell's controlling terminal is the new pty
    t.expect(PROMPT)
    assert wait_for(lambda: not _running(jaula, name, "sleep 100"), 20)
    t.send(b"\x10\x11")
    t.expect(b"detached from")
    assert t.wait() == 0
