"""What a dump cannot carry is refused before the freeze, or carried (issue 11, items 3, 6,
7): the contents of a ``--network none`` namespace, UNIX sockets connected outside the
container, inotify watches (carried by path; refused on a deleted file).  Each refusal names
the object, and the container keeps running untouched (its counter goes on, every tick
once)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.containers import inspect
from tests.helpers.counter import COUNTER, assert_continuous, ticks, wait_ticks
from tests.helpers.jaula import Jaula
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]

PY_IMAGE = "jaula-python:latest"


@pytest.fixture
def py(jaula: Jaula, python_image_layout: Path) -> Jaula:
    jaula.run("image", "import", str(python_image_layout), "--name", PY_IMAGE)
    return jaula


def _pid(j: Jaula, ref: str) -> int:
    return int(inspect(j, ref)["State"]["Pid"])


def _in_netns(j: Jaula, ref: str, *cmd: str) -> str:
    """Run ``cmd`` (an ``ip`` command) in the container's net namespace, from the host."""
    p = subprocess.run(
        ["nsenter", "-t", str(_pid(j, ref)), "-n", *cmd],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return p.stdout


def _refused_and_still_running(j: Jaula, ref: str, *needles: str) -> str:
    """``jaula checkpoint ref`` is refused with a one-line message holding ``needles``, and
    the container runs on, every tick once.  Returns the message."""
    before = ticks(j, ref)[-1]
    p = j.run("checkpoint", ref, check=False)
    assert p.returncode == 125, f"the checkpoint was not refused: {p.stdout}{p.stderr}"
    msg = p.stderr.strip()
    assert len(msg.splitlines()) == 1, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    assert "nothing was frozen" in msg or "keeps running" in msg, msg
    assert inspect(j, ref)["State"]["Status"] == "running"
    wait_ticks(j, ref, before + 5)
    assert_continuous(ticks(j, ref))
    return msg


def test_addresses_and_routes_added_to_a_none_namespace_are_carried(jaula: Jaula) -> None:
    """Item 3: what the host added to a ``--network none`` namespace (an address, a route)
    comes back after checkpoint and restore (CRIU dumps the namespace instead of taking it
    as external and empty)."""
    jaula.run("run", "-d", "--name", "nn", "busybox", "sh", "-c", COUNTER)
    wait_ticks(jaula, "nn", 3)
    _in_netns(jaula, "nn", "ip", "addr", "add", "10.9.9.9/32", "dev", "lo")
    _in_netns(jaula, "nn", "ip", "route", "add", "10.77.0.0/16", "dev", "lo")
    jaula.run("checkpoint", "nn")
    jaula.run("restore", "nn")
    assert "10.9.9.9/32" in _in_netns(jaula, "nn", "ip", "-4", "addr", "show", "dev", "lo")
    assert "10.77.0.0/16" in _in_netns(jaula, "nn", "ip", "route", "show")
    last = ticks(jaula, "nn")[-1]
    wait_ticks(jaula, "nn", last + 3)
    assert_continuous(ticks(jaula, "nn"))


def test_an_interface_added_to_a_none_namespace_is_refused(jaula: Jaula) -> None:
    """Item 3: an interface CRIU cannot rebuild alone (here a veth pair, both ends in the
    container's namespace) is refused before the freeze, named."""
    jaula.run("run", "-d", "--name", "nv", "busybox", "sh", "-c", COUNTER)
    wait_ticks(jaula, "nv", 3)
    _in_netns(jaula, "nv", "ip", "link", "add", "jpf0", "type", "veth", "peer", "name", "jpf1")
    _refused_and_still_running(jaula, "nv", "jpf0 (veth)", "ip link del")


@pytest.fixture
def unix_server(tmp_path: Path) -> Iterator[tuple[Path, list[socket.socket]]]:
    """A UNIX stream listener of this (host) process in ``tmp_path/vol/srv.sock``, accepting
    in a thread; yields (the volume dir, the accepted connections)."""
    vol = tmp_path / "vol"
    vol.mkdir()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(vol / "srv.sock"))
    srv.listen()
    conns: list[socket.socket] = []

    def accept() -> None:
        try:
            while True:
                conns.append(srv.accept()[0])
        except OSError:
            return

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield vol, conns
    finally:
        srv.shutdown(socket.SHUT_RDWR)
        srv.close()
        t.join(10)
        for c in conns:
            c.close()


CLIENT = (
    "import socket, time\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
    "s.connect('/vol/srv.sock')\n"
    "while True: time.sleep(1)\n"
)


def test_a_unix_socket_connected_outside_is_refused_naming_path_and_peer(
    py: Jaula, unix_server: tuple[Path, list[socket.socket]]
) -> None:
    """Item 6: a UNIX stream connection to a process outside the container (this test,
    through a socket on a volume) is refused before the freeze, naming the socket's path and
    the peer's pid."""
    vol, conns = unix_server
    py.run(
        "run", "-d", "--name", "ux", "-v", f"{vol}:/vol", PY_IMAGE,
        "sh", "-c", f"python3 -c \"{CLIENT}\" & {COUNTER}",
    )  # fmt: skip
    wait_ticks(py, "ux", 3)
    from runtime.poll import wait_for

    assert wait_for(lambda: bool(conns), 15), "the container did not connect"
    _refused_and_still_running(py, "ux", "/vol/srv.sock", f"process {os.getpid()}")


#: watches /srv/watched (IN_CREATE | IN_DELETE) and appends the name of each event to
#: /srv/events; with argv[1] ``gone`` it also watches /srv/gone, kept open and then
#: deleted: a watch on a file that no name leads to
WATCHER = r"""
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs("/srv/watched", exist_ok=True)
fd = libc.inotify_init1(0)
assert libc.inotify_add_watch(fd, b"/srv/watched", 0x300) > 0
if sys.argv[1] == "gone":
    keep = open("/srv/gone", "w")
    assert libc.inotify_add_watch(fd, b"/srv/gone", 0x2) > 0
    os.unlink("/srv/gone")
open("/srv/watching", "w").close()
while True:
    buf = os.read(fd, 4096)
    while buf:
        _wd, _mask, _cookie, n = struct.unpack_from("iIII", buf)
        name = buf[16 : 16 + n].rstrip(b"\0")
        buf = buf[16 + n :]
        if name:
            with open("/srv/events", "ab") as f:
                f.write(name + b"\n")
"""


def _watcher(py: Jaula, name: str, mode: str) -> None:
    from runtime.poll import wait_for

    py.run("run", "-d", "--name", name, PY_IMAGE, "sh", "-c",
           f"python3 -c '{WATCHER}' {mode} & {COUNTER}")  # fmt: skip
    wait_ticks(py, name, 3)
    watching = lambda: py.run("exec", name, "test", "-e", "/srv/watching", check=False)
    assert wait_for(lambda: watching().returncode == 0, 15), "the watch was not set up"


def test_an_inotify_watch_on_a_path_is_carried_through_a_restore(py: Jaula) -> None:
    """Item 7: an inotify watch on the overlay root is dumped by its path (CRIU's irmap:
    overlayfs gives no file handle, "fsnotify: Can't dump that handle" after the freeze
    before), and after the restore it reports what happens in the watched directory."""
    from runtime.poll import wait_for

    _watcher(py, "iw", "path")
    py.run("exec", "iw", "touch", "/srv/watched/before")
    py.run("checkpoint", "iw")
    py.run("restore", "iw")
    py.run("exec", "iw", "touch", "/srv/watched/after")
    events = lambda: py.run("exec", "iw", "cat", "/srv/events", check=False).stdout.split()
    assert wait_for(lambda: "after" in events(), 15), events()
    assert events() == ["before", "after"]


def test_an_inotify_watch_on_a_deleted_file_is_refused_naming_it(py: Jaula) -> None:
    """A watch on a file no name leads to any more (deleted, kept open) has no path to
    watch again where it restores (zdtm's inotify00): refused, naming its inode."""
    _watcher(py, "ig", "gone")
    _refused_and_still_running(py, "ig", "inotify", "(deleted?)", "inode ")


#: a child that asks to be traced by its parent (the shell, which never waits for it):
#: traced, though running
TRACED_CHILD = (
    "python3 -c 'import ctypes, time; ctypes.CDLL(None).ptrace(0, 0, None, None); "
    "time.sleep(100000)' & "
)


def test_a_traced_task_is_refused_before_the_freeze(py: Jaula) -> None:
    """A task held by a tracer (ptrace: a debugger, strace, CRIU's zdtm ptrace_sig) cannot
    be seized by CRIU, which failed the dump after the freeze: refused, naming the task and
    its tracer, and the container runs on."""
    py.run("run", "-d", "--name", "tr", PY_IMAGE, "sh", "-c", TRACED_CHILD + COUNTER)
    wait_ticks(py, "tr", 3)
    _refused_and_still_running(py, "tr", "(python3) is traced by process", "(sh)")


#: a UDP socket with data held back by UDP_CORK (CRIU: "Can't dump corked dgram socket")
CORKED_UDP = (
    "import socket, time\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.setsockopt(socket.IPPROTO_UDP, 1, 1)\n"  # UDP_CORK
    "s.bind(('127.0.0.1', 4711))\n"
    "s.sendto(b'x' * 100, ('127.0.0.1', 9))\n"
    "open('/tmp/ready', 'w').close()\n"
    "while True: time.sleep(1)\n"
)

#: a listener with one connection its process never accepts (CRIU: "In-flight connection")
UNACCEPTED = (
    "import socket, time\n"
    "l = socket.socket()\n"
    "l.bind(('127.0.0.1', 4712))\n"
    "l.listen(4)\n"
    "c = socket.create_connection(('127.0.0.1', 4712))\n"
    "open('/tmp/ready', 'w').close()\n"
    "while True: time.sleep(1)\n"
)


@pytest.mark.parametrize(
    ("script", "needles"),
    [
        (CORKED_UDP, ("UDP socket on 127.0.0.1:4711", "with data not yet sent")),
        (UNACCEPTED, ("TCP listener on 127.0.0.1:4712", "1 connection not yet accepted")),
    ],
    ids=["corked-udp", "unaccepted-connection"],
)
def test_a_socket_queue_crius_refuses_is_refused_before_the_freeze(
    py: Jaula, script: str, needles: tuple[str, ...]
) -> None:
    """zdtm socket_udp-corked and socket-tcp-skip-in-flight: CRIU refused these queues
    after the freeze (the dump failed, the container was thawed); they are refused before
    it, naming the socket and its process."""
    (py.root / "q.py").write_text(script)
    py.run(
        "run",
        "-d",
        "--name",
        "sq",
        "-v",
        f"{py.root / 'q.py'}:/q.py:ro",
        PY_IMAGE,
        "sh",
        "-c",
        f"python3 /q.py & {COUNTER}",
    )
    from runtime.poll import wait_for

    ready = lambda: py.run("exec", "sq", "test", "-e", "/tmp/ready", check=False)
    assert wait_for(lambda: ready().returncode == 0, 15), py.out("logs", "sq")
    wait_ticks(py, "sq", 3)
    _refused_and_still_running(py, "sq", "(python3)", *needles)


#: a fanotify mark on the whole file system of / (FAN_MARK_FILESYSTEM), which CRIU's
#: fdinfo parser skips: the dump would succeed without it
FS_MARK = (
    "import ctypes, time\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,"
    " ctypes.c_char_p]\n"
    "fd = libc.fanotify_init(0, 0)\n"
    "assert fd >= 0, ctypes.get_errno()\n"
    "assert libc.fanotify_mark(fd, 0x101, 0x20, -100, b'/') == 0, ctypes.get_errno()\n"
    "open('/tmp/marked', 'w').close()\n"
    "while True: time.sleep(1)\n"
)


def test_a_fanotify_mark_on_a_whole_file_system_is_refused(py: Jaula) -> None:
    """CRIU would drop a FAN_MARK_FILESYSTEM mark without a word; refused, naming it."""
    from runtime.poll import wait_for

    py.run("run", "-d", "--privileged", "--name", "fm", PY_IMAGE, "sh", "-c",
           f'python3 -c "{FS_MARK}" & {COUNTER}')  # fmt: skip
    wait_ticks(py, "fm", 3)
    marked = lambda: py.run("exec", "fm", "test", "-e", "/tmp/marked", check=False)
    assert wait_for(lambda: marked().returncode == 0, 15), "the mark was not set up"
    _refused_and_still_running(py, "fm", "fanotify mark on the whole file system", "device ")
