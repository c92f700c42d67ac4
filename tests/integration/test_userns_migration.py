"""A ``--userns=auto`` container keeps its user namespace through a migration between two
node services (issue 16): the destination reserves the same host id range, the migrated
init still runs as the mapped uid (``/proc/PID/status``), ``id`` inside still says 0, and
the upperdir's files keep the mapped owner; a destination whose range is taken refuses the
offer in preflight, before the freeze, and the container runs on at the source."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from runtime.userns import AUTO_SIZE, FileIdAllocator
from tests.helpers.containers import host_pid, inspect
from tests.helpers.nodes import Cluster2
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def test_an_auto_userns_container_keeps_its_ids_through_a_migration(
    nodes: Cluster2, busybox_image_layout: Path
) -> None:
    n1, n2 = nodes.local("node1"), nodes.local("node2")
    for j in (n1, n2):
        j.run("image", "import", str(busybox_image_layout), "--name", "busybox:latest")
    n1.run("run", "-d", "--name", "u", "--userns=auto", "busybox", "sleep", "1000")
    uid = _uid(host_pid(n1, "u"))
    n1.out("exec", "u", "touch", "/before")
    nodes.op("migrate", "u", "node2")
    nodes.assert_only_on("u", "node2")
    pid = host_pid(n2, "u")
    assert _uid(pid) == uid
    assert Path(f"/proc/{pid}/uid_map").read_text().split() == ["0", str(uid), str(AUTO_SIZE)]
    assert n2.out("exec", "u", "id", "-u").strip() == "0"
    n2.out("exec", "u", "touch", "/after")
    upper = Path(inspect(n2, "u")["UpperDir"])
    assert [os.stat(upper / f).st_uid for f in ("before", "after")] == [uid, uid]
    cid = inspect(n2, "u")["Id"]
    held = json.loads((nodes.state_root("node2") / "idranges.json").read_text())
    assert held[cid] == [uid, AUTO_SIZE]
    n2.run("rm", "-f", "u")


def test_a_destination_without_the_range_refuses_before_the_freeze(
    nodes: Cluster2, busybox_image_layout: Path
) -> None:
    n1, n2 = nodes.local("node1"), nodes.local("node2")
    n1.run("image", "import", str(busybox_image_layout), "--name", "busybox:latest")
    n1.run("run", "-d", "--name", "v", "--userns=auto", "busybox", "sleep", "1000")
    pid = host_pid(n1, "v")
    uid = _uid(pid)
    FileIdAllocator(nodes.state_root("node2")).reserve_exact("f" * 64, uid + 100, AUTO_SIZE)
    p = nodes.op("migrate", "v", "node2", check=False)
    assert p.returncode != 0
    assert "user namespace's ids" in p.stderr and "ffffffffffff" in p.stderr, p.stderr
    assert host_pid(n1, "v") == pid  # never frozen away: the same init runs on
    assert inspect(n1, "v")["State"]["Status"] == "running"
    held = json.loads((nodes.state_root("node2") / "idranges.json").read_text())
    assert list(held) == ["f" * 64]
    assert n2.container_ids() == []
    n1.run("rm", "-f", "v")
