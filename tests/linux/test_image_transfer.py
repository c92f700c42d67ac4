"""Sending an image from one image store to another (runtime.image.transfer): layers exported
as tars re-made from the unpacked layers, imported under their DiffID, then the image record.

Needs root (whiteouts are 0/0 devices, opaque dirs carry trusted.* xattrs, owners are kept,
overlay mounts), umoci, skopeo and busybox-static for the real images.  Every overlay mount is
made under tmp_path and unmounted by the ``overlay`` fixture's finalizer, also on failure.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import runtime.image.layers as layers_mod
import runtime.image.transfer as transfer_mod
from runtime.errors import ImageError, UnsafeArchiveError
from runtime.image import (
    Image,
    ImageStore,
    export_layer,
    image_record,
    import_layer,
    register_image,
)
from runtime.image.transfer import readable_mtime_ns
from tests.helpers.images import (
    TarEntry,
    build_layered_image,
    make_layer_tar,
    tools_missing,
    write_oci_layout,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: whiteouts, trusted.* xattrs"),
]
needs_tools = pytest.mark.skipif(tools_missing() is not None, reason=tools_missing() or "")


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def layered_image_layout(
    busybox_image_layout: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """busybox plus a layer deleting etc/motd and var/old and making opt/data opaque."""
    return build_layered_image(busybox_image_layout, tmp_path_factory.mktemp("layered"))


def rich_layer() -> bytes:
    """A layer with everything a layer can hold: owners, setuid and sticky modes, nanosecond
    mtimes, binary xattrs, hardlinks (across directories, to a symlink), symlinks, a FIFO,
    a long and a non-UTF-8 name, whiteouts in both forms and opaque directories both ways."""
    xattrs = {"trusted.jaula": b"\x00\x01binary\xff\xfe", "user.jaula": b"text"}
    return make_layer_tar(
        [
            TarEntry("./", kind="dir", mode=0o755, mtime=1_600_000_000.5),
            TarEntry("bin/", kind="dir", mode=0o755),
            TarEntry("bin/tool", data=b"#!/bin/sh\n", mode=0o4755, xattrs=xattrs),
            TarEntry("bin/tool-link", kind="hardlink", target="bin/tool"),
            TarEntry("a/first-link", kind="hardlink", target="bin/tool"),  # sorts before bin/
            TarEntry("bin/sh", kind="symlink", target="/bin/tool", mode=0o777),
            TarEntry("bin/rel", kind="symlink", target="tool", mode=0o777),
            TarEntry("bin/rel-hard", kind="hardlink", target="bin/rel"),
            TarEntry("home/user/", kind="dir", mode=0o700, uid=1000, gid=1000),
            TarEntry(
                "home/user/file",
                data=b"x" * 5000,
                mode=0o600,
                uid=1000,
                gid=1000,
                mtime=1_600_000_000.123456789,
            ),
            TarEntry("tmp/", kind="dir", mode=0o1777),
            TarEntry("run/fifo", kind="fifo", mode=0o620, uid=5, gid=6),
            TarEntry("deep/" + "d" * 120 + "/" + "long-name-" * 12, data=b"long\n"),
            TarEntry("odd/caf\udce9", data=b"latin-1 name\n"),
            TarEntry("etc/.wh.gone"),
            TarEntry("etc/dev0", kind="chr"),  # a whiteout already in overlay form
            TarEntry("var/opaque/", kind="dir", mode=0o755),
            TarEntry("var/opaque/.wh..wh..opq"),
            TarEntry("var/opaque/kept", data=b"kept\n"),
            TarEntry("var/wasdir/", kind="dir", mode=0o750),
            TarEntry("var/wasdir/new", data=b"new\n"),
            TarEntry("var/.wh.wasdir"),  # whiteout of a directory of this layer: opaque
            TarEntry("srv/empty/", kind="dir", mode=0o711, xattrs={"user.dir": b"attr"}),
        ]
    )


@pytest.fixture
def store_a(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "node-a")


@pytest.fixture
def store_b(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "node-b")


def transfer(src: ImageStore, dst: ImageStore, ref: str, work: Path) -> tuple[list[str], Image]:
    """What a migration does: the record, the missing layers bottom first, then the image.
    Return the layers sent and the image registered at ``dst``."""
    work.mkdir(exist_ok=True)
    record = json.loads(json.dumps(image_record(src, ref)))  # it crosses the wire
    sent = []
    for lid in dict.fromkeys(record["layers"]):
        if dst.has_layer(lid):
            continue
        tar = work / f"{lid}.tar"
        size = export_layer(src, lid, tar)
        assert size == tar.stat().st_size > 0
        digest = "sha256:" + hashlib.sha256(tar.read_bytes()).hexdigest()
        import_layer(dst, lid, tar, tar_digest=digest)
        sent.append(lid)
    return sent, register_image(dst, record)


def listing(root: Path) -> list[tuple[Any, ...]]:
    """Every entry under ``root`` (itself included): path, type, mode, owner, size, content
    digest, symlink target, xattrs, rdev, and the mtime (for directories as tarfile can carry
    it: see ``readable_mtime_ns``; whiteouts, created on import, have none that matters)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        names = [""] if dirpath == str(root) else []
        for name in names + sorted(dirnames + filenames):
            path = Path(dirpath) / name if name else Path(dirpath)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            whiteout = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
            content = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            xattrs = sorted(
                (k, os.getxattr(path, k, follow_symlinks=False))
                for k in os.listxattr(path, follow_symlinks=False)
            )
            if whiteout:
                mtime = None
            elif stat.S_ISDIR(st.st_mode):
                mtime = readable_mtime_ns(st.st_mtime_ns)
            else:
                mtime = st.st_mtime_ns
            out.append((
                os.fsencode(path.relative_to(root)), kind, stat.S_IMODE(st.st_mode),
                st.st_uid, st.st_gid, st.st_size if not stat.S_ISDIR(st.st_mode) else None,
                content, os.readlink(path) if stat.S_ISLNK(st.st_mode) else None,
                xattrs, st.st_rdev, mtime,
            ))  # fmt: skip
    return out


def hardlink_groups(root: Path) -> set[frozenset[str]]:
    """Paths sharing an inode (non-directories with more than one link)."""
    groups: dict[int, set[str]] = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(Path(dirpath) / name)
            if st.st_nlink > 1:
                groups.setdefault(st.st_ino, set()).add(str(Path(dirpath, name).relative_to(root)))
    return {frozenset(g) for g in groups.values()}


def assert_same_layers(a: ImageStore, b: ImageStore, layers: tuple[str, ...]) -> None:
    for lid in dict.fromkeys(layers):
        assert b.has_layer(lid)
        assert listing(b.layer_dir(lid)) == listing(a.layer_dir(lid)), lid[:12]
        assert hardlink_groups(b.layer_dir(lid)) == hardlink_groups(a.layer_dir(lid))
        meta = json.loads((b.layers_dir / lid / "layer.json").read_text())
        assert meta["diff_id"] == f"sha256:{lid}"  # the key is the original DiffID


def mounts_under(path: Path) -> list[str]:
    p = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(p + "/")]


def overlay_supported() -> bool:
    with open("/proc/filesystems") as f:
        if any(line.split()[-1] == "overlay" for line in f if line.strip()):
            return True
    return subprocess.run(["modprobe", "overlay"], check=False, capture_output=True).returncode == 0


def tar_members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path, encoding="utf-8", errors="surrogateescape") as tf:
        return tf.getmembers()


def only_tmp_left(store: ImageStore) -> bool:
    entries = [p.name for p in store.layers_dir.iterdir()]
    return entries == [".tmp"] and not any((store.layers_dir / ".tmp").iterdir())


# --- real images ---------------------------------------------------------------------------


@needs_tools
def test_transfer_busybox_then_layered(
    store_a: ImageStore,
    store_b: ImageStore,
    busybox_image_layout: Path,
    layered_image_layout: Path,
    tmp_path: Path,
) -> None:
    busybox = store_a.import_path(busybox_image_layout)
    layered = store_a.import_path(layered_image_layout)
    sent, got = transfer(store_a, store_b, "busybox", tmp_path / "wire")
    assert sent == list(busybox.layers)
    assert got == busybox
    # The layered image shares the base: only its top layer travels.
    sent, got = transfer(store_a, store_b, layered.id, tmp_path / "wire")
    assert sent == [layered.layers[1]]
    assert got == layered
    assert_same_layers(store_a, store_b, layered.layers)
    for image in (busybox, layered):
        for ref in (image.names[0], image.id, image.id[:12], f"sha256:{image.id}"):
            assert store_b.resolve(ref) == image, ref
        for blob in ("config.json", "manifest.json"):
            a = (store_a.images_dir / image.id / blob).read_bytes()
            assert (store_b.images_dir / image.id / blob).read_bytes() == a
    assert store_b.list() == [busybox, layered]
    assert store_b.layer_dirs(layered)[0] == store_b.layer_dir(busybox.layers[0])


@needs_tools
def test_exported_layer_is_oci_form_and_stable(
    store_a: ImageStore, store_b: ImageStore, layered_image_layout: Path, tmp_path: Path
) -> None:
    layered = store_a.import_path(layered_image_layout)
    top = layered.layers[1]
    tar_a = tmp_path / "top.tar"
    size = export_layer(store_a, top, tar_a)
    assert size == tar_a.stat().st_size
    members = {m.name: m for m in tar_members(tar_a)}
    assert next(iter(members)) == "."
    for name in ("etc/.wh.motd", "var/.wh.old", "opt/data/.wh..wh..opq"):
        m = members[name]
        assert m.isreg() and m.size == 0 and m.mode == 0, name
    assert members["opt/data"].isdir()
    assert members["opt/data/c"].isreg()
    assert "etc/motd" not in members and "var/old" not in members
    assert not any(m.ischr() or m.isblk() for m in members.values())
    assert not any("overlay" in k for m in members.values() for k in m.pax_headers)
    # Deterministic, and what the other node imports exports to the very same bytes.
    export_layer(store_a, top, tmp_path / "again.tar")
    assert (tmp_path / "again.tar").read_bytes() == tar_a.read_bytes()
    transfer(store_a, store_b, "layered", tmp_path / "wire")
    export_layer(store_b, top, tmp_path / "from-b.tar")
    assert (tmp_path / "from-b.tar").read_bytes() == tar_a.read_bytes()
    assert not list(tmp_path.glob(".*.tmp-*"))


@needs_tools
def test_overlay_of_transferred_layers_hides_deleted_files(
    store_a: ImageStore,
    store_b: ImageStore,
    layered_image_layout: Path,
    overlay: Callable[[list[Path]], Path],
    tmp_path: Path,
) -> None:
    store_a.import_path(layered_image_layout)
    _, image = transfer(store_a, store_b, "layered:latest", tmp_path / "wire")
    lowers = store_b.layer_dirs(image)
    assert all(d.is_relative_to(store_b.layers_dir) for d in lowers)
    assert sorted(os.listdir(lowers[0] / "opt/data")) == ["a", "b"]  # the lower content
    merged = overlay(lowers)
    assert not (merged / "etc/motd").exists()
    assert not (merged / "var/old").exists()
    assert (merged / "var").is_dir()
    assert sorted(os.listdir(merged / "opt/data")) == ["c"]  # opaque: a and b hidden
    assert (merged / "opt/data/c").read_text() == "c from the upper layer\n"
    assert (merged / "etc/added").read_text() == "added by the upper layer\n"
    out = subprocess.run(
        [shutil.which("chroot") or "/usr/sbin/chroot", str(merged), "/bin/sh", "-c",
         "cat /etc/added; ls /opt/data"],
        capture_output=True, text=True, check=True, env={"PATH": "/bin"},
    ).stdout  # fmt: skip
    assert out == "added by the upper layer\nc\n"


# --- a synthetic layer with every kind of entry --------------------------------------------


def test_rich_layer_round_trip(store_a: ImageStore, store_b: ImageStore, tmp_path: Path) -> None:
    write_oci_layout(tmp_path / "rich", [rich_layer()], ref_name="rich:1")
    image = store_a.import_path(tmp_path / "rich")
    (lid,) = image.layers
    layer = store_a.layer_dir(lid)
    # What store A holds (overlay form) before it travels.
    assert os.getxattr(layer / "var/opaque", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(layer / "var/wasdir", "trusted.overlay.opaque") == b"y"
    assert os.lstat(layer / "etc/gone").st_rdev == 0
    assert os.lstat(layer / "bin/tool").st_ino == os.lstat(layer / "a/first-link").st_ino

    _, got = transfer(store_a, store_b, "rich:1", tmp_path / "wire")
    assert got == image
    assert_same_layers(store_a, store_b, image.layers)
    other = store_b.layer_dir(lid)
    assert os.getxattr(other / "bin/tool", "trusted.jaula") == b"\x00\x01binary\xff\xfe"
    assert stat.S_IMODE(os.lstat(other / "bin/tool").st_mode) == 0o4755
    assert os.lstat(other / "home/user/file").st_mtime_ns == 1_600_000_000_123_456_768
    assert os.lstat(other / "bin/rel").st_ino == os.lstat(other / "bin/rel-hard").st_ino
    assert stat.S_ISFIFO(os.lstat(other / "run/fifo").st_mode)
    assert (other / os.fsdecode(b"odd/caf\xe9")).read_text() == "latin-1 name\n"

    tar = tmp_path / "wire" / f"{lid}.tar"
    members = {m.name: m for m in tar_members(tar)}
    # a/ is walked before bin/: the first path of the inode carries the content.
    assert members["a/first-link"].isreg()
    assert members["bin/tool"].islnk() and members["bin/tool"].linkname == "a/first-link"
    assert members["bin/rel-hard"].islnk() and members["bin/rel-hard"].linkname == "bin/rel"
    assert members["etc/.wh.gone"].isreg() and members["etc/.wh.dev0"].isreg()
    assert "var/wasdir/.wh..wh..opq" in members and "var/opaque/.wh..wh..opq" in members
    assert members["home/user/file"].pax_headers["mtime"] == "1600000000.123456768"
    xattr_keys = {k for m in members.values() for k in m.pax_headers if k.startswith("SCHILY")}
    assert xattr_keys == {
        "SCHILY.xattr.trusted.jaula", "SCHILY.xattr.user.jaula", "SCHILY.xattr.user.dir"
    }  # fmt: skip
    export_layer(store_b, lid, tmp_path / "from-b.tar")
    assert (tmp_path / "from-b.tar").read_bytes() == tar.read_bytes()


# --- refusals ------------------------------------------------------------------------------

F = TarEntry
HOSTILE = {
    "dotdot": [F("../escape", data=b"x")],
    "absolute": [F("/etc/jaula-escape", data=b"x")],
    "through-symlink": [F("link", kind="symlink", target="/tmp"), F("link/jaula-x", data=b"x")],
    "device": [F("dev/null", kind="chr", devmajor=1, devminor=3)],
    "hardlink-out": [F("shadow", kind="hardlink", target="/etc/shadow")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layer_is_refused(store_b: ImageStore, tmp_path: Path, case: str) -> None:
    tar = tmp_path / "hostile.tar"
    tar.write_bytes(make_layer_tar(HOSTILE[case]))
    lid = hashlib.sha256(b"claimed").hexdigest()
    with pytest.raises(UnsafeArchiveError) as err:
        import_layer(store_b, lid, tar)
    assert err.value.entry == HOSTILE[case][-1].name
    assert not store_b.has_layer(lid)
    assert only_tmp_left(store_b)
    assert not Path("/tmp/jaula-x").exists() and not Path("/etc/jaula-escape").exists()


def test_import_layer_checks_the_tar_digest_and_the_id(store_b: ImageStore, tmp_path: Path) -> None:
    tar = tmp_path / "layer.tar"
    tar.write_bytes(make_layer_tar([F("file", data=b"x")]))
    lid = hashlib.sha256(b"claimed").hexdigest()
    wrong = "sha256:" + "0" * 64
    with pytest.raises(ImageError, match=wrong):
        import_layer(store_b, lid, tar, tar_digest=wrong)
    assert only_tmp_left(store_b)
    with pytest.raises(ImageError, match="invalid layer id"):
        import_layer(store_b, "../../etc", tar)
    with pytest.raises(ImageError, match="cannot read"):
        import_layer(store_b, lid, tmp_path / "missing.tar")
    assert not store_b.has_layer(lid)


def test_export_missing_or_unreadable_layer(store_a: ImageStore, tmp_path: Path) -> None:
    out = tmp_path / "out.tar"
    lid = hashlib.sha256(b"nothing").hexdigest()
    with pytest.raises(ImageError, match=f"layer {lid[:12]} is not in the image store"):
        export_layer(store_a, lid, out)
    write_oci_layout(tmp_path / "img", [make_layer_tar([F("dev/", kind="dir")])])
    (lid,) = store_a.import_path(tmp_path / "img").layers
    os.mknod(store_a.layer_dir(lid) / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with pytest.raises(ImageError, match=rf"layer {lid[:12]}: 'dev/null' is a character device"):
        export_layer(store_a, lid, out)
    assert not out.exists() and not list(tmp_path.glob(".out.tar.tmp-*"))


def layered_record(store_a: ImageStore, tmp_path: Path) -> dict[str, Any]:
    base = make_layer_tar([F("etc/", kind="dir"), F("etc/motd", data=b"hi\n")])
    top = make_layer_tar([F("etc/.wh.motd")])
    write_oci_layout(tmp_path / "img", [base, top], ref_name="two:1")
    image = store_a.import_path(tmp_path / "img")
    return image_record(store_a, image.id)


def test_register_refuses_a_missing_layer(
    store_a: ImageStore, store_b: ImageStore, tmp_path: Path
) -> None:
    record = layered_record(store_a, tmp_path)
    base, top = record["layers"]
    export_layer(store_a, base, tmp_path / "base.tar")
    import_layer(store_b, base, tmp_path / "base.tar")
    with pytest.raises(ImageError, match=f"layer {top[:12]} of image {record['id'][:12]} is miss"):
        register_image(store_b, record)
    assert store_b.list() == []
    assert not (store_b.images_dir / record["id"]).exists()


def _tamper(record: dict[str, Any], how: str) -> dict[str, Any]:
    bad = dict(record)
    config = base64.b64decode(record["config"])
    if how == "config":
        bad["config"] = base64.b64encode(config + b" ").decode()
    elif how == "id":
        bad["id"] = hashlib.sha256(b"another").hexdigest()
    elif how == "manifest":
        bad["manifest"] = base64.b64encode(base64.b64decode(record["manifest"]) + b" ").decode()
    elif how == "layers":
        bad["layers"] = record["layers"][::-1]
    elif how == "not-base64":
        bad["config"] = "%%%"
    elif how == "truncated":
        del bad["manifest_digest"]
    return bad


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("config", "config does not match the image id"),
        ("id", "config does not match the image id"),
        ("manifest", "manifest does not match its digest"),
        ("layers", "do not match the config's rootfs.diff_ids"),
        ("not-base64", "config is not valid base64"),
        ("truncated", "image record is missing manifest_digest"),
    ],
)
def test_register_refuses_a_record_that_does_not_verify(
    store_a: ImageStore, store_b: ImageStore, tmp_path: Path, how: str, message: str
) -> None:
    record = layered_record(store_a, tmp_path)
    for lid in record["layers"]:
        export_layer(store_a, lid, tmp_path / f"{lid}.tar")
        import_layer(store_b, lid, tmp_path / f"{lid}.tar")
    with pytest.raises(ImageError, match=message):
        register_image(store_b, _tamper(record, how))
    assert store_b.list() == []
    assert register_image(store_b, record).id == record["id"]  # the genuine one is fine


def test_reimport_is_a_noop(
    store_a: ImageStore, store_b: ImageStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = layered_record(store_a, tmp_path)
    _, image = transfer(store_a, store_b, record["id"], tmp_path / "wire")
    index = store_b.images_dir / "index.json"
    before = (index.read_bytes(), index.stat().st_mtime_ns)
    inodes = [store_b.layer_dir(lid).stat().st_ino for lid in image.layers]
    calls: list[str] = []
    real = layers_mod.unpack_layer

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append("unpack")
        return real(*args, **kwargs)

    monkeypatch.setattr(transfer_mod, "unpack_layer", counting)
    for lid in image.layers:
        import_layer(store_b, lid, tmp_path / "wire" / f"{lid}.tar")
    assert calls == []
    assert register_image(store_b, record) == image
    assert (index.read_bytes(), index.stat().st_mtime_ns) == before
    assert [store_b.layer_dir(lid).stat().st_ino for lid in image.layers] == inodes
    assert store_b.list() == [image]


def test_register_keeps_names_the_destination_uses(
    store_a: ImageStore, store_b: ImageStore, tmp_path: Path
) -> None:
    write_oci_layout(tmp_path / "mine", [make_layer_tar([F("mine", data=b"b\n")])],
                     ref_name="two:1")  # fmt: skip
    mine = store_b.import_path(tmp_path / "mine")
    record = layered_record(store_a, tmp_path)
    _, image = transfer(store_a, store_b, record["id"], tmp_path / "wire")
    assert image.names == ()
    assert store_b.resolve("two:1") == mine
    assert store_b.resolve(record["id"]) == image
    # Once the name is free, registering again adds it.
    store_b.remove("two:1")
    assert register_image(store_b, record).names == ("two:1",)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs under tmp_path, unmounted by the finalizer."""
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


def test_export_to_a_full_disk_names_the_output(
    store_a: ImageStore, tmp_path: Path, small_fs: Path
) -> None:
    write_oci_layout(tmp_path / "img", [make_layer_tar([F("big", data=os.urandom(256 * 1024))])])
    (lid,) = store_a.import_path(tmp_path / "img").layers
    out = small_fs / "layer.tar"
    with pytest.raises(ImageError, match=rf"layer {lid[:12]}: cannot write {out}: No space"):
        export_layer(store_a, lid, out)
    assert os.listdir(small_fs) == []
