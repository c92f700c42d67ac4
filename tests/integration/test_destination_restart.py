"""The destination's node service SIGKILLed and restarted during an incoming post-copy
migration, with real node services and real CRIU (faults found by ``make chaos``).

Its ``criu lazy-pages`` daemon outlives the service (:class:`migrate.criu.LazyPagesDaemon`),
so the restarted service must deal with it: end it when the held copy is discarded (it
ran for ever, and kept its session dir in /dev/shm), leave it to finish when the copy is
resumed.  Either way the workload continues on exactly one node."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from migrate.hold import stale_hold_sockets
from runtime.container import Runtime
from runtime.poll import wait_for
from runtime.syscalls import is_alive, proc_start_time
from tests.helpers.counter import COUNTER, wait_ticks
from tests.helpers.faults import continues_on, migrate_async
from tests.helpers.nodes import Cluster2
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


def _lazy_daemons(under: Path) -> list[tuple[int, int]]:
    """(pid, start time) of the ``criu lazy-pages`` processes whose command line names a
    path under ``under`` (a node's state root: their work dir is the container's dir)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        start = proc_start_time(int(d))
        named = any(a.startswith(str(under).encode()) for a in argv)
        if b"lazy-pages" in argv and start is not None and named:
            found.append((int(d), start))
    return found


def test_discarded_held_postcopy_copy_ends_its_lazy_daemon(nodes: Cluster2) -> None:
    """node2's service dies as it begins the restore, before it can answer ``ready`` (so
    the source never commits; its restore goes on to pre-resume and is held there):
    restarted, it learns from the source that the migration did not commit, discards its
    copy, ends that session's lazy-pages daemon (pid + start time recorded before the
    fault) and removes its session dir; the source keeps the container."""
    c = nodes
    n1 = c.local("node1")
    n1.run("run", "-d", "--name", "lk", "busybox", "sh", "-c", COUNTER)
    wait_ticks(n1, "lk", 5, timeout=60)
    rt2 = Runtime(c.state_root("node2"))
    mig = migrate_async(c, "lk", "node2", "--strategy", "postcopy")
    daemons: list[tuple[int, int]] = []
    try:
        # the hold socket is made just before the restore starts: node2 cannot have
        # answered ``ready`` yet, so the source cannot have committed
        assert wait_for(lambda: stale_hold_sockets(rt2, set()), 120, 0.002), (
            "node2 never began the restore"
        )
        c.kill("node2")
        daemons = _lazy_daemons(c.state_root("node2"))
        assert daemons, "no lazy-pages daemon on node2 at the restore"
        c.start("node2")
        mig.communicate(timeout=180)
    finally:
        if mig.poll() is None:
            mig.kill()
            mig.wait()
    continues_on(c, "lk", "node1")
    left = wait_for(lambda: not any(is_alive(p, s) for p, s in daemons), 30) or [
        p for p, s in daemons if is_alive(p, s)
    ]
    try:
        assert left is True, f"node2's lazy-pages daemon {left} outlived the discarded copy"
    finally:
        for p, s in daemons:  # never leave it to the next test, with or without the fix
            if is_alive(p, s):
                os.kill(p, 9)
    assert wait_for(lambda: not c.incoming("node2"), 30), (
        f"node2 kept the session dir: {c.incoming('node2')}"
    )


#: COUNTER with a 24 MB heap that post-copy must bring: ``tick N`` then ``len 24000000``
BIG = 24_000_000
BIG_COUNTER = (
    f"x=$(head -c {BIG} /dev/zero | tr '\\0' a); i=0; while true; do i=$((i+1)); "
    'echo $i > /tmp/count; echo "tick $i"; echo "len ${#x}"; sleep 0.05; done'
)


def test_committed_held_postcopy_copy_resumes_after_a_restart(nodes: Cluster2) -> None:
    """node2's service dies the moment the source records the commit (``migrated``),
    before or as the ``resume`` reaches it: its restore is held at pre-resume and its
    lazy-pages daemon runs on.  Restarted, it learns the commit from the source, resumes
    the copy and follows the daemon to the last page: the container runs on node2 only,
    its memory whole (the two-outcome rule; a lost container was found by ``make
    chaos``)."""
    c = nodes
    n1, n2 = c.local("node1"), c.local("node2")
    n1.run("run", "-d", "--name", "pk", "busybox", "sh", "-c", BIG_COUNTER)
    wait_ticks(n1, "pk", 5, timeout=60)
    states = list(c.state_root("node1").glob("containers/*/state.json"))
    assert len(states) == 1, states
    mig = migrate_async(c, "pk", "node2", "--strategy", "postcopy")
    try:

        def committed() -> bool:
            try:
                return '"migrated"' in states[0].read_text()
            except OSError:
                return False

        assert wait_for(committed, 120, 0.001), "node1 never committed"
        c.kill("node2")
        mig.communicate(timeout=180)
    finally:
        if mig.poll() is None:
            mig.kill()
            mig.wait()
    c.start("node2")
    assert wait_for(lambda: c.where("pk").get("node2") == "running", 60), c.where("pk")
    continues_on(c, "pk", "node2")
    lengths = set(re.findall(r"^len (\d+)$", n2.out("logs", "pk"), re.MULTILINE))
    assert lengths == {str(BIG)}, lengths
    assert wait_for(lambda: not c.incoming("node2"), 60), c.incoming("node2")


def test_a_service_killed_right_after_answering_the_hold_finds_its_copy_resumed(
    nodes: Cluster2,
) -> None:
    """node2's service answers its held restorer ``resume`` and dies before it records the
    resumed container: the restorer asks no more, so the restarted service, which used to
    wait on the hold socket for it for ever, left the container ``migrating`` (found by
    the post-copy test above, rarely).  It now reads the decision the restorer wrote and
    records the container running.  The kill is aimed at the moment that file appears;
    it can land a little late, when the service had recorded it already: the outcome must
    be the same."""
    from migrate.hold import HOLD_DECISION
    from migrate.scratch import scratch_dirs

    c = nodes
    n1 = c.local("node1")
    n1.run("run", "-d", "--name", "ans", "busybox", "sh", "-c", COUNTER)
    wait_ticks(n1, "ans", 3)
    places = scratch_dirs(Runtime(c.state_root("node2")))

    def decided() -> bool:
        return any(p.is_dir() and any(p.glob(f"incoming-*/{HOLD_DECISION}")) for p in places)

    mig = migrate_async(c, "ans", "node2")
    try:
        assert wait_for(decided, 120, 0.0005), "node2's restorer was never answered"
        c.kill("node2")
        mig.communicate(timeout=120)
    finally:
        if mig.poll() is None:
            mig.kill()
            mig.wait()
    c.start("node2")
    assert wait_for(lambda: c.where("ans").get("node2") == "running", 60), c.where("ans")
    continues_on(c, "ans", "node2")
    assert wait_for(lambda: not c.incoming("node2"), 30), c.incoming("node2")
