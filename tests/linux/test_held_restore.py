"""A restore held at CRIU's pre-resume (how a migration's destination waits for the
source's commit) and told ``abort`` must leave nothing running: the source runs its own
copy again.  CRIU 4.2 resumed the tasks anyway (a failed pre-resume was only logged);
jaula's patch 0012 kills them.  Real container, real CRIU; the hold socket is the test's,
answering as a destination service does (migrate.hold.HoldServer)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from migrate.bundle import Bundle
from migrate.restore import RESTORER, _fresh_upper
from runtime.container import Runtime
from runtime.errors import ContainerError
from tests.helpers.containers import inspect
from tests.helpers.counter import COUNTER, ticks, wait_ticks
from tests.helpers.jaula import Jaula
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


def _serve_hold(path: Path, answer: bytes, asked: threading.Event) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        try:
            conn, _ = srv.accept()
        except OSError:
            return  # closed: nobody asked
        with conn:
            if conn.makefile("rb").readline().startswith(b"held"):
                asked.set()
                conn.sendall(answer + b"\n")

    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_a_held_restore_told_to_abort_leaves_nothing_running(jaula: Jaula, tmp_path: Path) -> None:
    jaula.run("run", "-d", "--name", "h", "busybox", "sh", "-c", COUNTER)
    wait_ticks(jaula, "h", 5)
    jaula.run("checkpoint", "h")
    at_dump = ticks(jaula, "h")[-1]
    rt = Runtime(jaula.root)
    c = rt.get("h")
    bundle = Bundle(c.dir / "checkpoint")
    _fresh_upper(c.dir, bundle)
    asked = threading.Event()
    hold = tmp_path / "hold.sock"
    srv = _serve_hold(hold, b"abort", asked)
    try:
        with pytest.raises(ContainerError):
            rt.revive(c.id, RESTORER, json.dumps({"bundle": str(bundle.path), "hold": str(hold)}))
    finally:
        srv.close()
    assert asked.is_set(), "the restore never reached pre-resume"
    info = inspect(jaula, "h")
    assert info["State"]["Status"] == "checkpointed", info["State"]
    assert rt.get("h").cgroup().pids() == []  # nothing of it runs
    time.sleep(0.3)
    assert ticks(jaula, "h")[-1] == at_dump, "the aborted copy ran"
    # and the checkpoint is still good: a plain restore continues from it
    jaula.run("restore", "h")
    wait_ticks(jaula, "h", at_dump + 5)
