"""A failed dump's error quotes a CRIU log that still exists when the error is read (issue
11, item 9).  CRIU wrote it into the half-made bundle (``checkpoint.new/criu/dump.log``),
which the failed checkpoint removes; the error quotes the copy kept in
``$JAULA_CRIU_LOG_DIR`` (here a directory of the test's)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.counter import COUNTER, wait_ticks
from tests.linux.conftest import Jaula, needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]

#: a deleted-but-open file larger than the ghost limit (64 MiB): CRIU refuses to dump it
GHOST = "head -c 80000000 /dev/zero > /tmp/big; exec 3</tmp/big; rm /tmp/big; " + COUNTER


def quoted_log(stderr: str) -> Path:
    """The log path a CriuError quotes (``criu log (PATH): ...``)."""
    m = re.search(r"criu log \((/[^)]+)\)", stderr)
    assert m, f"the error quotes no CRIU log: {stderr}"
    return Path(m.group(1))


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
