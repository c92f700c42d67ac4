"""Reading images from OCI image layouts, oci-archive tars and ``docker save`` tarballs.

Three inputs are understood, all read without being unpacked to disk:

* **OCI image layout directory** (OCI image-spec ``image-layout.md``)::

      oci-layout                     {"imageLayoutVersion": "1.0.0"}
      index.json                     image index: manifests[] descriptors, annotated with
                                     org.opencontainers.image.ref.name
      blobs/sha256/<hex>             content-addressed blobs (manifests, configs, layers)

* **oci-archive**: a tar of such a layout (what ``skopeo copy ... oci-archive:F`` and
  ``podman save --format oci-archive`` write).  A plain, gzip or zstd tar.

* **docker-archive** (``docker save``, ``skopeo copy ... docker-archive:F``)::

      manifest.json                  [{"Config": "<hex>.json", "RepoTags": [...],
                                       "Layers": ["<hex>.tar" | "<v1id>/layer.tar", ...]}]
      <hex>.json                     the image config (same format as an OCI config)
      <hex>.tar, <v1id>/layer.tar    uncompressed layer tars (the latter often symlinks)

  Docker 25 and later write an OCI layout *and* ``manifest.json`` into one tar; such an
  archive is read as an OCI layout, with ``RepoTags`` as a source of names.

Verification (OCI image-spec ``descriptor.md`` "Digests"): every blob read through a
descriptor is checked against the descriptor's digest *and* size (the size check happens while
reading, so an oversized blob is refused before it is fully read).  A docker-archive has no
descriptors for its layers; there the uncompressed stream of layer *i* must hash to
``rootfs.diff_ids[i]`` of the config (``config.md`` "Layer DiffID"), which
:func:`runtime.image.layers.unpack_layer` checks, and the config itself must hash to its file
name when that name is a digest.  Only ``sha256`` digests are accepted.

Names: an image may carry names from ``org.opencontainers.image.ref.name`` when it contains a
``:`` or ``/`` (skopeo writes ``busybox:latest``; a bare ``latest`` is a tag inside the layout
and is only used to choose a manifest), from ``io.containerd.image.name`` (Docker 25+), or
from ``RepoTags``.  Names are normalised by :func:`normalize_name`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import hashlib
import json
import os
import platform
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO, Any, Protocol, Self

import structlog
import zstandard

from runtime.errors import ImageError

log = structlog.get_logger(__name__)

# --- media types (OCI image-spec media-types.md; Docker image manifest v2 schema 2) ---------

MEDIA_TYPE_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_TYPE_OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
MEDIA_TYPE_OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
MEDIA_TYPE_OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
MEDIA_TYPE_DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_TYPE_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MEDIA_TYPE_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

INDEX_MEDIA_TYPES = frozenset({MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_MANIFEST_LIST})
MANIFEST_MEDIA_TYPES = frozenset({MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST})
CONFIG_MEDIA_TYPES = frozenset({MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_DOCKER_CONFIG})

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"

#: Upper bound, in bytes, for any JSON document read from an image (index, manifest, config).
MAX_JSON_BYTES = 16 * 1024 * 1024
#: Upper bound, in bytes, for a compressed outer archive once decompressed to a temp file.
MAX_ARCHIVE_BYTES = 256 * 1024 * 1024 * 1024

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHUNK_BYTES = 1024 * 1024


class Compression(Enum):
    """How a layer or archive stream is compressed (image-spec ``layer.md``)."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


_LAYER_MEDIA_TYPES: dict[str, Compression] = {
    MEDIA_TYPE_OCI_LAYER: Compression.NONE,
    MEDIA_TYPE_OCI_LAYER_GZIP: Compression.GZIP,
    MEDIA_TYPE_OCI_LAYER_ZSTD: Compression.ZSTD,
    MEDIA_TYPE_OCI_LAYER_ND: Compression.NONE,
    MEDIA_TYPE_OCI_LAYER_ND_GZIP: Compression.GZIP,
    MEDIA_TYPE_OCI_LAYER_ND_ZSTD: Compression.ZSTD,
    MEDIA_TYPE_DOCKER_LAYER: Compression.NONE,
    MEDIA_TYPE_DOCKER_LAYER_GZIP: Compression.GZIP,
    MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP: Compression.GZIP,
}


def layer_compression(media_type: str) -> Compression:
    """The compression a layer media type declares (image-spec ``layer.md``, ``media-types.md``).

    Raises:
        ImageError: the media type is not a layer type we can apply (e.g. encrypted layers).
    """
    try:
        return _LAYER_MEDIA_TYPES[media_type]
    except KeyError:
        raise ImageError(f"unsupported layer media type {media_type!r}") from None


def sniff_compression(head: bytes) -> Compression:
    """Detect gzip (``1f 8b``) or zstd (``28 b5 2f fd``) from the first bytes of a stream."""
    if head.startswith(b"\x1f\x8b"):
        return Compression.GZIP
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return Compression.ZSTD
    return Compression.NONE


# --- digests ----------------------------------------------------------------------------------


def digest_hex(digest: str, what: str = "digest") -> str:
    """Return the hex part of a ``sha256:<64 hex>`` digest (image-spec ``descriptor.md``).

    Raises:
        ImageError: the digest is malformed or uses an algorithm other than sha256.
    """
    algorithm, sep, encoded = digest.partition(":")
    if not sep or algorithm != "sha256" or not _HEX64.fullmatch(encoded):
        raise ImageError(f"{what} {digest!r} is not a sha256 digest (sha256:<64 hex digits>)")
    return encoded


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class VerifyingReader:
    """A read-only stream that hashes (sha256) and counts what passes through it.

    ``on_read(n)`` is called with the size in bytes of every chunk read (for progress bars).

    With ``expected_size`` set, reading past that many bytes raises :class:`ImageError` at once;
    :meth:`finish` drains the rest of the stream and checks the digest and the size.
    ``limit_bytes`` bounds the stream when no size is known.
    """

    def __init__(
        self,
        raw: IO[bytes],
        what: str,
        expected_digest: str | None = None,
        expected_size: int | None = None,
        limit_bytes: int | None = None,
        on_read: Callable[[int], None] | None = None,
    ) -> None:
        self._raw = raw
        self._on_read = on_read
        self._what = what
        self._expected_digest = expected_digest
        self._expected_size = expected_size
        self._limit = expected_size if expected_size is not None else limit_bytes
        self._hash = hashlib.sha256()
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self._raw.read(-1 if size is None else size)
        if data:
            self.bytes_read += len(data)
            if self._limit is not None and self.bytes_read > self._limit:
                if self._expected_size is not None:
                    raise ImageError(
                        f"{self._what} {self._expected_digest or ''} is larger than the "
                        f"{self._expected_size} bytes its descriptor declares".replace("  ", " ")
                    )
                raise ImageError(f"{self._what} is larger than {self._limit} bytes")
            self._hash.update(data)
            if self._on_read is not None:
                self._on_read(len(data))
        return data

    def drain(self) -> None:
        """Read the stream to its end (the bytes are hashed and counted, then dropped)."""
        while self.read(_CHUNK_BYTES):
            pass

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of the bytes read so far."""
        return "sha256:" + self._hash.hexdigest()

    def finish(self) -> str:
        """Drain, then verify digest and size; return the digest of the whole stream.

        Raises:
            ImageError: naming the expected digest, when the content does not match it.
        """
        self.drain()
        if self._expected_size is not None and self.bytes_read != self._expected_size:
            raise ImageError(
                f"{self._what} {self._expected_digest}: size is {self.bytes_read} bytes, "
                f"descriptor says {self._expected_size}"
            )
        actual = self.digest
        if self._expected_digest is not None and actual != self._expected_digest:
            raise ImageError(
                f"{self._what} {self._expected_digest}: content does not match its digest "
                f"(got {actual})"
            )
        return actual


# --- descriptors and configs ----------------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    """``platform`` of an index entry (image-spec ``image-index.md``)."""

    os: str
    architecture: str
    variant: str | None = None


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor (image-spec ``descriptor.md``): media type, digest, size in bytes."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None

    @classmethod
    def from_json(cls, obj: Any, what: str) -> Descriptor:
        """Parse and validate a descriptor object; ``what`` names it in errors."""
        if not isinstance(obj, dict):
            raise ImageError(f"{what}: descriptor is not a JSON object")
        media_type = obj.get("mediaType", "")
        digest = obj.get("digest")
        size = obj.get("size")
        if not isinstance(media_type, str):
            raise ImageError(f"{what}: mediaType is not a string")
        if not isinstance(digest, str):
            raise ImageError(f"{what}: descriptor has no digest")
        digest_hex(digest, f"{what} digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{what} {digest}: size {size!r} is not a non-negative integer")
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise ImageError(f"{what} {digest}: annotations are not a string map")
        plat = None
        p = obj.get("platform")
        if isinstance(p, dict) and isinstance(p.get("os"), str):
            plat = Platform(
                os=p["os"], architecture=str(p.get("architecture", "")), variant=p.get("variant")
            )
        return cls(media_type, digest, size, dict(annotations), plat)


@dataclass(frozen=True)
class ImageConfig:
    """Execution defaults from the ``config`` object of an image config (image-spec
    ``config.md`` "Properties": Env, Entrypoint, Cmd, WorkingDir, User, StopSignal).

    Absent fields become empty tuples/strings; ``stop_signal`` stays ``None`` when unset.
    """

    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    stop_signal: str | None = None

    @classmethod
    def from_json(cls, obj: Any) -> ImageConfig:
        """Build from the ``config`` object (``None`` or missing gives the defaults)."""
        if obj is None:
            return cls()
        if not isinstance(obj, dict):
            raise ImageError("image config: 'config' is not a JSON object")

        def strings(key: str) -> tuple[str, ...]:
            value = obj.get(key)
            if value is None:
                return ()
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ImageError(f"image config: config.{key} is not a list of strings")
            return tuple(value)

        def string(key: str) -> str:
            value = obj.get(key)
            if value is None:
                return ""
            if not isinstance(value, str):
                raise ImageError(f"image config: config.{key} is not a string")
            return value

        return cls(
            env=strings("Env"),
            entrypoint=strings("Entrypoint"),
            cmd=strings("Cmd"),
            working_dir=string("WorkingDir"),
            user=string("User"),
            stop_signal=string("StopSignal") or None,
        )

    def to_json(self) -> dict[str, Any]:
        """The OCI ``config`` object for these fields (round-trips through :meth:`from_json`)."""
        out: dict[str, Any] = {
            "Env": list(self.env),
            "Entrypoint": list(self.entrypoint),
            "Cmd": list(self.cmd),
            "WorkingDir": self.working_dir,
            "User": self.user,
        }
        if self.stop_signal is not None:
            out["StopSignal"] = self.stop_signal
        return out


@dataclass(frozen=True)
class ParsedConfig:
    """The parts of an image config blob (image-spec ``config.md``) the store keeps."""

    config: ImageConfig
    diff_ids: tuple[str, ...]
    created: str | None
    os: str
    architecture: str


def parse_config(data: bytes) -> ParsedConfig:
    """Parse an image config blob; ``rootfs.type`` must be ``layers``.

    Raises:
        ImageError: malformed JSON, wrong rootfs type, malformed diff_ids, OS other than linux.
    """
    obj = _loads(data, "image config")
    rootfs = obj.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise ImageError("image config: rootfs.type is not 'layers'")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise ImageError("image config: rootfs.diff_ids is not a list of digests")
    for d in diff_ids:
        digest_hex(d, "image config diff_id")
    os_name = obj.get("os", "")
    if os_name not in ("linux", ""):
        raise ImageError(f"image is built for os {os_name!r}; only linux images can run")
    arch = str(obj.get("architecture", ""))
    if arch and arch != host_architecture():
        log.warning("image architecture differs from host", image=arch, host=host_architecture())
    created = obj.get("created")
    return ParsedConfig(
        config=ImageConfig.from_json(obj.get("config")),
        diff_ids=tuple(diff_ids),
        created=created if isinstance(created, str) else None,
        os=os_name or "linux",
        architecture=arch,
    )


def host_architecture() -> str:
    """The host CPU in GOARCH spelling, as image platforms use it (``amd64``, ``arm64``...)."""
    machine = platform.machine()
    return {
        "x86_64": "amd64",
        "aarch64": "arm64",
        "armv7l": "arm",
        "armv6l": "arm",
        "i686": "386",
        "i386": "386",
        "ppc64le": "ppc64le",
        "s390x": "s390x",
        "riscv64": "riscv64",
    }.get(machine, machine)


# --- names ------------------------------------------------------------------------------------

_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_NAME_RE = re.compile(
    rf"(?P<repo>(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)(?::(?P<tag>{_TAG}))?"
)
_DOCKER_HUB = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


def normalize_name(ref: str) -> str:
    """Normalise an image name to ``repository:tag`` (distribution reference grammar).

    A missing tag becomes ``latest``; ``docker.io/library/`` and ``docker.io/`` prefixes are
    dropped, so ``docker.io/library/busybox`` and ``busybox`` are the same name.

    Raises:
        ImageError: not a valid name (digest references ``name@sha256:...`` are not names).
    """
    if "@" in ref:
        raise ImageError(f"invalid image name {ref!r}: digest references are not image names")
    m = _NAME_RE.fullmatch(ref)
    if m is None or len(ref) > 255:
        raise ImageError(f"invalid image name {ref!r}")
    repo = m.group("repo")
    first, _, rest = repo.partition("/")
    has_domain = bool(rest) and ("." in first or ":" in first or first == "localhost")
    if rest and not has_domain and not re.fullmatch(_PATH_COMPONENT, first):
        raise ImageError(f"invalid image name {ref!r}: repository must be lowercase")
    if has_domain and first in _DOCKER_HUB:
        repo = rest
        if repo.startswith("library/") and repo.count("/") == 1:
            repo = repo[len("library/") :]
    return f"{repo}:{m.group('tag') or 'latest'}"


def _names_from_ref(ref: str | None) -> str | None:
    """A name from a ``ref.name`` annotation, or ``None`` for a bare tag or an invalid one."""
    if not ref or (":" not in ref and "/" not in ref):
        return None
    try:
        return normalize_name(ref)
    except ImageError:
        log.warning("ignoring unusable image name annotation", ref=ref)
        return None


# --- sources: a layout directory or a tar ---------------------------------------------------


class BlobSource(Protocol):
    """Files of an image layout or archive, by path relative to its root."""

    def open(self, relpath: str) -> IO[bytes]:
        """Open a regular file for reading; raises ImageError if it is missing."""
        ...

    def exists(self, relpath: str) -> bool:
        """Whether a regular file exists at ``relpath``."""
        ...

    def size(self, relpath: str) -> int:
        """Size in bytes of the regular file at ``relpath``; raises ImageError if missing."""
        ...

    def close(self) -> None:
        """Release the source."""
        ...


def _clean_relpath(relpath: str) -> str:
    norm = posixpath.normpath(relpath)
    if norm.startswith(("/", "../")) or norm in ("..", "."):
        raise ImageError(f"path {relpath!r} in the image escapes the archive")
    return norm


class DirSource:
    """A directory (OCI layout or an unpacked docker archive).

    Paths are opened component by component with ``O_NOFOLLOW``: symlinks inside the
    directory are refused, so a layout cannot make us read a host file.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            self._fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ImageError(f"cannot open image directory {root}: {e.strerror}") from e

    def _open_fd(self, relpath: str) -> int:
        parts = _clean_relpath(relpath).split("/")
        fd = self._fd
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                if not last:
                    flags |= os.O_DIRECTORY
                nfd = os.open(part, flags, dir_fd=fd)
                if fd != self._fd:
                    os.close(fd)
                fd = nfd
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ImageError(f"{self.root / relpath} is not a regular file")
            return fd
        except OSError as e:
            if fd != self._fd:
                os.close(fd)
            if e.errno == errno.ELOOP:
                raise ImageError(
                    f"{self.root / relpath}: symlinks are not followed in an image layout"
                ) from e
            raise ImageError(f"cannot open {self.root / relpath}: {e.strerror}") from e
        except BaseException:
            if fd != self._fd:
                os.close(fd)
            raise

    def open(self, relpath: str) -> IO[bytes]:
        return os.fdopen(self._open_fd(relpath), "rb")

    def exists(self, relpath: str) -> bool:
        try:
            os.close(self._open_fd(relpath))
            return True
        except ImageError:
            return False

    def size(self, relpath: str) -> int:
        fd = self._open_fd(relpath)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class TarSource:
    """An uncompressed, seekable tar whose regular members are read in place.

    Symlink members (``<v1id>/layer.tar -> ../<hex>.tar`` in docker archives) and hardlinks are
    resolved within the archive, at most 16 hops deep.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._tar = tarfile.open(  # noqa: SIM115 - kept open until close()
                path, "r:", encoding="utf-8", errors="surrogateescape"
            )
            self._members: dict[str, tarfile.TarInfo] = {}
            for m in self._tar.getmembers():
                try:
                    self._members[_clean_relpath(m.name)] = m
                except ImageError:
                    continue  # never looked up
        except (OSError, tarfile.TarError) as e:
            raise ImageError(f"cannot read archive {path}: {e}") from e

    def _resolve(self, relpath: str) -> tarfile.TarInfo:
        name = _clean_relpath(relpath)
        for _ in range(16):
            m = self._members.get(name)
            if m is None:
                raise ImageError(f"{self.path}: archive has no {relpath!r}")
            if m.isreg():
                return m
            if m.issym():
                name = _clean_relpath(posixpath.join(posixpath.dirname(name), m.linkname))
            elif m.islnk():
                name = _clean_relpath(m.linkname)
            else:
                raise ImageError(f"{self.path}: {relpath!r} is not a regular file")
        raise ImageError(f"{self.path}: too many links resolving {relpath!r}")

    def open(self, relpath: str) -> IO[bytes]:
        f = self._tar.extractfile(self._resolve(relpath))
        if f is None:
            raise ImageError(f"{self.path}: {relpath!r} is not a regular file")
        return f

    def exists(self, relpath: str) -> bool:
        try:
            self._resolve(relpath)
            return True
        except ImageError:
            return False

    def size(self, relpath: str) -> int:
        return self._resolve(relpath).size

    def close(self) -> None:
        self._tar.close()


def read_json(source: BlobSource, relpath: str, what: str) -> Any:
    """Read and parse a small JSON file (at most :data:`MAX_JSON_BYTES`)."""
    with source.open(relpath) as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise ImageError(f"{what} is larger than {MAX_JSON_BYTES} bytes")
    return _loads(data, what)


def _loads(data: bytes, what: str) -> Any:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(obj, (dict, list)):
        raise ImageError(f"{what} is not a JSON object")
    return obj


def blob_path(digest: str) -> str:
    """Path of a blob inside an OCI layout (image-spec ``image-layout.md`` "Blobs")."""
    return f"blobs/sha256/{digest_hex(digest)}"


def read_blob(source: BlobSource, desc: Descriptor, what: str) -> bytes:
    """Read a small blob through its descriptor and verify digest and size.

    Raises:
        ImageError: naming the digest, when the blob is missing, too large or does not match.
    """
    if desc.size > MAX_JSON_BYTES:
        raise ImageError(f"{what} {desc.digest} is {desc.size} bytes; at most {MAX_JSON_BYTES}")
    try:
        raw = source.open(blob_path(desc.digest))
    except ImageError as e:
        raise ImageError(f"{what} {desc.digest} is missing from the image: {e}") from e
    with raw:
        reader = VerifyingReader(raw, what, desc.digest, desc.size)
        data = reader.read(desc.size + 1)
        reader.finish()
    return data


# --- what an image source yields ---------------------------------------------------------------


@dataclass(frozen=True)
class LayerSource:
    """One layer of an image being imported.

    Attributes:
        relpath: where the layer blob is inside the source.
        media_type: its media type (for docker archives, the uncompressed docker type).
        digest: the blob digest to verify it against, or ``None`` when the source declares
            none (docker archives: then ``diff_id`` is the check).
        size: the blob size in bytes, or ``None`` when not declared.
        diff_id: ``sha256:`` digest of the uncompressed layer tar, from the config.
    """

    relpath: str
    media_type: str
    digest: str | None
    size: int | None
    diff_id: str


@dataclass(frozen=True)
class SourceImage:
    """An image found in a layout or archive, with its manifest and config verified.

    ``manifest`` is ``None`` for docker archives (they carry no manifest blob).
    """

    format: str
    names: tuple[str, ...]
    manifest: bytes | None
    manifest_digest: str | None
    config: bytes
    config_digest: str
    parsed: ParsedConfig
    layers: tuple[LayerSource, ...]


class OpenImage:
    """An image source opened by :func:`open_image`; use as a context manager."""

    def __init__(self, source: BlobSource, image: SourceImage, cleanup: list[Path]) -> None:
        self.source = source
        self.image = image
        self._cleanup = cleanup

    def open_layer(self, layer: LayerSource) -> IO[bytes]:
        """Open the raw (possibly compressed) layer blob."""
        try:
            return self.source.open(layer.relpath)
        except ImageError as e:
            raise ImageError(f"layer {layer.digest or layer.diff_id} is missing: {e}") from e

    def layer_size(self, layer: LayerSource) -> int | None:
        """Size in bytes of the layer blob as stored, or ``None`` if it cannot be found."""
        if layer.size is not None:
            return layer.size
        try:
            return self.source.size(layer.relpath)
        except ImageError:
            return None

    def close(self) -> None:
        self.source.close()
        for p in self._cleanup:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_image(path: Path, want_name: str | None = None, tmp_dir: Path | None = None) -> OpenImage:
    """Open an OCI layout directory, an oci-archive or a docker-archive and pick one image.

    ``want_name`` (normalised) chooses among several images in one layout or archive, by
    ``ref.name`` or ``RepoTags``.  A gzip or zstd compressed archive is first decompressed
    into ``tmp_dir`` (deleted on close).  The manifest and config are verified here; layers are
    verified while they are read.

    Raises:
        ImageError: unreadable input, unknown format, no or several matching images,
            malformed or mismatching manifest/config.
    """
    cleanup: list[Path] = []
    source: BlobSource
    if path.is_dir():
        source, kind = DirSource(path), "oci-layout"
    elif path.is_file():
        tar_path = _decompressed_archive(path, tmp_dir, cleanup)
        source, kind = TarSource(tar_path), "oci-archive"
    else:
        raise ImageError(f"image {path} does not exist")
    try:
        if source.exists("index.json"):
            image = _read_oci(source, kind, want_name)
        elif source.exists("manifest.json"):
            image = _read_docker(source, want_name)
        else:
            raise ImageError(
                f"{path} is neither an OCI image layout (index.json) nor a docker archive "
                "(manifest.json)"
            )
    except BaseException:
        source.close()
        for p in cleanup:
            p.unlink(missing_ok=True)
        raise
    return OpenImage(source, image, cleanup)


def _decompressed_archive(path: Path, tmp_dir: Path | None, cleanup: list[Path]) -> Path:
    with open(path, "rb") as f:
        kind = sniff_compression(f.read(4))
        if kind is Compression.NONE:
            return path
        f.seek(0)
        fd, name = tempfile.mkstemp(prefix="archive-", suffix=".tar", dir=tmp_dir)
        cleanup.append(Path(name))
        stream: IO[bytes]
        with os.fdopen(fd, "wb") as out:
            if kind is Compression.GZIP:
                stream = gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[assignment]
            else:
                stream = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
            reader = VerifyingReader(stream, f"archive {path}", limit_bytes=MAX_ARCHIVE_BYTES)
            try:
                shutil.copyfileobj(reader, out, _CHUNK_BYTES)
            except (OSError, EOFError, zstandard.ZstdError) as e:
                raise ImageError(f"cannot decompress {path}: {e}") from e
    log.debug("decompressed archive", path=str(path), compression=kind.value)
    return Path(name)


def _read_oci(source: BlobSource, kind: str, want_name: str | None) -> SourceImage:
    if source.exists("oci-layout"):
        layout = read_json(source, "oci-layout", "oci-layout")
        version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
        if not isinstance(version, str) or not version.startswith("1."):
            raise ImageError(f"unsupported OCI image layout version {version!r}")
    else:
        raise ImageError("not an OCI image layout: the oci-layout file is missing")
    index = read_json(source, "index.json", "index.json")
    candidates = list(_manifests(source, index, "index.json", None, depth=0))
    if not candidates:
        raise ImageError(f"no image for linux/{host_architecture()} in this layout")
    # Docker 25+ save: an OCI layout plus docker's manifest.json, whose RepoTags name images
    # by their config path (blobs/sha256/<config hex>).
    tags_by_config: dict[str, list[str]] = {}
    if source.exists("manifest.json"):
        with contextlib.suppress(ImageError):
            docker = read_json(source, "manifest.json", "manifest.json")
            for entry in docker if isinstance(docker, list) else []:
                if isinstance(entry, dict) and isinstance(entry.get("Config"), str):
                    cfg = _digest_in_path(entry["Config"])
                    if cfg is not None:
                        tags_by_config.setdefault(cfg, []).extend(_repo_tags(entry))

    def names_of(desc: Descriptor, ref: str | None) -> list[str]:
        out = []
        containerd = desc.annotations.get(ANNOTATION_CONTAINERD_NAME)
        for n in (_names_from_ref(containerd), _names_from_ref(ref)):
            if n and n not in out:
                out.append(n)
        return out

    chosen: tuple[Descriptor, str | None] | None = None
    if want_name is not None:
        tag = want_name.rsplit(":", 1)[1]
        for desc, ref in candidates:
            if want_name in names_of(desc, ref) or ref == tag:
                chosen = (desc, ref)
                break
    if chosen is None:
        distinct = {d.digest for d, _ in candidates}
        if len(distinct) != 1:
            refs = sorted({r or d.digest for d, r in candidates})
            raise ImageError(
                f"the layout holds {len(distinct)} images ({', '.join(refs)}); "
                "give a name to choose one"
            )
        chosen = candidates[0]
    desc, ref = chosen
    manifest = read_blob(source, desc, "manifest")
    image = _from_manifest(source, kind, tuple(names_of(desc, ref)), desc.digest, manifest)
    if not image.names and tags_by_config.get(image.config_digest):
        names = tuple(dict.fromkeys(tags_by_config[image.config_digest]))
        image = dataclasses.replace(image, names=names)
    return image


def _manifests(
    source: BlobSource, index: Any, what: str, ref: str | None, depth: int
) -> Iterator[tuple[Descriptor, str | None]]:
    """Image manifests reachable from an index for the host platform, with their ref.name."""
    if depth > 4:
        raise ImageError(f"{what}: image indexes nested too deeply")
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise ImageError(f"{what}: not an image index (no manifests list)")
    if index.get("schemaVersion") != 2:
        raise ImageError(f"{what}: schemaVersion is not 2")
    for i, obj in enumerate(index["manifests"]):
        desc = Descriptor.from_json(obj, f"{what} manifests[{i}]")
        p = desc.platform
        if p is not None and (p.os != "linux" or p.architecture != host_architecture()):
            continue
        r = desc.annotations.get(ANNOTATION_REF_NAME, ref)
        if desc.media_type in INDEX_MEDIA_TYPES:
            nested = _loads(read_blob(source, desc, "image index"), f"image index {desc.digest}")
            yield from _manifests(source, nested, f"image index {desc.digest}", r, depth + 1)
        elif desc.media_type in MANIFEST_MEDIA_TYPES or desc.media_type == "":
            yield desc, r
        else:
            log.debug("skipping index entry", media_type=desc.media_type, digest=desc.digest)


def _from_manifest(
    source: BlobSource, kind: str, names: tuple[str, ...], digest: str, data: bytes
) -> SourceImage:
    what = f"manifest {digest}"
    m = _loads(data, what)
    if not isinstance(m, dict) or m.get("schemaVersion") != 2:
        raise ImageError(f"{what}: not an image manifest (schemaVersion 2)")
    mt = m.get("mediaType")
    if mt is not None and mt not in MANIFEST_MEDIA_TYPES:
        raise ImageError(f"{what}: unsupported manifest media type {mt!r}")
    config_desc = Descriptor.from_json(m.get("config"), f"{what} config")
    if config_desc.media_type not in CONFIG_MEDIA_TYPES:
        raise ImageError(f"{what}: unsupported config media type {config_desc.media_type!r}")
    layers_json = m.get("layers")
    if not isinstance(layers_json, list):
        raise ImageError(f"{what}: no layers list")
    layer_descs = [
        Descriptor.from_json(o, f"{what} layers[{i}]") for i, o in enumerate(layers_json)
    ]
    for d in layer_descs:
        layer_compression(d.media_type)
    config = read_blob(source, config_desc, "image config")
    parsed = parse_config(config)
    if len(parsed.diff_ids) != len(layer_descs):
        raise ImageError(
            f"{what}: {len(layer_descs)} layers but the config lists "
            f"{len(parsed.diff_ids)} diff_ids"
        )
    layers = tuple(
        LayerSource(blob_path(d.digest), d.media_type, d.digest, d.size, diff_id)
        for d, diff_id in zip(layer_descs, parsed.diff_ids, strict=True)
    )
    return SourceImage(kind, names, data, digest, config, config_desc.digest, parsed, layers)


def _repo_tags(entry: dict[str, Any]) -> list[str]:
    tags = entry.get("RepoTags") or []
    out = []
    if isinstance(tags, list):
        for t in tags:
            if isinstance(t, str):
                try:
                    out.append(normalize_name(t))
                except ImageError:
                    log.warning("ignoring unusable RepoTag", tag=t)
    return out


def _read_docker(source: BlobSource, want_name: str | None) -> SourceImage:
    manifest = read_json(source, "manifest.json", "manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise ImageError("manifest.json: not a non-empty list of images")
    entries = [e for e in manifest if isinstance(e, dict)]
    chosen = None
    if want_name is not None:
        chosen = next((e for e in entries if want_name in _repo_tags(e)), None)
    if chosen is None:
        if len(entries) != 1:
            tags = sorted(t for e in entries for t in _repo_tags(e))
            raise ImageError(
                f"the archive holds {len(entries)} images ({', '.join(tags)}); "
                "give a name to choose one"
            )
        chosen = entries[0]
    config_path = chosen.get("Config")
    layer_paths = chosen.get("Layers")
    if not isinstance(config_path, str):
        raise ImageError("manifest.json: entry has no Config")
    if not isinstance(layer_paths, list) or not all(isinstance(p, str) for p in layer_paths):
        raise ImageError("manifest.json: entry has no Layers list")
    with source.open(config_path) as f:
        reader = VerifyingReader(f, "image config", limit_bytes=MAX_JSON_BYTES)
        config = reader.read(MAX_JSON_BYTES + 1)
        config_digest = reader.finish()
    named = _digest_in_path(config_path)
    if named is not None and named != config_digest:
        raise ImageError(
            f"image config {named}: content does not match its digest (got {config_digest})"
        )
    parsed = parse_config(config)
    if len(parsed.diff_ids) != len(layer_paths):
        raise ImageError(
            f"manifest.json: {len(layer_paths)} layers but the config lists "
            f"{len(parsed.diff_ids)} diff_ids"
        )
    layers = []
    for relpath, diff_id in zip(layer_paths, parsed.diff_ids, strict=True):
        blob_digest = _digest_in_path(relpath) if relpath.startswith("blobs/") else None
        layers.append(LayerSource(relpath, MEDIA_TYPE_DOCKER_LAYER, blob_digest, None, diff_id))
    return SourceImage(
        "docker-archive",
        tuple(_repo_tags(chosen)),
        None,
        None,
        config,
        config_digest,
        parsed,
        tuple(layers),
    )


def _digest_in_path(relpath: str) -> str | None:
    """``sha256:<hex>`` when a file name is a digest (``<hex>.json``, ``blobs/sha256/<hex>``)."""
    base = posixpath.basename(relpath)
    stem = base.rsplit(".", 1)[0] if "." in base else base
    if _HEX64.fullmatch(stem) and (relpath.startswith("blobs/sha256/") or "/" not in relpath):
        return "sha256:" + stem
    return None


def synthesize_manifest(
    config_digest: str, config_size: int, layers: list[tuple[str, int]]
) -> bytes:
    """An OCI manifest for an image that came without one (docker archive): the config and
    uncompressed layers (digest = diff_id, size in bytes), as image-spec ``manifest.md``.
    """
    doc = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": {
            "mediaType": MEDIA_TYPE_OCI_CONFIG,
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [{"mediaType": MEDIA_TYPE_OCI_LAYER, "digest": d, "size": s} for d, s in layers],
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


__all__ = [
    "BlobSource",
    "Compression",
    "Descriptor",
    "DirSource",
    "ImageConfig",
    "LayerSource",
    "OpenImage",
    "ParsedConfig",
    "Platform",
    "SourceImage",
    "TarSource",
    "VerifyingReader",
    "digest_hex",
    "host_architecture",
    "layer_compression",
    "normalize_name",
    "open_image",
    "parse_config",
    "read_blob",
    "sha256_digest",
    "sniff_compression",
    "synthesize_manifest",
]
