"""``-i``/``-t`` for ``run`` and ``create``, and ``attach``, as Podman spells them.

``run -it IMAGE sh``: the container's monitor owns a pty (:mod:`runtime.tty`); this process
puts the caller's terminal in raw mode and relays it until the shell exits (its exit code is
returned) or the user detaches with ctrl-p ctrl-q (the container keeps running; ``jaula
attach`` gets back to it, with ``logs`` holding what it printed meanwhile).  ``-t`` without
``-i`` shows the terminal without sending input.  ``-i`` without ``-t`` (stdin through a
pipe) is refused for now: jaula has no stdin path without a terminal yet.
"""

from __future__ import annotations

import argparse
import sys

from runtime import tty
from runtime.container import Container, Runtime
from runtime.errors import ConfigError, ContainerError
from runtime.state import ContainerStatus
from runtime.store import TTY_MARK


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Before :mod:`runtime.commands.lifecycle`: ``create`` copies run's flags."""
    run = sub._name_parser_map["run"]
    run.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    run.add_argument("-t", "--tty", action="store_true", help="give the container a terminal")
    ex = sub._name_parser_map["exec"]
    ex.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    ex.add_argument("-t", "--tty", action="store_true", help="give the command a terminal")
    at = sub.add_parser("attach", help="attach to a running container's terminal")
    at.add_argument("--no-stdin", action="store_true", help="do not send input")
    at.add_argument("container")


def check_flags(a: argparse.Namespace) -> None:
    """Raise ConfigError for ``-i`` without ``-t`` (not supported yet)."""
    if getattr(a, "interactive", False) and not getattr(a, "tty", False):
        raise ConfigError("-i without -t is not supported yet: use -it for an interactive shell")


def attach_terminal(c: Container, send_input: bool = True) -> int:
    """Relay the caller's terminal to the container's (module docstring).  Returns 0 when
    detached, else the container's exit code."""
    if not (c.dir / TTY_MARK).exists():
        raise ContainerError(
            f"container {c.name} has no terminal: attach needs one started with -t "
            "(`jaula logs -f` follows its output)",
            c.id,
        )
    try:
        sock = tty.connect(c.dir, timeout_s=5.0)
    except OSError as e:
        raise ContainerError(f"cannot attach to {c.name}: its terminal is gone ({e})", c.id) from e
    if tty.relay(sock, send_input=send_input):
        print(f"\r\njaula: detached from {c.name}", file=sys.stderr)
        return 0
    code = c.wait(timeout_s=30.0)
    return code if code is not None and code >= 0 else 125


def exec_terminal(rt: Runtime, a: argparse.Namespace) -> int:
    """``exec -it``: the program on a new pty this process relays (:func:`runtime.tty.relay_pty`)."""
    import os
    import threading

    cmd = list(a.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if a.detach:
        raise ConfigError("exec -t goes with an attached exec, not with -d")
    c = rt.get(a.container)
    master, slave = os.openpty()
    stop_r, stop_w = os.pipe()
    result: list[int] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(c.exec(tuple(cmd), tuple(a.env), a.workdir, a.user, False, slave))
        except BaseException as e:  # noqa: BLE001 - raised again in the main thread
            failure.append(e)
        finally:
            os.write(stop_w, b"x")

    worker = threading.Thread(target=run, name="exec", daemon=True)
    worker.start()
    try:
        tty.relay_pty(master, stop_r, send_input=a.interactive)
    finally:
        worker.join()
        for fd in (master, slave, stop_r, stop_w):
            os.close(fd)
    if failure:
        raise failure[0]
    return result[0]


def dispatch(rt: Runtime, a: argparse.Namespace) -> int | None:
    if a.cmd in ("run", "create"):
        check_flags(a)
        return None
    if a.cmd == "exec" and a.tty:
        check_flags(a)
        return exec_terminal(rt, a)
    if a.cmd == "exec" and a.interactive:
        return None  # exec inherits this process's stdin already
    if a.cmd == "attach":
        c = rt.get(a.container)
        if c.status is not ContainerStatus.RUNNING:
            raise ContainerError(
                f"container {c.name} is {c.status.value}: attach needs it running", c.id
            )
        return attach_terminal(c, send_input=not a.no_stdin)
    return None
