"""Sending an image from one node's store to another's (base layers first during a migration).

The store keeps no layer blobs, only unpacked layers in overlay form, so a layer travels as a
tar **re-made** from its ``diff`` directory.  The sequence, driven by the migration session::

    source                                         destination
    rec = image_record(store, image_id)   ---->    missing = [l for l in rec["layers"]
                                                              if not store.has_layer(l)]
    for each missing layer, bottom first:
        export_layer(store, lid, tar)     ---->    import_layer(store, lid, tar)
                                                   register_image(store, rec)

**Layer tar** (:func:`export_layer`): an uncompressed PAX tar (image-spec ``layer.md``) of
``layers/<id>/diff``, in a fixed order: ``./`` (the layer root), then directory by directory
(the root first, subdirectories depth first, each in byte order of the names), every entry of
a directory in byte order of its name.  Overlay form is turned back into OCI form (``layer.md``
"Whiteouts"), as moby's overlay whiteout converter does:

* a character device 0/0 ``NAME`` becomes an empty regular file ``.wh.NAME`` (mode 0, owner
  0:0, the mtime of its directory: the device's own metadata means nothing);
* a directory with ``trusted.overlay.opaque=y`` is written as usual, followed by an empty
  ``DIR/.wh..wh..opq`` (same metadata rule);
* ``trusted.overlay.*`` and ``user.overlay.*`` attributes are never written.

Kept: numeric owners (no user or group names), modes with setuid/setgid/sticky, mtimes to the
nanosecond (a PAX ``mtime`` record when not a whole second), the other extended attributes as
PAX ``SCHILY.xattr.*`` records (binary values with ``hdrcharset=BINARY``), symlinks, FIFOs,
and hardlinks: a second path to an inode already written becomes a hardlink entry to the first.
Access times are not written (reading a layer changes them), so the importer sets atime =
mtime.  The tar depends only on what the layer holds: a layer imported from it exports to the
very same bytes on the other node (whiteouts excepted when they are hardlinked to each other,
which the unpacker never creates and which are written as separate whiteouts).

**Layer ids, trust.**  A store's layer id is the layer's DiffID, the sha256 of the
*original* uncompressed tar, as listed in the image config.  The re-made tar does not hash to
it (entry order, headers and padding differ), so the destination cannot recompute the DiffID:
:func:`import_layer` stores the layer under the id the source *claims*.  That claim is trusted
because it comes from an authenticated peer (CURVE key) over a transfer that checks the sha256
of every file it moves; keeping the original DiffID as the key means both nodes name the layer
alike, and later images sharing it (from any source) find it.  The unpacking itself is the
store's usual safe unpacker: hostile content is refused exactly as in an image import.  What is
verified at the destination: the image config hashes to the image id, the manifest to its
digest, and the record's layer list is the config's ``rootfs.diff_ids`` (:func:`register_image`).

**Image record** (:func:`image_record`): a small JSON-serialisable dict::

    {"id": hex sha256 of the config, "names": ["busybox:latest"],
     "config": base64 of the config blob, "manifest": base64 of the manifest blob,
     "manifest_digest": "sha256:...", "layers": [hex DiffIDs, bottom to top],
     "created": "2024-01-01T00:00:00Z" | None, "size_bytes": sum of the original layer sizes}
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import json
import os
import stat
import tarfile
from pathlib import Path
from typing import IO, Any, cast

import structlog

from runtime.errors import ImageError
from runtime.image.layers import (
    OPAQUE_WHITEOUT,
    OVERLAY_OPAQUE_XATTR,
    WHITEOUT_PREFIX,
    unpack_layer,
)
from runtime.image.oci import (
    MEDIA_TYPE_OCI_LAYER,
    digest_hex,
    normalize_name,
    parse_config,
    sha256_digest,
)
from runtime.image.store import Image, ImageStore

log = structlog.get_logger(__name__)

_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
_SKIPPED_XATTRS = ("trusted.overlay.", "user.overlay.")
_NS = 1_000_000_000
_RECORD_KEYS = ("id", "names", "config", "manifest", "manifest_digest", "layers", "size_bytes")


# --- layers ----------------------------------------------------------------------------------


def export_layer(store: ImageStore, layer_id: str, out: Path) -> int:
    """Write the layer ``layer_id`` (hex DiffID or ``sha256:<hex>``) of ``store`` as an
    uncompressed OCI layer tar to ``out``; return its size in bytes.

    The tar is written to a temp file beside ``out`` and renamed over it (not fsynced: it is
    a transfer artifact).  Takes no lock; a layer removed while it is read is detected.

    Raises:
        ImageError: naming the layer, when it is missing, unreadable, or holds something a
            layer cannot (a device other than 0/0, a socket); ``out`` is then not created.
    """
    out = Path(out)
    lid = store.layer_dir(layer_id).parent.name
    if not store.has_layer(lid):
        raise ImageError(f"layer {lid[:12]} is not in the image store at {store.root}")
    layer_path = store.layers_dir / lid
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        layer_fd = os.open(layer_path, _DIR_OPEN)
    except OSError as e:
        raise ImageError(f"layer {lid[:12]}: cannot open {layer_path}: {e.strerror}") from e
    try:
        writer = _LayerWriter(lid, layer_fd)
        with open(tmp, "wb") as f:
            with tarfile.open(
                fileobj=cast(IO[bytes], _Output(f)),
                mode="w",
                format=tarfile.PAX_FORMAT,
                encoding="utf-8",
                errors="surrogateescape",
            ) as tf:
                writer.write(tf)
            size = f.tell()
        # ``remove`` and ``gc`` rename a layer away before deleting it: if the layer is still
        # in place now, everything read above was the complete layer.
        try:
            still = os.stat(layer_path, follow_symlinks=False).st_ino == os.fstat(layer_fd).st_ino
        except FileNotFoundError:
            still = False
        if not still:
            raise ImageError(f"layer {lid[:12]} was removed from the store while exported")
        os.rename(tmp, out)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):  # _WriteError included
            raise ImageError(f"layer {lid[:12]}: cannot write {out}: {e.strerror or e}") from e
        raise
    finally:
        os.close(layer_fd)
    log.info("layer exported", layer=lid[:12], size_bytes=size, entries=writer.entries)
    return size


def import_layer(
    store: ImageStore, layer_id: str, tar_path: Path, *, tar_digest: str | None = None
) -> None:
    """Unpack the OCI layer tar ``tar_path`` (as :func:`export_layer` writes it) into
    ``store`` as the layer ``layer_id``: the DiffID the sending peer claims for it (see the
    module docstring for why it is trusted and not recomputed).

    Uses the store's safe unpacker and limits (refusals raise
    :class:`~runtime.errors.UnsafeArchiveError` as for an import).  Atomic and under the
    store's lock (:meth:`ImageStore.add_layer`); a no-op when the layer is already stored.
    With ``tar_digest`` (``sha256:<hex>``) the tar must also hash to it.  The layer stays
    unreferenced (and :meth:`ImageStore.gc` would delete it) until :func:`register_image`.

    Raises:
        ImageError: invalid id, unreadable or invalid tar, unsafe entry, digest mismatch.
            Nothing is left in the store.
    """
    lid = store.layer_dir(layer_id).parent.name
    tar_path = Path(tar_path)
    if tar_digest is not None:
        digest_hex(tar_digest, "layer tar digest")

    def unpack(diff: Path) -> dict[str, Any]:
        try:
            raw = open(tar_path, "rb")  # noqa: SIM115 - closed below
        except OSError as e:
            raise ImageError(f"layer {lid[:12]}: cannot read {tar_path}: {e.strerror}") from e
        with raw:
            stats = unpack_layer(
                raw,
                diff,
                media_type=MEDIA_TYPE_OCI_LAYER,
                blob_digest=tar_digest,
                limits=store.limits,
            )
        return {
            "diff_id": f"sha256:{lid}",
            "size_bytes": stats.size_bytes,
            "entries": stats.entries,
            "blob_digest": stats.diff_id,  # the re-made tar received, not the original blob
            "media_type": MEDIA_TYPE_OCI_LAYER,
            "transferred": True,
        }

    if store.add_layer(lid, unpack):
        log.info("layer imported from a peer", layer=lid[:12])
    else:
        log.info("layer already present", layer=lid[:12])


# --- images ----------------------------------------------------------------------------------


def image_record(store: ImageStore, image_id: str) -> dict[str, Any]:
    """What another node needs to register the image ``image_id`` (an id, id prefix or name,
    as :meth:`ImageStore.resolve` takes) once it has its layers; see the module docstring.

    Raises:
        ImageNotFound, AmbiguousImage: as :meth:`ImageStore.resolve`.
        ImageError: the stored config or manifest is missing or does not match its digest.
    """
    image = store.resolve(image_id)
    image_dir = store.images_dir / image.id
    try:
        config = (image_dir / "config.json").read_bytes()
        manifest = (image_dir / "manifest.json").read_bytes()
    except OSError as e:
        raise ImageError(f"image {image.id[:12]}: cannot read {e.filename}: {e.strerror}") from e
    if sha256_digest(config) != f"sha256:{image.id}":
        raise ImageError(f"image {image.id[:12]}: stored config does not match the image id")
    if sha256_digest(manifest) != image.manifest_digest:
        raise ImageError(
            f"image {image.id[:12]}: stored manifest does not match {image.manifest_digest}"
        )
    return {
        "id": image.id,
        "names": list(image.names),
        "config": base64.b64encode(config).decode("ascii"),
        "manifest": base64.b64encode(manifest).decode("ascii"),
        "manifest_digest": image.manifest_digest,
        "layers": list(image.layers),
        "created": image.created,
        "size_bytes": image.size_bytes,
    }


def register_image(store: ImageStore, record: dict[str, Any]) -> Image:
    """Add the image described by ``record`` (from :func:`image_record` on another node) to
    ``store``, whose layers must all be there already.

    Checked first: sha256 of the config is the id, sha256 of the manifest is
    ``manifest_digest`` and the manifest's config descriptor names the id, the layers are the
    config's ``rootfs.diff_ids``, the names are valid.  Names another image of this store
    holds stay with it (see :meth:`ImageStore.add_image`).  Idempotent: registering an image
    already stored only adds its free new names.

    Raises:
        ImageError: a check above fails, or a layer is missing (named).
    """
    if not isinstance(record, dict) or any(k not in record for k in _RECORD_KEYS):
        missing = [k for k in _RECORD_KEYS if not isinstance(record, dict) or k not in record]
        raise ImageError(f"image record is missing {', '.join(missing)}")
    image_id = record["id"]
    if not isinstance(image_id, str):
        raise ImageError("image record: id is not a string")
    digest_hex(f"sha256:{image_id}", "image record id")
    config = _b64(record["config"], image_id, "config")
    manifest = _b64(record["manifest"], image_id, "manifest")
    if sha256_digest(config) != f"sha256:{image_id}":
        raise ImageError(
            f"image {image_id[:12]}: config does not match the image id "
            f"(got {sha256_digest(config)})"
        )
    manifest_digest = record["manifest_digest"]
    if not isinstance(manifest_digest, str) or sha256_digest(manifest) != manifest_digest:
        raise ImageError(
            f"image {image_id[:12]}: manifest does not match its digest {manifest_digest!r}"
        )
    try:
        manifest_config = json.loads(manifest)["config"]["digest"]
    except (ValueError, KeyError, TypeError) as e:
        raise ImageError(f"image {image_id[:12]}: manifest has no config descriptor") from e
    if manifest_config != f"sha256:{image_id}":
        raise ImageError(f"image {image_id[:12]}: manifest is for config {manifest_config!r}")
    parsed = parse_config(config)
    layers = tuple(digest_hex(d, "image config diff_id") for d in parsed.diff_ids)
    if record["layers"] != list(layers):
        raise ImageError(
            f"image {image_id[:12]}: record layers do not match the config's rootfs.diff_ids"
        )
    names = record["names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ImageError(f"image {image_id[:12]}: names is not a list of strings")
    size = record["size_bytes"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"image {image_id[:12]}: size_bytes {size!r} is not a byte count")
    image = Image(
        id=image_id,
        names=tuple(dict.fromkeys(normalize_name(n) for n in names)),
        manifest_digest=manifest_digest,
        layers=layers,
        config=parsed.config,
        created=parsed.created,
        size_bytes=size,
    )
    stored = store.add_image(image, config, manifest)
    log.info("image registered from a peer", id=image_id[:12], names=list(stored.names))
    return stored


def _b64(value: object, image_id: str, what: str) -> bytes:
    if not isinstance(value, str):
        raise ImageError(f"image {image_id[:12]}: {what} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"image {image_id[:12]}: {what} is not valid base64: {e}") from e


# --- writing a layer tar ---------------------------------------------------------------------


def readable_mtime_ns(mtime_ns: int) -> int:
    """``mtime_ns`` as an importer built on Python's tarfile gets it back from a PAX record:
    tarfile parses the decimal into a double (``TarInfo.mtime``) and the unpacker takes
    ``round(mtime * 1e9)``, so nanoseconds survive only down to the spacing of doubles (256 ns
    today).  The function is idempotent; its values survive a round trip exactly.
    """
    return round(float(_decimal_seconds(mtime_ns)) * _NS)


def _decimal_seconds(mtime_ns: int) -> str:
    sign, (q, r) = ("-", divmod(-mtime_ns, _NS)) if mtime_ns < 0 else ("", divmod(mtime_ns, _NS))
    return f"{sign}{q}.{r:09d}".rstrip("0").rstrip(".")


def _set_mtime(info: tarfile.TarInfo, mtime_ns: int) -> None:
    """Whole seconds in the header; else a PAX ``mtime`` record holding the time as it will
    be read back (:func:`readable_mtime_ns`), so that what a layer imported from this tar
    holds exports to the same bytes again."""
    mtime_ns = readable_mtime_ns(mtime_ns)
    sec, frac = divmod(mtime_ns, _NS)
    if frac == 0 and sec >= 0:
        info.mtime = sec
        return
    info.mtime = max(sec, 0)
    info.pax_headers = {**info.pax_headers, "mtime": _decimal_seconds(mtime_ns)}


def _xattrs(target: int | str, follow: bool) -> dict[str, bytes]:
    """Extended attributes of ``target`` (an fd, or a path not followed), overlay ones left out."""
    try:
        keys = os.listxattr(target, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out: dict[str, bytes] = {}
    for key in sorted(keys):
        if key.startswith(_SKIPPED_XATTRS):
            continue
        try:
            out[key] = os.getxattr(target, key, follow_symlinks=follow)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
    return out


def _pax_xattrs(info: tarfile.TarInfo, xattrs: dict[str, bytes]) -> None:
    records = {
        f"SCHILY.xattr.{key}": value.decode("utf-8", "surrogateescape")
        for key, value in xattrs.items()
    }
    if records:
        info.pax_headers = {**info.pax_headers, **records}


class _WriteError(OSError):
    """Writing the tar failed (told apart from failing to read the layer)."""


class _Output:
    """The tar file as tarfile sees it: write errors become :class:`_WriteError`."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f

    def write(self, data: bytes) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            raise _WriteError(e.errno, e.strerror) from e

    def tell(self) -> int:
        return self._f.tell()


class _LayerWriter:
    """Walks one layer's ``diff`` directory (only through fds, never following a symlink) and
    writes its entries in the order of the module docstring."""

    def __init__(self, lid: str, layer_fd: int) -> None:
        self.lid = lid
        self.layer_fd = layer_fd
        self.entries = 0
        self._links: dict[tuple[int, int], str] = {}
        self._where = "diff"

    def write(self, tf: tarfile.TarFile) -> None:
        try:
            self._write(tf)
        except (ImageError, _WriteError):
            raise
        except OSError as e:
            raise ImageError(
                f"layer {self.lid[:12]}: cannot read {self._where!r}: {e.strerror or e}"
            ) from e

    def _open_dir(self, parts: tuple[str, ...]) -> int:
        fd = os.open("diff", _DIR_OPEN, dir_fd=self.layer_fd)
        try:
            for name in parts:
                nfd = os.open(name, _DIR_OPEN, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _write(self, tf: tarfile.TarFile) -> None:
        root_fd = self._open_dir(())
        try:
            st = os.fstat(root_fd)
            info = self._info("./", tarfile.DIRTYPE, st)
            xattrs = _xattrs(root_fd, True)
            _pax_xattrs(info, xattrs)
            self._add(tf, info)
            if self._is_opaque(root_fd):
                self._add(tf, self._marker(OPAQUE_WHITEOUT, st.st_mtime_ns))
        finally:
            os.close(root_fd)
        pending: list[tuple[str, ...]] = [()]
        while pending:
            parts = pending.pop()
            self._where = "/".join(parts) or "."
            dfd = self._open_dir(parts)
            try:
                dir_mtime_ns = os.fstat(dfd).st_mtime_ns
                subdirs = []
                for name in sorted(os.listdir(dfd), key=os.fsencode):
                    if self._entry(tf, dfd, parts, name, dir_mtime_ns):
                        subdirs.append(parts + (name,))
            finally:
                os.close(dfd)
            pending.extend(reversed(subdirs))

    def _entry(
        self,
        tf: tarfile.TarFile,
        dfd: int,
        parts: tuple[str, ...],
        name: str,
        dir_mtime_ns: int,
    ) -> bool:
        """Write the entry ``name`` of directory ``parts``; True when it is a directory."""
        path = "/".join(parts + (name,))
        self._where = path
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        mode = st.st_mode
        proc_path = f"/proc/self/fd/{dfd}/{name}"
        if stat.S_ISDIR(mode):
            fd = os.open(name, _DIR_OPEN, dir_fd=dfd)
            try:
                info = self._info(path, tarfile.DIRTYPE, os.fstat(fd))
                _pax_xattrs(info, _xattrs(fd, True))
                opaque = self._is_opaque(fd)
            finally:
                os.close(fd)
            self._add(tf, info)
            if opaque:
                self._add(tf, self._marker(f"{path}/{OPAQUE_WHITEOUT}", st.st_mtime_ns))
            return True
        if stat.S_ISCHR(mode) and st.st_rdev == 0:
            prefix = "/".join(parts + (WHITEOUT_PREFIX + name,))
            self._add(tf, self._marker(prefix, dir_mtime_ns))
            return False
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self._links:
            info = self._info(path, tarfile.LNKTYPE, st)
            info.linkname = self._links[key]
            self._add(tf, info)
            return False
        if stat.S_ISREG(mode):
            fd = os.open(name, _FILE_OPEN, dir_fd=dfd)
            with open(fd, "rb") as f:
                fst = os.fstat(fd)
                if (fst.st_dev, fst.st_ino) != key:
                    raise ImageError(f"layer {self.lid[:12]}: {path!r} changed while exported")
                info = self._info(path, tarfile.REGTYPE, fst)
                info.size = fst.st_size
                _pax_xattrs(info, _xattrs(fd, True))
                self._add(tf, info, cast(IO[bytes], f))
        elif stat.S_ISLNK(mode):
            info = self._info(path, tarfile.SYMTYPE, st)
            info.linkname = os.readlink(name, dir_fd=dfd)
            _pax_xattrs(info, _xattrs(proc_path, False))
            self._add(tf, info)
        elif stat.S_ISFIFO(mode):
            info = self._info(path, tarfile.FIFOTYPE, st)
            _pax_xattrs(info, _xattrs(proc_path, False))
            self._add(tf, info)
        else:
            kind = {
                stat.S_IFCHR: f"character device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}",
                stat.S_IFBLK: f"block device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}",
                stat.S_IFSOCK: "socket",
            }.get(stat.S_IFMT(mode), f"file of type {stat.S_IFMT(mode):o}")
            raise ImageError(f"layer {self.lid[:12]}: {path!r} is a {kind}, not allowed in a layer")
        if st.st_nlink > 1:
            self._links[key] = path
        return False

    @staticmethod
    def _is_opaque(fd: int) -> bool:
        try:
            return os.getxattr(fd, OVERLAY_OPAQUE_XATTR) == b"y"
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                return False
            raise

    @staticmethod
    def _info(name: str, kind: bytes, st: os.stat_result) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        _set_mtime(info, st.st_mtime_ns)
        return info

    @staticmethod
    def _marker(name: str, mtime_ns: int) -> tarfile.TarInfo:
        """An empty ``.wh.`` file: mode 0, owner 0:0, the given mtime."""
        info = tarfile.TarInfo(name)
        info.type = tarfile.REGTYPE
        info.mode = 0
        _set_mtime(info, mtime_ns)
        return info

    def _add(self, tf: tarfile.TarFile, info: tarfile.TarInfo, f: IO[bytes] | None = None) -> None:
        tf.addfile(info, f)
        self.entries += 1


__all__ = ["export_layer", "image_record", "import_layer", "register_image"]
