"""A container whose memory is still arriving from a post-copy (its state names a live
lazy-pages daemon) cannot be checkpointed or migrated: the pages not fetched yet would be
left out of the dump.  Once that daemon is gone, it can.  Real container and CLI; the
daemon is stood in for by a real process of this test."""

from __future__ import annotations

import subprocess

import pytest

from runtime import syscalls as sc
from runtime.container import Runtime
from runtime.state import PostcopyRecord
from tests.helpers.counter import COUNTER, wait_ticks
from tests.helpers.jaula import Jaula
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


def _mark(j: Jaula, name: str, pid: int) -> None:
    c = Runtime(j.root).get(name)
    with c.locked():
        c.refresh()
        c.state.postcopy = PostcopyRecord("s1", "node1", pid, sc.proc_start_time(pid))
        c.save()


def test_checkpoint_refused_while_the_memory_arrives(jaula: Jaula) -> None:
    jaula.run("run", "-d", "--name", "pc", "busybox", "sh", "-c", COUNTER)
    wait_ticks(jaula, "pc", 3)
    daemon = subprocess.Popen(["sleep", "60"])
    try:
        _mark(jaula, "pc", daemon.pid)
        p = jaula.run("checkpoint", "pc", check=False)
        assert p.returncode != 0
        assert "still receiving its memory from node1" in p.stderr, p.stderr
        assert "keeps running" in p.stderr
    finally:
        daemon.kill()
        daemon.wait()
    jaula.run("checkpoint", "pc")  # the daemon is gone: the mark no longer holds it back
