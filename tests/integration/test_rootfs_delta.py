"""The upperdir's changes between the pre-copy and the freeze reach the destination as the
source has them, hardlinks included: a container keeps a backup of a file by a hardlink and
then saves a new version renamed over the old (what ``cp -l`` backups and editors do).
The destination once wrote the backup's old content through the base's link into the new
file: the migration succeeded and the new content was lost."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from runtime.poll import wait_for
from tests.helpers.faults import migrate_async, wait_incoming
from tests.helpers.nodes import Cluster2
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]

SETUP = (
    "mkdir -p /data && echo old > /data/conf && ln /data/conf /data/conf~ && "
    "head -c 100000000 /dev/urandom > /big && touch /ready && exec sleep 86400"
)


def test_a_file_saved_over_its_hardlinked_backup_during_the_precopy(nodes: Cluster2) -> None:
    n1, n2 = nodes.local("node1"), nodes.local("node2")
    n1.run("run", "-d", "--name", "saver", "busybox", "sh", "-c", SETUP)
    pid = int(json.loads(n1.out("inspect", "saver"))[0]["State"]["Pid"])
    root = Path(f"/proc/{pid}/root")
    assert wait_for((root / "ready").exists, 60), "the container never wrote its 100 MB"
    mig = migrate_async(nodes, "saver", "node2")
    try:
        wait_incoming(nodes, "node2", min_bytes=10 << 20)
        # the pre-copy's base (conf and conf~ linked) is on its way: save a new version
        (root / "data" / "conf.tmp").write_text("new\n")
        os.rename(root / "data" / "conf.tmp", root / "data" / "conf")
        _out, err = mig.communicate(timeout=150)
    finally:
        if mig.poll() is None:
            mig.kill()
            mig.wait()
    assert mig.returncode == 0, err
    nodes.assert_only_on("saver", "node2")
    assert n2.out("exec", "saver", "cat", "/data/conf") == "new\n"
    assert n2.out("exec", "saver", "cat", "/data/conf~") == "old\n"
    inodes = n2.out("exec", "saver", "stat", "-c", "%i %h", "/data/conf", "/data/conf~").split()
    assert inodes[0] != inodes[2] and inodes[1] == inodes[3] == "1", inodes
