"""One safe reader for every tar jaula reads: image layers, rootfs diffs, bundles, image packs.

Three pieces, for the four readers: :mod:`runtime.image.layers` and ``migrate.rootfs_diff``
(name check and reader, with their own rules on top), ``migrate.bundle`` and
``migrate.image_pack`` (the flat extractor):

* :func:`entry_parts` turns a member name into path components relative to the archive's
  root, refusing absolute names, ``..`` components and NUL bytes.  (The outer image archives,
  oci-archive and docker-archive, are read in place by :class:`runtime.image.oci.TarSource`,
  which only looks members up by name and never writes them out.)
* :class:`TarReader` (opened with :func:`open_tar`) reads a tar front to back in stream mode
  (one pass, nothing seeks back, every header dropped once handled) and yields its members,
  applying :class:`TarLimits` as it goes: the number of entries, the size of one regular file
  and the total of all regular files.  Sizes are *apparent* sizes: a GNU sparse member counts
  for the whole file it describes, not for the few blocks the archive stores, so a 4 KiB
  archive declaring a 10 GB file is over a 1 GiB bound.  :meth:`TarReader.write_data` writes a
  member's data into a file descriptor; a sparse member's holes are sought over, never
  written, so what is allocated on disk is what the archive stores.  The reader turns
  :mod:`tarfile`'s errors into :class:`~runtime.errors.CorruptArchiveError` and refuses a
  **truncated** archive, which :mod:`tarfile` accepts silently as long as the cut falls on or
  inside a header: the archive must end with the end-of-archive marker (a zero block; POSIX
  wants two, GNU tar accepts one with a warning, and so do we).  A cut inside a member's data
  is refused too, as :mod:`tarfile` does.
* :func:`extract_flat` writes the regular files of a tar, each at one of the places its
  caller allows, into an existing directory: no directories are created, every parent is
  opened with ``O_NOFOLLOW``, and every file is created with ``O_EXCL|O_NOFOLLOW`` (mode
  0600), so an archive can neither write outside the directory nor replace what is there.

Errors (:mod:`runtime.errors`): :class:`~runtime.errors.UnsafeArchiveError` for an entry that
is not allowed, its subclass :class:`~runtime.errors.ArchiveLimitError` for a bound passed,
:class:`~runtime.errors.CorruptArchiveError` for a malformed or truncated archive; all derive
from :class:`~runtime.errors.ArchiveError` and name the member concerned.  Callers outside the
runtime translate them at their boundary (``raise BundleError(...) from e``).

Sources: POSIX.1-2008 ``pax`` (ustar header, end of archive), GNU tar manual ("Basic Tar
Format", "Storing Sparse Files": the old GNU and the PAX 0.0, 0.1 and 1.0 sparse formats,
which :mod:`tarfile` decodes into ``TarInfo.sparse``), and :mod:`tarfile`'s own ``makefile``,
which seeks over holes the same way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Self, cast

from runtime.errors import ArchiveLimitError, CorruptArchiveError, UnsafeArchiveError

_CHUNK_BYTES = 1024 * 1024
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class TarLimits:
    """Bounds on what one archive may hold.

    Attributes:
        max_entries: number of members (headers of any type, long-name and PAX records
            excepted: :mod:`tarfile` folds those into the member they describe).
        max_entry_bytes: apparent size of one regular file, bytes (a sparse file at its full
            size).
        max_total_bytes: apparent sizes of all regular files together, bytes (hardlinks and
            other types count for nothing).
    """

    max_entries: int
    max_entry_bytes: int
    max_total_bytes: int


def entry_parts(name: str, entry: str | None = None) -> tuple[str, ...]:
    """Split a tar member name (or a hardlink target) into path components relative to the
    archive root: ``./a/./b//c`` gives ``("a", "b", "c")``; ``""``, ``.``, ``./`` and ``/``
    name the root and give ``()``.

    Args:
        name: the name (or link target) as written in the archive.
        entry: the member to name in the error (default: ``name``).

    Raises:
        UnsafeArchiveError: the name is absolute (other than a lone ``/``), has a ``..``
            component or a NUL byte.
    """
    entry = name if entry is None else entry
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if name.startswith("/") and parts:
        raise UnsafeArchiveError(f"entry {entry!r}: absolute path {name!r}", entry)
    if ".." in parts:
        raise UnsafeArchiveError(f"entry {entry!r}: path {name!r} has a '..' component", entry)
    if "\x00" in name:
        raise UnsafeArchiveError(f"entry {entry!r}: NUL in path", entry)
    return parts


class _TarFile(tarfile.TarFile):
    """A :class:`tarfile.TarFile` that remembers why its last header read failed."""

    last_header_error: tarfile.HeaderError | None = None


class _TarInfo(tarfile.TarInfo):
    """Records the header error that ends the archive, which :mod:`tarfile` swallows
    (a zero block, but also no bytes at all, half a header or a bad checksum)."""

    @classmethod
    def fromtarfile(cls, tarfile: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tarfile)
        except _HEADER_ERROR as e:
            if isinstance(tarfile, _TarFile):
                tarfile.last_header_error = e
            raise


_HEADER_ERROR = tarfile.HeaderError
#: how an archive whose last header read failed with this tarfile error (class name: typeshed
#: does not declare them) ended; "EOFHeaderError" (a zero block) is the normal end
_ENDINGS = {
    "EmptyHeaderError": "it ends without the end-of-archive marker",
    "TruncatedHeaderError": "it ends inside a header",
    "InvalidHeaderError": "a header is invalid",
}
_TAR_ERRORS = (tarfile.TarError, EOFError)


class TarReader:
    """Reads one tar archive front to back; see the module docstring.

    Iterating yields every member in order, after the limits are applied; the data of the
    member just yielded can be read with :meth:`write_data` before the next one is asked
    for.  The iteration ends normally only at the end-of-archive marker.

    Attributes:
        what: how errors name the archive (``"the image pack"``, ``"layer sha256:..."``).
        entries: members yielded so far.
        total_bytes: apparent bytes of the regular files yielded so far.
    """

    def __init__(self, tf: _TarFile, limits: TarLimits, what: str) -> None:
        self._tf = tf
        self.limits = limits
        self.what = what
        self.entries = 0
        self.total_bytes = 0
        self._last: str | None = None

    def _corrupt(self, reason: str) -> CorruptArchiveError:
        return CorruptArchiveError(f"{self.what} is not a valid tar: {reason}", reason, self._last)

    def _where(self) -> str:
        return f"after entry {self._last!r}" if self._last is not None else "at its start"

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        tf = self._tf
        while True:
            try:
                m = tf.next()
            except _TAR_ERRORS as e:
                raise self._corrupt(f"{e} ({self._where()}): truncated or corrupt") from e
            if m is None:
                break
            tf.members.clear()  # type: ignore[attr-defined]  # else every header is kept
            self._last = m.name
            self._count(m)
            yield m
        # Only a failed header read ends the archive (the first one may have been read when
        # the archive was opened), and tarfile keeps the reason to itself.
        end = tf.last_header_error
        name = type(end).__name__ if end is not None else None
        if name == "EOFHeaderError":  # a zero block: the end-of-archive marker
            return
        why = _ENDINGS.get(name or "", "it ends unexpectedly")
        if name == "InvalidHeaderError":
            why = f"{why} ({end})"
        raise self._corrupt(f"{why} {self._where()}: the archive is truncated or corrupt")

    def _count(self, m: tarfile.TarInfo) -> None:
        lim = self.limits
        self.entries += 1
        if self.entries > lim.max_entries:
            raise ArchiveLimitError(
                f"{self.what} has more than {lim.max_entries} entries (at {m.name!r})",
                m.name,
                "entries",
                lim.max_entries,
            )
        if not m.isreg():
            return
        if m.size > lim.max_entry_bytes:
            raise ArchiveLimitError(
                f"{self.what}: entry {m.name!r} is {m.size} bytes, over the "
                f"{lim.max_entry_bytes} byte limit",
                m.name,
                "entry_bytes",
                lim.max_entry_bytes,
            )
        self.total_bytes += m.size
        if self.total_bytes > lim.max_total_bytes:
            raise ArchiveLimitError(
                f"{self.what} unpacks to more than {lim.max_total_bytes} bytes "
                f"(at entry {m.name!r})",
                m.name,
                "total_bytes",
                lim.max_total_bytes,
            )

    def _segments(self, m: tarfile.TarInfo) -> list[tuple[int, int]]:
        """The (offset, length) data runs of a regular member, checked against its size."""
        if m.sparse is None:
            return [(0, m.size)]
        sparse = cast(list[tuple[int, int]], m.sparse)
        runs = [(off, n) for off, n in sparse if n > 0]
        end = 0
        for off, n in runs:
            if off < end or off + n > m.size:
                raise self._corrupt(
                    f"entry {m.name!r}: its sparse map is out of order or runs past the "
                    f"{m.size} bytes of the file"
                )
            end = off + n
        stored = self._tf.offset - m.offset_data  # the member's data area, padded
        if sum(n for _, n in runs) > stored:
            raise self._corrupt(
                f"entry {m.name!r}: its sparse map declares more data than the entry holds"
            )
        return runs

    def write_data(self, m: tarfile.TarInfo, fd: int) -> int:
        """Write the data of ``m`` (the member just yielded, a regular file) into the new,
        empty file ``fd``, from offset 0; a sparse member's holes are left as holes (the file
        is then extended to its full size with ``ftruncate``).  ``fd`` stays open.

        Returns:
            the bytes of data written (for a sparse member, less than its size).

        Raises:
            CorruptArchiveError: the data runs past the end of the archive, or the sparse
                map is inconsistent.
            OSError: writing failed.
        """
        runs = self._segments(m)
        src = cast(IO[bytes], self._tf.fileobj)
        written = 0
        try:
            src.seek(m.offset_data)
            for off, n in runs:
                if m.sparse is not None:
                    os.lseek(fd, off, os.SEEK_SET)
                while n > 0:
                    chunk = src.read(min(_CHUNK_BYTES, n))
                    if not chunk:
                        raise self._corrupt(
                            f"the data of entry {m.name!r} runs past the end of the archive: "
                            "it is truncated"
                        )
                    n -= len(chunk)
                    written += len(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
        except _TAR_ERRORS as e:
            raise self._corrupt(f"{e} (in entry {m.name!r}): truncated or corrupt") from e
        if m.sparse is not None:
            os.ftruncate(fd, m.size)
        return written


@contextlib.contextmanager
def open_tar(source: Path | IO[bytes], limits: TarLimits, what: str) -> Iterator[TarReader]:
    """A :class:`TarReader` over the uncompressed tar ``source`` (a path, or a stream read
    from its current position), closed on exit.

    Raises:
        CorruptArchiveError: ``source`` is not a tar (raised on entry).
        OSError: ``source`` cannot be opened.
    """
    with contextlib.ExitStack() as stack:
        if isinstance(source, Path):
            fileobj: IO[bytes] = stack.enter_context(open(source, "rb"))
        else:
            fileobj = source
        try:
            tf = _TarFile.open(
                fileobj=fileobj,
                mode="r|",
                tarinfo=_TarInfo,
                encoding="utf-8",
                errors="surrogateescape",
            )
        except _TAR_ERRORS as e:
            raise CorruptArchiveError(f"{what} is not a valid tar: {e}", str(e)) from e
        assert isinstance(tf, _TarFile)
        stack.callback(tf.close)
        yield TarReader(tf, limits, what)


def extract_flat(
    source: Path | IO[bytes],
    dest: Path,
    *,
    allowed: Callable[[tuple[str, ...]], bool],
    expected: str,
    limits: TarLimits,
    what: str,
) -> list[str]:
    """Write the regular files of the tar ``source`` into the existing directory ``dest``.

    Every member must be a regular file whose name is plain (written as its components
    joined by ``/``: no ``./``, no ``//``, no trailing ``/``) and that ``allowed`` accepts
    (``allowed(("criu", "core-1.img"))``); its parent directories must exist under ``dest``
    (they are opened with ``O_NOFOLLOW``, never created); it is created 0600 with
    ``O_EXCL|O_NOFOLLOW``, so nothing is overwritten.  On error the files written so far
    stay: the caller removes ``dest`` or its contents.

    Args:
        expected: what an allowed member is, for the error (``"a regular file with a
            plain name"``).
        what: how errors name the archive.

    Returns:
        the names of the members written, in archive order.

    Raises:
        UnsafeArchiveError: a member that is not allowed (``unexpected entry ...: not
            <expected>``), or one whose name is already in ``dest`` (``... twice, or a name
            that is already there``).
        ArchiveLimitError: over ``limits``.
        CorruptArchiveError: not a tar, truncated or corrupt.
        OSError: ``dest`` cannot be opened or written.
    """
    names: list[str] = []
    root_fd = os.open(dest, _DIR_OPEN)
    try:
        with open_tar(source, limits, what) as reader:
            for m in reader:
                try:
                    parts: tuple[str, ...] | None = entry_parts(m.name)
                except UnsafeArchiveError:
                    parts = None
                if not (m.isreg() and parts and "/".join(parts) == m.name and allowed(parts)):
                    raise UnsafeArchiveError(
                        f"unexpected entry {m.name!r} in {what}: not {expected}", m.name
                    )
                _write_flat(reader, m, root_fd, parts, what)
                names.append(m.name)
    finally:
        os.close(root_fd)
    return names


def _write_flat(
    reader: TarReader, m: tarfile.TarInfo, root_fd: int, parts: tuple[str, ...], what: str
) -> None:
    pfd = root_fd
    try:
        for d in parts[:-1]:
            try:
                nfd = os.open(d, _DIR_OPEN, dir_fd=pfd)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
                raise UnsafeArchiveError(
                    f"unexpected entry {m.name!r} in {what}: its directory {d!r} is missing or "
                    "not a directory",
                    m.name,
                ) from None
            if pfd != root_fd:
                os.close(pfd)
            pfd = nfd
        try:
            fd = os.open(parts[-1], _FILE_CREATE, 0o600, dir_fd=pfd)
        except FileExistsError:
            raise UnsafeArchiveError(
                f"{what} holds {m.name!r} twice, or a name that is already there",
                m.name,
            ) from None
        try:
            reader.write_data(m, fd)
        finally:
            os.close(fd)
    finally:
        if pfd != root_fd:
            os.close(pfd)


__all__ = [
    "TarLimits",
    "TarReader",
    "entry_parts",
    "extract_flat",
    "open_tar",
]
