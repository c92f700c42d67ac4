"""The container's upperdir as a tar: what a checkpoint carries of its filesystem.

Written with GNU tar in POSIX (pax) format, which keeps everything overlayfs put in the
upperdir: whiteouts (character devices 0/0), opaque and redirect xattrs
(``trusted.overlay.*``), other xattrs, owners (numeric), modes, mtimes, hardlinks, symlinks,
FIFOs and sparse files (``--sparse``).

Reading a tar that came from elsewhere is checked first, entry by entry, with the runtime's
safe tar reader (:mod:`runtime.tarsafe`, :func:`validate`): no absolute names or ``..``,
bounded sizes and entry count, no truncated archive; and the rules of this format: nothing
written through a symlink, hardlinks only to earlier regular entries, no device other than a
whiteout.  Only then does GNU tar extract it.  ``trusted.overlay.origin`` is not restored: it names
lower-layer inodes of the source node, which mean nothing here.

Sources: overlayfs.rst ("whiteouts and opaque directories", "redirect_dir"), GNU tar manual
("Extended File Attributes", "Archiving Sparse Files"), POSIX pax format.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from migrate.errors import BundleError
from runtime.errors import ArchiveError, UnsafeArchiveError
from runtime.tarsafe import TarLimits, entry_parts, open_tar

MAX_TOTAL_BYTES = 64 << 30
MAX_ENTRIES = 2_000_000
_LIMITS = TarLimits(
    max_entries=MAX_ENTRIES, max_entry_bytes=MAX_TOTAL_BYTES, max_total_bytes=MAX_TOTAL_BYTES
)
_XATTR_ARGS = ["--xattrs", "--xattrs-include=*"]


#: what GNU tar says (exit status 1) of a file the running container changes while it is
#: read: harmless for a pre-copy, whose changed files are sent again after the freeze
_LIVE_CHANGES = ("file changed as we read it", "File removed before we read it", "File shrank by")
#: what GNU tar warns of with exit status 0: a unix socket's inode (CRIU binds it again at
#: restore), not content
_NOTICES = ("socket ignored",)


def write(upperdir: Path, out: Path, live: bool = False) -> int:
    """Tar ``upperdir`` into ``out``; returns the tar's size in bytes.

    ``live``: the container runs meanwhile (a migration's pre-copy, taken after a
    :func:`snapshot`): a file it changes or removes while tar reads it is not an error,
    since :func:`write_delta` sends every entry whose stamp changed since the snapshot.

    Raises BundleError with tar's message on failure."""
    p = subprocess.run(
        [
            "tar",
            "--create",
            "--file",
            str(out),
            "--directory",
            str(upperdir),
            "--format=posix",
            "--sparse",
            "--numeric-owner",
            "--acls",
            *_XATTR_ARGS,
            ".",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    harmless = (
        live
        and p.returncode == 1
        and all(
            any(m in line for m in (*_LIVE_CHANGES, *_NOTICES))
            for line in p.stderr.strip().splitlines()
        )
    )
    if p.returncode != 0 and not harmless:
        raise BundleError(f"cannot archive the upperdir {upperdir}: {p.stderr.strip()}")
    return out.stat().st_size


def _parts(name: str, entry: str) -> tuple[str, ...]:
    """:func:`runtime.tarsafe.entry_parts`, refusing with BundleError."""
    try:
        return entry_parts(name, entry)
    except UnsafeArchiveError as e:
        raise BundleError(f"unsafe entry {entry!r} in the rootfs diff: {e}") from e


def validate(tar_path: Path) -> int:
    """Check every entry of a rootfs-diff tar; returns the number of entries.

    Raises BundleError naming the first unsafe entry, or saying why the tar is not a
    valid, complete tar."""
    return _validated(tar_path)[0]


def _validated(tar_path: Path) -> tuple[int, list[tuple[str, bool]]]:
    """:func:`validate`, also returning the entries' names (as the tar spells them) and
    whether each is a directory, in the tar's order."""
    symlinks: set[tuple[str, ...]] = set()
    regular: set[tuple[str, ...]] = set()
    names: list[tuple[str, bool]] = []
    try:
        with open_tar(tar_path, _LIMITS, f"the rootfs diff {tar_path}") as reader:
            for m in reader:
                path = _parts(m.name, m.name)
                for i in range(len(path)):
                    if path[:i] in symlinks:
                        raise BundleError(
                            f"unsafe entry {m.name!r} in the rootfs diff: it is "
                            f"written through the symlink {'/'.join(path[:i]) or '.'}"
                        )
                if m.ischr() or m.isblk():  # not isdev(): tarfile counts FIFOs as devices
                    if not (m.ischr() and m.devmajor == 0 and m.devminor == 0):
                        raise BundleError(
                            f"unsafe entry {m.name!r} in the rootfs diff: device "
                            f"{m.devmajor}:{m.devminor} (only whiteouts allowed)"
                        )
                elif m.islnk():
                    target = _parts(m.linkname, m.name)
                    if target not in regular:
                        raise BundleError(
                            f"unsafe entry {m.name!r} in the rootfs diff: "
                            f"hardlink to {m.linkname!r}, not an earlier file"
                        )
                elif m.issym():
                    symlinks.add(path)
                elif m.isreg():
                    regular.add(path)
                elif not (m.isdir() or m.isfifo()):
                    raise BundleError(
                        f"unsafe entry {m.name!r} in the rootfs diff: unsupported type {m.type!r}"
                    )
                if not m.issym():
                    symlinks.discard(path)  # replaced by a non-link entry
                names.append((m.name, m.isdir()))
            return reader.entries, names
    except ArchiveError as e:  # limits, corrupt or truncated tar (the message names it)
        raise BundleError(str(e)) from e
    except OSError as e:
        raise BundleError(f"cannot read the rootfs diff {tar_path}: {e.strerror or e}") from e


def _tar_extract(tar_path: Path, upperdir: Path, what: str, *more: str) -> None:
    """GNU tar extracting a validated upperdir tar into ``upperdir``, owners, modes, ACLs
    and xattrs kept (``trusted.overlay.origin`` left out: it names the source's inodes).
    Raises BundleError naming ``what`` with tar's message."""
    p = subprocess.run(
        [
            "tar",
            "--extract",
            "--file",
            str(tar_path),
            "--directory",
            str(upperdir),
            "--same-owner",
            "--same-permissions",
            "--numeric-owner",
            "--acls",
            *_XATTR_ARGS,
            "--xattrs-exclude=trusted.overlay.origin",
            *more,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if p.returncode != 0:
        raise BundleError(f"cannot extract {what} into {upperdir}: {p.stderr.strip()}")


def extract(tar_path: Path, upperdir: Path) -> None:
    """Validate, then extract into an empty ``upperdir`` (created 0755 if missing).

    Raises BundleError."""
    validate(tar_path)
    upperdir.mkdir(mode=0o755, parents=True, exist_ok=True)
    if any(upperdir.iterdir()):
        raise BundleError(f"cannot restore the rootfs diff into {upperdir}: it is not empty")
    _tar_extract(tar_path, upperdir, "the rootfs diff")
    os.chmod(upperdir, 0o755)


#: what identifies a version of an upperdir entry: (mode, size, mtime ns, ctime ns, inode)
EntryStamp = tuple[int, int, int, int, int]


def snapshot(upperdir: Path) -> dict[str, EntryStamp]:
    """Every entry of ``upperdir`` (relative path -> stamp), without following symlinks.
    Taken before a pre-copy, it lets :func:`write_delta` send only what changed since."""
    out: dict[str, EntryStamp] = {}
    root = str(upperdir)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            out[os.path.relpath(full, root)] = (
                st.st_mode,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_ino,
            )
    return out


def write_delta(upperdir: Path, before: dict[str, EntryStamp], out: Path) -> tuple[list[str], int]:
    """Tar what changed in ``upperdir`` since ``before`` into ``out`` (no recursion: each
    new or changed entry alone, directories for their metadata).  Returns (paths to delete
    first on the receiving side, number of entries in the tar).  A path whose type changed is
    in both: deleted, then written anew."""
    now = snapshot(upperdir)
    deleted = sorted(p for p in before if p not in now)
    changed = sorted(p for p, st in now.items() if before.get(p) != st)
    deleted += [p for p in changed if p in before and (before[p][0] >> 12) != (now[p][0] >> 12)]
    lst = out.with_suffix(".list")
    lst.write_bytes(b"".join(os.fsencode(p) + b"\0" for p in changed))
    try:
        p = subprocess.run(
            [
                "tar",
                "--create",
                "--file",
                str(out),
                "--directory",
                str(upperdir),
                "--format=posix",
                "--sparse",
                "--numeric-owner",
                "--acls",
                *_XATTR_ARGS,
                "--no-recursion",
                "--null",
                "--files-from",
                str(lst),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        lst.unlink()
    if p.returncode != 0:
        raise BundleError(f"cannot archive the changes of {upperdir}: {p.stderr.strip()}")
    return sorted(set(deleted)), len(changed)


def apply_deleted(upperdir: Path, deleted: list[str]) -> None:
    """Remove ``deleted`` (relative paths from :func:`write_delta`) from ``upperdir``,
    refusing any path that would leave it.  Raises BundleError."""
    import shutil

    root = os.path.realpath(upperdir)
    for rel in sorted(deleted, key=lambda p: -p.count("/")):
        full = _inside(root, rel, "deleted path")
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        elif os.path.lexists(full):
            os.unlink(full)


def _inside(root: str, rel: str, what: str) -> str:
    """``root/rel`` (``root`` a real path), its parent checked to be ``root`` or under it
    on this disk.  Raises BundleError naming ``what`` and ``rel`` otherwise."""
    if not _parts(rel, rel):
        raise BundleError(f"unsafe {what} {rel!r}: it names the upperdir itself")
    full = os.path.join(root, rel)
    parent = os.path.realpath(os.path.dirname(full))
    if parent != root and not parent.startswith(root + os.sep):
        raise BundleError(f"unsafe {what} {rel!r}: it leaves the upperdir")
    return full


def extract_over(tar_path: Path, upperdir: Path) -> None:
    """Validate, then extract a delta tar over an existing ``upperdir``.

    Every entry's parent must be inside ``upperdir`` on this disk (the base may have put a
    symlink there, which :func:`validate` cannot see).  Every entry that is not a directory
    first has its path unlinked where it exists (a directory there is left to the sender's
    deleted list).  Written in place instead (``--overwrite`` opens an existing file with
    ``O_TRUNC``), a file would be written through the hardlinks the base gave it: after
    ``ln A A~`` and then a new ``A`` renamed over the old one (a save that keeps a backup),
    the old content the delta carries for ``A~`` landed in ``A`` as well.  Every name of a
    changed inode is in the delta (they share its stamp, :func:`snapshot`), so the tar links
    them again; a name the source unlinked from it gets an inode of its own.

    Raises BundleError."""
    _, names = _validated(tar_path)
    root = os.path.realpath(upperdir)
    paths = [(_inside(root, rel, "entry"), isdir) for rel, isdir in names]
    for full, isdir in paths:
        if isdir or not os.path.lexists(full):
            continue
        if not os.path.isdir(full) or os.path.islink(full):
            try:
                os.unlink(full)
            except OSError as e:
                raise BundleError(
                    f"cannot replace {full} with the rootfs delta's: {e.strerror or e}"
                ) from e
    _tar_extract(tar_path, upperdir, "the rootfs delta", "--overwrite", "--no-recursion")
