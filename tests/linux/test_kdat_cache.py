"""CRIU's kdat cache under /dev/shm (jaula's patch 0010 and migrate.criu.criu_env): used
only from a directory that is root's own and closed to others, on a tmpfs.  A directory of
that name made by somebody else, or opened to others, is never read by root's CRIU."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrate import criu
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


@pytest.fixture
def kdat_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = Path("/dev/shm") / f"criu-kdat-test-{secrets.token_hex(4)}"
    monkeypatch.setattr(criu, "KDAT_DIR", d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _check(env: dict[str, str]) -> str:
    """``criu check`` with ``env``; returns its log (stderr at -v4)."""
    p = subprocess.run(
        [criu.require(), "check", "-v4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stderr


def test_a_private_dir_holds_the_cache_and_is_used(kdat_dir: Path) -> None:
    env = criu.criu_env()
    assert env["CRIU_KDAT_DIR"] == str(kdat_dir)
    assert (os.lstat(kdat_dir).st_mode & 0o777) == 0o700
    _check(env)
    assert (kdat_dir / "criu.kdat").is_file()  # written by the first run
    assert "Loaded kdat cache from" in _check(env)  # read by the next


def test_a_dir_of_someone_else_is_not_used(kdat_dir: Path) -> None:
    kdat_dir.mkdir(mode=0o700)
    os.chown(kdat_dir, 65534, 65534)  # as if user nobody made it first
    assert "CRIU_KDAT_DIR" not in criu.criu_env()
    # and CRIU itself refuses it, even when told to use it
    log = _check({**os.environ, "CRIU_KDAT_DIR": str(kdat_dir)})
    assert "is not a private directory" in log
    assert "Loaded kdat cache" not in log
    assert not (kdat_dir / "criu.kdat").exists()


def test_a_dir_open_to_others_is_not_used(kdat_dir: Path) -> None:
    kdat_dir.mkdir()
    kdat_dir.chmod(0o755)
    assert "CRIU_KDAT_DIR" not in criu.criu_env()
    log = _check({**os.environ, "CRIU_KDAT_DIR": str(kdat_dir)})
    assert "is not a private directory" in log
    assert not (kdat_dir / "criu.kdat").exists()


def test_a_stale_temporary_file_is_cleared(kdat_dir: Path) -> None:
    """A CRIU killed while saving leaves criu.kdat.tmp, which CRIU creates with O_EXCL:
    left there, no later run could save the cache."""
    criu.criu_env()
    tmp = kdat_dir / "criu.kdat.tmp"
    tmp.write_bytes(b"half")
    os.utime(tmp, (0, 0))
    env = criu.criu_env()
    assert not tmp.exists()
    _check(env)
    assert (kdat_dir / "criu.kdat").is_file()
