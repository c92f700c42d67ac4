"""``run -it``, detach (ctrl-p ctrl-q) and ``attach`` through a real pty (issue 17): the
container's terminal is a pty its monitor owns, so the shell keeps it while nobody is
attached, and its line discipline (erase, ^C) is the kernel's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.poll import wait_for
from tests.helpers.jaula import Jaula
from tests.helpers.skips import needs_criu
from tests.helpers.terminal import (
    Terminal,
    check_shell_came_back,
    prompt,
    set_up_shell,
)

pytestmark = pytest.mark.root


#: a loop that counts in /tmp/t and on its terminal, opening no /dev/tty
TICKER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/t; echo t=$i; sleep 0.1; done"


def test_interactive_shell_detach_attach_exit(jaula: Jaula) -> None:
    with Terminal(jaula.root, "run", "-it", "--name", "sh", "busybox", "sh") as t:
        prompt(t)
        t.send(b"echo $((6*7))\r")
        assert b"42\r\n" in t.expect(b"42\r\n")
        prompt(t)
        t.send(b"\x10\x11")  # ctrl-p ctrl-q
        t.expect(b"detached from sh")
        assert t.wait() == 0
    (d,) = json.loads(jaula.out("inspect", "sh"))
    assert d["State"]["Status"] == "running"
    with Terminal(jaula.root, "attach", "sh") as t:
        t.send(b"\r")  # as a user does: Enter, to see a fresh prompt
        prompt(t)
        t.send(b"echo again$((1+1))\r")
        t.expect(b"again2")
        prompt(t)
        t.send(b"exit 3\r")
        assert t.wait() == 3
    assert jaula.out("wait", "sh").strip() == "3"
    assert "42" in jaula.out("logs", "sh")  # the terminal's output is in the log too


def test_line_discipline_and_ctrl_c(jaula: Jaula) -> None:
    with Terminal(jaula.root, "run", "-it", "--name", "ld", "busybox", "sh") as t:
        prompt(t)
        t.send(b"cat\r")
        t.expect(b"cat\r\n")
        # type only once cat runs: until then the shell's line editor may still hold the
        # terminal raw (the echo of "cat" comes before it gives the line discipline back)
        running = lambda: any(
            ln.split()[-1:] == ["cat"] for ln in jaula.out("exec", "ld", "ps").splitlines()
        )
        assert wait_for(running, 20), jaula.out("exec", "ld", "ps")
        # the kernel's line discipline, not the shell's editor, reads for cat: two erases
        # leave "axy"
        t.send(b"abc\x7f\x7fxy\r")
        echo = t.expect(b"xy\r\n")  # the echo: "abc", two erases, "xy"
        assert echo.endswith(b"abc\b \b\b \bxy\r\n"), echo
        t.expect(b"axy\r\n")  # cat's copy: it runs, in the foreground
        t.send(b"\x03")  # ^C: SIGINT to cat through the controlling terminal
        prompt(t)
        t.send(b"exit 0\r")
        assert t.wait() == 0


def test_attach_needs_a_terminal(jaula: Jaula) -> None:
    jaula.out("run", "-d", "--name", "plain", "busybox", "sleep", "1000")
    p = jaula.run("attach", "plain", check=False)
    assert p.returncode == 125 and p.stderr.count("\n") == 1 and "has no terminal" in p.stderr


def test_interactive_without_tty_is_refused(jaula: Jaula) -> None:
    p = jaula.run("run", "-i", "busybox", "cat", check=False)
    assert p.returncode == 125 and "-i without -t" in p.stderr
    assert jaula.container_ids() == []


def test_exec_it_shell(jaula: Jaula) -> None:
    jaula.out("run", "-d", "--name", "svc", "busybox", "sleep", "1000")
    with Terminal(jaula.root, "exec", "-it", "svc", "sh") as t:
        prompt(t)
        t.send(b"echo $((2+3)) $$\r")
        out = t.expect(b"\r\n", 20.0) + t.expect(b"\r\n", 20.0)
        assert b"5 " in out  # and a pid of the container's namespace after it
        prompt(t)
        t.send(b"sleep 1001\r")
        t.expect(b"sleep 1001\r\n")
        from runtime.poll import wait_for

        # the shell makes it the terminal's foreground job before it execs it
        assert wait_for(lambda: "sleep 1001" in jaula.out("top", "svc"), 20.0, 0.1)
        t.send(b"\x03")  # ^C reaches the exec'd shell's foreground job: its own terminal
        prompt(t)
        t.send(b"exit 4\r")
        assert t.wait() == 4
    (d,) = json.loads(jaula.out("inspect", "svc"))
    assert d["State"]["Status"] == "running"


@needs_criu
def test_terminal_survives_checkpoint_and_restore(jaula: Jaula) -> None:
    with Terminal(jaula.root, "run", "-it", "--name", "crt", "busybox", "sh") as t:
        set_up_shell(t)
    jaula.out("checkpoint", "crt")
    (d,) = json.loads(jaula.out("inspect", "crt"))
    assert d["State"]["Status"] == "checkpointed"
    jaula.out("restore", "crt")
    with Terminal(jaula.root, "attach", "crt") as t:
        check_shell_came_back(jaula, t, "crt")
    with Terminal(jaula.root, "attach", "crt") as t:  # and once more: exit through it
        t.send(b"exit 5\r")
        assert t.wait() == 5
    assert jaula.out("wait", "crt").strip() == "5"


@needs_criu
def test_terminal_comes_back_from_an_exported_bundle(
    jaula: Jaula, jaula2: Jaula, tmp_path: Path
) -> None:
    """Restored on another node (state root) from ``checkpoint --export``: that node's
    monitor makes the pty, and ``attach`` there reaches the shell."""
    with Terminal(jaula.root, "run", "-it", "--name", "exp", "busybox", "sh") as t:
        set_up_shell(t)
    bundle = tmp_path / "exp.tar"
    jaula.out("checkpoint", "exp", "--export", str(bundle))
    jaula2.out("restore", "--import", str(bundle), "--insecure-unsigned")
    with Terminal(jaula2.root, "attach", "exp") as t:
        check_shell_came_back(jaula2, t, "exp")
    jaula2.out("rm", "-f", "exp")


@needs_criu
def test_terminal_without_a_shell_survives_checkpoint(jaula: Jaula) -> None:
    """``-t`` for a program that never opens ``/dev/tty`` (the key declared for it goes
    unused, at the dump and at the restore): it comes back, its output on the new pty."""
    jaula.out("run", "-d", "-t", "--name", "ticker", "busybox", "sh", "-c", TICKER)
    assert wait_for(lambda: "t=3" in jaula.out("logs", "ticker"), 20)
    jaula.out("checkpoint", "ticker")
    jaula.out("restore", "ticker")
    with Terminal(jaula.root, "attach", "--no-stdin", "ticker") as t:
        t.expect(b"t=")  # printed on the new terminal after the restore
    n = int(jaula.out("exec", "ticker", "cat", "/tmp/t"))
    assert wait_for(lambda: int(jaula.out("exec", "ticker", "cat", "/tmp/t")) > n, 20)
    jaula.out("rm", "-f", "ticker")


@needs_criu
def test_checkpoint_refuses_another_terminal(jaula: Jaula) -> None:
    """A terminal other than the container's own (here a pty made inside it on a devpts
    of its own) cannot be carried: refused before the freeze, in one line."""
    jaula.out(
        "run", "-d", "-t", "--privileged", "--name", "term", "busybox", "sh", "-c",
        "mkdir -p /tmp/pts && mount -t devpts -o newinstance,ptmxmode=666 devpts /tmp/pts "
        "&& exec 7<>/tmp/pts/ptmx && exec sleep 1000",
    )  # fmt: skip
    holds = lambda: "ptmx" in jaula.out("exec", "term", "ls", "-l", "/proc/1/fd")
    assert wait_for(holds, 20), jaula.out("exec", "term", "ls", "-l", "/proc/1/fd")
    p = jaula.run("checkpoint", "term", check=False)
    assert p.returncode == 125 and p.stderr.count("\n") == 1, p.stderr
    assert "terminal other than the container's own" in p.stderr
    (d,) = json.loads(jaula.out("inspect", "term"))
    assert d["State"]["Status"] == "running"
