"""A source service that dies between recording ``migrated -> node2`` and telling CRIU so
leaves the frozen copy to CRIU, which lets it run again (or dies with the service, which
detaches it), while node2, reading that record, resumes its own.  The microsecond window
cannot be hit on demand, so the test makes the state it leaves: a running container whose
record says it left.  The restarted service must kill that copy: the record decides."""

from __future__ import annotations

import time

import pytest

from runtime.container import Runtime
from runtime.state import ContainerStatus
from tests.helpers.counter import COUNTER, ticks, wait_ticks
from tests.helpers.leaks import mounts_under
from tests.helpers.nodes import Cluster2
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


def test_restarted_source_kills_a_copy_recorded_as_migrated(nodes: Cluster2) -> None:
    c = nodes
    n1 = c.local("node1")
    n1.run("run", "-d", "--name", "dup", "busybox", "sh", "-c", COUNTER)
    wait_ticks(n1, "dup", 3)
    c.kill("node1")
    ctr = Runtime(c.state_root("node1")).get("dup")
    assert ctr.cgroup().pids(), "the container should be running"
    with ctr.locked():  # the way a migration records it: running, migrating, migrated
        ctr.refresh()
        for status in (ContainerStatus.MIGRATING, ContainerStatus.MIGRATED):
            ctr.state.status = status
            ctr.state.migrated_to = "node2" if status is ContainerStatus.MIGRATED else None
            ctr.save()
    c.start("node1")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and ctr.cgroup().pids():
        time.sleep(0.05)
    assert ctr.cgroup().pids() == [], "the copy recorded as migrated still runs"
    assert "recover.migrated_copy_killed" in c.log("node1")
    assert mounts_under(ctr.dir) == []
    last = ticks(n1, "dup")[-1]
    time.sleep(0.3)
    assert ticks(n1, "dup")[-1] == last
    assert c.where("dup") == {"node1": "migrated"}  # the record stays: it decides
