"""The local image store: image records plus content-addressed, unpacked layers.

On disk, under the state root given to :class:`ImageStore`::

    images/
      .lock                    flock(2)ed by writers (import, remove, gc) for their whole run
      index.json               {"version": 1, "images": [image records, oldest import first]}
      <image id>/config.json   the image config blob, verbatim (its sha256 is the image id)
      <image id>/manifest.json the manifest blob, verbatim; for docker archives, which carry
                               none, a synthesized OCI manifest listing the uncompressed layers
    layers/
      .tmp/                    work in progress: layers being unpacked, layers being deleted,
                               decompressed archives (emptied whenever a writer takes the lock)
      <layer id>/diff/         the unpacked layer in overlay form: one overlayfs lowerdir
      <layer id>/layer.json    {"diff_id", "size_bytes", "entries", "blob_digest", "media_type"},
                               plus "transferred": true for a layer received from another node
                               (:mod:`runtime.image.transfer`: sizes and blob digest are those of
                               the re-made tar it came in)

**Layer id = hex sha256 of the layer DiffID**, i.e. of the *uncompressed* layer tar
(image-spec ``config.md`` "Layer DiffID").  Rationale: the config lists the DiffIDs, so the id
is known (and trusted, the config being verified) before any layer is read; the same layer
compressed with gzip, zstd or not at all (docker archives) is stored once; and unpacking checks
that the stream really hashes to it.  Since each layer is unpacked on its own (not on top of
its parents), its directory depends on its content only.

Atomicity: a layer is unpacked into ``layers/.tmp/``; after all new layers of an import are
unpacked, one ``sync(2)`` makes their contents durable and each is renamed into place, so a
``layers/<id>/`` directory is always complete.  JSON files are written to a temp file, fsynced
and renamed, and the directory is fsynced.  The index is written last: a crash leaves at worst
unreferenced layers, which :meth:`ImageStore.gc` removes.  Readers (``list``, ``resolve``,
``layer_dirs``) take no lock; they see either the old or the new index.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

from runtime.errors import AmbiguousImage, ImageError, ImageInUse, ImageNotFound
from runtime.image.layers import UnpackLimits, unpack_layer, verify_layer
from runtime.image.oci import (
    ImageConfig,
    OpenImage,
    digest_hex,
    normalize_name,
    open_image,
    sha256_digest,
    synthesize_manifest,
)

log = structlog.get_logger(__name__)

INDEX_VERSION = 1
_HEX = re.compile(r"[0-9a-f]{1,64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Image:
    """An image in the store.

    Attributes:
        id: hex sha256 of the image config blob (the Docker/Podman image id).
        names: ``repository:tag`` names pointing at this image (may be empty).
        manifest_digest: ``sha256:`` digest of the manifest (image-spec ``manifest.md``).
        layers: layer ids (hex DiffIDs) bottom to top, as in the config's ``rootfs.diff_ids``.
        config: execution defaults from the image config.
        created: the config's ``created`` timestamp (RFC 3339), if any.
        size_bytes: sum of the uncompressed sizes of the distinct layers, bytes.
    """

    id: str
    names: tuple[str, ...]
    manifest_digest: str
    layers: tuple[str, ...]
    config: ImageConfig
    created: str | None
    size_bytes: int

    def to_json(self) -> dict[str, Any]:
        """The record kept in ``images/index.json``."""
        return {
            "id": self.id,
            "names": list(self.names),
            "manifest_digest": self.manifest_digest,
            "layers": list(self.layers),
            "config": self.config.to_json(),
            "created": self.created,
            "size_bytes": self.size_bytes,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Image:
        """Parse a record of ``images/index.json``."""
        try:
            return cls(
                id=str(obj["id"]),
                names=tuple(obj["names"]),
                manifest_digest=str(obj["manifest_digest"]),
                layers=tuple(obj["layers"]),
                config=ImageConfig.from_json(obj["config"]),
                created=obj.get("created"),
                size_bytes=int(obj["size_bytes"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ImageError(f"malformed image record in the store index: {e}") from e


class ImageStore:
    """Images and their unpacked layers under ``root`` (see the module docstring for the layout).

    Args:
        root: the state root; the store uses ``root/images`` and ``root/layers`` only.
        limits: bounds applied to every layer unpacked (sizes in bytes, entry count).
    """

    def __init__(self, root: Path, limits: UnpackLimits | None = None) -> None:
        self.root = Path(root)
        self.images_dir = self.root / "images"
        self.layers_dir = self.root / "layers"
        self.limits = limits or UnpackLimits()
        self._tmp = self.layers_dir / ".tmp"
        self._index_path = self.images_dir / "index.json"

    # -- reading --------------------------------------------------------------------------

    def list(self) -> builtins.list[Image]:
        """All images, in import order (oldest first)."""
        return builtins.list(self._load().values())

    def resolve(self, ref: str) -> Image:
        """Find an image by name (``name[:tag]``, tag ``latest`` by default), full id
        (optionally ``sha256:``-prefixed) or unique id prefix.  Names win over id prefixes.

        Raises:
            ImageNotFound: nothing matches.
            AmbiguousImage: an id prefix matches several images.
        """
        return self._resolve_in(self._load(), ref)[0]

    def has_layer(self, layer_id: str) -> bool:
        """Whether the layer (hex DiffID, or ``sha256:<hex>``) is unpacked in the store."""
        lid = layer_id.removeprefix("sha256:")
        if not _HEX64.fullmatch(lid):
            return False
        d = self.layers_dir / lid
        return (d / "layer.json").is_file() and (d / "diff").is_dir()

    def layer_dir(self, layer_id: str) -> Path:
        """The unpacked directory (overlay lowerdir) of a layer; it may not exist."""
        lid = layer_id.removeprefix("sha256:")
        if not _HEX64.fullmatch(lid):
            raise ImageError(f"invalid layer id {layer_id!r}")
        return self.layers_dir / lid / "diff"

    def layer_dirs(self, image: Image) -> builtins.list[Path]:
        """The image's layer directories, **bottom to top** (overlayfs wants its ``lowerdir=``
        option top first: reverse this list and join with ``:``).

        A layer appearing twice is listed once, at its topmost position (equivalent for
        overlayfs, which refuses some repeated lowerdirs).

        Raises:
            ImageError: a layer is missing from the store.
        """
        seen: set[str] = set()
        top_first: builtins.list[Path] = []
        for lid in reversed(image.layers):
            if lid in seen:
                continue
            seen.add(lid)
            if not self.has_layer(lid):
                raise ImageError(
                    f"layer {lid[:12]} of image {image.id[:12]} is missing from the store; "
                    "import the image again"
                )
            top_first.append(self.layer_dir(lid))
        return top_first[::-1]

    # -- writing --------------------------------------------------------------------------

    def import_path(
        self,
        path: Path,
        name: str | None = None,
        on_progress: Callable[[ImportProgress], None] | None = None,
        *,
        limits: UnpackLimits | None = None,
    ) -> Image:
        """Import an image from an OCI layout directory, an oci-archive or a docker archive.

        Every blob is verified (manifest and config by digest and size, layers by digest and
        size and by DiffID); layers not yet in the store are unpacked (see
        :mod:`runtime.image.layers`), present ones are only verified.  The image is named
        ``name`` if given, else by the archive's ``ref.name`` annotation or ``RepoTags``, else
        it stays unnamed.  A name already used by another image moves to this one.  Importing
        an image that is already stored adds its names; a docker archive (which has no
        manifest) then keeps the stored manifest, an OCI source replaces it.

        ``on_progress`` (when given) is called with an :class:`ImportProgress` once before the
        first layer byte is read, after every chunk read (about 1 MiB) and once with
        ``finished`` at the end, also when the import fails; the CLI draws a progress bar from
        it.  The store itself never writes to a terminal.
        ``limits`` replaces the store's bounds (:class:`~runtime.image.layers.UnpackLimits`)
        for this import; ``max_image_bytes`` counts every layer of the image, stored ones
        included.

        Raises:
            ImageError: unreadable or invalid input, digest mismatch (named), unsafe layer
                (:class:`~runtime.errors.UnsafeArchiveError`), a layer or the image over its
                bound (:class:`~runtime.errors.ArchiveLimitError`, naming the entry).
                Nothing is left behind.
        """
        path = Path(path)
        want = normalize_name(name) if name is not None else None
        started = time.monotonic()
        with self._locked(), open_image(path, want, tmp_dir=self._tmp) as opened:
            src = opened.image
            image_id = digest_hex(src.config_digest, "image config digest")
            log.info("importing image", path=str(path), format=src.format, id=image_id[:12])
            sizes, added = self._import_layers(opened, on_progress, path, limits or self.limits)
            try:
                images = self._load()
                old = images.get(image_id)
                manifest, manifest_digest = src.manifest, src.manifest_digest
                if manifest_digest is None and old is not None:
                    manifest_digest = old.manifest_digest  # keep the manifest we have
                elif manifest is None or manifest_digest is None:
                    manifest = synthesize_manifest(
                        src.config_digest,
                        len(src.config),
                        [(layer.diff_id, sizes[digest_hex(layer.diff_id)]) for layer in src.layers],
                    )
                    manifest_digest = sha256_digest(manifest)
                layer_ids = tuple(digest_hex(layer.diff_id) for layer in src.layers)
                names = (want,) if want is not None else src.names
                merged = tuple(dict.fromkeys((old.names if old else ()) + names))
                image = Image(
                    id=image_id,
                    names=merged,
                    manifest_digest=manifest_digest,
                    layers=layer_ids,
                    config=src.parsed.config,
                    created=src.parsed.created,
                    size_bytes=sum(sizes[lid] for lid in dict.fromkeys(layer_ids)),
                )
                image_dir = self.images_dir / image_id
                image_dir.mkdir(mode=0o700, exist_ok=True)
                _write_atomic(image_dir / "config.json", src.config)
                if manifest is not None:
                    _write_atomic(image_dir / "manifest.json", manifest)
                for other in builtins.list(images.values()):
                    if other.id != image_id and set(other.names) & set(names):
                        moved = tuple(n for n in other.names if n not in names)
                        images[other.id] = _replace_names(other, moved)
                        log.info(
                            "name moved",
                            names=sorted(set(other.names) - set(moved)),
                            old=other.id[:12],
                            new=image_id[:12],
                        )
                images[image_id] = image
                self._save(images)
            except BaseException:
                for lid in added:
                    self._delete_layer(lid)
                raise
        log.info(
            "image imported",
            id=image_id[:12],
            names=builtins.list(image.names),
            layers=len(layer_ids),
            new_layers=len(added),
            seconds=round(time.monotonic() - started, 3),
        )
        return image

    def _import_layers(
        self,
        opened: OpenImage,
        on_progress: Callable[[ImportProgress], None] | None,
        path: Path,
        limits: UnpackLimits,
    ) -> tuple[dict[str, int], builtins.list[str]]:
        """Verify every layer, unpack the missing ones; return sizes by id and ids added."""
        src = opened.image
        image_bytes = 0  # what the layers so far unpack to, for limits.max_image_bytes
        sizes: dict[str, int] = {}
        staged: dict[str, Path] = {}
        added: builtins.list[str] = []
        total = sum(opened.layer_size(layer) or 0 for layer in src.layers)
        try:
            with _Reporter(on_progress, path, total) as bar:
                for layer in src.layers:
                    lid = digest_hex(layer.diff_id, "layer diff_id")
                    if lid in sizes:
                        continue
                    with opened.open_layer(layer) as raw:
                        if self.has_layer(lid):
                            verify_layer(
                                raw,
                                media_type=layer.media_type,
                                blob_digest=layer.digest,
                                blob_size=layer.size,
                                diff_id=layer.diff_id,
                                limits=limits,
                                on_read=bar.advance,
                            )
                            sizes[lid] = self._layer_meta(lid).get("size_bytes", 0)
                            image_bytes += sizes[lid]
                            if image_bytes > limits.max_image_bytes:
                                raise ImageError(
                                    f"image is larger than {limits.max_image_bytes} bytes "
                                    f"unpacked (its layers up to {lid[:12]}, already stored, "
                                    f"unpack to {image_bytes} bytes)"
                                )
                            log.info("layer already present", layer=lid[:12])
                            continue
                        staging = Path(tempfile.mkdtemp(prefix=f"{lid[:12]}-", dir=self._tmp))
                        staged[lid] = staging
                        (staging / "diff").mkdir(mode=0o755)
                        t0 = time.monotonic()
                        stats = unpack_layer(
                            raw,
                            staging / "diff",
                            media_type=layer.media_type,
                            blob_digest=layer.digest,
                            blob_size=layer.size,
                            diff_id=layer.diff_id,
                            limits=limits,
                            on_read=bar.advance,
                            image_bytes_before=image_bytes,
                        )
                    image_bytes += max(stats.size_bytes, stats.unpacked_bytes)
                    meta = {
                        "diff_id": stats.diff_id,
                        "size_bytes": stats.size_bytes,
                        "entries": stats.entries,
                        "blob_digest": layer.digest,
                        "media_type": layer.media_type,
                    }
                    _write_atomic(staging / "layer.json", _dumps(meta))
                    sizes[lid] = stats.size_bytes
                    log.info(
                        "layer unpacked",
                        layer=lid[:12],
                        size_bytes=stats.size_bytes,
                        entries=stats.entries,
                        seconds=round(time.monotonic() - t0, 3),
                    )
            if staged:
                os.sync()  # the layer contents are durable before any appears in layers/
            for lid, staging in staged.items():
                target = self.layers_dir / lid
                if target.exists():  # incomplete leftover (no layer.json); replace it
                    self._delete_layer(lid)
                os.rename(staging, target)
                added.append(lid)
            if added:
                _fsync_dir(self.layers_dir)
        except BaseException:
            for staging in staged.values():
                shutil.rmtree(staging, ignore_errors=True)
            for lid in added:
                self._delete_layer(lid)
            raise
        return sizes, added

    def add_layer(self, layer_id: str, unpack: Callable[[Path], dict[str, Any]]) -> bool:
        """Add one layer unless it is already stored; ``unpack(diff_dir)`` fills the new, empty
        ``diff_dir`` and returns the record for ``layer.json`` (see the module docstring).

        Runs under the writers' lock and is atomic like :meth:`import_path`: the layer is
        unpacked in ``layers/.tmp``, synced, then renamed into place.  The layer is not yet
        referenced by any image: a :meth:`gc` before the image is added deletes it.

        Returns:
            True when the layer was added, False when it was already present (``unpack`` is
            then not called).

        Raises:
            ImageError: invalid layer id, or whatever ``unpack`` raises (nothing is left behind).
        """
        lid = self.layer_dir(layer_id).parent.name  # validates the id
        with self._locked():
            if self.has_layer(lid):
                return False
            staging = Path(tempfile.mkdtemp(prefix=f"{lid[:12]}-", dir=self._tmp))
            try:
                (staging / "diff").mkdir(mode=0o755)
                meta = unpack(staging / "diff")
                _write_atomic(staging / "layer.json", _dumps(meta))
                os.sync()  # the layer's contents are durable before it appears in layers/
                if (self.layers_dir / lid).exists():  # incomplete leftover (no layer.json)
                    self._delete_layer(lid)
                os.rename(staging, self.layers_dir / lid)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            _fsync_dir(self.layers_dir)
            return True

    def add_image(self, image: Image, config: bytes, manifest: bytes) -> Image:
        """Register ``image`` whose layers are already stored, with its verbatim ``config``
        and ``manifest`` blobs (the caller has verified them).

        Unlike :meth:`import_path`, names never move: a name another image holds stays
        with it (logged) and is not given to ``image``.  If the image is already stored only
        its free new names are added (its config and manifest files are kept as they are).

        Raises:
            ImageError: a layer is missing from the store (named); the index is unreadable.
        """
        with self._locked():
            for lid in image.layers:
                if not self.has_layer(lid):
                    raise ImageError(
                        f"layer {lid[:12]} of image {image.id[:12]} is missing from the store; "
                        "send the layer before the image"
                    )
            images = self._load()
            taken = {n for other in images.values() if other.id != image.id for n in other.names}
            kept = tuple(n for n in image.names if n not in taken)
            if len(kept) < len(image.names):
                log.warning(
                    "image names kept by other images",
                    id=image.id[:12],
                    names=sorted(set(image.names) - set(kept)),
                )
            old = images.get(image.id)
            if old is not None:
                merged = tuple(dict.fromkeys(old.names + kept))
                if merged != old.names:
                    images[image.id] = _replace_names(old, merged)
                    self._save(images)
                return images[image.id]
            image_dir = self.images_dir / image.id
            image_dir.mkdir(mode=0o700, exist_ok=True)
            _write_atomic(image_dir / "config.json", config)
            _write_atomic(image_dir / "manifest.json", manifest)
            images[image.id] = _replace_names(image, kept)
            self._save(images)
            log.info("image added", id=image.id[:12], names=builtins.list(kept))
            return images[image.id]

    def remove(self, ref: str, in_use: Callable[[str], bool] | None = None) -> None:
        """Remove an image and the layers no other image uses.

        When ``ref`` is a name and the image has other names too, only that name is removed
        (like ``docker rmi``).  Otherwise the image goes, unless ``in_use(image.id)`` is true.

        Raises:
            ImageNotFound, AmbiguousImage: as :meth:`resolve`.
            ImageInUse: ``in_use`` says a container uses the image.
        """
        with self._locked():
            images = self._load()
            image, by_name = self._resolve_in(images, ref)
            if by_name is not None and len(image.names) > 1:
                images[image.id] = _replace_names(
                    image, tuple(n for n in image.names if n != by_name)
                )
                self._save(images)
                log.info("image untagged", id=image.id[:12], name=by_name)
                return
            if in_use is not None and in_use(image.id):
                raise ImageInUse(
                    f"image {ref} ({image.id[:12]}) is used by a container: remove the container "
                    "first"
                )
            del images[image.id]
            self._save(images)
            shutil.rmtree(self.images_dir / image.id, ignore_errors=True)
            still_used = {lid for other in images.values() for lid in other.layers}
            removed = [lid for lid in dict.fromkeys(image.layers) if lid not in still_used]
            for lid in removed:
                self._delete_layer(lid)
            log.info(
                "image removed",
                id=image.id[:12],
                names=builtins.list(image.names),
                layers_removed=len(removed),
            )

    def gc(self) -> builtins.list[str]:
        """Delete layers no image references (left by a crash); return their ids."""
        with self._locked():
            used = {lid for image in self._load().values() for lid in image.layers}
            removed = []
            if self.layers_dir.is_dir():
                for entry in sorted(os.listdir(self.layers_dir)):
                    if _HEX64.fullmatch(entry) and entry not in used:
                        self._delete_layer(entry)
                        removed.append(entry)
            if removed:
                log.info("unreferenced layers removed", layers=removed)
            return removed

    # -- internals ------------------------------------------------------------------------

    def _resolve_in(self, images: dict[str, Image], ref: str) -> tuple[Image, str | None]:
        """The image ``ref`` names, and the normalised name if it matched by name."""
        ref = ref.strip()
        if not ref.startswith("sha256:"):
            try:
                name = normalize_name(ref)
            except ImageError:
                name = None
            if name is not None:
                for image in images.values():
                    if name in image.names:
                        return image, name
        hexref = ref.removeprefix("sha256:")
        if _HEX.fullmatch(hexref):
            matches = [image for image in images.values() if image.id.startswith(hexref)]
            if len(matches) == 1:
                return matches[0], None
            if len(matches) > 1:
                raise AmbiguousImage(
                    f"image id prefix {ref} is ambiguous: it matches "
                    + ", ".join(image.id[:12] for image in matches)
                )
        raise ImageNotFound(
            f"image {ref} not found: pull it (`jaula pull {ref}`) or import it with "
            "`jaula image import PATH`"
        )

    def _load(self) -> dict[str, Image]:
        try:
            data = self._index_path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise ImageError(f"image index {self._index_path} is corrupt: {e}") from e
        if not isinstance(doc, dict) or doc.get("version") != INDEX_VERSION:
            raise ImageError(f"image index {self._index_path}: unsupported format version")
        images = [Image.from_json(obj) for obj in doc.get("images", [])]
        return {image.id: image for image in images}

    def _save(self, images: dict[str, Image]) -> None:
        doc = {"version": INDEX_VERSION, "images": [i.to_json() for i in images.values()]}
        _write_atomic(self._index_path, _dumps(doc))

    def _layer_meta(self, lid: str) -> dict[str, Any]:
        try:
            meta = json.loads((self.layers_dir / lid / "layer.json").read_bytes())
        except (OSError, ValueError) as e:
            raise ImageError(f"layer {lid[:12]}: unreadable layer.json: {e}") from e
        return meta if isinstance(meta, dict) else {}

    def _delete_layer(self, lid: str) -> None:
        """Move the layer out of ``layers/`` (atomically), then delete it."""
        src = self.layers_dir / lid
        if not src.exists():
            return
        trash = Path(tempfile.mkdtemp(prefix=f"del-{lid[:12]}-", dir=self._tmp))
        os.rename(src, trash / "layer")
        shutil.rmtree(trash)
        log.debug("layer deleted", layer=lid[:12])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the writers' lock; clear ``layers/.tmp`` (only writers use it)."""
        try:
            self.images_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.layers_dir.mkdir(mode=0o711, exist_ok=True)
            fd = os.open(self.images_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ImageError(f"cannot open the image store at {self.root}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self._tmp.exists():
                shutil.rmtree(self._tmp)
            self._tmp.mkdir(mode=0o700)
            yield
        finally:
            os.close(fd)


def _replace_names(image: Image, names: tuple[str, ...]) -> Image:
    return Image(
        id=image.id,
        names=names,
        manifest_digest=image.manifest_digest,
        layers=image.layers,
        config=image.config,
        created=image.created,
        size_bytes=image.size_bytes,
    )


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class ImportProgress:
    """How far :meth:`ImageStore.import_path` is: ``done_bytes`` of ``total_bytes`` layer
    bytes read from ``path`` (as stored there, compressed or not; ``total_bytes`` is 0 when
    the source does not give the sizes).  ``finished`` is set on the last report only, which
    also comes when the import fails."""

    path: Path
    done_bytes: int
    total_bytes: int
    finished: bool = False


class _Reporter:
    """Counts the layer bytes read and reports them to ``on_progress`` (if any)."""

    def __init__(
        self, on_progress: Callable[[ImportProgress], None] | None, path: Path, total_bytes: int
    ) -> None:
        self._on_progress = on_progress
        self._path = path
        self._total = total_bytes
        self._done = 0

    def _report(self, finished: bool = False) -> None:
        if self._on_progress is not None:
            self._on_progress(ImportProgress(self._path, self._done, self._total, finished))

    def __enter__(self) -> Self:
        self._report()
        return self

    def advance(self, nbytes: int) -> None:
        self._done += nbytes
        self._report()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._report(finished=True)


__all__ = ["Image", "ImageStore", "ImportProgress"]
