"""Issue 15, item 3: the source's node service restarts in the middle of a migration.  The
restarted service never answers the old request; ``jaula migrate`` must notice within
seconds (the service's heartbeat stops, and its ping answers with a new incarnation) and
say where the container runs now, rather than wait its 600 s in silence."""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers.faults import big_container, continues_on, migrate_async, wait_incoming
from tests.helpers.nodes import Cluster2
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


def test_migrate_reports_a_source_restart_and_where_the_container_runs(nodes: Cluster2) -> None:
    big_container(nodes.local("node1"), "phoenix")
    mig = migrate_async(nodes, "phoenix", "node2")
    try:
        wait_incoming(nodes, "node2")
        nodes.kill("node1")  # SIGKILL: the session dies before the commit
        nodes.start("node1")  # a new incarnation on the same endpoint
        # well under the old 600 s; a CLI that waits for the dead request never returns
        out, err = mig.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        mig.kill()
        mig.communicate()
        raise AssertionError("jaula migrate did not notice the source's restart") from None
    assert mig.returncode == 125, (out, err)
    assert "node1's service restarted" in err and "phoenix" in err
    assert "runs on node1" in err
    continues_on(nodes, "phoenix", "node1")


def test_a_destination_killed_while_held_leaves_no_copy_and_takes_it_later(
    nodes: Cluster2,
) -> None:
    """Found by ``make chaos``: the destination's service killed while its restore was held
    at pre-resume; its next incarnation learnt from the source that there was no commit and
    removed the copy with a bare rmtree, which left the rootfs mounted and the directory
    behind: every later migration of that container to it was refused ("already exists")."""
    import time

    from migrate.hold import stale_hold_sockets
    from runtime.container import Runtime
    from tests.helpers.leaks import mounts_under

    big_container(nodes.local("node1"), "held", mib=20)
    cid = nodes.local("node1").container_ids()[0]
    rt2 = Runtime(nodes.state_root("node2"))
    mig = migrate_async(nodes, "held", "node2")
    try:
        deadline = time.monotonic() + 120
        while not stale_hold_sockets(rt2, set()):
            assert mig.poll() is None and time.monotonic() < deadline, "never held"
            time.sleep(0.002)
        nodes.kill("node2")
        nodes.start("node2")
        mig.communicate(timeout=120)
    finally:
        if mig.poll() is None:
            mig.kill()
            mig.wait()
    copy = nodes.state_root("node2") / "containers" / cid
    deadline = time.monotonic() + 60
    while copy.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not copy.exists() and not mounts_under(copy.parent), list(copy.parent.iterdir())
    continues_on(nodes, "held", "node1")
    nodes.op("migrate", "held", "node2")
    continues_on(nodes, "held", "node2")
