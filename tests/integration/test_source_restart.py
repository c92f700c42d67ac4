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
