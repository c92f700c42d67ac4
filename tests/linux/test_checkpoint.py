"""Checkpoint and restore of real containers with real CRIU, through the CLI."""

from __future__ import annotations

import tarfile
import time
from pathlib import Path

import pytest

from tests.helpers.containers import inspect
from tests.helpers.counter import COUNTER, assert_continuous, count, ticks, wait_ticks
from tests.helpers.jaula import Jaula
from tests.helpers.leaks import mounts_under
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


def test_checkpoint_and_restore_continue_where_they_were(jaula: Jaula) -> None:
    jaula.run("run", "-d", "--name", "c", "busybox", "sh", "-c", COUNTER)
    wait_ticks(jaula, "c", 10)
    pid_before = inspect(jaula, "c")["State"]["Pid"]
    jaula.run("checkpoint", "c")
    info = inspect(jaula, "c")
    assert info["State"]["Status"] == "checkpointed"
    assert mounts_under(Path(info["Rootfs"])) == []
    at_dump = ticks(jaula, "c")[-1]
    upper_count = int((Path(info["UpperDir"]) / "tmp/count").read_text())
    assert upper_count == at_dump
    time.sleep(0.3)
    assert ticks(jaula, "c")[-1] == at_dump, "the container ran after its checkpoint"
    jaula.run("restore", "c")
    wait_ticks(jaula, "c", at_dump + 10)
    info = inspect(jaula, "c")
    assert info["State"]["Status"] == "running" and info["State"]["Pid"] != pid_before
    assert count(jaula, "c") > at_dump
    assert_continuous(ticks(jaula, "c"))
    assert jaula.out("exec", "c", "cat", "/proc/1/cmdline").startswith("sh")


def test_exit_code_is_collected_after_restore(jaula: Jaula) -> None:
    jaula.run(
        "run",
        "-d",
        "--name",
        "x",
        "busybox",
        "sh",
        "-c",
        "trap 'exit 42' USR1; while true; do sleep 0.05; done",
    )
    time.sleep(0.3)
    jaula.run("checkpoint", "x")
    jaula.run("restore", "x")
    jaula.run("kill", "-s", "USR1", "x")
    assert jaula.out("wait", "x").strip() == "42"
    assert inspect(jaula, "x")["State"]["ExitCode"] == 42


def test_leave_running(jaula: Jaula) -> None:
    jaula.run("run", "-d", "--name", "lr", "busybox", "sh", "-c", COUNTER)
    wait_ticks(jaula, "lr", 5)
    pid = inspect(jaula, "lr")["State"]["Pid"]
    jaula.run("checkpoint", "--leave-running", "lr")
    info = inspect(jaula, "lr")
    assert info["State"]["Status"] == "running" and info["State"]["Pid"] == pid
    n = ticks(jaula, "lr")[-1]
    wait_ticks(jaula, "lr", n + 5)
    assert (Path(info["UpperDir"]).parent / "checkpoint" / "manifest.json").exists()
    assert_continuous(ticks(jaula, "lr"))


def test_export_import_into_another_state_root(jaula: Jaula, jaula2: Jaula, tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    cid = jaula.out(
        "run",
        "-d",
        "--name",
        "mover",
        "-v",
        f"{vol}:/data",
        "busybox",
        "sh",
        "-c",
        "echo written-before > /etc/motd; exec 3>>/data/log; "
        + COUNTER.replace('echo "tick $i";', 'echo "tick $i"; echo $i >&3;'),
    ).strip()
    wait_ticks(jaula, "mover", 10)
    bundle = tmp_path / "mover.tar"
    jaula.run("checkpoint", "mover", "--export", str(bundle))
    at_dump = ticks(jaula, "mover")[-1]
    jaula.run("rm", "mover")
    with tarfile.open(bundle) as tf:
        names = tf.getnames()
    assert "manifest.json" in names and "rootfs-diff.tar" in names
    assert any(n.startswith("criu/pages-") for n in names)
    assert jaula2.out("restore", "--import", str(bundle), "--insecure-unsigned").strip() == cid
    info = inspect(jaula2, "mover")
    assert info["Id"] == cid and info["Name"] == "mover"
    assert info["State"]["Status"] == "running"
    assert jaula2.out("exec", "mover", "cat", "/etc/motd") == "written-before\n"
    deadline = time.monotonic() + 10
    while count(jaula2, "mover") < at_dump + 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count(jaula2, "mover") >= at_dump + 10
    lines = [int(x) for x in (vol / "log").read_text().split()]
    assert lines == list(range(1, len(lines) + 1)), "the volume log has a gap or a duplicate"
    assert Path(info["UpperDir"]).is_relative_to(jaula2.root)


def test_import_refuses_corrupt_bundle_and_leaves_nothing(
    jaula: Jaula, jaula2: Jaula, tmp_path: Path
) -> None:
    jaula.run("run", "-d", "--name", "cor", "busybox", "sh", "-c", COUNTER)
    wait_ticks(jaula, "cor", 3)
    good = tmp_path / "good.tar"
    jaula.run("checkpoint", "--leave-running", "cor", "--export", str(good))
    bad = tmp_path / "bad.tar"
    with tarfile.open(good) as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()  # type: ignore[union-attr]
            if m.name.startswith("criu/pages-"):
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            dst.addfile(m, __import__("io").BytesIO(data))
    p = jaula2.run("restore", "--import", str(bad), check=False)
    assert p.returncode == 125 and "sha256" in p.stderr and len(p.stderr.splitlines()) == 1
    assert jaula2.container_ids() == []
    assert not list((jaula2.root / "tmp").glob("*"))


def test_import_refuses_missing_layer_and_name_collision(
    jaula: Jaula, jaula2: Jaula, tmp_path: Path
) -> None:
    jaula.run("run", "-d", "--name", "n1", "busybox", "sh", "-c", COUNTER)
    wait_ticks(jaula, "n1", 3)
    b = tmp_path / "n1.tar"
    jaula.run("checkpoint", "--leave-running", "n1", "--export", str(b))
    # a node without the image
    bare = Jaula(jaula2.root.parent / (jaula2.root.name + "-bare"))
    try:
        p = bare.run("restore", "--import", str(b), "--insecure-unsigned", check=False)
        assert p.returncode == 125 and "layer sha256:" in p.stderr and "import" in p.stderr
        assert bare.container_ids() == []
    finally:
        import shutil

        shutil.rmtree(bare.root, ignore_errors=True)
    # the same id is already here
    p = jaula.run("restore", "--import", str(b), "--insecure-unsigned", check=False)
    assert p.returncode == 125 and "already exists" in p.stderr
    # a different container already holds the name
    jaula2.run("run", "-d", "--name", "n1", "busybox", "sleep", "100")
    p = jaula2.run("restore", "--import", str(b), "--insecure-unsigned", check=False)
    assert p.returncode == 125 and "--name" in p.stderr
    jaula2.run("restore", "--import", str(b), "--insecure-unsigned", "--name", "n1-copy")
    assert inspect(jaula2, "n1-copy")["State"]["Status"] == "running"


def test_failed_dump_leaves_the_container_running(jaula: Jaula) -> None:
    # A deleted-but-open file larger than the ghost limit (64 MiB) cannot be dumped.
    jaula.run(
        "run",
        "-d",
        "--name",
        "ghost",
        "busybox",
        "sh",
        "-c",
        "head -c 80000000 /dev/zero > /tmp/big; exec 3</tmp/big; rm /tmp/big; " + COUNTER,
    )
    wait_ticks(jaula, "ghost", 5)
    p = jaula.run("checkpoint", "ghost", check=False)
    assert p.returncode == 125 and "criu dump failed" in p.stderr
    assert "ghost" in p.stderr.lower()
    info = inspect(jaula, "ghost")
    assert info["State"]["Status"] == "running"
    n = ticks(jaula, "ghost")[-1]
    wait_ticks(jaula, "ghost", n + 5)
    freezer = info["CgroupPaths"].get("freezer")
    if freezer:
        assert Path(freezer, "freezer.state").read_text().strip() == "THAWED"


def test_bundle_write_failure_resumes_the_container(
    jaula: Jaula, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In-process fault: the upperdir tar fails while CRIU holds the tasks at post-dump.
    from migrate import checkpoint as cp
    from migrate import rootfs_diff
    from migrate.errors import BundleError
    from runtime.container import Runtime

    jaula.run("run", "-d", "--name", "bw", "busybox", "sh", "-c", COUNTER)
    wait_ticks(jaula, "bw", 5)

    def boom(upper: Path, out: Path) -> int:
        raise BundleError("injected: disk full while writing the rootfs diff")

    monkeypatch.setattr(rootfs_diff, "write", boom)
    with pytest.raises(Exception, match="injected|post-dump|criu dump failed"):
        cp.checkpoint(Runtime(jaula.root), "bw")
    assert inspect(jaula, "bw")["State"]["Status"] == "running"
    n = ticks(jaula, "bw")[-1]
    wait_ticks(jaula, "bw", n + 5)
    assert_continuous(ticks(jaula, "bw"))


def test_restore_refuses_wrong_states(jaula: Jaula) -> None:
    jaula.run("run", "-d", "--name", "r", "busybox", "sleep", "100")
    p = jaula.run("restore", "r", check=False)
    assert p.returncode == 125 and "not checkpointed" in p.stderr
    jaula.run("stop", "-t", "0", "r")
    p = jaula.run("checkpoint", "r", check=False)
    assert p.returncode == 125 and "only a running container" in p.stderr
