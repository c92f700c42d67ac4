"""Post-copy (``--strategy postcopy``, CRIU lazy pages) between two real node services with
real CRIU: the container is restored on node2 before its memory is, runs there while the
pages arrive, and ends with all of them; nothing runs twice, nothing is lost.

The workload holds a 24 MB shell variable (heap pages a post-copy must fetch) and prints
its length with every tick: a page that did not arrive would change the length or stop
the shell; a page that arrived twice cannot be seen, a tick that ran twice can."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from tests.helpers.counter import assert_continuous, ticks, wait_ticks
from tests.helpers.jaula import JAULA, REPO
from tests.helpers.nodes import Cluster2, both_backends
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]

BIG = 24_000_000
#: COUNTER (tests.helpers.counter) with a large heap: ``tick N LEN``
BIG_COUNTER = (
    f"x=$(head -c {BIG} /dev/zero | tr '\\0' a); i=0; while true; do i=$((i+1)); "
    'echo $i > /tmp/count; echo "tick $i"; echo "len ${#x}"; sleep 0.05; done'
)


def _lengths(c: Cluster2, node: str, name: str) -> set[int]:
    out = c.local(node).out("logs", name)
    return {int(m) for m in re.findall(r"^len (\d+)$", out, re.MULTILINE)}


@both_backends
def test_postcopy_moves_the_memory_after_the_resume(nodes: Cluster2) -> None:
    c = nodes
    n1, n2 = c.local("node1"), c.local("node2")
    n1.run("run", "-d", "--name", "pc", "busybox", "sh", "-c", BIG_COUNTER)
    wait_ticks(n1, "pc", 10, timeout=60)
    rep = json.loads(c.op("migrate", "pc", "node2", "--strategy", "postcopy", "--json").stdout)
    assert rep["strategy"] == "postcopy" and rep["resume_confirmed"] is True
    assert rep["postcopy_error"] == ""
    assert "postcopy" in rep["phases_s"] and rep["postcopy_s"] == rep["phases_s"]["postcopy"]
    # the heap came after the resume, through the lazy page server, not in the images
    assert rep["page_server_bytes"] >= BIG, rep
    assert rep["bytes_sent"] >= rep["page_server_bytes"]
    c.assert_only_on("pc", "node2")
    n = ticks(n2, "pc")[-1]
    wait_ticks(n2, "pc", n + 10, timeout=30)
    assert_continuous(ticks(n2, "pc"))
    assert _lengths(c, "node2", "pc") == {BIG}
    # and back, cold: the memory restored by post-copy is whole
    rep = json.loads(c.op("migrate", "pc", "node1", "--json").stdout)
    assert rep["resume_confirmed"] is True
    c.assert_only_on("pc", "node1")
    n = ticks(n1, "pc")[-1]
    wait_ticks(n1, "pc", n + 10, timeout=30)
    assert_continuous(ticks(n1, "pc"))
    assert _lengths(c, "node1", "pc") == {BIG}


def test_destination_service_killed_during_postcopy(nodes: Cluster2) -> None:
    """node2's service dies right after the resume, while pages are still on node1: its
    lazy-pages daemon is not tied to it and finishes, so the container keeps all its
    memory and runs on node2 only; the restarted service finds it running."""
    c = nodes
    n1, n2 = c.local("node1"), c.local("node2")
    n1.run("run", "-d", "--name", "sk", "busybox", "sh", "-c", BIG_COUNTER)
    wait_ticks(n1, "sk", 5, timeout=60)
    mig = subprocess.Popen(
        [
            *JAULA,
            "--client-config",
            str(c.files.clients["alice"]),
            "migrate",
            "sk",
            "node2",
            "--strategy",
            "postcopy",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    # wait until node2's lazy-pages daemon runs for a container that has resumed
    root2 = str(c.state_root("node2"))
    deadline = time.monotonic() + 60
    daemon = 0
    while time.monotonic() < deadline and not daemon:
        for pid in _lazy_daemons(root2):
            state = c.state_root("node2").glob("containers/*/state.json")
            if any('"running"' in p.read_text() for p in state):
                daemon = pid
        time.sleep(0.002)
    assert daemon, "post-copy never started on node2"
    c.kill("node2")
    assert _alive(daemon), "the lazy-pages daemon died with the service"
    out, err = mig.communicate(timeout=120)
    assert mig.returncode == 0, err
    rep = json.loads(out)
    assert rep["postcopy_error"] == "", rep
    c.start("node2")
    c.assert_only_on("sk", "node2")
    n = ticks(n2, "sk")[-1]
    wait_ticks(n2, "sk", n + 10, timeout=30)
    assert_continuous(ticks(n2, "sk"))
    assert _lengths(c, "node2", "sk") == {BIG}


def _lazy_daemons(under: str) -> list[int]:
    """Pids of ``criu lazy-pages`` processes whose command line names a path ``under``."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"lazy-pages" in argv and any(a.startswith(under.encode()) for a in argv):
            pids.append(int(d))
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False
