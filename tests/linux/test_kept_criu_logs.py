"""A failed dump's error quotes a CRIU log that still exists when the error is read (issue
11, item 9).  CRIU wrote it into the half-made bundle (``checkpoint.new/criu/dump.log``),
which the failed checkpoint removes; the error quotes the copy kept in
``$JAULA_CRIU_LOG_DIR`` (here a directory of the test's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.counter import wait_ticks
from tests.helpers.criu_logs import GHOST, quoted_log
from tests.helpers.jaula import Jaula
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


def test_a_failed_dump_quotes_a_log_that_exists(
    jaula: Jaula, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = tmp_path / "kept-criu-logs"
    monkeypatch.setenv("JAULA_CRIU_LOG_DIR", str(kept))  # inherited by the CLI
    jaula.run("run", "-d", "--name", "ghost", "busybox", "sh", "-c", GHOST)
    wait_ticks(jaula, "ghost", 3)
    p = jaula.run("checkpoint", "ghost", check=False)
    assert p.returncode == 125 and "criu dump failed" in p.stderr, p.stderr
    log = quoted_log(p.stderr)
    assert log.is_file(), f"the log the error quotes is gone: {log}"
    assert log.parent == kept
    text = log.read_text()
    assert "Dumping FAILED" in text or "Error" in text
    # the place CRIU wrote it is gone, as before
    assert not list(jaula.root.glob("containers/*/checkpoint.new"))
