"""A migration whose dump fails on the source quotes a CRIU log that still exists once the
error is printed (issue 11, item 9): the source's session removes its scratch dir, where
CRIU wrote the log, before the error reaches the operator; the error quotes the copy kept
in the node's kept-logs dir (``logs/criu`` under its state root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.store import CRIU_LOGS_DIR
from tests.helpers.counter import ticks, wait_ticks
from tests.helpers.criu_logs import GHOST, quoted_log
from tests.helpers.nodes import make_cluster, serving
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


def test_a_failed_migration_dump_quotes_a_log_that_exists(
    tmp_path: Path, busybox_image_layout: Path
) -> None:
    with serving(make_cluster(tmp_path / "cluster", busybox_image_layout)) as nodes:
        n1 = nodes.local("node1")
        n1.run("run", "-d", "--name", "ghost", "busybox", "sh", "-c", GHOST)
        wait_ticks(n1, "ghost", 3)
        p = nodes.op("migrate", "ghost", "node2", check=False)
        assert p.returncode != 0 and "criu dump failed" in p.stderr, p.stderr
        log = quoted_log(p.stderr)
        assert log.is_file(), f"the log the error quotes is gone: {log}"
        kept = nodes.state_root("node1") / CRIU_LOGS_DIR
        assert log.parent == kept and "Error" in log.read_text()
        nodes.assert_only_on("ghost", "node1")
        n = ticks(n1, "ghost")[-1]
        wait_ticks(n1, "ghost", n + 3)
