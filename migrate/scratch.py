"""Where a migration's transient files live: one private directory per state root, under
/dev/shm when it has room (a large dump is then not written back to disk), else under the
state root's ``tmp``.  Several nodes can share a host, so the directory is named after the
state root (:func:`root_tag`).

Layout::

    /dev/shm/jaula-<root tag>/         mode 0700, ours (checked: /dev/shm is world-writable)
        outgoing-<session>/            the source's CRIU images, tars, TLS identity
        incoming-<session>/            the destination's staging dir (criu/, layers/, ...)
            lazy-daemon.json           post-copy: {"pid": int, "start": int} of the session's
                                       ``criu lazy-pages`` (it outlives the node service)
    <state root>/tmp/                  the same, when /dev/shm has no room
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
from pathlib import Path

from migrate.errors import PreflightError
from runtime.container import Runtime
from runtime.state import atomic_write_json
from runtime.store import TMP_DIR
from runtime.syscalls import is_alive, proc_start_time

#: in an incoming session's dir: the pid and start time of its lazy-pages daemon
LAZY_DAEMON_FILE = "lazy-daemon.json"

#: where the CRIU images of a migration live for the seconds they exist: memory (tmpfs)
#: when it has room, so that a large dump is not also written back to disk
SCRATCH_TMPFS = Path("/dev/shm")


def root_tag(rt: Runtime) -> str:
    """Ten hex characters naming ``rt``'s state root (sha1 of its resolved path)."""
    return hashlib.sha1(str(rt.root.resolve()).encode()).hexdigest()[:10]


def scratch_dir(rt: Runtime, need_bytes: int) -> Path:
    """A directory for a session's transient files: under /dev/shm when it has room for
    ``need_bytes`` (plus a quarter), else under the state root's ``tmp``.

    Raises PreflightError when the /dev/shm directory of that name is not ours."""
    try:
        st = os.statvfs(SCRATCH_TMPFS)
        if st.f_bavail * st.f_frsize > need_bytes * 5 // 4:
            d = SCRATCH_TMPFS / f"jaula-{root_tag(rt)}"
            d.mkdir(mode=0o700, exist_ok=True)
            check_private_dir(d)
            return d
    except OSError:
        pass
    return rt.root / TMP_DIR


def check_private_dir(d: Path) -> None:
    """/dev/shm is writable by everyone: a directory of that name made by someone else
    (before us, after a reboot) would let them swap the images root restores, or the
    session's certificates.  Ours must be a real directory, ours, closed to others.

    Raises PreflightError naming it."""
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PreflightError(
            f"{d} is not a private directory of this user (owner uid "
            f"{st.st_uid}, mode {stat.filemode(st.st_mode)}): someone else "
            "made it; remove it, then migrate again"
        )


def remove_scratch(d: Path) -> None:
    """Remove a session's directory, and its tmpfs parent when nothing else is in it."""
    shutil.rmtree(d, ignore_errors=True)
    if d.parent.parent == SCRATCH_TMPFS:
        try:
            d.parent.rmdir()
        except OSError:
            pass  # another session of this node is using it


def scratch_dirs(rt: Runtime) -> list[Path]:
    """Every place :func:`scratch_dir` may have used for ``rt`` (for recovery)."""
    return [SCRATCH_TMPFS / f"jaula-{root_tag(rt)}", rt.root / TMP_DIR]


def disk_usage_bytes(path: Path) -> int:
    """Bytes allocated to the files under ``path`` (st_blocks * 512; files that vanish
    meanwhile count 0)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


def record_lazy_daemon(d: Path, pid: int) -> None:
    """Write :data:`LAZY_DAEMON_FILE` in session dir ``d``: ``pid`` and its start time
    (clock ticks since boot), so that a restarted service can end that very process and
    no other (never by name).  Raises OSError."""
    atomic_write_json(d / LAZY_DAEMON_FILE, {"pid": pid, "start": proc_start_time(pid)})


def lazy_daemon(d: Path) -> tuple[int, int] | None:
    """The (pid, start time) recorded in session dir ``d`` when that process still runs,
    else None (no record, unreadable, or the pid now names another process)."""
    try:
        rec = json.loads((d / LAZY_DAEMON_FILE).read_text())
        pid, start = int(rec["pid"]), rec["start"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (pid, start) if isinstance(start, int) and is_alive(pid, start) else None


def end_lazy_daemon(d: Path) -> int | None:
    """SIGKILL the lazy-pages daemon recorded in session dir ``d`` if it still runs (its
    copy of the container is not resumed, so nothing needs its pages); returns its pid,
    or None when there was none.  A daemon that is not our child is reaped by init."""
    found = lazy_daemon(d)
    if found is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(found[0], signal.SIGKILL)
    return found[0]


def discard_session_dir(d: Path) -> int | None:
    """Remove an abandoned session dir ``d`` (:func:`remove_scratch`) after ending its
    lazy-pages daemon (:func:`end_lazy_daemon`); returns that daemon's pid, or None."""
    pid = end_lazy_daemon(d)
    remove_scratch(d)
    return pid
