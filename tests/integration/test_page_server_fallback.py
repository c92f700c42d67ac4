"""The page-server fallback of a migration, with two real node services and real CRIU: a
destination that cannot offer a ``criu page-server`` answers the source's offer without one,
so the memory pages travel as files over the CURVE channel; the migration still works and the
report says no byte went through a page server.  The real reason here: node2 listens on
``ipc://`` (no TCP host for a page server).  A node listening on a host *name*
(``tcp://localhost:PORT``) does get one (the name is resolved: ``criu page-server --address``
takes IP literals only).  Back onto node1 (tcp://127.0.0.1) the page server is used again."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.counter import COUNTER, assert_continuous, ticks, wait_ticks
from tests.helpers.nodes import Cluster2, make_cluster, serving
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


def _relisten(c: Cluster2, node: str, how: str) -> None:
    """Rewrite ``node``'s listen endpoint: ``ipc`` (a socket in the cluster dir, removed
    with it; the cluster file's endpoint for it too) or ``hostname`` (``localhost`` instead
    of 127.0.0.1, the same port; the others still connect to 127.0.0.1)."""
    tcp = c.files.endpoints[node]
    files: tuple[Path, ...]
    if how == "ipc":
        sock = c.files.root / f"{node}.ipc"
        assert len(str(sock)) < 100, f"{sock} is too long for a unix socket path"
        new, files = f"ipc://{sock}", (c.files.nodes[node], c.files.cluster)
    else:
        new, files = tcp.replace("127.0.0.1", "localhost"), (c.files.nodes[node],)
    for f in files:
        text = f.read_text()
        assert f'"{tcp}"' in text
        f.write_text(text.replace(f'"{tcp}"', f'"{new}"'))
    assert c.files.node_config(node).listen == new


@pytest.fixture(params=["ipc", "hostname"])
def fallback_nodes(
    request: pytest.FixtureRequest, tmp_path: Path, busybox_image_layout: Path
) -> Iterator[Cluster2]:
    """node1 on tcp://127.0.0.1, node2 listening where it cannot offer a page server; both
    started, stopped and leak-checked."""
    c = make_cluster(tmp_path / "cluster", busybox_image_layout)
    _relisten(c, "node2", request.param)
    with serving(c):
        yield c


def test_migration_with_or_without_a_page_server(fallback_nodes: Cluster2) -> None:
    c = fallback_nodes
    listen = c.files.node_config("node2").listen
    n1, n2 = c.local("node1"), c.local("node2")
    n1.run("run", "-d", "--name", "fb", "busybox", "sh", "-c", COUNTER)
    wait_ticks(n1, "fb", 10)
    rep = json.loads(c.op("migrate", "fb", "node2", "--json").stdout)
    assert rep["source"] == "node1" and rep["destination"] == "node2"
    assert rep["resume_confirmed"] is True
    if listen.startswith("ipc://"):
        assert rep["page_server_bytes"] == 0  # no page server: the pages went as files
    else:  # a host name is resolved for `criu page-server --address`
        assert 0 < rep["page_server_bytes"] < rep["bytes_sent"]
    assert rep["bytes_sent"] > 0 and rep["files"] > 0
    c.assert_only_on("fb", "node2")
    n = ticks(n2, "fb")[-1]
    wait_ticks(n2, "fb", n + 10, timeout=30)
    assert_continuous(ticks(n2, "fb"))  # the memory state continued, nothing ran twice
    log2 = (c.files.root / "node2.log").read_text()
    assert "migration.page_server.unavailable" not in log2  # nothing failed to start
    # back onto the TCP node: its page server takes the pages again
    rep = json.loads(c.op("migrate", "fb", "node1", "--json").stdout)
    assert rep["resume_confirmed"] is True
    assert 0 < rep["page_server_bytes"] < rep["bytes_sent"]
    c.assert_only_on("fb", "node1")
    n = ticks(n1, "fb")[-1]
    wait_ticks(n1, "fb", n + 10, timeout=30)
    assert_continuous(ticks(n1, "fb"))
