"""The log of a failed CRIU action is copied where nothing removes it, and the error quotes
the copy (issue 11, item 9): migrate.criu.keep_log, its pruning, its fallbacks."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrate import criu


@pytest.fixture(autouse=True)
def no_process_wide_dir() -> Iterator[None]:
    criu.keep_logs_in(None)
    yield
    criu.keep_logs_in(None)


def test_the_error_quotes_a_kept_copy_that_outlives_the_scratch_dir(tmp_path: Path) -> None:
    scratch = tmp_path / "session"
    scratch.mkdir()
    (scratch / "dump.log").write_text("(00.1) Error (criu/files-reg.c:1): Can't dump ghost\n")
    err = criu._failed("dump", "see the log lines", scratch / "dump.log", tmp_path / "kept")
    (scratch / "dump.log").unlink()
    scratch.rmdir()  # what a failed migration does to its scratch dir
    assert err.log_path is not None and Path(err.log_path).parent == tmp_path / "kept"
    assert Path(err.log_path).read_text().endswith("Can't dump ghost\n")
    assert "Can't dump ghost" in err.log_excerpt and err.log_path in str(err)
    assert stat.S_IMODE(os.stat(err.log_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "kept").st_mode) == 0o700


def test_only_the_newest_copies_are_kept_and_nothing_else_is_touched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(criu, "KEPT_LOGS", 3)
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "README").write_text("not a kept log")
    log = tmp_path / "restore.log"
    copies = []
    for i in range(5):
        log.write_text(f"run {i}\n")
        copies.append(criu.keep_log(log, "restore", kept))
    left = sorted(p.name for p in kept.iterdir())
    assert left == sorted(["README", *(c.name for c in copies[2:])])
    assert [c.read_text() for c in copies[2:]] == ["run 2\n", "run 3\n", "run 4\n"]


def test_directory_chosen_by_caller_then_process_then_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JAULA_CRIU_LOG_DIR", raising=False)
    assert criu.kept_logs_dir() == criu.DEFAULT_KEPT_LOGS_DIR
    monkeypatch.setenv("JAULA_CRIU_LOG_DIR", str(tmp_path / "env"))
    assert criu.kept_logs_dir() == tmp_path / "env"
    criu.keep_logs_in(tmp_path / "node")
    assert criu.kept_logs_dir() == tmp_path / "node"
    assert criu.kept_logs_dir(tmp_path / "caller") == tmp_path / "caller"


def test_no_log_or_no_room_leaves_the_original_path_and_raises_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "never-written.log"
    assert criu.keep_log(missing, "dump", tmp_path / "kept") == missing
    assert list((tmp_path / "kept").iterdir()) == []
    (tmp_path / "file").write_text("")
    log = tmp_path / "dump.log"
    log.write_text("x\n")
    assert criu.keep_log(log, "dump", tmp_path / "file" / "kept") == log  # ENOTDIR
