"""The checkpoint bundle: everything needed to bring a container back, on this node or another.

Layout (a directory; exported as one uncompressed tar of the same tree)::

    manifest.json       written last, atomically; lists every other file with its size and
                        sha256, so a bundle without it, or whose files do not match it, is
                        incomplete and is refused
    criu/               CRIU's images dir (inventory.img, pstree.img, pages-*.img, ...)
    criu/dump.log       CRIU's log of the dump (listed too)
    rootfs-diff.tar     the container's upperdir (see :mod:`migrate.rootfs_diff`)
    ctr.log             the container's output so far (CRI log format), when it has any
    manifest.sig        in an exported tar only: the exporting node's signature of
                        manifest.json (see "Signatures" below)

``manifest.json`` (format version 1)::

    {"format_version": 1, "created_at": <s since epoch>, "source_node": "node1",
     "kernel": "6.18.44", "criu_version": [4, 1, 1], "cpu_flags": ["fpu", ...],
     "container": <ContainerConfig JSON>, "image": {"id": ..., "ref": ..., "layers": [...]},
     "stdio": {"stdout": "pipe:[1234]", "stderr": "pipe:[1235]"},
     "volumes": [{"key": "vol0", "destination": "/data", "source": "/srv/data"}],
     "netns": "external" (CRIU did not save the lo-only net namespace: give it a new one),
     "cgroup_mode": "hybrid", "dump": {"freeze_to_dump_s": ..., "pages_bytes": ...},
     "files": [{"path": "criu/pages-1.img", "size": 1234, "sha256": "..."}, ...]}

Signatures.  The sha256 digests find corruption, not an attacker: whoever edits a file can
update its digest.  An exported tar therefore carries ``manifest.sig``, a JSON object
``{"node": "node1", "signing_key": <base64 Ed25519 public key>, "signature": <base64>}``:
the exporting node's Ed25519 signature (RFC 8032; key: :func:`migrate.keys.signing_key`) of
``SIGNED_CONTEXT + manifest.json's bytes``.  The manifest holds every file's digest, so the
signature covers the whole bundle.  On import (:func:`check_signature`) the key must be the
``signing_key`` of a node in the cluster file (the allowlist) and the signature must verify;
an unsigned bundle, or one signed by a key the cluster does not list, is restored only with
``insecure=True`` (``--insecure-unsigned``), and a signature that does not verify never is.

Sources: DESIGN.md ("checkpoint bundle"); STYLE.md habit 3 (manifest last, verified before
anything is restored).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import platform
import shutil
import tarfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from migrate import keys
from migrate.errors import BundleError
from runtime.errors import ArchiveError
from runtime.state import atomic_write_json
from runtime.tarsafe import TarLimits, extract_flat

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CRIU_DIR = "criu"
ROOTFS_DIFF = "rootfs-diff.tar"
LOG = "ctr.log"
SIGNATURE = "manifest.sig"
#: what a node signs: this prefix, then manifest.json's bytes (a signature made for
#: something else never passes for a bundle's)
SIGNED_CONTEXT = b"jaula checkpoint bundle manifest v1\0"
#: the flag that lets an unsigned or foreign bundle in, and what it risks (CLI help, errors)
INSECURE_FLAG = "--insecure-unsigned"
INSECURE_RISK = (
    "the bundle's processes are restored as root with whatever memory, files and command it "
    "holds; anyone who could edit it can run anything on this node"
)
_CHUNK = 1 << 20
#: members an imported bundle may have (CRIU writes a few images per task)
_MAX_IMPORT_ENTRIES = 1_000_000


@dataclass(frozen=True)
class FileEntry:
    """One file of the bundle: ``path`` relative to the bundle root (POSIX), ``size`` in
    bytes, ``sha256`` hex digest."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The bundle's manifest (see the module docstring for the JSON form)."""

    container: dict[str, Any]
    image: dict[str, Any]
    criu_version: tuple[int, int, int]
    stdio: dict[str, str | None] = field(default_factory=dict)
    volumes: tuple[dict[str, str], ...] = ()
    netns: str = ""
    cgroup_mode: str = ""
    source_node: str = ""
    kernel: str = field(default_factory=platform.release)
    cpu_flags: tuple[str, ...] = ()
    created_at: float = field(default_factory=time.time)
    dump: dict[str, Any] = field(default_factory=dict)
    files: tuple[FileEntry, ...] = ()
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        if not isinstance(d, dict):
            raise BundleError("the bundle manifest is not a JSON object")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version!r} is not supported (this jaula "
                f"reads version {FORMAT_VERSION}): restore it with the jaula that "
                "made it, or make a new checkpoint"
            )
        try:
            return cls(
                container=d["container"],
                image=d["image"],
                criu_version=tuple(d["criu_version"]),
                stdio=d.get("stdio", {}),
                volumes=tuple(d.get("volumes", ())),
                netns=d.get("netns", ""),
                cgroup_mode=d.get("cgroup_mode", ""),
                source_node=d.get("source_node", ""),
                kernel=d.get("kernel", ""),
                cpu_flags=tuple(d.get("cpu_flags", ())),
                created_at=float(d.get("created_at", 0)),
                dump=d.get("dump", {}),
                files=tuple(FileEntry(**f) for f in d["files"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"the bundle manifest is malformed: {e}") from e


def cpu_flags() -> tuple[str, ...]:
    """The CPU feature flags of this machine (``flags`` of the first CPU in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return tuple(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return ()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _digests(paths: list[Path]) -> list[str]:
    """sha256 of each file, two at a time (hashlib releases the GIL on large updates)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(sha256_file, paths))


class Bundle:
    """A checkpoint bundle directory.

    Args:
        path: the bundle's root directory.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def criu_dir(self) -> Path:
        return self.path / CRIU_DIR

    @property
    def rootfs_diff(self) -> Path:
        return self.path / ROOTFS_DIFF

    @classmethod
    def create(cls, path: Path) -> Bundle:
        """A new, empty bundle at ``path`` (a previous one there is removed)."""
        if path.exists():
            shutil.rmtree(path)
        (path / CRIU_DIR).mkdir(parents=True, mode=0o700)
        return cls(path)

    def _files(self) -> Iterator[Path]:
        for p in sorted(self.path.rglob("*")):
            if (
                p.is_file()
                and p.name not in (MANIFEST, SIGNATURE)
                and not p.name.startswith(".manifest")
            ):
                yield p

    def finalize(self, manifest: Manifest) -> Manifest:
        """Digest every file and write ``manifest.json`` last.  Returns the manifest written."""
        files = list(self._files())
        entries = tuple(
            FileEntry(str(p.relative_to(self.path)), p.stat().st_size, digest)
            for p, digest in zip(files, _digests(files), strict=True)
        )
        m = Manifest(**{**asdict(manifest), "files": entries})
        m = Manifest.from_json(json.loads(json.dumps(m.to_json())))
        atomic_write_json(self.path / MANIFEST, m.to_json())
        return m

    def manifest(self) -> Manifest:
        """Read the manifest.  Raises BundleError when it is missing or malformed."""
        try:
            with open(self.path / MANIFEST) as f:
                return Manifest.from_json(json.load(f))
        except FileNotFoundError:
            raise BundleError(
                f"{self.path} is not a complete checkpoint bundle: no {MANIFEST}"
            ) from None
        except ValueError as e:
            raise BundleError(f"the manifest of {self.path} is not valid JSON: {e}") from e

    def verify(self, digests: bool = True) -> Manifest:
        """Check that the files are exactly those listed, with their sizes and (unless
        ``digests`` is False: a bundle that never left this node) their sha256.

        Raises BundleError naming the first file that differs."""
        m = self.manifest()
        listed = {f.path: f for f in m.files}
        present = {str(p.relative_to(self.path)) for p in self._files()}
        if extra := sorted(present - set(listed)):
            raise BundleError(f"the bundle has files its manifest does not list: {extra[:3]}")
        for f in m.files:
            p = self.path / f.path
            if not p.is_file():
                raise BundleError(f"the bundle is missing {f.path}")
            if p.stat().st_size != f.size:
                raise BundleError(
                    f"{f.path} has {p.stat().st_size} bytes, the manifest says "
                    f"{f.size}: the bundle is truncated or corrupt"
                )
        if digests:
            paths = [self.path / f.path for f in m.files]
            for f, digest in zip(m.files, _digests(paths), strict=True):
                if digest != f.sha256:
                    raise BundleError(
                        f"{f.path} does not match its sha256 in the manifest: the bundle is corrupt"
                    )
        return m

    def export(self, out: Path, signer: tuple[str, Ed25519PrivateKey] | None = None) -> int:
        """Write the bundle as one uncompressed tar at ``out`` (atomically); returns bytes.

        ``signer``: (node name, its key from :func:`migrate.keys.signing_key`): the tar then
        carries ``manifest.sig`` (module docstring); without it the tar is unsigned."""
        self.manifest()
        tmp = out.with_name(f".{out.name}.partial")
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            for p in self._files():
                tf.add(p, arcname=str(p.relative_to(self.path)), recursive=False)
            tf.add(self.path / MANIFEST, arcname=MANIFEST, recursive=False)
            if signer is not None:
                sig = _sign((self.path / MANIFEST).read_bytes(), *signer)
                info = tarfile.TarInfo(SIGNATURE)
                info.size, info.mode, info.mtime = len(sig), 0o644, int(time.time())
                tf.addfile(info, io.BytesIO(sig))
        os.replace(tmp, out)
        return out.stat().st_size

    @classmethod
    def import_tar(cls, tar_path: Path, dest: Path, max_bytes: int = 256 << 30) -> Bundle:
        """Unpack an exported bundle into the new directory ``dest`` and verify it.

        Only regular files at known places (``manifest.json``, ``rootfs-diff.tar``,
        ``ctr.log``, ``criu/NAME``) are accepted, each once, in at most ``max_bytes``; the tar
        is read by :func:`runtime.tarsafe.extract_flat`.  Raises BundleError naming the
        offending entry, or saying why the tar is not a valid, complete tar; ``dest`` is
        removed on failure."""
        if dest.exists():
            raise BundleError(f"cannot import into {dest}: it exists")
        (dest / CRIU_DIR).mkdir(parents=True, mode=0o700)
        limits = TarLimits(
            max_entries=_MAX_IMPORT_ENTRIES, max_entry_bytes=max_bytes, max_total_bytes=max_bytes
        )
        try:
            extract_flat(
                tar_path,
                dest,
                allowed=_bundle_place,
                expected="a bundle file",
                limits=limits,
                what=f"the bundle {tar_path}",
            )
        except ArchiveError as e:
            shutil.rmtree(dest, ignore_errors=True)
            raise BundleError(str(e)) from e
        except OSError as e:
            shutil.rmtree(dest, ignore_errors=True)
            raise BundleError(f"cannot import the bundle {tar_path}: {e.strerror or e}") from e
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        b = cls(dest)
        try:
            b.verify()
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return b


def _bundle_place(parts: tuple[str, ...]) -> bool:
    """Whether a member at ``parts`` is a bundle file: at the root, or an image in criu/."""
    if len(parts) == 1:
        return parts[0] in (MANIFEST, ROOTFS_DIFF, LOG, SIGNATURE)
    return len(parts) == 2 and parts[0] == CRIU_DIR


def _sign(manifest: bytes, node: str, key: Ed25519PrivateKey) -> bytes:
    """``manifest.sig``'s bytes for ``manifest`` signed by ``node`` with ``key``."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    sig = key.sign(SIGNED_CONTEXT + manifest)
    doc = {
        "node": node,
        "signing_key": base64.b64encode(pub).decode(),
        "signature": base64.b64encode(sig).decode(),
    }
    return json.dumps(doc, sort_keys=True).encode() + b"\n"


def check_signature(bundle: Bundle, signers: dict[str, bytes], insecure: bool = False) -> str:
    """Check an imported bundle's ``manifest.sig`` against ``signers`` (node name -> its
    32-byte Ed25519 public key: the cluster file's ``signing_key`` entries).

    Returns the name of the node that signed it, or ``""`` for an unsigned or foreign
    bundle let in by ``insecure``.  Raises BundleError: a signature that does not verify
    (the bundle was edited after it was signed: always refused), or, without ``insecure``,
    an unsigned bundle or one whose key no node of the cluster has."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = bundle.path / SIGNATURE
    manifest = (bundle.path / MANIFEST).read_bytes()
    how = f"restore it with {INSECURE_FLAG} only if you trust where it came from ({INSECURE_RISK})"
    if not path.is_file():
        if insecure:
            return ""
        raise BundleError(f"the bundle is not signed ({SIGNATURE} missing): {how}")
    try:
        doc = json.loads(path.read_text())
        node, key_b64, sig = str(doc["node"]), doc["signing_key"], doc["signature"]
        raw_key = keys.parse_signing_public(key_b64)
        raw_sig = base64.b64decode(sig, validate=True)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise BundleError(f"the bundle's {SIGNATURE} is malformed ({e}): refused") from None
    try:
        Ed25519PublicKey.from_public_bytes(raw_key).verify(raw_sig, SIGNED_CONTEXT + manifest)
    except InvalidSignature:
        raise BundleError(
            f"the bundle's signature (by {node!r}) does not verify: manifest.json (and with it "
            "a file it lists) was changed after it was signed; refused"
        ) from None
    signer = next((n for n, k in signers.items() if k == raw_key), None)
    if signer is None:
        if insecure:
            return ""
        known = ", ".join(sorted(signers)) or "none (the cluster file lists no signing_key)"
        raise BundleError(
            f"the bundle is signed by a key no node of the cluster has (it says {node!r}; "
            f"nodes with a signing_key: {known}): {how}"
        )
    return signer
