"""Unpacking one image layer (a tar changeset) into a directory, safely, in overlayfs form.

The input is a layer blob as OCI image-spec ``layer.md`` describes it: a tar, optionally
gzip or zstd compressed (told apart by media type *and* by magic bytes; a declared compression
that the bytes contradict is refused).  The output is a directory usable as one overlayfs
``lowerdir`` (kernel ``Documentation/filesystems/overlayfs.rst``):

* ``.wh.NAME`` (layer.md "Whiteouts") becomes a character device ``NAME`` with device number
  0/0, overlayfs' whiteout.  If ``NAME`` is a directory of this same layer (in either order), the
  whiteout instead makes that directory opaque, since the whiteout hides only what lower layers
  hold there.  A file of this layer named ``NAME`` stays and already hides the lower one.
* ``.wh..wh..opq`` (layer.md "Opaque Whiteout") sets ``trusted.overlay.opaque=y`` on its
  directory.  Other ``.wh..wh.*`` names (AUFS bookkeeping) are skipped.
* A character device 0/0 in the tar is already an overlay whiteout and is kept as one.

Preserved: numeric owners (when running as root), modes including setuid/setgid/sticky,
extended attributes from PAX ``SCHILY.xattr.*`` and ``LIBARCHIVE.xattr.*`` records (except
``trusted.overlay.*``/``user.overlay.*``, which only this module sets), hardlinks within the
layer, symlinks, FIFOs, access and modification times (directories get theirs after all their
contents are written).  Metadata is applied in the order chown, chmod, xattrs, times, because
chown clears setuid bits and ``security.capability``.

Refused with :class:`~runtime.errors.UnsafeArchiveError` naming the entry:

* absolute names (a lone ``/``, the layer root as umoci writes it, is accepted) and ``..``
  components;
* any entry whose parent path passes through a symlink or a non-directory (so nothing is ever
  written *through* a symlink: parents are opened with ``O_NOFOLLOW`` relative to directory
  fds, and final components are created with ``O_EXCL|O_NOFOLLOW``/``mkdirat``/``symlinkat``/
  ``linkat`` without following);
* relative symlink targets that, joined lexically to the link's directory, climb above the
  layer root (the rule Docker applies).  Absolute targets such as ``/bin/busybox`` are allowed:
  they are resolved inside the container, never by this code.  Host tools must still never
  follow symlinks found in layer directories;
* hardlinks to absolute or ``..`` paths, to directories, or to entries not (yet) in the layer;
* character devices other than 0/0, block devices, unknown entry types;
* a regular file larger than :attr:`UnpackLimits.max_entry_bytes`; a layer that unpacks to
  more than :attr:`UnpackLimits.max_layer_bytes` (compression and sparse bombs), or that takes
  its image over :attr:`UnpackLimits.max_image_bytes`; more entries than
  :attr:`UnpackLimits.max_entries` (:class:`~runtime.errors.ArchiveLimitError`, naming the
  entry at which the bound was passed);
* a truncated layer: one that ends inside a header or a member's data, or without the
  end-of-archive marker (:class:`~runtime.errors.ImageError`; tarfile alone would drop the
  last entry and accept it).

Sizes are counted as :mod:`runtime.tarsafe` counts them (which also reads the tar): a file's
apparent size, so a GNU sparse member counts for the whole file it declares.  Sparse files
stay sparse: their holes are sought over, never written, so what a layer allocates on disk is
at most what its uncompressed stream holds.

Parents missing from the tar are created 0755 root:root, as Docker and containerd do; such a
directory hides the attributes of the same directory in lower layers.

Creating whiteouts and setting ``trusted.*`` attributes need root (CAP_MKNOD, CAP_SYS_ADMIN).
Without root, owners are not preserved and attributes the kernel refuses are skipped with a
warning, but whiteouts and opaque directories still raise :class:`~runtime.errors.ImageError`.
"""

from __future__ import annotations

import base64
import errno
import gzip
import hashlib
import os
import posixpath
import shutil
import stat
import tarfile
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

import structlog
import zstandard

from runtime.errors import (
    ArchiveLimitError,
    CorruptArchiveError,
    ImageError,
    UnsafeArchiveError,
)
from runtime.image.oci import Compression, VerifyingReader, layer_compression, sniff_compression
from runtime.tarsafe import TarLimits, TarReader, entry_parts, open_tar

log = structlog.get_logger(__name__)

GiB = 1024**3
WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
_CHUNK_BYTES = 1024 * 1024
_MAX_CACHED_DIRS = 256
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class UnpackLimits:
    """Bounds on what layers may unpack to.

    What a layer *unpacks to* is the larger of its uncompressed tar stream and the apparent
    sizes of its regular files (a sparse file at its full size): both are checked against
    the bound while the layer is read, so nothing much beyond the bound is ever written.

    The defaults are about twice the largest images in common use (CUDA and PyTorch images
    unpack to 10 to 20 GiB, in layers of up to about 10 GiB), so that no real image is
    refused while a hostile one takes at most 64 GiB; a node with a smaller disk lowers them
    (``ImageStore(limits=...)``, ``jaula image import --max-layer-size/--max-image-size``).
    Docker, containerd and containers/storage, as far as we know, bound neither.

    Attributes:
        max_layer_bytes: what one layer may unpack to, bytes (compression and sparse bombs).
        max_image_bytes: what all the layers of one image may unpack to together, bytes.
        max_entry_bytes: apparent size of one regular file, bytes.
        max_entries: number of tar entries (headers), including directories and links.
    """

    max_layer_bytes: int = 32 * GiB
    max_entry_bytes: int = 16 * GiB
    max_entries: int = 2_000_000
    max_image_bytes: int = 64 * GiB


@dataclass(frozen=True)
class LayerStats:
    """What unpacking (or verifying) a layer found.

    Attributes:
        diff_id: ``sha256:`` digest of the uncompressed tar (image-spec config.md "DiffID").
        size_bytes: length of the uncompressed tar stream, bytes.
        entries: number of tar entries applied.
        unpacked_bytes: apparent sizes of its regular files together, bytes (0 when only
            verified).
    """

    diff_id: str
    size_bytes: int
    entries: int
    unpacked_bytes: int = 0


def unpack_layer(
    raw: IO[bytes],
    dest: Path,
    *,
    media_type: str | None = None,
    blob_digest: str | None = None,
    blob_size: int | None = None,
    diff_id: str | None = None,
    limits: UnpackLimits | None = None,
    preserve_owners: bool | None = None,
    on_read: Callable[[int], None] | None = None,
    image_bytes_before: int = 0,
) -> LayerStats:
    """Unpack the layer blob read from ``raw`` into the existing, empty directory ``dest``.

    Args:
        raw: the blob as stored (compressed or not); read to its end.
        dest: target directory; it receives the layer root's mode, owner and times.
        media_type: the descriptor's media type, or ``None`` to rely on magic bytes only.
        blob_digest, blob_size: when given, the raw blob must match them (descriptor.md).
        diff_id: when given, the uncompressed tar must hash to it (config.md "DiffID").
        limits: size bounds; :class:`UnpackLimits` defaults when ``None``.
        preserve_owners: chown entries to their uid/gid; default: only when euid is 0.
        on_read: called with the size of every chunk of ``raw`` read, in bytes.
        image_bytes_before: what the image's earlier layers unpack to, bytes; this layer may
            unpack to at most ``limits.max_image_bytes`` minus that.

    On error ``dest`` is left partly filled; the caller unpacks into a temporary directory and
    deletes it (see :class:`runtime.image.store.ImageStore`).

    Raises:
        UnsafeArchiveError: an entry breaks one of the rules in the module docstring.
        ImageError: malformed or mismatching data, or an OS error while writing.
    """
    limits = limits or UnpackLimits()
    if preserve_owners is None:
        preserve_owners = os.geteuid() == 0
    what = f"layer {blob_digest or diff_id}" if blob_digest or diff_id else "layer"
    image_left = max(0, limits.max_image_bytes - image_bytes_before)
    if image_left < limits.max_layer_bytes:
        bound = image_left
        over = (
            f"image is larger than {limits.max_image_bytes} bytes unpacked ({what}, after "
            f"{image_bytes_before} bytes in the layers before it)"
        )
    else:
        bound = limits.max_layer_bytes
        over = f"layer is larger than {bound} bytes unpacked"
    blob = VerifyingReader(raw, "layer", blob_digest, blob_size, on_read=on_read)
    stream = _LayerStream(_decompress(blob, media_type), bound, over)
    tar_limits = TarLimits(limits.max_entries, limits.max_entry_bytes, bound)
    try:
        root_fd = os.open(dest, _DIR_OPEN)
    except OSError as e:
        raise ImageError(f"cannot open layer directory {dest}: {e.strerror}") from e
    extractor = _Extractor(root_fd, preserve_owners)
    entries = unpacked = 0
    try:
        try:
            with open_tar(cast(IO[bytes], stream), tar_limits, what) as reader:
                for member in reader:
                    stream.entry = member.name
                    extractor.apply(reader, member)
                entries, unpacked = reader.entries, reader.total_bytes
            stream.entry = "<end of archive>"
            stream.drain()
            extractor.finish()
        except (ImageError, CorruptArchiveError, *_FORMAT_ERRORS) as e:
            # A corrupt blob shows up as garbage first: name the digest when it is the cause.
            _raise_if_blob_mismatch(blob, blob_digest, e)
            if isinstance(e, ArchiveLimitError) and e.limit == "total_bytes":
                raise ArchiveLimitError(
                    f"{over} (at entry {e.entry!r})", e.entry or "", e.limit, e.bound
                ) from e
            if isinstance(e, ImageError):
                raise
            reason = e.reason if isinstance(e, CorruptArchiveError) else str(e)
            raise ImageError(f"{what} is not a valid tar stream: {reason}") from e
        blob.finish()
    finally:
        extractor.close()
        os.close(root_fd)
    return _check_diff_id(stream, diff_id, entries, unpacked)


def verify_layer(
    raw: IO[bytes],
    *,
    media_type: str | None = None,
    blob_digest: str | None = None,
    blob_size: int | None = None,
    diff_id: str | None = None,
    limits: UnpackLimits | None = None,
    on_read: Callable[[int], None] | None = None,
) -> None:
    """Check a layer blob without unpacking it (for layers already in the store).

    With ``blob_digest`` the raw bytes are hashed; otherwise the stream is decompressed and
    must hash to ``diff_id``.

    Raises:
        ImageError: naming the digest that does not match.
    """
    limits = limits or UnpackLimits()
    blob = VerifyingReader(raw, "layer", blob_digest, blob_size, on_read=on_read)
    if blob_digest is not None:
        blob.finish()
        return
    over = f"layer is larger than {limits.max_layer_bytes} bytes uncompressed"
    stream = _LayerStream(_decompress(blob, media_type), limits.max_layer_bytes, over)
    try:
        stream.drain()
    except _FORMAT_ERRORS as e:
        raise ImageError(f"layer {diff_id or ''} cannot be decompressed: {e}") from e
    blob.finish()
    _check_diff_id(stream, diff_id, 0)


_FORMAT_ERRORS = (tarfile.TarError, EOFError, zlib.error, zstandard.ZstdError, gzip.BadGzipFile)


def _raise_if_blob_mismatch(
    blob: VerifyingReader, blob_digest: str | None, cause: BaseException
) -> None:
    """After a failure, read the rest of the blob; raise the digest mismatch if there is one."""
    if blob_digest is None:
        return
    try:
        blob.finish()
    except ImageError as mismatch:
        raise mismatch from cause
    except OSError:
        return


def _check_diff_id(
    stream: _LayerStream, diff_id: str | None, entries: int, unpacked_bytes: int = 0
) -> LayerStats:
    actual = "sha256:" + stream.hash.hexdigest()
    if diff_id is not None and actual != diff_id:
        raise ImageError(
            f"layer {diff_id}: uncompressed content does not match its diff_id (got {actual})"
        )
    return LayerStats(actual, stream.bytes_read, entries, unpacked_bytes)


class _Prefixed:
    """A stream with some already-read bytes put back in front."""

    def __init__(self, head: bytes, raw: IO[bytes] | VerifyingReader) -> None:
        self._head = head
        self._raw = raw

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if self._head:
            if size is None or size < 0:
                data = self._head + self._raw.read()
                self._head = b""
                return data
            data, self._head = self._head[:size], self._head[size:]
            return data
        return self._raw.read(-1 if size is None else size)


def _decompress(blob: VerifyingReader, media_type: str | None) -> IO[bytes]:
    head = b""
    while len(head) < 4:
        more = blob.read(4 - len(head))
        if not more:
            break
        head += more
    sniffed = sniff_compression(head)
    if media_type is not None:
        declared = layer_compression(media_type)
        if declared is not Compression.NONE and declared is not sniffed:
            raise ImageError(
                f"layer media type {media_type} declares {declared.value} but the content is "
                f"{'uncompressed' if sniffed is Compression.NONE else sniffed.value}"
            )
    prefixed = cast(IO[bytes], _Prefixed(head, blob))
    if sniffed is Compression.GZIP:
        return cast(IO[bytes], gzip.GzipFile(fileobj=prefixed, mode="rb"))
    if sniffed is Compression.ZSTD:
        reader = zstandard.ZstdDecompressor().stream_reader(prefixed, read_across_frames=True)
        return cast(IO[bytes], reader)
    return prefixed


class _LayerStream:
    """The uncompressed tar stream: hashed for the diff_id and bounded in size (``over``:
    the error message when the bound is passed, completed with the entry being read)."""

    def __init__(self, raw: IO[bytes], limit_bytes: int, over: str) -> None:
        self._raw = raw
        self._limit = limit_bytes
        self._over = over
        self.hash = hashlib.sha256()
        self.bytes_read = 0
        self.entry = "<start of archive>"

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self._raw.read(-1 if size is None else size)
        self.bytes_read += len(data)
        if self.bytes_read > self._limit:
            raise ArchiveLimitError(
                f"{self._over} (at entry {self.entry!r})", self.entry, "total_bytes", self._limit
            )
        self.hash.update(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK_BYTES):
            pass


#: the one name check of :mod:`runtime.tarsafe`, under the name this module always gave it
split_entry_name = entry_parts


@dataclass
class _DirMeta:
    """Metadata of a directory, applied once all its contents are written."""

    uid: int = 0
    gid: int = 0
    mode: int = 0o755
    times_ns: tuple[int, int] | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)
    opaque: bool = False


def _times_ns(member: tarfile.TarInfo) -> tuple[int, int]:
    mtime_ns = round(float(member.mtime) * 1e9)
    atime = member.pax_headers.get("atime")
    try:
        atime_ns = round(float(atime) * 1e9) if atime is not None else mtime_ns
    except ValueError:
        atime_ns = mtime_ns
    return atime_ns, mtime_ns


def _member_xattrs(member: tarfile.TarInfo) -> Iterator[tuple[str, bytes]]:
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr.") :]
            data = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr.") :])
            try:
                data = base64.b64decode(value + "=" * (-len(value) % 4))
            except ValueError:
                raise UnsafeArchiveError(
                    f"entry {member.name!r}: malformed xattr record {key!r}", member.name
                ) from None
        else:
            continue
        if name.startswith(("trusted.overlay.", "user.overlay.")):
            log.warning("dropping overlay xattr from layer", entry=member.name, xattr=name)
            continue
        yield name, data


class _Extractor:
    """Applies tar entries under a root directory fd; see the module docstring for the rules."""

    def __init__(self, root_fd: int, preserve_owners: bool) -> None:
        self.root_fd = root_fd
        self.preserve_owners = preserve_owners
        self._dirs: dict[tuple[str, ...], int] = {}
        self._dir_meta: dict[tuple[str, ...], _DirMeta] = {(): _DirMeta()}
        self._whiteouts: set[tuple[str, ...]] = set()

    # -- directory fds ------------------------------------------------------------------

    def close(self) -> None:
        """Close every cached directory fd (not the root fd, which the caller owns)."""
        self._forget_dirs()

    def _dir_fd(self, dparts: tuple[str, ...], entry: str, create: bool = True) -> int:
        """An fd for directory ``dparts``, walked with O_NOFOLLOW; missing ones are created.

        The fd is cached (and owned by the cache); intermediate fds are closed on the way.
        """
        i = len(dparts)
        while i > 0 and dparts[:i] not in self._dirs:
            i -= 1
        fd = self._dirs[dparts[:i]] if i else self.root_fd
        owned = False
        try:
            for j in range(i, len(dparts)):
                nfd = self._open_child(fd, dparts, j, entry, create)
                if owned:
                    os.close(fd)
                fd, owned = nfd, True
        except BaseException:
            if owned:
                os.close(fd)
            raise
        if owned:
            self._dirs[dparts] = fd
        return fd

    def _open_child(
        self, fd: int, dparts: tuple[str, ...], j: int, entry: str, create: bool
    ) -> int:
        name = dparts[j]
        try:
            return os.open(name, _DIR_OPEN, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(name, 0o700, dir_fd=fd)
            self._dir_meta.setdefault(dparts[: j + 1], _DirMeta())
            return os.open(name, _DIR_OPEN, dir_fd=fd)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            where = "/".join(dparts[: j + 1])
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeArchiveError(
                    f"entry {entry!r} would be written through the symlink {where!r}", entry
                ) from None
            raise UnsafeArchiveError(
                f"entry {entry!r}: parent {where!r} is not a directory", entry
            ) from None

    def _forget_dirs(self, under: tuple[str, ...] = ()) -> None:
        """Close cached directory fds at or below ``under`` (all of them by default)."""
        n = len(under)
        for key in [k for k in self._dirs if k[:n] == under]:
            os.close(self._dirs.pop(key))

    def _remove_existing(self, pfd: int, parts: tuple[str, ...], keep_dir: bool = False) -> bool:
        """Remove what is at ``parts`` (a later tar entry replaces an earlier one).

        Returns True when a directory is there and was kept (``keep_dir``).
        """
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            self._forget_dirs(parts)
            shutil.rmtree(name, dir_fd=pfd)
            n = len(parts)
            self._dir_meta = {k: v for k, v in self._dir_meta.items() if k[:n] != parts}
            self._whiteouts = {k for k in self._whiteouts if k[:n] != parts}
        else:
            os.unlink(name, dir_fd=pfd)
            self._whiteouts.discard(parts)
        return False

    # -- entries ------------------------------------------------------------------------

    def apply(self, reader: TarReader, member: tarfile.TarInfo) -> None:
        """Apply one tar entry (the one ``reader`` just yielded, limits already applied)."""
        entry = member.name
        if len(self._dirs) > _MAX_CACHED_DIRS:
            self._forget_dirs()
        parts = entry_parts(entry)
        try:
            self._apply(reader, member, entry, parts)
        except OSError as e:
            raise ImageError(f"cannot unpack entry {entry!r}: {e.strerror or e}") from e

    def _apply(
        self, reader: TarReader, m: tarfile.TarInfo, entry: str, parts: tuple[str, ...]
    ) -> None:
        if parts and parts[-1].startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, entry)
        elif not parts:
            if not m.isdir():
                raise UnsafeArchiveError(
                    f"entry {entry!r}: the layer root is not a directory", entry
                )
            self._dir_meta[()] = self._meta_of(m, self._dir_meta[()].opaque)
        elif m.isdir():
            self._mkdir(parts, m, entry)
        elif m.isreg():
            self._file(reader, parts, m, entry)
        elif m.issym():
            self._symlink(parts, m, entry)
        elif m.islnk():
            self._hardlink(parts, m, entry)
        elif m.ischr() and m.devmajor == 0 and m.devminor == 0:
            self._whiteout_at(parts, entry)  # already in overlay form
        elif m.ischr() or m.isblk():
            kind = "character" if m.ischr() else "block"
            raise UnsafeArchiveError(
                f"entry {entry!r}: {kind} device {m.devmajor}:{m.devminor} is not allowed in a "
                "layer",
                entry,
            )
        elif m.isfifo():
            self._fifo(parts, m, entry)
        else:
            raise UnsafeArchiveError(f"entry {entry!r}: unsupported tar type {m.type!r}", entry)

    def _meta_of(self, m: tarfile.TarInfo, opaque: bool) -> _DirMeta:
        return _DirMeta(
            uid=m.uid,
            gid=m.gid,
            mode=m.mode & 0o7777,
            times_ns=_times_ns(m),
            xattrs=dict(_member_xattrs(m)),
            opaque=opaque,
        )

    def _whiteout(self, parts: tuple[str, ...], entry: str) -> None:
        base = parts[-1]
        if base == OPAQUE_WHITEOUT:
            dparts = parts[:-1]
            self._dir_fd(dparts, entry)
            self._dir_meta.setdefault(dparts, _DirMeta()).opaque = True
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            log.debug("skipping AUFS metadata entry", entry=entry)
            return
        target = base[len(WHITEOUT_PREFIX) :]
        if target in ("", ".", ".."):
            raise UnsafeArchiveError(f"entry {entry!r}: whiteout of {target!r}", entry)
        self._whiteout_at(parts[:-1] + (target,), entry)

    def _whiteout_at(self, tparts: tuple[str, ...], entry: str) -> None:
        """Hide ``tparts`` of the lower layers (see the module docstring)."""
        pfd = self._dir_fd(tparts[:-1], entry)
        target = tparts[-1]
        try:
            st = os.stat(target, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            self._mknod_whiteout(pfd, tparts, entry)
            return
        if stat.S_ISDIR(st.st_mode):
            # A directory of this layer: the whiteout hides only the lower layers' content.
            self._dir_meta.setdefault(tparts, _DirMeta()).opaque = True
        # else: a file of this layer (or an earlier whiteout) already hides the lower entry.

    def _mknod_whiteout(self, pfd: int, parts: tuple[str, ...], entry: str) -> None:
        try:
            os.mknod(parts[-1], stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=pfd)
        except PermissionError as e:
            raise ImageError(
                f"entry {entry!r}: creating an overlay whiteout needs root (CAP_MKNOD)"
            ) from e
        self._whiteouts.add(parts)

    def _mkdir(self, parts: tuple[str, ...], m: tarfile.TarInfo, entry: str) -> None:
        pfd = self._dir_fd(parts[:-1], entry)
        opaque = parts in self._whiteouts or (
            parts in self._dir_meta and self._dir_meta[parts].opaque
        )
        if not self._remove_existing(pfd, parts, keep_dir=True):
            os.mkdir(parts[-1], 0o700, dir_fd=pfd)
        self._dir_meta[parts] = self._meta_of(m, opaque)

    def _file(
        self, reader: TarReader, parts: tuple[str, ...], m: tarfile.TarInfo, entry: str
    ) -> None:
        pfd = self._dir_fd(parts[:-1], entry)
        self._remove_existing(pfd, parts)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(parts[-1], flags, 0o600, dir_fd=pfd)
        try:
            reader.write_data(m, fd)  # sparse files keep their holes
            self._set_meta_fd(fd, m, entry)
        finally:
            os.close(fd)

    def _fifo(self, parts: tuple[str, ...], m: tarfile.TarInfo, entry: str) -> None:
        pfd = self._dir_fd(parts[:-1], entry)
        self._remove_existing(pfd, parts)
        os.mkfifo(parts[-1], 0o600, dir_fd=pfd)
        fd = os.open(
            parts[-1], os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd
        )
        try:
            self._set_meta_fd(fd, m, entry)
        finally:
            os.close(fd)

    def _symlink(self, parts: tuple[str, ...], m: tarfile.TarInfo, entry: str) -> None:
        target = m.linkname
        if not target or "\x00" in target:
            raise UnsafeArchiveError(f"entry {entry!r}: symlink with an empty target", entry)
        if not target.startswith("/"):
            resolved = posixpath.normpath(posixpath.join(*parts[:-1], target))
            if resolved == ".." or resolved.startswith("../"):
                raise UnsafeArchiveError(
                    f"entry {entry!r}: symlink to {target!r} points outside the layer", entry
                )
        pfd = self._dir_fd(parts[:-1], entry)
        self._remove_existing(pfd, parts)
        name = parts[-1]
        os.symlink(target, name, dir_fd=pfd)
        if self.preserve_owners:
            os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        for key, value in _member_xattrs(m):
            path = f"/proc/self/fd/{pfd}/{name}"
            self._setxattr(path, key, value, entry, follow_symlinks=False)
        os.utime(name, ns=_times_ns(m), dir_fd=pfd, follow_symlinks=False)

    def _hardlink(self, parts: tuple[str, ...], m: tarfile.TarInfo, entry: str) -> None:
        link = m.linkname
        if link.startswith("/"):
            raise UnsafeArchiveError(f"entry {entry!r}: hardlink to absolute path {link!r}", entry)
        tparts = entry_parts(link, entry)
        if not tparts:
            raise UnsafeArchiveError(f"entry {entry!r}: hardlink to the layer root", entry)
        if tparts == parts:
            return
        missing = UnsafeArchiveError(
            f"entry {entry!r}: hardlink target {link!r} is not in the layer", entry
        )
        try:
            tpfd = self._dir_fd(tparts[:-1], entry, create=False)
            st = os.stat(tparts[-1], dir_fd=tpfd, follow_symlinks=False)
        except FileNotFoundError:
            raise missing from None
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeArchiveError(f"entry {entry!r}: hardlink to directory {link!r}", entry)
        pfd = self._dir_fd(parts[:-1], entry)
        self._remove_existing(pfd, parts)
        try:
            tpfd = self._dir_fd(tparts[:-1], entry, create=False)  # may have been forgotten
            os.link(tparts[-1], parts[-1], src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            raise missing from None
        if stat.S_ISCHR(st.st_mode):
            self._whiteouts.add(parts)

    # -- metadata -----------------------------------------------------------------------

    def _set_meta_fd(self, fd: int, m: tarfile.TarInfo, entry: str) -> None:
        if self.preserve_owners:
            os.fchown(fd, m.uid, m.gid)
        os.fchmod(fd, m.mode & 0o7777)
        for key, value in _member_xattrs(m):
            self._setxattr(fd, key, value, entry)
        os.utime(fd, ns=_times_ns(m))

    def _setxattr(
        self, target: int | str, key: str, value: bytes, entry: str, follow_symlinks: bool = True
    ) -> None:
        try:
            os.setxattr(target, key, value, follow_symlinks=follow_symlinks)
        except OSError as e:
            unsupported = e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
            if unsupported or (e.errno == errno.EPERM and not self.preserve_owners):
                log.warning("xattr not preserved", entry=entry, xattr=key, error=e.strerror)
                return
            raise ImageError(f"entry {entry!r}: cannot set xattr {key}: {e.strerror}") from e

    def finish(self) -> None:
        """Apply directory metadata (owner, mode, xattrs, opaque mark, times) last."""
        for dparts, meta in sorted(self._dir_meta.items(), key=lambda kv: -len(kv[0])):
            if len(self._dirs) > _MAX_CACHED_DIRS:
                self._forget_dirs()
            where = "/".join(dparts) or "/"
            try:
                fd = self._dir_fd(dparts, where, create=False)
                if self.preserve_owners:
                    os.fchown(fd, meta.uid, meta.gid)
                os.fchmod(fd, meta.mode)
            except OSError as e:
                raise ImageError(f"cannot set metadata of directory {where!r}: {e.strerror}") from e
            for key, value in meta.xattrs.items():
                self._setxattr(fd, key, value, where)
            if meta.opaque:
                try:
                    os.setxattr(fd, OVERLAY_OPAQUE_XATTR, b"y")
                except OSError as e:
                    raise ImageError(
                        f"cannot mark directory {where!r} opaque ({OVERLAY_OPAQUE_XATTR}): "
                        f"{e.strerror}; this needs root (CAP_SYS_ADMIN)"
                    ) from e
            if meta.times_ns is not None:
                os.utime(fd, ns=meta.times_ns)


__all__ = [
    "OPAQUE_WHITEOUT",
    "OVERLAY_OPAQUE_XATTR",
    "WHITEOUT_PREFIX",
    "LayerStats",
    "UnpackLimits",
    "split_entry_name",
    "unpack_layer",
    "verify_layer",
]
