"""The shared checkpoint/restore cases (``shared/cases/CASES.md``), each with real CRIU on the
workloads the python image carries under ``/opt/cases``.

For each case the right outcome is one of two: the workload goes on after checkpoint and
restore with the state the entry names intact, or a clear refusal before anything is frozen,
with the container still running unchanged and nothing half-made.  The move is the one to
"another node": ``checkpoint --export`` on ``jaula``, ``restore --import`` on ``jaula2`` (a
second state root), unless the case is about something local (C17).

Two state roots on one host share the cgroup path of a container id (``/jaula/<id>``), so a
test never removes the source container while its copy runs on ``jaula2``: the fixtures
tear ``jaula2`` down first.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
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
from tests.helpers.jaula import JAULA, Jaula
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]

CASES = "/opt/cases"


# -- helpers --------------------------------------------------------------------------------


@pytest.fixture
def py(jaula: Jaula, python_image_layout: Path) -> Jaula:
    jaula.run("image", "import", str(python_image_layout), "--name", "jaula-python:latest")
    return jaula


@pytest.fixture
def py2(jaula2: Jaula, python_image_layout: Path) -> Jaula:
    jaula2.run("image", "import", str(python_image_layout), "--name", "jaula-python:latest")
    return jaula2


def assert_refused_and_untouched(
    j: Jaula, ref: str, p: subprocess.CompletedProcess[str], *words: str
) -> None:
    """``p`` (a checkpoint) was refused with one clear line naming ``words``, and the
    container still runs with nothing made: no bundle, not frozen."""
    assert p.returncode == 125, (p.stdout, p.stderr)
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    for w in words:
        assert w in p.stderr, (w, p.stderr)
    assert "keeps running" in p.stderr
    info = inspect(j, ref)
    assert info["State"]["Status"] == "running"
    assert not (Path(info["UpperDir"]).parent / "checkpoint").exists(), "a bundle was begun"
    freezer = info["CgroupPaths"].get("freezer")
    if freezer:
        assert Path(freezer, "freezer.state").read_text().strip() == "THAWED"


def assert_nothing_made(j: Jaula) -> None:
    """A refused import left no container, and nothing in the state root's tmp."""
    assert j.container_ids() == []
    assert not list((j.root / "tmp").glob("*"))


def bundle_file(bundle: Path, path: str) -> bytes:
    """The content of ``path`` (relative to the container's /) in the bundle's upperdir tar."""
    with tarfile.open(bundle) as outer:
        diff = outer.extractfile("rootfs-diff.tar")
        assert diff is not None
        with tarfile.open(fileobj=io.BytesIO(diff.read())) as inner:
            member = inner.extractfile(f"./{path.lstrip('/')}")
            assert member is not None
            return member.read()


def exec_py(j: Jaula, ref: str, code: str) -> str:
    return j.out("exec", ref, "python3", "-c", code)


# -- C05 ------------------------------------------------------------------------------------


def test_c05_deleted_open_mmapped_files_travel_as_ghosts(
    py: Jaula, py2: Jaula, tmp_path: Path
) -> None:
    """C05: (a) a 3 MiB file of the upper dir and (b) a file of the image (lower layer),
    opened, mapped and deleted.  (b) failed the dump ("Can't create link remap"): through
    overlayfs the deleted lower file still has a link count of 1, and jaula did not pass
    link_remap; with it CRIU falls back to a ghost file."""
    src = f"{CASES}/C05/deleted_open.c"
    py.run("run", "-d", "--name", "c05", "jaula-python", f"{CASES}/C05/deleted_open")
    py.run("run", "-d", "--name", "c05l", "jaula-python", f"{CASES}/C05/deleted_open", src)
    want = {}
    for ref, path in (("c05", "/tmp/c05.data"), ("c05l", src)):
        first = wait_lines(py, ref, r"^deleted ")[0]
        assert first.startswith(f"deleted {path} ")
        want[ref] = re.search(r"sum=([0-9a-f]+)", first).group(1)  # type: ignore[union-attr]
        wait_lines(py, ref, r"^OK sum=")
    for ref, path in (("c05", "/tmp/c05.data"), ("c05l", src)):
        bundle = tmp_path / f"{ref}.tar"
        n = move(py, py2, ref, bundle)
        with tarfile.open(bundle) as tf:
            assert any(m.startswith("criu/ghost-file-") for m in tf.getnames())
        after = wait_lines(py2, ref, r"^(OK|FAIL) ", after=n, count=2)
        assert all(ln.startswith(f"OK sum={want[ref]} ") for ln in after), after
        no_fail(py2, ref)
        py2.run("exec", ref, "test", "!", "-e", path)
        upper = Path(inspect(py2, ref)["UpperDir"])
        helpers = [
            p
            for p in upper.rglob("*")
            if p.name.startswith("link_remap.") or ".cr." in p.name or "ghost" in p.name
        ]
        assert helpers == [], helpers


# -- C06 ------------------------------------------------------------------------------------

READ_SEG = """
import mmap, struct
with open('/dev/shm/c06.seg', 'r+b') as f:
    m = mmap.mmap(f.fileno(), 1 << 20)
    v = struct.unpack_from('Q', m, 0)[0]
    bad = [i for i in range(1, min(v, 100000)) if struct.unpack_from('Q', m, 8 * i)[0] != i]
    print(v, len(bad), bad[:5])
"""


def test_c06_posix_shm_file_in_dev_shm_arrives_with_its_content(
    py: Jaula, py2: Jaula, tmp_path: Path
) -> None:
    """C06: a /dev/shm file mapped by a writer and a reader.  The container's /dev/shm is a
    tmpfs of its own mount namespace, so CRIU carries its files.  Every slot the writer
    filled before the checkpoint still holds its value, and the counter goes on without
    stepping back.  (The real app of the report, PostgreSQL, is not in the test images.)"""
    py.run("run", "-d", "--name", "c06", "jaula-python", "python3", f"{CASES}/C06/posix_shm.py")
    wait_lines(py, "c06", r"^counter 20 file present: True")
    v0 = int(exec_py(py, "c06", READ_SEG).split()[0])
    n = move(py, py2, "c06", tmp_path / "c06.tar")
    after = wait_lines(py2, "c06", r"^counter \d+ ", after=n)
    assert after[0].endswith("file present: True")
    assert int(after[0].split()[1]) > v0
    v1, bad, first_bad = exec_py(py2, "c06", READ_SEG).split(maxsplit=2)
    assert int(v1) > v0 and bad == "0", first_bad
    assert py2.out("exec", "c06", "stat", "-c", "%s %a", "/dev/shm/c06.seg").split() == [
        str(1 << 20),
        "600",
    ]
    no_fail(py2, "c06")


# -- C07 ------------------------------------------------------------------------------------


def test_c07_sysv_shm_segment_comes_back_in_the_private_ipc_namespace(
    py: Jaula, py2: Jaula, tmp_path: Path
) -> None:
    """C07 with a private IPC namespace (jaula's only kind): the segment is recreated with the
    same key, id, mode, size and attach count, and the counter continues."""
    py.run("run", "-d", "--name", "c07", "jaula-python", f"{CASES}/C07/sysv_shm")
    wait_lines(py, "c07", r"^counter=\d+ ", count=2)
    before = sysv_segments(py, "c07")
    assert before == [("3079", "0", "600", str(1 << 20), "2")]  # key 0xC07
    n = move(py, py2, "c07", tmp_path / "c07.tar")
    last = last_number(py, "c07", r"^counter=(\d+) ")
    assert sysv_segments(py2, "c07") == before
    after = wait_lines(py2, "c07", r"^counter=\d+ ", after=n, count=2)
    values = [int(ln.split()[0].split("=")[1]) for ln in after]
    assert values[:2] == [last + 20, last + 40]
    no_fail(py2, "c07")


def test_c07_ipc_namespace_is_never_shared(py: Jaula) -> None:
    """C07, negative variant (a container sharing the host's or another container's IPC
    namespace must be refused): impossible in jaula by construction, every container's init
    unshares CLONE_NEWIPC (runtime/init_process.py) and ``jaula run`` has no option to share
    one.  Tested here: two containers and the host are in three IPC namespaces, and each
    container has a segment with key 0xC07 of its own."""
    py.run("run", "-d", "--name", "a", "jaula-python", f"{CASES}/C07/sysv_shm")
    py.run("run", "-d", "--name", "b", "jaula-python", f"{CASES}/C07/sysv_shm")
    for ref in ("a", "b"):
        wait_lines(py, ref, r"^key=0xc07 shmid=0 ")
    ns = {os.readlink(f"/proc/{host_pid(py, ref)}/ns/ipc") for ref in ("a", "b")}
    ns.add(os.readlink("/proc/self/ns/ipc"))
    assert len(ns) == 3, ns
    for ref in ("a", "b"):
        assert sysv_segments(py, ref) == [("3079", "0", "600", str(1 << 20), "2")]


# -- C08 ------------------------------------------------------------------------------------


def locks_of(pid: int) -> list[list[str]]:
    """/proc/locks entries (split) held by host pid ``pid``."""
    return [
        ln.split()
        for ln in Path("/proc/locks").read_text().splitlines()
        if ln.split()[1] != "->" and ln.split()[4] == str(pid)
    ]


def test_c08_flock_and_fcntl_locks_are_held_after_restore(
    py: Jaula, py2: Jaula, tmp_path: Path
) -> None:
    """C08: flock and a POSIX record lock (bytes 100-109) come back held by the restored
    process: a separate process finds both busy, /proc/locks names the restored pid."""
    lock = "/data/c08.lock"
    py.run(
        "run",
        "-d",
        "--name",
        "c08",
        "jaula-python",
        "python3",
        f"{CASES}/C08/locker.py",
        "hold",
        lock,
    )
    wait_lines(py, "c08", r"tick 2$")
    n = move(py, py2, "c08", tmp_path / "c08.tar")
    probe = py2.out("exec", "c08", "python3", f"{CASES}/C08/locker.py", "probe", lock)
    assert probe.strip() == "flock: busy (errno 11) -> OK; fcntl: busy (errno 11) -> OK"
    held = locks_of(host_pid(py2, "c08"))
    assert sorted(e[1] for e in held) == ["FLOCK", "POSIX"], held
    posix = next(e for e in held if e[1] == "POSIX")
    assert posix[3] == "WRITE" and posix[6:8] == ["100", "109"], posix
    wait_lines(py2, "c08", r"tick \d+$", after=n, count=2)


def test_c08_lock_shared_with_a_process_outside_is_refused(py: Jaula, tmp_path: Path) -> None:
    """C08, negative: the lock file is on a volume and a host process also holds a lock on
    it (bytes 0-9, which do not conflict).  Moving the container's locks away would break
    that sharing: refused before the freeze, the container keeps its locks and runs on."""
    import fcntl

    vol = tmp_path / "vol"
    vol.mkdir()
    py.run(
        "run",
        "-d",
        "--name",
        "c08s",
        "-v",
        f"{vol}:/data",
        "jaula-python",
        "python3",
        f"{CASES}/C08/locker.py",
        "hold",
        "/data/c08.lock",
    )
    wait_lines(py, "c08s", r"tick 1$")
    with open(vol / "c08.lock", "a+") as f:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
        p = py.run("checkpoint", "c08s", check=False)
        assert_refused_and_untouched(py, "c08s", p, "locked", str(os.getpid()), "outside")
    assert sorted(e[1] for e in locks_of(host_pid(py, "c08s"))) == ["FLOCK", "POSIX"]
    n = len(stdout_lines(py, "c08s"))
    wait_lines(py, "c08s", r"tick \d+$", after=n)


# -- C09 ------------------------------------------------------------------------------------


def ps(j: Jaula, ref: str) -> list[tuple[str, str, str]]:
    """(pid, stat, command) of every process of the container, but the ``ps`` itself."""
    rows = [
        ln.split(None, 2) for ln in j.out("exec", ref, "ps", "-o", "pid,stat,args").splitlines()[1:]
    ]
    return sorted((r[0], r[1], r[2]) for r in rows if not r[2].startswith("ps "))


def test_c09_zombies_come_back_with_their_pids_and_exit_codes(
    py: Jaula, py2: Jaula, tmp_path: Path
) -> None:
    """C09: three unreaped children (exit 7, 9, 42), a middle process with a zombie of its
    own and a sleeper.  Same pids and states after the move; reaping gives the codes."""
    py.run("run", "-d", "--name", "c09", "jaula-python", "python3", f"{CASES}/C09/zombie_tree.py")
    wait_lines(py, "c09", r"^parent 1 unreaped children \[2, 3, 4\]")
    wait_for(lambda: sum(s == "Z" for _, s, _ in ps(py, "c09")) == 4, what="4 zombies")
    before = ps(py, "c09")
    n = move(py, py2, "c09", tmp_path / "c09.tar")
    assert ps(py2, "c09") == before
    py2.run("kill", "-s", "USR1", "c09")
    reaped = wait_lines(py2, "c09", r"^reaped ", after=n, count=3)
    assert reaped == ["reaped 2 exit=7 OK", "reaped 3 exit=9 OK", "reaped 4 exit=42 OK"]
    assert [z for z in ps(py2, "c09") if z[1] == "Z"] == [z for z in before if z[0] == "6"]


def test_c09_zombie_left_by_an_exec_is_checkpointable(
    py: Jaula, py2: Jaula, tmp_path: Path
) -> None:
    """C09 variant: an init that never reaps and ``exec ctr sh -c 'sleep 2 &'``.  jaula
    starts exec'd programs in a session of their own, so the zombie's session id is a pid of
    the container, and the tree dumps and restores."""
    py.run("run", "-d", "--name", "c09x", "jaula-python", "sleep", "infinity")
    py.run("exec", "c09x", "sh", "-c", "sleep 2 &")
    time.sleep(3)
    before = ps(py, "c09x")
    assert [s for _, s, _ in before] == ["S", "Z"], before
    move(py, py2, "c09x", tmp_path / "c09x.tar")
    assert ps(py2, "c09x") == before


def test_c09_process_whose_session_leader_is_outside_is_refused(py: Jaula) -> None:
    """C09, negative: a process entered from the host without a session of its own
    (``nsenter``, not ``jaula exec``) leaves a zombie whose session leader is outside the
    container (session id 0 inside).  CRIU would fail on it after freezing: the preflight
    refuses first, naming it."""
    if shutil.which("nsenter") is None:
        pytest.skip("nsenter (util-linux) is not installed")
    py.run("run", "-d", "--name", "c09n", "jaula-python", "sleep", "infinity")
    pid = host_pid(py, "c09n")
    subprocess.run(
        ["nsenter", "-t", str(pid), "-p", "-m", "--", "sh", "-c", "sleep 0.2 &"],
        check=True,
        timeout=10,
    )
    wait_for(lambda: "Z" in [s for _, s, _ in ps(py, "c09n")], what="the zombie")
    p = py.run("checkpoint", "c09n", check=False)
    assert_refused_and_untouched(py, "c09n", p, "zombie process", "session", "outside")


# -- C11 ------------------------------------------------------------------------------------


def test_c11_fifo_travels_with_the_upper_dir_and_its_data_once(
    py: Jaula, py2: Jaula, tmp_path: Path
) -> None:
    """C11: a FIFO in the upper dir between a fast writer and a slow reader.  The node
    travels in the upper dir (the rootfs diff took FIFOs for devices and refused them), the
    reader goes on with the next number: nothing lost, nothing twice."""
    py.run(
        "run",
        "-d",
        "--name",
        "c11",
        "jaula-python",
        "sh",
        f"{CASES}/C11/fifo_pair.sh",
        "/tmp/c11.fifo",
    )
    wait_lines(py, "c11", r"^reader at \d+$")
    n = move(py, py2, "c11", tmp_path / "c11.tar")
    last = last_number(py, "c11", r"^reader at (\d+)$")
    py2.run("exec", "c11", "test", "-p", "/tmp/c11.fifo")
    at = [int(ln.split()[-1]) for ln in wait_lines(py2, "c11", r"^reader at \d+$", after=n)]
    assert at[0] == last + 500
    no_fail(py2, "c11")


def test_c11_fifo_on_a_volume_is_refused(py: Jaula, tmp_path: Path) -> None:
    """C11, negative: the FIFO is on a volume, which the checkpoint does not ship; it could
    be missing where the container is restored ("Can't open fake fifo"): refused."""
    vol = tmp_path / "vol"
    vol.mkdir()
    py.run(
        "run",
        "-d",
        "--name",
        "c11v",
        "-v",
        f"{vol}:/data",
        "jaula-python",
        "sh",
        f"{CASES}/C11/fifo_pair.sh",
        "/data/c11.fifo",
    )
    wait_lines(py, "c11v", r"^reader at \d+$")
    p = py.run("checkpoint", "c11v", check=False)
    assert_refused_and_untouched(py, "c11v", p, "FIFO /data/c11.fifo", "not shipped")
    n = len(stdout_lines(py, "c11v"))
    wait_lines(py, "c11v", r"^reader at \d+$", after=n)
    no_fail(py, "c11v")


# -- C12 ------------------------------------------------------------------------------------

PIPE_OF_INIT = """
import fcntl, os
fd = os.open('/proc/1/fd/3', os.O_RDONLY | os.O_NONBLOCK)
st = os.fstat(fd)
print(fcntl.fcntl(fd, 1032), st.st_uid, st.st_gid, oct(st.st_mode))
"""


@pytest.fixture
def pipe_max_size() -> Iterator[Path]:
    """``/proc/sys/fs/pipe-max-size``, written back to its value when the test ends."""
    path = Path("/proc/sys/fs/pipe-max-size")
    old = path.read_text()
    try:
        yield path
    finally:
        path.write_text(old)
    assert path.read_text() == old


def test_c12_enlarged_pipe_keeps_its_size_and_its_blocks(
    py: Jaula, py2: Jaula, tmp_path: Path
) -> None:
    """C12: a 1 MiB pipe (F_SETPIPE_SZ), full of numbered 4 KiB blocks at the checkpoint.
    After the move: the same size, owner and mode, and the blocks go on in order.  (The
    entry asks for an unprivileged container; see the next test for why jaula refuses that
    on this node.  Root here lacks CAP_SYS_RESOURCE too, so 1 MiB, the node's
    fs.pipe-max-size, is as far as an unprivileged process could go.)"""
    py.run("run", "-d", "--name", "c12", "jaula-python", "python3", f"{CASES}/C12/bigpipe.py")
    before = exec_py(py, "c12", PIPE_OF_INIT).split()
    assert before[0] == str(1 << 20)
    wait_lines(py, "c12", r"^block \d+ pipe size")
    n = move(py, py2, "c12", tmp_path / "c12.tar")
    last = last_number(py, "c12", r"^block (\d+) pipe size")
    assert exec_py(py2, "c12", PIPE_OF_INIT).split() == before
    after = wait_lines(py2, "c12", r"^block \d+ pipe size", after=n)
    assert int(after[0].split()[1]) == last + 100
    assert after[0].endswith(f"pipe size {1 << 20}")
    no_fail(py2, "c12")


def test_c12_target_with_a_smaller_pipe_max_size_refuses_the_import(
    py: Jaula, py2: Jaula, tmp_path: Path, pipe_max_size: Path
) -> None:
    """C12, negative: the target's fs.pipe-max-size (512 KiB) is below the 1 MiB pipe and it
    lacks CAP_SYS_RESOURCE: CRIU's F_SETPIPE_SZ would fail mid-restore with EPERM.  The
    import refuses before making anything; the source (checkpointed with --leave-running)
    runs on."""
    from migrate.checkpoint import has_cap_sys_resource

    if has_cap_sys_resource():
        pytest.skip("this node has CAP_SYS_RESOURCE: any pipe size can be restored")
    py.run("run", "-d", "--name", "c12n", "jaula-python", "python3", f"{CASES}/C12/bigpipe.py")
    wait_lines(py, "c12n", r"^block 100 ")
    bundle = tmp_path / "c12n.tar"
    py.run("checkpoint", "--leave-running", "c12n", "--export", str(bundle))
    pipe_max_size.write_text(str(512 << 10))
    p = py2.run("restore", "--import", str(bundle), "--insecure-unsigned", check=False)
    assert p.returncode == 125 and len(p.stderr.splitlines()) == 1, p.stderr
    assert "fs.pipe-max-size is 524288" in p.stderr and "1048576" in p.stderr
    assert_nothing_made(py2)
    assert inspect(py, "c12n")["State"]["Status"] == "running"
    n = len(stdout_lines(py, "c12n"))
    wait_lines(py, "c12n", r"^block \d+ ", after=n)


def test_c12_unprivileged_container_is_refused_without_cap_sys_resource(py: Jaula) -> None:
    """C12's unprivileged run (jaula has no user namespaces; ``-u 65534`` is its unprivileged
    container): CRIU reads every task's rlimits with prlimit(), which the kernel refuses for
    another uid without CAP_SYS_RESOURCE, so on this node the dump would fail after the
    freeze ("Can't get rlimit").  The preflight refuses first."""
    from migrate.checkpoint import has_cap_sys_resource

    py.run(
        "run",
        "-d",
        "-u",
        "65534",
        "--name",
        "c12u",
        "jaula-python",
        "python3",
        f"{CASES}/C12/bigpipe.py",
        str(256 << 10),
    )
    wait_lines(py, "c12u", r"^block 100 ")
    p = py.run("checkpoint", "c12u", check=False)
    if has_cap_sys_resource():
        assert p.returncode == 0, p.stderr
        return
    assert_refused_and_untouched(py, "c12u", p, "uid 65534", "CAP_SYS_RESOURCE")


# -- C16 ------------------------------------------------------------------------------------


def test_c16_open_log_file_is_identical_on_the_target(
    py: Jaula, py2: Jaula, tmp_path: Path
) -> None:
    """C16: a log file kept open for append plus a read fd following it.  On the target the
    file is the checkpoint's byte for byte, appends land at its end, the read fd goes on
    from its offset, the sequence goes on by +1."""
    log = "/var/log/c16.log"
    py.run("run", "-d", "--name", "c16", "jaula-python", "python3", f"{CASES}/C16/appender.py", log)
    wait_lines(py, "c16", r"^seq 25 ")
    bundle = tmp_path / "c16.tar"
    n = move(py, py2, "c16", bundle)
    at_checkpoint = bundle_file(bundle, log)
    assert at_checkpoint.endswith(b"\n") and len(at_checkpoint.split()) >= 25
    wait_lines(py2, "c16", r"^seq \d+ ", after=n)
    now = py2.out("exec", "c16", "cat", log).encode()
    assert now.startswith(at_checkpoint) and b"\0" not in now
    seq = [int(x) for x in now.split()]
    assert seq == list(range(1, len(seq) + 1)) and len(seq) > len(at_checkpoint.split())
    no_fail(py2, "c16")


def test_c16_rootfs_that_cannot_be_made_identical_is_refused(
    py: Jaula, py2: Jaula, tmp_path: Path
) -> None:
    """C16, negative: the bundle's upper dir was altered on the way (one byte).  The import
    refuses it on its digest before making anything; the source runs on."""
    py.run(
        "run",
        "-d",
        "--name",
        "c16n",
        "jaula-python",
        "python3",
        f"{CASES}/C16/appender.py",
        "/var/log/c16.log",
    )
    wait_lines(py, "c16n", r"^seq 25 ")
    good, bad = tmp_path / "good.tar", tmp_path / "bad.tar"
    py.run("checkpoint", "--leave-running", "c16n", "--export", str(good))
    with tarfile.open(good) as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()  # type: ignore[union-attr]
            if m.name == "rootfs-diff.tar":
                at = data.index(b"1\n2\n3\n4\n")
                data = data[:at] + b"7" + data[at + 1 :]
            dst.addfile(m, io.BytesIO(data))
    p = py2.run("restore", "--import", str(bad), check=False)
    assert p.returncode == 125 and "rootfs-diff.tar" in p.stderr and "sha256" in p.stderr
    assert_nothing_made(py2)
    n = len(stdout_lines(py, "c16n"))
    wait_lines(py, "c16n", r"^seq \d+ ", after=n)
    no_fail(py, "c16n")


# -- C17 ------------------------------------------------------------------------------------


def test_c17_leave_running_checkpoint_restores_the_file_as_it_was(py: Jaula) -> None:
    """C17 (local: rolling back to an older checkpoint): checkpoint with --leave-running,
    let the file grow for 4 s (the entry says 10), stop, restore that checkpoint.  The
    upper dir was taken while the tasks were frozen, so the file goes back to exactly 1..N
    and the process writes N+1 next.  ``restore`` of a stopped container refused it as "not
    checkpointed" before; now it rolls back to the kept checkpoint."""
    out = "/data/c17.out"
    py.run("run", "-d", "--name", "c17", "jaula-python", "python3", f"{CASES}/C17/grower.py", out)
    wait_lines(py, "c17", r"^n=20 ")
    py.run("checkpoint", "--leave-running", "c17")
    info = inspect(py, "c17")
    bundle = Path(info["UpperDir"]).parent / "checkpoint"
    with tarfile.open(bundle / "rootfs-diff.tar") as tf:
        snap = tf.extractfile("./data/c17.out").read()  # type: ignore[union-attr]
    n_at = len(snap.split())
    assert snap == b"".join(b"%d\n" % i for i in range(1, n_at + 1))
    time.sleep(4)
    grown = len(py.out("exec", "c17", "cat", out).split())
    assert grown > n_at + 20
    py.run("stop", "-t", "1", "c17")
    n = len(stdout_lines(py, "c17"))
    py.run("restore", "c17")
    now = py.out("exec", "c17", "cat", out).encode()
    assert now.startswith(snap)
    seq = [int(x) for x in now.split()]
    assert seq == list(range(1, len(seq) + 1)) and n_at <= len(seq) < grown
    wait_for(
        lambda: len(py.out("exec", "c17", "cat", out).split()) > n_at + 5,
        what="the file to grow again",
    )
    wait_lines(py, "c17", r"^n=\d+ ", after=n)
    assert inspect(py, "c17")["State"]["Status"] == "running"
    no_fail(py, "c17")


# -- C19 ------------------------------------------------------------------------------------

LIMIT_FILES = {
    "memory": (
        "memory.limit_in_bytes",
        "memory.memsw.limit_in_bytes",
        "memory.soft_limit_in_bytes",
        "memory.max",
        "memory.high",
    ),
    "pids": ("pids.max",),
    "cpu": ("cpu.cfs_quota_us", "cpu.cfs_period_us", "cpu.max"),
    "": ("memory.max", "memory.high", "pids.max", "cpu.max"),
}


def limits(j: Jaula, ref: str) -> dict[str, str]:
    """The limits in the container's cgroup files, as the host sees them (v1 or v2)."""
    out = {}
    for ctrl, d in inspect(j, ref)["CgroupPaths"].items():
        for f in LIMIT_FILES.get(ctrl, ()):
            if Path(d, f).exists():
                out[f] = Path(d, f).read_text().strip()
    return out


def probe_limits(j: Jaula, ref: str) -> None:
    """``limits.sh probe`` and a 128 MiB allocation: both stopped inside the container."""
    # The output goes to a file: the background sleeps would hold a pipe open for 30 s.
    j.run(
        "exec", ref, "sh", "-c", f"sh {CASES}/C19/limits.sh probe >/tmp/probe.out 2>&1", check=False
    )
    out = j.out("exec", ref, "cat", "/tmp/probe.out")
    # busybox sh gives up the whole script when fork fails: then only its complaint is left
    m = re.search(r"started (\d+) background sleeps", out)
    assert (m and int(m.group(1)) < 32) or "can't fork" in out, out
    leftover = [
        ln.split()[0]
        for ln in j.out("exec", ref, "ps", "-o", "pid,args").splitlines()
        if ln.split()[1:] == ["sleep", "30"]
    ]
    if leftover:
        j.run("exec", ref, "kill", *leftover)
    dd = j.run("exec", ref, "dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1", check=False)
    assert dd.returncode != 0, "a 128 MiB buffer fit under a 64 MiB limit"
    assert inspect(j, ref)["State"]["Status"] == "running"


def test_c19_memory_pids_and_cpu_limits_hold_after_restore(
    py: Jaula, py2: Jaula, tmp_path: Path
) -> None:
    """C19: a container with 64 MiB of memory, 32 pids and half a CPU.  The restored tasks
    live in a cgroup with the same limits (the cgroup files compared; ``limits.sh show`` too,
    which reads them from inside on cgroup v2 only), forks stop near 32, a 128 MiB buffer is
    refused or OOM-killed inside, and a further checkpoint and restore work."""
    py.run(
        "run",
        "-d",
        "--name",
        "c19",
        "--memory",
        "64m",
        "--pids-limit",
        "32",
        "--cpus",
        "0.5",
        "jaula-python",
        "sh",
        f"{CASES}/C19/limits.sh",
        "idle",
    )
    want = limits(py, "c19")
    assert want.get("pids.max") == "32" and str(64 << 20) in want.values(), want
    show = py.out("exec", "c19", "sh", f"{CASES}/C19/limits.sh", "show")
    move(py, py2, "c19", tmp_path / "c19.tar")
    assert limits(py2, "c19") == want
    # the cgroup parent is per state root (two roots may hold one id): compare the rest
    same_parent = re.compile(r"/jaula[-0-9a-f]*/")
    assert same_parent.sub(
        "/P/", py2.out("exec", "c19", "sh", f"{CASES}/C19/limits.sh", "show")
    ) == same_parent.sub("/P/", show)
    probe_limits(py2, "c19")
    py2.run("checkpoint", "c19")
    py2.run("restore", "c19")
    assert limits(py2, "c19") == want
    probe_limits(py2, "c19")


def test_c19_target_that_cannot_provide_the_limits_refuses(
    py: Jaula, py2: Jaula, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C19, negative: (a) a bundle made on a node of the other cgroup version (the manifest
    says so) and (b) a node without the pids controller are refused before anything is
    made; the source runs on."""
    from migrate import restore as rs
    from migrate.errors import PreflightError
    from runtime.cgroups import CgroupMode, detect_mode
    from runtime.container import Runtime

    py.run(
        "run",
        "-d",
        "--name",
        "c19n",
        "--memory",
        "64m",
        "--pids-limit",
        "32",
        "jaula-python",
        "sh",
        f"{CASES}/C19/limits.sh",
        "idle",
    )
    good = tmp_path / "good.tar"
    py.run("checkpoint", "--leave-running", "c19n", "--export", str(good))
    other = "hybrid" if detect_mode() is CgroupMode.UNIFIED else "unified"
    moved = tmp_path / "other-cgroups.tar"
    with tarfile.open(good) as src, tarfile.open(moved, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()  # type: ignore[union-attr]
            if m.name == "manifest.json":
                manifest = json.loads(data)
                manifest["cgroup_mode"] = other
                data = json.dumps(manifest).encode()
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    p = py2.run("restore", "--import", str(moved), "--insecure-unsigned", check=False)
    assert p.returncode == 125 and f"({other})" in p.stderr and "same cgroup version" in p.stderr
    assert_nothing_made(py2)

    have = rs._controllers_here(detect_mode())
    monkeypatch.setattr(rs, "_controllers_here", lambda mode: have - {"pids"})
    with pytest.raises(PreflightError, match="no pids cgroup controller"):
        rs.restore(Runtime(py2.root), import_file=good, insecure_unsigned=True)
    assert_nothing_made(py2)
    assert inspect(py, "c19n")["State"]["Status"] == "running"


# -- C26 ------------------------------------------------------------------------------------


def test_c26_sealed_memfd_still_execs_after_restore(py: Jaula, py2: Jaula, tmp_path: Path) -> None:
    """C26: a sealed memfd holding a copy of echo, mapped, run with fexecve every 2 s.  After
    the move each round prints OK: same checksum, same seals, exec status 0."""
    py.run("run", "-d", "--name", "c26", "jaula-python", "python3", f"{CASES}/C26/memfd_exec.py")
    wait_lines(py, "c26", r"^OK round=")
    n = move(py, py2, "c26", tmp_path / "c26.tar")
    last = last_number(py, "c26", r"^OK round=(\d+) ")
    after = wait_lines(py2, "c26", r"^(OK|FAIL) round=", after=n, count=2)
    assert all(ln.startswith("OK ") and ln.endswith("exec_status=0") for ln in after), after
    rounds = [int(ln.split()[1].split("=")[1]) for ln in after]
    assert rounds[:2] == [last + 1, last + 2]
    assert f"payload-ran-{rounds[0]}" in stdout_lines(py2, "c26")
    no_fail(py2, "c26")


SECRETMEM = """
import ctypes, os, mmap, sys, time
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.syscall(447, 0)  # memfd_secret (x86_64, aarch64)
if fd < 0:
    print('unsupported', ctypes.get_errno(), flush=True)
    sys.exit(0)
os.ftruncate(fd, 4096)
m = mmap.mmap(fd, 4096)
m[:6] = b'secret'
print('ready', flush=True)
while True:
    time.sleep(0.1)
"""


def test_c26_memfd_secret_is_refused(py: Jaula) -> None:
    """C26, negative: memfd_secret memory cannot be dumped at all: refused before the freeze,
    naming it."""
    if os.uname().machine not in ("x86_64", "aarch64"):
        pytest.skip("memfd_secret's syscall number is known here for x86_64 and aarch64 only")
    py.run("run", "-d", "--name", "c26s", "jaula-python", "python3", "-c", SECRETMEM)
    first = wait_lines(py, "c26s", r"^(ready|unsupported)")[0]
    if first.startswith("unsupported"):
        pytest.skip(f"memfd_secret is not available on this kernel ({first})")
    p = py.run("checkpoint", "c26s", check=False)
    assert_refused_and_untouched(py, "c26s", p, "memfd_secret")


# -- the preflight's own checks -------------------------------------------------------------


def test_attached_exec_still_running_is_refused(py: Jaula) -> None:
    """An attached ``jaula exec`` still running has its helper in the container's cgroup but
    outside its process tree: CRIU only warned ("Unexpected process in the freezer cgroup")
    and left the exec'd program out of the checkpoint.  Refused now; after it ends the
    checkpoint works."""
    py.run("run", "-d", "--name", "ex", "jaula-python", "sleep", "infinity")
    cmd = [*JAULA, "--state-root", str(py.root), "exec", "ex", "sleep", "3"]
    with subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parents[2],
    ) as execing:
        wait_for(lambda: len(ps(py, "ex")) == 2, what="the exec'd sleep")
        p = py.run("checkpoint", "--leave-running", "ex", check=False)
        assert_refused_and_untouched(py, "ex", p, "not in its process tree", "exec")
        assert execing.wait(timeout=10) == 0
    py.run("checkpoint", "--leave-running", "ex")
