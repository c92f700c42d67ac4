"""What a migration does to files' identities (``st_dev``, ``st_ino``), with real node
services and a python workload (issue 11, zdtm's ``unlink_fstat03`` and ``file_locks01``).

Those two zdtm tests fail after a jaula migration though nothing they hold was lost: they
compare a file's ``st_dev`` and ``st_ino`` from before the dump with those after the restore,
and on the destination every file of the container is another inode on another file system
(a new overlay mount; the upperdir extracted anew, the image layers another node's).  No
migration between two file systems keeps those numbers (zdtm itself waives ``st_dev`` for
NFS).  What the tests hold is carried, checked here by its meaning: the open file whose name
was unlinked is still the inode of its other hardlink, with its size and offset, and the
flocks hold on the same files, shared and exclusive as before.

A program that remembers inode numbers does see the change.  SQLite in its default
rollback-journal mode compares the inode it opened with the path's before every write
transaction and then refuses to write (SQLITE_READONLY_DBMOVED): found by this workload
after a migration that reported success.  Preflight now refuses such a database before the
freeze, naming it; in WAL mode, which makes no such check, it migrates and writes on."""

from __future__ import annotations

import errno
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.poll import wait_for
from tests.helpers.nodes import Cluster2, make_cluster, serving
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]

IMAGE = "jaula-python:latest"

#: the container's init (``python3 -c WORKLOAD MODE``, MODE a SQLite journal mode or
#: ``none``): before /data/ready, the state of unlink_fstat03 and file_locks01 and a SQLite
#: database; after /data/go appears, its findings in /data/result (JSON)
WORKLOAD = r"""
import fcntl, json, os, sqlite3, sys, time
os.makedirs("/data", exist_ok=True)
fd = os.open("/data/f", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.link("/data/f", "/data/f.link")
os.unlink("/data/f")
os.write(fd, b"0" * 1000)
a, b = open("/data/lock.0", "w"), open("/data/lock.1", "w")
fcntl.flock(a, fcntl.LOCK_SH)
fcntl.flock(b, fcntl.LOCK_EX)
db = None
if sys.argv[1] != "none":
    db = sqlite3.connect("/data/db.sqlite", isolation_level=None)
    db.execute("pragma journal_mode=" + sys.argv[1])
    db.execute("create table t(v)")
    db.execute("insert into t values (1)")
open("/data/ready", "w").close()
while not os.path.exists("/data/go"):
    time.sleep(0.05)
st, ln = os.fstat(fd), os.stat("/data/f.link")
out = {"same_inode": st.st_ino == ln.st_ino, "nlink": st.st_nlink, "size": st.st_size,
       "pos": os.lseek(fd, 0, os.SEEK_CUR)}
if db is not None:
    try:
        db.execute("insert into t values (2)")
        out["sqlite"] = [r[0] for r in db.execute("select v from t")]
    except sqlite3.Error as e:
        out["sqlite"] = "%s: %s" % (getattr(e, "sqlite_errorname", "?"), e)
with open("/data/result.tmp", "w") as f:
    json.dump(out, f)
os.rename("/data/result.tmp", "/data/result")
time.sleep(86400)
"""


@pytest.fixture
def nodes(
    tmp_path: Path, busybox_image_layout: Path, python_image_layout: Path
) -> Iterator[Cluster2]:
    """node1 and node2 serving with the python image on both."""
    c = make_cluster(tmp_path / "cluster", busybox_image_layout)
    for node in ("node1", "node2"):
        c.local(node).run("image", "import", str(python_image_layout), "--name", IMAGE, timeout=300)
    with serving(c) as c:
        yield c


def _root(nodes: Cluster2, node: str, name: str) -> Path:
    """The container's root as the host sees it (``/proc/INIT/root``)."""
    pid = json.loads(nodes.local(node).out("inspect", name))[0]["State"]["Pid"]
    return Path(f"/proc/{pid}/root")


def _start(nodes: Cluster2, name: str, mode: str) -> Path:
    nodes.local("node1").run("run", "-d", "--name", name, IMAGE, "python3", "-c", WORKLOAD, mode)
    root = _root(nodes, "node1", name)
    assert wait_for((root / "data" / "ready").exists, 60), "the workload never got ready"
    return root


def _result(root: Path) -> dict[str, object]:
    (root / "data" / "go").touch()
    assert wait_for((root / "data" / "result").exists, 30), "the workload never answered"
    out: dict[str, object] = json.loads((root / "data" / "result").read_text())
    return out


def _flock_nb(path: Path, how: int) -> int:
    """0 when a new open file description of ``path`` gets the flock ``how`` at once
    (released again), EWOULDBLOCK when another holds a conflicting one."""
    with open(path) as f:
        try:
            fcntl.flock(f, how | fcntl.LOCK_NB)
        except BlockingIOError:
            return errno.EWOULDBLOCK
        fcntl.flock(f, fcntl.LOCK_UN)
        return 0


def test_the_state_of_unlink_fstat03_and_file_locks01_is_carried(nodes: Cluster2) -> None:
    _start(nodes, "ident", "none")
    nodes.op("migrate", "ident", "node2")
    nodes.assert_only_on("ident", "node2")
    root = _root(nodes, "node2", "ident")
    data = root / "data"
    assert _flock_nb(data / "lock.0", fcntl.LOCK_SH) == 0  # still shared
    assert _flock_nb(data / "lock.0", fcntl.LOCK_EX) == errno.EWOULDBLOCK
    assert _flock_nb(data / "lock.1", fcntl.LOCK_SH) == errno.EWOULDBLOCK  # still exclusive
    assert _result(root) == {"same_inode": True, "nlink": 1, "size": 1000, "pos": 1000}


def test_a_sqlite_database_in_rollback_journal_mode_is_refused_before_the_freeze(
    nodes: Cluster2,
) -> None:
    root = _start(nodes, "journal", "delete")
    p = nodes.op("migrate", "journal", "node2", check=False)
    assert p.returncode != 0, p.stdout
    err = " ".join(p.stderr.split())
    assert "SQLite database /data/db.sqlite" in err and "rollback-journal" in err, err
    assert "during preflight" in err or "aborted" not in err, err
    nodes.assert_only_on("journal", "node1")
    assert _result(root)["sqlite"] == [1, 2]  # never frozen, still writing on node1


def test_a_sqlite_database_in_wal_mode_migrates_and_writes_on(nodes: Cluster2) -> None:
    _start(nodes, "wal", "wal")
    nodes.op("migrate", "wal", "node2")
    nodes.assert_only_on("wal", "node2")
    assert _result(_root(nodes, "node2", "wal"))["sqlite"] == [1, 2]
