"""``cp``, ``top``, ``rename``, ``rm -a``, ``images``, ``version``/``--version`` and ``info``
against real containers (issue 17), spelled as Podman's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.jaula import Jaula

pytestmark = pytest.mark.root


def test_cp_both_ways_running_and_stopped(jaula: Jaula, tmp_path: Path) -> None:
    jaula.out("run", "-d", "--name", "c", "busybox", "sleep", "1000")
    (tmp_path / "in.txt").write_text("to the container\n")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "a").write_text("A")
    jaula.out("cp", str(tmp_path / "in.txt"), "c:/tmp/")
    jaula.out("cp", str(tmp_path / "tree"), "c:/opt")  # an existing dir: lands inside
    assert jaula.out("exec", "c", "cat", "/tmp/in.txt") == "to the container\n"
    assert jaula.out("exec", "c", "cat", "/opt/tree/a") == "A"
    jaula.out("exec", "c", "sh", "-c", "echo made inside > /tmp/out.txt")
    jaula.out("cp", "c:/tmp/out.txt", str(tmp_path / "out.txt"))
    assert (tmp_path / "out.txt").read_text() == "made inside\n"
    jaula.out("stop", "-t", "0", "c")
    # stopped: its overlay is mounted for the copy, the upperdir keeps what was written
    jaula.out("cp", "c:/opt/tree/.", str(tmp_path / "back"))
    assert (tmp_path / "back" / "a").read_text() == "A"
    jaula.out("cp", str(tmp_path / "in.txt"), "c:/new.txt")
    jaula.out("start", "c")
    assert jaula.out("exec", "c", "cat", "/new.txt") == "to the container\n"


def test_cp_cannot_leave_the_container(jaula: Jaula, tmp_path: Path) -> None:
    jaula.out("run", "-d", "--name", "c", "busybox", "sleep", "1000")
    jaula.out("exec", "c", "sh", "-c", "echo inside > /mine; busybox ln -s /mine /escape")
    # /escape -> /mine, an absolute link: it resolves inside the container's root, and the
    # link itself is copied (as podman cp copies links); its target is the container's
    jaula.out("cp", "c:/escape", str(tmp_path / "p"))
    assert (tmp_path / "p").is_symlink()
    host_file = tmp_path / "host-secret"
    host_file.write_text("host")
    # a link inside naming a host path reaches the container's own file of that path
    jaula.out("exec", "c", "sh", "-c", f"mkdir -p {tmp_path}; echo ctr > {host_file}")
    jaula.out("exec", "c", "busybox", "ln", "-s", str(host_file), "/to-host")
    jaula.out("cp", "c:/to-host/", str(tmp_path / "got"))
    assert (tmp_path / "got").read_text() == "ctr\n"
    # and a copy into the container through that link writes the container's file only
    (tmp_path / "new").write_text("new")
    jaula.out("cp", str(tmp_path / "new"), "c:/to-host")
    assert host_file.read_text() == "host"
    assert jaula.out("exec", "c", "cat", str(host_file)) == "new"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["/a", "/b"], "exactly one side"),
        (["c:/nope", "/tmp/x"], "/nope does not exist"),
        (["/etc/hostname", "c:/no/such/dir/f"], "parent directory"),
    ],
)
def test_cp_errors(jaula: Jaula, args: list[str], needle: str) -> None:
    jaula.out("run", "-d", "--name", "c", "busybox", "sleep", "1000")
    p = jaula.run("cp", *args, check=False)
    assert p.returncode == 125 and p.stderr.count("\n") == 1 and needle in p.stderr, p.stderr


def test_top_lists_the_container_processes(jaula: Jaula) -> None:
    jaula.out("run", "-d", "--name", "t", "busybox", "sh", "-c", "sleep 1001 & sleep 1002")
    from runtime.poll import wait_for

    def listed() -> str | None:
        o = jaula.out("top", "t")
        return o if "sleep 1001" in o else None

    out = wait_for(listed, 10.0)
    assert out, "sleep 1001 never showed"
    lines = out.splitlines()
    assert lines[0].split() == ["USER", "PID", "PPID", "ELAPSED", "TIME", "COMMAND"]
    rows = {ln.split(None, 5)[5]: ln.split() for ln in lines[1:]}
    assert rows["sleep 1002"][:3] == ["root", "1", "0"]
    assert rows["sleep 1001"][0] == "root" and rows["sleep 1001"][2] == "1"


def test_rename(jaula: Jaula) -> None:
    cid = jaula.out("run", "-d", "--name", "old", "busybox", "sleep", "1000").strip()
    jaula.out("run", "-d", "--name", "other", "busybox", "sleep", "1000")
    jaula.out("rename", "old", "new")
    (d,) = json.loads(jaula.out("inspect", "new"))
    assert d["Id"] == cid and d["Name"] == "new"
    assert jaula.run("inspect", "old", check=False).returncode == 125
    p = jaula.run("rename", "new", "other", check=False)
    assert p.returncode == 125 and "already in use" in p.stderr


def test_rm_all(jaula: Jaula) -> None:
    jaula.out("run", "-d", "busybox", "sleep", "1000")
    jaula.out("create", "busybox", "true")
    p = jaula.run("rm", "-a", check=False)  # a running one without -f: refused, others go
    assert p.returncode == 125 and len(jaula.container_ids()) == 1
    jaula.out("rm", "-af")
    assert jaula.container_ids() == []
    bad = jaula.run("rm", check=False)
    assert bad.returncode == 125 and "or --all" in bad.stderr


def test_images_version_info(jaula: Jaula) -> None:
    table = jaula.out("images").splitlines()
    assert table[0].split()[:4] == ["REPOSITORY", "TAG", "IMAGE", "ID"]
    assert table[1].split()[:2] == ["busybox", "latest"]
    (img,) = json.loads(jaula.out("images", "--format", "json"))
    assert img["Names"] == ["busybox:latest"] and len(img["Id"]) == 64
    assert jaula.out("images", "-q").strip() == img["Id"][:12]
    assert jaula.out("--version").startswith("jaula version ")
    assert json.loads(jaula.out("version", "--format", "json"))["Client"]["Version"]
    jaula.out("run", "-d", "busybox", "sleep", "1000")
    d = json.loads(jaula.out("info", "--format", "json"))
    assert d["store"]["containerStore"]["running"] == 1
    assert d["store"]["imageStore"]["number"] == 1
    assert d["store"]["graphRoot"] == str(jaula.root)
    assert "kernel:" in jaula.out("info")
