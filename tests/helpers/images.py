"""Build small test images: real ones with umoci/skopeo, synthetic ones in pure Python.

Real images (need root, ``umoci``, ``skopeo`` and Debian's ``busybox-static``):

* :func:`build_busybox_image`: a one-layer busybox rootfs as an OCI layout, named via
  ``org.opencontainers.image.ref.name``.
* :func:`build_layered_image`: busybox plus a second layer that deletes ``/etc/motd`` and
  ``/var/old`` (whiteouts) and replaces ``/opt/data`` (opaque directory).
* :func:`oci_archive`, :func:`docker_archive`: the same image as an oci-archive tar or as a
  ``docker save``-style tarball (``skopeo copy oci:DIR:REF docker-archive:FILE:NAME``).

Synthetic images (no root, no tools): :func:`make_layer_tar` and :func:`write_oci_layout`,
:func:`write_docker_archive`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = (
    "cat", "echo", "ls", "sleep", "true", "false", "id", "env", "pwd", "mkdir", "rm", "touch",
    "ps", "grep", "wc", "head", "stat", "readlink", "kill", "test", "uname", "hostname",
)  # fmt: skip
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"
ENV = ("PATH=/usr/sbin:/usr/bin:/sbin:/bin", "JAULA_TEST=1")


def tools_missing() -> str | None:
    """Why real images cannot be built here, or ``None`` when they can."""
    for tool in ("umoci", "skopeo"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install umoci skopeo)"
    if not BUSYBOX.is_file():
        return "/bin/busybox is missing (apt-get install busybox-static)"
    if os.geteuid() != 0:
        return "building images with umoci needs root"
    return None


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")


def busybox_rootfs(dest: Path) -> Path:
    """Write a minimal busybox rootfs to ``dest``: /bin/busybox, applet symlinks (``sh`` with
    the absolute target ``/bin/busybox``, the others relative), /etc/passwd and /etc/group
    with root and nobody (65534), /etc/motd, /opt/data/{a,b}, /var/old/file, and empty
    proc, dev, sys, tmp (1777), root (0700).
    """
    for d in ("bin", "etc", "proc", "dev", "sys", "tmp", "root", "opt/data", "var/old"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    os.chmod(dest / "root", 0o700)
    shutil.copy2(BUSYBOX, dest / "bin/busybox")
    os.symlink("/bin/busybox", dest / "bin/sh")
    for applet in BUSYBOX_APPLETS:
        os.symlink("busybox", dest / "bin" / applet)
    (dest / "etc/passwd").write_text(PASSWD)
    (dest / "etc/group").write_text(GROUP)
    (dest / "etc/motd").write_text("welcome to the lower layer\n")
    (dest / "opt/data/a").write_text("a from the lower layer\n")
    (dest / "opt/data/b").write_text("b from the lower layer\n")
    (dest / "var/old/file").write_text("old\n")
    return dest


def _tag_of(name: str) -> str:
    return name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"


def _set_ref_name(layout: Path, name: str) -> None:
    """Set ``org.opencontainers.image.ref.name`` of the layout's only manifest to ``name``."""
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    (entry,) = index["manifests"]
    entry.setdefault("annotations", {})["org.opencontainers.image.ref.name"] = name
    index_path.write_text(json.dumps(index))


def ref_name(layout: Path) -> str:
    """The ``ref.name`` annotation of the layout's only manifest."""
    (entry,) = json.loads((layout / "index.json").read_text())["manifests"]
    return str(entry["annotations"]["org.opencontainers.image.ref.name"])


def build_busybox_image(workdir: Path, name: str = "busybox:latest") -> Path:
    """Build a one-layer busybox image as an OCI layout in ``workdir/layout``; return it.

    Made with ``umoci init``/``new``/``unpack``, :func:`busybox_rootfs` written into the
    bundle, ``umoci repack`` and ``umoci config`` (Env, Cmd ``sh``, WorkingDir ``/tmp``,
    StopSignal SIGTERM); ``index.json`` then names it ``name`` the way skopeo does.
    (``umoci insert`` is avoided: Debian's umoci 0.4.7 ends its layer tars without padding.)
    """
    workdir.mkdir(parents=True, exist_ok=True)
    layout = workdir / "layout"
    bundle = workdir / "bundle"
    image = f"{layout}:{_tag_of(name)}"
    _run("umoci", "init", "--layout", str(layout))
    _run("umoci", "new", "--image", image)
    _run("umoci", "unpack", "--image", image, str(bundle))
    busybox_rootfs(bundle / "rootfs")
    _run("umoci", "repack", "--image", image, "--no-history", str(bundle))
    config_args = [f"--config.env={e}" for e in ENV]
    _run(
        "umoci", "config", "--image", image, "--no-history", *config_args,
        "--config.cmd=sh", "--config.workingdir=/tmp", "--config.stopsignal=SIGTERM",
    )  # fmt: skip
    _set_ref_name(layout, name)
    return layout


def build_layered_image(base_layout: Path, workdir: Path, name: str = "layered:latest") -> Path:
    """Copy ``base_layout`` (a busybox layout) and add a layer that deletes ``etc/motd`` and
    ``var/old`` (``.wh.`` whiteouts), makes ``opt/data`` opaque holding only a new ``c``, and
    adds ``etc/added``.  The layer is written by :func:`make_layer_tar` and appended with
    ``umoci raw add-layer``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    layout = workdir / "layout"
    shutil.copytree(base_layout, layout, symlinks=True)
    # umoci looks tags up by ref.name; give it a plain tag while it works.
    _set_ref_name(layout, "work")
    layer = workdir / "layer2.tar"
    layer.write_bytes(
        make_layer_tar(
            [
                TarEntry("etc/.wh.motd"),
                TarEntry("var/.wh.old"),
                TarEntry("opt/data/.wh..wh..opq"),
                TarEntry("opt/data/", kind="dir", mode=0o755),
                TarEntry("opt/data/c", data=b"c from the upper layer\n"),
                TarEntry("etc/added", data=b"added by the upper layer\n"),
            ]
        )
    )
    _run("umoci", "raw", "add-layer", "--image", f"{layout}:work", "--no-history", str(layer))
    _set_ref_name(layout, name)
    return layout


def oci_archive(layout_dir: Path, out_tar: Path) -> Path:
    """Tar the OCI layout (``index.json``, ``oci-layout``, ``blobs/``) into ``out_tar``."""
    with tarfile.open(out_tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for item in ("oci-layout", "index.json", "blobs"):
            tf.add(layout_dir / item, arcname=item)
    return out_tar


def docker_archive(layout_dir: Path, out_tar: Path, name: str | None = None) -> Path:
    """Convert the layout to a ``docker save`` tarball with ``skopeo copy``; the archive's
    RepoTags is ``name`` (default: the layout's ref.name).
    """
    ref = ref_name(layout_dir)
    _run(
        "skopeo", "--insecure-policy", "copy", "--quiet",
        f"oci:{layout_dir}:{ref}", f"docker-archive:{out_tar}:{name or ref}",
    )  # fmt: skip
    return out_tar


# --- synthetic images -------------------------------------------------------------------


@dataclass
class TarEntry:
    """One tar member for :func:`make_layer_tar`.

    ``kind``: file, dir, symlink, hardlink, chr, blk, fifo.  ``target`` is the link target.
    ``xattrs`` go into PAX ``SCHILY.xattr.*`` records.
    """

    name: str
    data: bytes = b""
    kind: str = "file"
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 1_600_000_000
    target: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


_KINDS = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def make_layer_tar(entries: Iterable[TarEntry]) -> bytes:
    """An uncompressed PAX tar holding ``entries`` in order (names are written verbatim)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = _KINDS[e.kind]
            info.mode = e.mode
            info.uid, info.gid = e.uid, e.gid
            info.mtime = e.mtime
            info.linkname = e.target
            info.devmajor, info.devminor = e.devmajor, e.devminor
            if e.xattrs:
                info.pax_headers = {
                    f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                    for k, v in e.xattrs.items()
                }
            if e.kind == "file":
                info.size = len(e.data)
                tf.addfile(info, io.BytesIO(e.data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def compress(data: bytes, kind: str) -> bytes:
    """``kind``: none, gzip or zstd."""
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


LAYER_MEDIA_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


def _blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return f"sha256:{digest}", len(data)


def image_config(diff_ids: list[str], **config: object) -> dict[str, object]:
    """An OCI image config for linux on the host architecture with these diff_ids."""
    from runtime.image.oci import host_architecture

    return {
        "created": "2024-01-01T00:00:00Z",
        "architecture": host_architecture(),
        "os": "linux",
        "config": config or {"Env": list(ENV), "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }


@dataclass
class SyntheticImage:
    """What :func:`write_oci_layout` wrote: paths and digests, for tests to corrupt or check."""

    layout: Path
    manifest_digest: str
    config_digest: str
    layer_digests: list[str]
    diff_ids: list[str]


def write_oci_layout(
    layout: Path,
    layers: list[bytes],
    compression: str = "gzip",
    ref_name: str | None = "test:latest",
    config: dict[str, object] | None = None,
) -> SyntheticImage:
    """Write an OCI layout holding one image made of uncompressed layer tars ``layers``."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    diff_ids = [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in layers]
    layer_descs = []
    for tar in layers:
        digest, size = _blob(layout, compress(tar, compression))
        layer_descs.append(
            {"mediaType": LAYER_MEDIA_TYPES[compression], "digest": digest, "size": size}
        )
    cfg = config if config is not None else image_config(diff_ids)
    config_digest, config_size = _blob(layout, json.dumps(cfg).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layer_descs,
    }
    manifest_digest, manifest_size = _blob(layout, json.dumps(manifest).encode())
    entry: dict[str, object] = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest,
        "size": manifest_size,
    }
    if ref_name is not None:
        entry["annotations"] = {"org.opencontainers.image.ref.name": ref_name}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    return SyntheticImage(
        layout, manifest_digest, config_digest, [d["digest"] for d in layer_descs], diff_ids
    )


def write_docker_archive(
    out_tar: Path,
    layers: list[bytes],
    repo_tags: list[str],
    config: dict[str, object] | None = None,
) -> str:
    """Write a ``docker save``-style tarball (legacy ``<id>/layer.tar`` symlinks included);
    return the config digest.
    """
    diff_ids = [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in layers]
    cfg = json.dumps(config if config is not None else image_config(diff_ids)).encode()
    config_hex = hashlib.sha256(cfg).hexdigest()
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def add(name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        members.append((info, data))

    layer_names = []
    for i, tar in enumerate(layers):
        hexd = diff_ids[i].split(":")[1]
        add(f"{hexd}.tar", tar)
        legacy = f"{i:064x}"
        link = tarfile.TarInfo(f"{legacy}/layer.tar")
        link.type = tarfile.SYMTYPE
        link.linkname = f"../{hexd}.tar"
        members.append((link, None))
        layer_names.append(f"{legacy}/layer.tar")
    add(f"{config_hex}.json", cfg)
    manifest = [{"Config": f"{config_hex}.json", "RepoTags": repo_tags, "Layers": layer_names}]
    add("manifest.json", json.dumps(manifest).encode())
    with tarfile.open(out_tar, "w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return f"sha256:{config_hex}"
