"""Isolation kept through a live migration between two node services (issue 16): I/O
limits (resolved by device path on the destination) and the seccomp filter of jaula's default profile is still loaded in the migrated init (host
``/proc/PID/status``) and still denies what it denied (EPERM from ``add_key``), in the
init and in a ``jaula exec`` on the destination."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.containers import host_pid, stdout_lines, wait_lines
from tests.helpers.io_probe import WRITE, loop_ext4, rate
from tests.helpers.nodes import Cluster2
from tests.helpers.seccomp_probe import EPERM, LOOP, ONCE, host_seccomp_mode, needs_x86_64, parse
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu, needs_x86_64]
PROBE_LINE = r"^tick \d+ errno \d+ seccomp \d+$"


def test_seccomp_filter_survives_a_migration(nodes: Cluster2, python_image_layout: Path) -> None:
    n1, n2 = nodes.local("node1"), nodes.local("node2")
    for j in (n1, n2):
        j.run("image", "import", str(python_image_layout), "--name", "jaula-python:latest")
    n1.run("run", "-d", "--name", "scm", "jaula-python", "python3", "-c", LOOP)
    assert parse(wait_lines(n1, "scm", PROBE_LINE)[0]) == (EPERM, 2)
    nodes.op("migrate", "scm", "node2")
    nodes.assert_only_on("scm", "node2")
    assert host_seccomp_mode(host_pid(n2, "scm")) == 2
    after = len(stdout_lines(n2, "scm"))
    assert parse(wait_lines(n2, "scm", PROBE_LINE, after=after)[0]) == (EPERM, 2)
    assert parse(n2.out("exec", "scm", "python3", "-c", ONCE)) == (EPERM, 2)


def test_io_limit_survives_a_migration(
    nodes: Cluster2, python_image_layout: Path, tmp_path: Path
) -> None:
    """A write to a throttled loop device stays under the limit (+20 %) on the destination,
    whose cgroup got the limit by resolving the device's path there."""
    n1, n2 = nodes.local("node1"), nodes.local("node2")
    for j in (n1, n2):
        j.run("image", "import", str(python_image_layout), "--name", "jaula-python:latest")
    limit = 1 << 20
    with loop_ext4(tmp_path) as (mnt, dev):
        try:
            n1.run("run", "-d", "--name", "iom", "-v", f"{mnt}:/data",
                   "--device-write-bps", f"{dev}:1mb", "jaula-python", "sleep", "1000")  # fmt: skip
            out = n1.out("exec", "iom", "python3", "-c", WRITE, "/data/a", "4")
            assert rate(out) <= 1.2 * limit, out
            nodes.op("migrate", "iom", "node2")
            nodes.assert_only_on("iom", "node2")
            out = n2.out("exec", "iom", "python3", "-c", WRITE, "/data/b", "4")
            assert rate(out) <= 1.2 * limit, f"no limit after the migration: {out}"
        finally:
            for j in (n1, n2):
                j.run("rm", "-f", "iom", check=False)
