"""Reading and writing cgroupfs files, with errors that name the file, the value and the errno.

cgroupfs (kernfs) control files are small text files with one of a few shapes
(Documentation/admin-guide/cgroup-v2.rst, "Conventions"):

- a single value: ``pids.max`` -> ``max`` or ``5``; ``memory.limit_in_bytes`` -> ``67108864``;
- flat keyed: one ``key value`` pair per line: ``cpu.stat``, ``memory.events``,
  ``cgroup.events``, v1 ``memory.oom_control``;
- newline separated values: ``cgroup.procs``, ``tasks``;
- space separated values: ``cgroup.controllers``, ``cgroup.subtree_control``.

A value is written with one ``write(2)`` on a file opened ``O_WRONLY|O_TRUNC`` (never
``O_CREAT``: the kernel creates control files itself, so a missing file means a missing
controller or feature and must fail with ENOENT, in a fake cgroupfs as on the real one).

Every failure raises :class:`runtime.errors.CgroupError` carrying ``path`` and ``errno``.  The
three primitives :func:`_write_raw`, :func:`_mkdir_raw` and :func:`_rmdir_raw` are the only
places that touch the kernel; unit tests replace them to emulate kernfs on a plain directory.
"""

from __future__ import annotations

import errno as errno_mod
import os
from collections.abc import Callable
from pathlib import Path

from runtime import poll
from runtime.errors import CgroupError

#: Extra words appended to an error message, per errno, saying what it usually means here.
_HINTS: dict[int, str] = {
    errno_mod.ENOENT: "the file does not exist (controller not mounted or not enabled?)",
    errno_mod.EACCES: "permission denied (needs root or a delegated cgroup)",
    errno_mod.EPERM: "operation not permitted (needs root or a delegated cgroup)",
    errno_mod.EROFS: "cgroupfs is mounted read-only",
    errno_mod.ESRCH: "no such process",
    errno_mod.EINVAL: "the kernel rejected the value",
    errno_mod.EBUSY: "the cgroup is busy (it still has tasks or child cgroups, or the new limit "
    "is below current usage)",
    errno_mod.EISDIR: "expected a file, found a directory",
    errno_mod.ENOSPC: "no room for a new cgroup (cgroup.max.descendants/depth reached?)",
    errno_mod.EOPNOTSUPP: "not supported by this kernel or cgroup type",
}


def _describe(err: OSError) -> str:
    code = err.errno or 0
    text = os.strerror(code) if code else str(err)
    hint = _HINTS.get(code)
    return f"{text}: {hint}" if hint else text


def _error(action: str, path: Path, err: OSError) -> CgroupError:
    return CgroupError(f"cannot {action} {path}: {_describe(err)}", path=str(path), errno=err.errno)


# --- the three kernel-facing primitives (replaced by the unit tests' fake kernfs) ---


def _write_raw(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with a single write(2), as cgroupfs expects."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        written = os.write(fd, data)
    finally:
        os.close(fd)
    if written != len(data):
        raise OSError(errno_mod.EIO, f"short write ({written} of {len(data)} bytes)")


def _mkdir_raw(path: Path) -> None:
    os.mkdir(path, 0o755)


def _rmdir_raw(path: Path) -> None:
    os.rmdir(path)


# --- reading ---


def read_text(path: Path) -> str:
    """The whole content of a control file, stripped of surrounding whitespace."""
    try:
        return path.read_text().strip()
    except OSError as err:
        raise _error("read", path, err) from err


def read_int(path: Path) -> int:
    """A single-value file holding an integer.  ``max`` (v2 "unlimited") reads as -1."""
    text = read_text(path)
    if text == "max":
        return -1
    try:
        return int(text)
    except ValueError:
        raise CgroupError(
            f"unexpected content {text!r} in {path}: expected an integer", path=str(path)
        ) from None


def read_keyed(path: Path) -> dict[str, int]:
    """A flat keyed file (``key value`` per line) as a dict; non-integer values are skipped."""
    result: dict[str, int] = {}
    for line in read_text(path).splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                result[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return result


def read_words(path: Path) -> list[str]:
    """A space or newline separated file (``cgroup.controllers``, ``cgroup.procs``)."""
    return read_text(path).split()


def read_pids(path: Path) -> list[int]:
    """``cgroup.procs`` or ``tasks``: one pid per line."""
    return [int(word) for word in read_words(path)]


# --- writing ---


def write(path: Path, value: str | int) -> None:
    """Write one value to a control file.

    Raises:
        CgroupError: naming the file, the value and the errno (``path`` and ``errno`` set).
    """
    data = str(value).encode()
    try:
        _write_raw(path, data)
    except OSError as err:
        raise CgroupError(
            f"cannot write {str(value)!r} to {path}: {_describe(err)}",
            path=str(path),
            errno=err.errno,
        ) from err


# --- directories ---


def make_dir(path: Path) -> bool:
    """Create one cgroup directory.  Returns False when it already existed."""
    try:
        _mkdir_raw(path)
    except FileExistsError:
        if not path.is_dir():
            raise CgroupError(
                f"cannot create cgroup {path}: a non-directory is in the way",
                path=str(path),
                errno=errno_mod.EEXIST,
            ) from None
        return False
    except OSError as err:
        raise _error("create cgroup", path, err) from err
    return True


def make_dirs(root: Path, relpath: str) -> list[Path]:
    """Create ``root/relpath`` and its missing ancestors below ``root`` (which must exist).

    Returns the directories this call created, top-down.
    """
    if not root.is_dir():
        raise CgroupError(
            f"cgroup hierarchy {root} does not exist", path=str(root), errno=errno_mod.ENOENT
        )
    created = []
    current = root
    for part in Path(relpath).parts:
        current = current / part
        if make_dir(current):
            created.append(current)
    return created


def remove_dir(path: Path) -> bool:
    """Remove one cgroup directory.  Returns False when it did not exist.

    rmdir(2) on a cgroup that still has tasks or children fails with EBUSY
    (cgroup-v2.rst, "Processes": a cgroup without children or live processes can be removed).
    """
    try:
        _rmdir_raw(path)
    except FileNotFoundError:
        return False
    except OSError as err:
        raise _error("remove cgroup", path, err) from err
    return True


def remove_empty_ancestors(root: Path, relpath: str) -> None:
    """Remove the ancestors of ``root/relpath`` below ``root``, deepest first, while empty.

    A parent that is busy (other containers live there) or already gone is left alone.
    """
    parts = Path(relpath).parts
    for depth in range(len(parts) - 1, 0, -1):
        ancestor = root.joinpath(*parts[:depth])
        try:
            remove_dir(ancestor)
        except CgroupError as err:
            if err.errno in (errno_mod.EBUSY, errno_mod.ENOTEMPTY, errno_mod.EEXIST):
                return
            raise


def subtree(path: Path) -> list[Path]:
    """``path`` and every cgroup below it, deepest first (the order rmdir needs)."""
    found: list[Path] = []
    for dirpath, dirnames, _files in os.walk(path, topdown=False):
        del dirnames
        found.append(Path(dirpath))
    return found


def procs_recursive(path: Path) -> list[int]:
    """Pids in ``cgroup.procs`` of ``path`` and of every cgroup below it, sorted, unique."""
    pids: set[int] = set()
    for cgroup in subtree(path):
        try:
            pids.update(read_pids(cgroup / "cgroup.procs"))
        except CgroupError as err:
            if err.errno != errno_mod.ENOENT:  # removed while we walked
                raise
    return sorted(pids)


def wait_for(condition: Callable[[], bool], timeout_s: float, max_interval_s: float = 0.05) -> bool:
    """:func:`runtime.poll.wait_for` for a yes/no condition (the cgroup drivers' name)."""
    return bool(poll.wait_for(condition, timeout_s, max_interval_s))
