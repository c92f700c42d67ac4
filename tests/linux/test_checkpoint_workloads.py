"""Checkpoint and restore of real workloads with real CRIU: a process tree, the filesystem,
IPC objects and file descriptors, memory from 16 MiB to 1 GiB, and redis with 100 000 keys.

Each container is checkpointed on ``jaula``, exported, imported into a second state root
(``jaula2``, another node) and restored there; the checks run against the copy.  The
workloads of the python image are ``tests/workloads/checkpoint_*.py``, passed with
``python3 -c``; memhog is in the memory image.  As in test_cases.py, a source container is
never removed while its copy runs (both state roots share the cgroup path of an id).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.helpers.containers import (
    host_pid,
    inspect,
    last_number,
    move,
    no_fail,
    stdout_lines,
    sysv_segments,
    wait_for,
    wait_lines,
)
from tests.helpers.images import WORKLOADS
from tests.helpers.jaula import Jaula
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


def workload(name: str) -> str:
    return (WORKLOADS / name).read_text()


def _import(j: Jaula, layout: Path, name: str) -> Jaula:
    j.run("image", "import", str(layout), "--name", name)
    return j


@pytest.fixture
def py(jaula: Jaula, python_image_layout: Path) -> Jaula:
    return _import(jaula, python_image_layout, "jaula-python:latest")


@pytest.fixture
def py2(jaula2: Jaula, python_image_layout: Path) -> Jaula:
    return _import(jaula2, python_image_layout, "jaula-python:latest")


def processes(j: Jaula, ref: str) -> list[tuple[str, str, bool, int]]:
    """(pid, ppid, is a zombie, threads) of every process of the container but the
    ``ps``."""
    rows = [
        ln.split() for ln in j.out("exec", ref, "ps", "-o", "pid,ppid,stat,comm").splitlines()[1:]
    ]
    out = []
    for pid, ppid, st, comm in rows:
        if comm == "ps":
            continue
        threads = j.out("exec", ref, "ls", f"/proc/{pid}/task").split()
        out.append((pid, ppid, st.startswith("Z"), len(threads)))
    return sorted(out)


def host_zombies_under(pid: int) -> list[str]:
    """Zombies among the host descendants of ``pid`` (as ``PID COMM``)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += map(int, (task / "children").read_text().split())
            except OSError:
                continue
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            found.append(f"{p} {stat.split('(', 1)[1].split(')')[0]}")
    return found


# -- a process tree -------------------------------------------------------------------------


def test_process_tree_with_threads_and_pipes(py: Jaula, py2: Jaula, tmp_path: Path) -> None:
    """An init with three children, threads in every process and a pipe pair to each child:
    after the move the same pids, parents, states and thread counts, the pipes carry the
    next round, every thread runs, and nothing is left a zombie, then or after the init
    reaps its children."""
    py.run(
        "run",
        "-d",
        "--name",
        "tree",
        "jaula-python",
        "python3",
        "-c",
        workload("checkpoint_tree.py"),
    )
    wait_lines(py, "tree", r"^round \d+ ", count=3)
    before = processes(py, "tree")
    # the children's pids depend on how their threads and the next fork interleave
    kids = sorted((p for p, _, _, _ in before[1:]), key=int)
    assert before == [("1", "0", False, 2), *((k, "1", False, 3) for k in kids)], before
    n = move(py, py2, "tree", tmp_path / "tree.tar")
    last = last_number(py, "tree", r"^round (\d+) ")
    assert processes(py2, "tree") == before
    after = wait_lines(py2, "tree", r"^round \d+ ", after=n, count=5)
    rounds = [int(ln.split()[1]) for ln in after]
    assert rounds[:2] == [last + 3, last + 6]
    spins = [[int(x) for x in ln.split()[3].split(",")] for ln in after]
    beats = [int(ln.split()[5]) for ln in after]
    assert all(b > a for a, b in zip(spins[0], spins[-1])) and beats[-1] > beats[0]
    monitor = inspect(py2, "tree")["State"]["MonitorPid"]
    assert host_zombies_under(monitor) == []
    py2.run("kill", "-s", "USR1", "tree")
    done = wait_lines(py2, "tree", r"^(reaped|all reaped)", after=n, count=4)
    assert done == [*(f"reaped {k} exit={10 + i}" for i, k in enumerate(kids)), "all reaped"]
    assert processes(py2, "tree") == [("1", "0", False, 2)]
    assert host_zombies_under(monitor) == []
    no_fail(py2, "tree")


# -- files ----------------------------------------------------------------------------------


def upper_entries(upper: Path, skip: set[str]) -> dict[str, tuple[object, ...]]:
    """The upper dir as the host sees it: type and mode, owner, device (whiteouts), size,
    content, link target and the overlay and user xattrs of every entry."""
    import os
    import stat

    out: dict[str, tuple[object, ...]] = {}
    for p in sorted(upper.rglob("*")):
        rel = str(p.relative_to(upper))
        if rel in skip:
            continue
        st = p.lstat()
        xattrs = sorted(
            (k, os.getxattr(p, k, follow_symlinks=False))
            for k in os.listxattr(p, follow_symlinks=False)
            if k.startswith("user.") or k == "trusted.overlay.opaque"
        )
        body: object = None
        if stat.S_ISREG(st.st_mode):
            body = p.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            body = os.readlink(p)
        out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_rdev, st.st_size, body, xattrs)
    return out


def test_files_written_open_and_deleted_are_identical_after_restore(
    py: Jaula, py2: Jaula, tmp_path: Path
) -> None:
    """Files written in the upper dir before the checkpoint, files open for writing during
    it (an appended log, a file rewritten in place), a file deleted while open, a file of
    the image deleted (whiteout), a directory of the image replaced (opaque), one changed
    (copy-up), a hardlink, a symlink, an xattr, a sparse file: all identical after the move,
    seen from inside and in the upper dir on the host."""
    live, rw = "/srv/live.log", "/srv/rw.dat"
    py.run(
        "run",
        "-d",
        "--name",
        "files",
        "jaula-python",
        "python3",
        "-c",
        workload("checkpoint_files.py"),
    )
    wait_lines(py, "files", r"^tick \d+ gone-ok")
    manifest = workload("tree_manifest.py")
    inside = json.loads(py.out("exec", "files", "python3", "-c", manifest, live, rw))
    assert "/etc/motd" not in inside and "/opt/data/a" not in inside
    bundle = tmp_path / "files.tar"
    n = move(py, py2, "files", bundle)
    assert json.loads(py2.out("exec", "files", "python3", "-c", manifest, live, rw)) == inside
    src_upper = Path(inspect(py, "files")["UpperDir"])
    dst_upper = Path(inspect(py2, "files")["UpperDir"])
    skip = {"srv/live.log", "srv/rw.dat"}
    assert upper_entries(dst_upper, skip) == upper_entries(src_upper, skip)
    motd = (dst_upper / "etc/motd").lstat()
    assert (motd.st_mode >> 12, motd.st_rdev) == (0o02, 0), "no whiteout for /etc/motd"
    import os

    assert os.getxattr(dst_upper / "opt/data", "trusted.overlay.opaque") == b"y"
    sparse = (dst_upper / "srv/static/sparse").stat()
    assert sparse.st_blocks * 512 < 1 << 20 < sparse.st_size, "the sparse file was filled"
    # the files open for writing: the checkpoint's content, then the writes after it
    at_ckpt = (src_upper / "srv/live.log").read_bytes()
    wait_lines(py2, "files", r"^tick \d+ ", after=n, count=2)
    now = py2.out("exec", "files", "cat", live).encode()
    assert now.startswith(at_ckpt) and len(now) > len(at_ckpt)
    seq = [int(x) for x in now.split()]
    assert seq == list(range(1, len(seq) + 1))
    counter = int(py2.out("exec", "files", "cat", rw)[:20])
    assert counter >= len(seq) - 1 and (dst_upper / "srv/rw.dat").stat().st_size == 64
    py2.run("exec", "files", "test", "!", "-e", "/srv/gone.txt")
    assert all(
        ln.endswith("gone-ok") for ln in stdout_lines(py2, "files")[n:] if ln.startswith("tick")
    )
    assert not [p for p in dst_upper.rglob("*") if p.name.startswith("link_remap.")]
    no_fail(py2, "files")


# -- IPC and file descriptors ---------------------------------------------------------------

PING = (
    "import socket; s = socket.create_connection(('127.0.0.1', 7000), timeout=5); "
    "s.sendall(b'ping'); print(s.recv(64).decode().strip())"
)


def test_ipc_objects_and_special_fds_survive_restore(py: Jaula, py2: Jaula, tmp_path: Path) -> None:
    """Unix sockets (a named stream socket with a message queued, a seqpacket pair to a
    child), a TCP listener and an established TCP connection in the container's net
    namespace, SysV and POSIX shared memory written by two processes, eventfd, a periodic
    timerfd, epoll over them, signalfd, flock and a POSIX lock: the workload checks each
    every 100 ms across the move (the timerfd for progress, not punctuality: the workload's
    docstring says why); from outside, a new connection from an ``exec`` reaches
    the listener, SIGUSR2 arrives through the signalfd, the locks are busy, the segments
    are there."""
    py.run(
        "run", "-d", "--name", "ipc", "jaula-python", "python3", "-c", workload("checkpoint_ipc.py")
    )
    wait_lines(py, "ipc", r"^tick 10 ok ")
    assert re.fullmatch(r"pong \d+\n", py.out("exec", "ipc", "python3", "-c", PING))
    shm = sysv_segments(py, "ipc")
    assert shm == [(str(0x5EED), "0", "600", str(64 << 12), "2")]
    n = move(py, py2, "ipc", tmp_path / "ipc.tar")
    after = wait_lines(py2, "ipc", r"^tick \d+ ok ", after=n, count=2)
    timers = [int(re.search(r"timer=(\d+)", ln).group(1)) for ln in after]  # type: ignore[union-attr]
    assert timers[1] - timers[0] >= 15, f"the 50 ms timerfd stopped firing: {after}"
    assert all(ln.endswith("interval=50000000") for ln in after)
    pong = py2.out("exec", "ipc", "python3", "-c", PING)
    assert re.fullmatch(r"pong \d+\n", pong) and int(pong.split()[1]) > 20
    assert sysv_segments(py2, "ipc") == shm
    assert py2.out("exec", "ipc", "stat", "-c", "%s", "/dev/shm/ipcwl").strip() == str(1 << 20)
    probe = py2.out("exec", "ipc", "python3", "/opt/cases/C08/locker.py", "probe", "/srv/lock")
    assert probe.strip() == "flock: busy (errno 11) -> OK; fcntl: busy (errno 11) -> OK"
    py2.run("kill", "-s", "USR2", "ipc")
    assert wait_lines(py2, "ipc", r"^signalfd got", after=n) == ["signalfd got 12"]
    m = len(stdout_lines(py2, "ipc"))
    wait_lines(py2, "ipc", r"^tick \d+ ok ", after=m, count=2)
    assert inspect(py2, "ipc")["State"]["Status"] == "running"
    no_fail(py2, "ipc")
    # allowed, not asserted (see the workload): a timer re-armed late across the restore
    print("timerfd late:", [ln for ln in stdout_lines(py2, "ipc") if "timerfd late" in ln])


# -- memory ---------------------------------------------------------------------------------


@pytest.fixture
def mem(jaula: Jaula, memory_image_layout: Path) -> Jaula:
    return _import(jaula, memory_image_layout, "jaula-mem:latest")


@pytest.fixture
def mem2(jaula2: Jaula, memory_image_layout: Path) -> Jaula:
    return _import(jaula2, memory_image_layout, "jaula-mem:latest")


def verify(j: Jaula, ref: str, timeout: float) -> int:
    """Send SIGUSR1 to memhog and return the counter of its ``VERIFY OK``."""
    n = len(stdout_lines(j, ref))
    j.run("kill", "-s", "USR1", ref)
    line = wait_lines(j, ref, r"^VERIFY ", after=n, timeout=timeout)[0]
    assert line.startswith("VERIFY OK "), line
    return int(line.split()[2])


@pytest.mark.parametrize(
    "mib", [16, 256, pytest.param(1024, marks=[pytest.mark.slow, pytest.mark.timeout(600)])]
)
def test_memhog_memory_is_intact_after_restore(
    mem: Jaula, mem2: Jaula, tmp_path: Path, mib: int
) -> None:
    """memhog with MIB MiB of touched, distinct pages, 1 % re-dirtied every 100 ms: after the
    move every page verifies (``VERIFY OK``) and the tick counter goes on from where it was.
    The 1 GiB one is marked ``slow`` (deselect with ``-m 'not slow'``); it takes about 20 s
    here."""
    t0 = time.monotonic()
    mem.run(
        "run",
        "-d",
        "--name",
        "m",
        "jaula-mem",
        "python3",
        "/opt/workloads/memhog.py",
        str(mib),
        "--dirty-pct",
        "1",
    )
    wait_lines(mem, "m", r"^READY 1$", timeout=60 + mib / 8)
    c0 = verify(mem, "m", timeout=30 + mib / 8)
    t1 = time.monotonic()
    bundle = tmp_path / "m.tar"
    mem.run("checkpoint", "m", "--export", str(bundle), timeout=120 + mib / 4)
    assert bundle.stat().st_size > mib << 20
    t2 = time.monotonic()
    mem2.run("restore", "--import", str(bundle), "--insecure-unsigned", timeout=120 + mib / 4)
    t3 = time.monotonic()
    c1 = verify(mem2, "m", timeout=30 + mib / 8)
    assert c1 > c0
    wait_for(lambda: verify(mem2, "m", timeout=30 + mib / 8) > c1, what="the counter to go on")
    print(
        f"memhog {mib} MiB: start+verify {t1 - t0:.1f} s, checkpoint+export {t2 - t1:.1f} s, "
        f"import+restore {t3 - t2:.1f} s, total {time.monotonic() - t0:.1f} s"
    )


# -- redis ----------------------------------------------------------------------------------

FILL = (
    "for i = 1, 100000 do redis.call('SET', 'key:' .. i, 'value:' .. i) end "
    "return redis.call('DBSIZE')"
)


@pytest.fixture
def rd(jaula: Jaula, redis_image_layout: Path) -> Jaula:
    return _import(jaula, redis_image_layout, "jaula-redis:latest")


@pytest.fixture
def rd2(jaula2: Jaula, redis_image_layout: Path) -> Jaula:
    return _import(jaula2, redis_image_layout, "jaula-redis:latest")


def redis_info(j: Jaula, ref: str) -> dict[str, str]:
    out = j.out("exec", ref, "redis-cli", "info", "server")
    return dict(ln.strip().split(":", 1) for ln in out.splitlines() if ":" in ln)


def test_redis_with_100000_keys_moves_to_another_state_root(
    rd: Jaula, rd2: Jaula, tmp_path: Path
) -> None:
    """redis-server holding 100 000 keys (filled by a Lua script: DEBUG POPULATE is off in
    this redis): after checkpoint, export, import into another state root and restore, the
    same DBSIZE, a key written before reads back, writes go on, and it is the same server:
    same run_id, process 1, uptime counted from its first start.  (``/proc/1/stat``'s start
    time cannot stay: CRIU restores into new tasks and the kernel has no way to set a task's
    start time, so INFO's run_id and uptime are the server's own record of it.)"""
    rd.run("run", "-d", "--name", "r", "jaula-redis")
    wait_for(
        lambda: rd.run("exec", "r", "redis-cli", "ping", check=False).stdout == "PONG\n",
        what="redis PONG",
    )
    assert rd.out("exec", "r", "redis-cli", "eval", FILL, "0") == "100000\n"
    assert rd.out("exec", "r", "redis-cli", "set", "before", "written-before") == "OK\n"
    info = redis_info(rd, "r")
    t_info = time.monotonic()
    assert info["process_id"] == "1"
    move(rd, rd2, "r", tmp_path / "r.tar")
    assert rd2.out("exec", "r", "redis-cli", "dbsize") == "100001\n"
    assert rd2.out("exec", "r", "redis-cli", "get", "before") == "written-before\n"
    assert rd2.out("exec", "r", "redis-cli", "get", "key:77777") == "value:77777\n"
    now = redis_info(rd2, "r")
    assert now["run_id"] == info["run_id"] and now["process_id"] == "1"
    elapsed = time.monotonic() - t_info
    assert int(info["uptime_in_seconds"]) + elapsed - 2 <= int(now["uptime_in_seconds"])
    assert int(now["uptime_in_seconds"]) <= int(info["uptime_in_seconds"]) + elapsed + 2
    assert rd2.out("exec", "r", "redis-cli", "set", "after", "written-after") == "OK\n"
    assert rd2.out("exec", "r", "redis-cli", "incr", "key:1:n") == "1\n"
    assert rd2.out("exec", "r", "redis-cli", "dbsize") == "100003\n"
    assert host_pid(rd2, "r") != 0 and inspect(rd2, "r")["State"]["Status"] == "running"
