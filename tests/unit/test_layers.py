"""Layer unpacking (hostile and benign tars), image sources and the image store, on synthetic
images built in tmp_path.  No root needed except where marked: whiteouts are 0/0 character
devices (CAP_MKNOD), opaque directories carry trusted.* xattrs (CAP_SYS_ADMIN), and owners
can only be preserved by root.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import sys
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard

import runtime.image.store as store_mod
from runtime.cli import ImportBar
from runtime.errors import (
    AmbiguousImage,
    ImageError,
    ImageInUse,
    ImageNotFound,
    UnsafeArchiveError,
)
from runtime.image import ImageStore, UnpackLimits, normalize_name, unpack_layer, verify_layer
from runtime.image.layers import split_entry_name
from runtime.image.store import ImportProgress
from tests.helpers.images import (
    LAYER_MEDIA_TYPES,
    TarEntry,
    compress,
    image_config,
    make_layer_tar,
    write_docker_archive,
    write_oci_layout,
)
from tests.helpers.tars import cuts, gnu_sparse_tar, member_end, pax_sparse_tar

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: whiteouts (mknod 0/0), trusted.* xattrs, chown"
)
F = TarEntry  # short alias for tables
MakeSparse = Callable[[str, int, list[tuple[int, bytes]]], bytes]


def unpack(tmp_path: Path, entries: list[TarEntry], **kw: object) -> Path:
    dest = tmp_path / "layer"
    dest.mkdir()
    unpack_layer(io.BytesIO(make_layer_tar(entries)), dest, **kw)  # type: ignore[arg-type]
    return dest


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A host directory that hostile entries aim at; it must stay untouched."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret").write_text("host secret\n")
    return d


def snapshot(d: Path) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for p in sorted(d.rglob("*")):
        st = p.lstat()
        out[str(p)] = (st.st_mode, st.st_nlink, p.read_bytes() if p.is_file() else b"")
    return out


# --- hostile archives ----------------------------------------------------------------------


def hostile_cases(outside: Path) -> dict[str, tuple[list[TarEntry], str]]:
    """name -> (entries, the entry that must be named in the error)."""
    o = str(outside)
    return {
        "dotdot": ([F("../outside/evil", b"x")], "../outside/evil"),
        "dotdot-inner": (
            [F("a/", kind="dir"), F("a/../../outside/evil", b"x")],
            "a/../../outside/evil",
        ),
        "absolute": ([F(f"{o}/evil", b"x")], f"{o}/evil"),
        "absolute-etc": ([F("/etc/evil", b"x")], "/etc/evil"),
        "symlink-escape": ([F("up", kind="symlink", target="../outside")], "up"),
        "symlink-escape-deep": (
            [F("a/b/", kind="dir"), F("a/b/l", kind="symlink", target="../../../outside/secret")],
            "a/b/l",
        ),
        "write-through-abs-symlink": (
            [F("etc", kind="symlink", target=o), F("etc/passwd", b"pwned")],
            "etc/passwd",
        ),
        "write-through-rel-symlink": (
            [F("real/", kind="dir"), F("lnk", kind="symlink", target="real"), F("lnk/x", b"x")],
            "lnk/x",
        ),
        "dir-through-symlink": (
            [F("etc", kind="symlink", target=o), F("etc/sub/", kind="dir")],
            "etc/sub",
        ),
        "whiteout-through-symlink": (
            [F("etc", kind="symlink", target=o), F("etc/.wh.secret")],
            "etc/.wh.secret",
        ),
        "hardlink-dotdot": ([F("h", kind="hardlink", target="../outside/secret")], "h"),
        "hardlink-absolute": ([F("h", kind="hardlink", target=f"{o}/secret")], "h"),
        "hardlink-through-symlink": (
            [F("s", kind="symlink", target=o), F("h", kind="hardlink", target="s/secret")],
            "h",
        ),
        "hardlink-missing": ([F("h", kind="hardlink", target="nothere")], "h"),
        "hardlink-to-dir": ([F("d/", kind="dir"), F("h", kind="hardlink", target="d")], "h"),
        "char-device": ([F("dev/null", kind="chr", devmajor=1, devminor=3)], "dev/null"),
        "block-device": ([F("dev/sda", kind="blk", devmajor=8, devminor=0)], "dev/sda"),
        "block-device-0-0": ([F("dev/b", kind="blk")], "dev/b"),
        "parent-is-file": ([F("f", b"x"), F("f/x", b"y")], "f/x"),
        "whiteout-dotdot": ([F("a/.wh..", b"")], "a/.wh.."),
        "root-not-dir": ([F("./", kind="symlink", target="/")], "./"),
    }


HOSTILE = sorted(hostile_cases(Path("/x")))


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_entry_is_refused_and_named(case: str, tmp_path: Path, outside: Path) -> None:
    entries, bad = hostile_cases(outside)[case]
    before = snapshot(outside)
    with pytest.raises(UnsafeArchiveError) as err:
        unpack(tmp_path, entries)
    assert err.value.entry == bad
    assert bad in str(err.value)
    assert snapshot(outside) == before
    assert not (tmp_path / "evil").exists()


def test_size_bomb_entry_is_refused(tmp_path: Path) -> None:
    entries = [F("small", b"ok"), F("big", b"x" * 4096)]
    with pytest.raises(UnsafeArchiveError) as err:
        unpack(tmp_path, entries, limits=UnpackLimits(max_entry_bytes=1024))
    assert err.value.entry == "big"
    assert not (tmp_path / "layer" / "big").exists()


def test_compression_bomb_is_refused(tmp_path: Path) -> None:
    tar = make_layer_tar([F("zeros", b"\0" * (8 * 1024 * 1024))])
    blob = gzip.compress(tar)
    assert len(blob) < 64 * 1024
    dest = tmp_path / "layer"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match="larger than") as err:
        unpack_layer(io.BytesIO(blob), dest, limits=UnpackLimits(max_layer_bytes=1024 * 1024))
    assert err.value.entry == "zeros"


def test_too_many_entries_is_refused(tmp_path: Path) -> None:
    entries = [F(f"f{i}", b"") for i in range(20)]
    with pytest.raises(UnsafeArchiveError, match="more than 10 entries"):
        unpack(tmp_path, entries, limits=UnpackLimits(max_entries=10))


@pytest.mark.parametrize(
    ("name", "parts"),
    [("", ()), (".", ()), ("./", ()), ("/", ()), ("//", ()), ("./a/./b//c", ("a", "b", "c"))],
)
def test_split_entry_name(name: str, parts: tuple[str, ...]) -> None:
    assert split_entry_name(name) == parts


@pytest.mark.parametrize("name", ["/a", "../a", "a/../b", "a/..", "/./a"])
def test_split_entry_name_refuses(name: str) -> None:
    with pytest.raises(UnsafeArchiveError):
        split_entry_name(name)


# --- what is preserved --------------------------------------------------------------------


def test_files_dirs_modes_and_times(tmp_path: Path) -> None:
    dest = unpack(
        tmp_path,
        [
            F("./", kind="dir", mode=0o755, mtime=1_000_000_000),
            F("bin/", kind="dir", mode=0o750, mtime=1_100_000_000),
            F("bin/tool", b"#!/bin/sh\n", mode=0o4755, mtime=1_200_000_000),
            F("tmp/", kind="dir", mode=0o1777, mtime=1_300_000_000),
            F("ro/", kind="dir", mode=0o555, mtime=1_400_000_000),
            F("ro/file", b"data", mode=0o400, mtime=1_500_000_000),
            F("deep/er/file", b"implicit parents"),
        ],
    )
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert dest.stat().st_mtime == 1_000_000_000
    tool = dest / "bin/tool"
    assert tool.read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE(tool.stat().st_mode) == 0o4755
    assert tool.stat().st_mtime == 1_200_000_000
    # Directory times survive the files written into them afterwards.
    assert (dest / "bin").stat().st_mtime == 1_100_000_000
    assert stat.S_IMODE((dest / "bin").stat().st_mode) == 0o750
    assert stat.S_IMODE((dest / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((dest / "ro").stat().st_mode) == 0o555
    assert (dest / "ro").stat().st_mtime == 1_400_000_000
    assert stat.S_IMODE((dest / "deep").stat().st_mode) == 0o755


def test_symlinks_absolute_targets_allowed_and_never_followed(tmp_path: Path) -> None:
    dest = unpack(
        tmp_path,
        [
            F("bin/busybox", b"\x7fELF", mode=0o755),
            F("bin/sh", kind="symlink", target="/bin/busybox", mtime=1_234_567_890),
            F("bin/ls", kind="symlink", target="busybox"),
            F("lib", kind="symlink", target="usr/lib"),
            F("usr/lib/x/up", kind="symlink", target="../../../bin/sh"),
            F("etc/mtab", kind="symlink", target="/proc/self/mounts"),
        ],
    )
    assert os.readlink(dest / "bin/sh") == "/bin/busybox"
    assert os.readlink(dest / "bin/ls") == "busybox"
    assert os.readlink(dest / "usr/lib/x/up") == "../../../bin/sh"
    assert os.lstat(dest / "bin/sh").st_mtime == 1_234_567_890


def test_hardlinks_share_an_inode(tmp_path: Path) -> None:
    dest = unpack(
        tmp_path,
        [
            F("bin/busybox", b"binary", mode=0o755),
            F("bin/cat", kind="hardlink", target="bin/busybox"),
            F("sbin/init", kind="hardlink", target="./bin/busybox"),
        ],
    )
    ino = (dest / "bin/busybox").stat().st_ino
    assert (dest / "bin/cat").stat().st_ino == ino
    assert (dest / "sbin/init").stat().st_ino == ino
    assert (dest / "bin/busybox").stat().st_nlink == 3


def test_fifo(tmp_path: Path) -> None:
    dest = unpack(tmp_path, [F("run/fifo", kind="fifo", mode=0o620)])
    st = os.lstat(dest / "run/fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620


def test_later_entries_replace_earlier_ones(tmp_path: Path) -> None:
    dest = unpack(
        tmp_path,
        [
            F("x", b"file"),
            F("x/", kind="dir", mode=0o700),
            F("d/child", b"c"),
            F("d", kind="symlink", target="x"),
            F("f", b"first"),
            F("f", b"second"),
            F("h", b"old"),
            F("g", kind="hardlink", target="h"),
            F("h", b"new"),
        ],
    )
    assert (dest / "x").is_dir() and not (dest / "x").is_symlink()
    assert os.readlink(dest / "d") == "x"
    assert (dest / "f").read_bytes() == b"second"
    assert (dest / "g").read_bytes() == b"old"  # the link kept the replaced inode
    assert (dest / "h").read_bytes() == b"new"


def test_replaced_dir_then_write_through_it_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafeArchiveError) as err:
        unpack(tmp_path, [F("d/a", b"1"), F("d", kind="symlink", target="/etc"), F("d/b", b"2")])
    assert err.value.entry == "d/b"


def test_user_xattrs_preserved(tmp_path: Path) -> None:
    dest = unpack(
        tmp_path,
        [
            F("d/", kind="dir", mode=0o755, xattrs={"user.dir": b"D"}),
            F("d/f", b"x", xattrs={"user.note": b"hello", "user.bin": b"\xff\x00\x80"}),
        ],
    )
    try:
        assert os.getxattr(dest / "d/f", "user.note") == b"hello"
    except OSError as e:  # pragma: no cover - filesystems without user xattrs
        if e.errno != errno.ENOTSUP:
            raise
        pytest.skip(f"no user xattrs on {tmp_path}: {e}")
    assert os.getxattr(dest / "d/f", "user.bin") == b"\xff\x00\x80"
    assert os.getxattr(dest / "d", "user.dir") == b"D"


@pytest.mark.parametrize("kind", ["none", "gzip", "zstd"])
@pytest.mark.parametrize("declared", [True, False])
def test_compression_by_media_type_and_magic(tmp_path: Path, kind: str, declared: bool) -> None:
    tar = make_layer_tar([F("hello", b"world")])
    blob = compress(tar, kind)
    dest = tmp_path / "layer"
    dest.mkdir()
    stats = unpack_layer(
        io.BytesIO(blob),
        dest,
        media_type=LAYER_MEDIA_TYPES[kind] if declared else None,
        blob_digest="sha256:" + hashlib.sha256(blob).hexdigest(),
        blob_size=len(blob),
        diff_id="sha256:" + hashlib.sha256(tar).hexdigest(),
    )
    assert (dest / "hello").read_bytes() == b"world"
    assert stats.size_bytes == len(tar)
    assert stats.entries == 1


@pytest.mark.parametrize(
    ("declared", "actual"), [("gzip", "zstd"), ("zstd", "none"), ("gzip", "none")]
)
def test_declared_compression_must_match_content(
    tmp_path: Path, declared: str, actual: str
) -> None:
    blob = compress(make_layer_tar([F("a", b"b")]), actual)
    dest = tmp_path / "layer"
    dest.mkdir()
    with pytest.raises(ImageError, match=f"declares {declared}"):
        unpack_layer(io.BytesIO(blob), dest, media_type=LAYER_MEDIA_TYPES[declared])


def test_unknown_media_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="unsupported layer media type"):
        unpack_layer(
            io.BytesIO(b""), tmp_path, media_type="application/vnd.oci.image.layer.v1.tar+encrypted"
        )


def test_digest_size_and_diff_id_mismatches_name_the_digest(tmp_path: Path) -> None:
    tar = make_layer_tar([F("a", b"b")])
    blob = gzip.compress(tar)
    good = "sha256:" + hashlib.sha256(blob).hexdigest()
    bad = "sha256:" + "0" * 64
    cases: list[dict[str, Any]] = [
        {"blob_digest": bad, "blob_size": len(blob)},
        {"blob_digest": good, "blob_size": len(blob) + 1},
        {"blob_digest": good, "blob_size": len(blob) - 1},
        {"diff_id": bad},
    ]
    for i, kw in enumerate(cases):
        dest = tmp_path / f"l{i}"
        dest.mkdir()
        with pytest.raises(ImageError) as err:
            unpack_layer(io.BytesIO(blob), dest, **kw)
        assert str(kw.get("blob_digest", kw.get("diff_id"))) in str(err.value)


def test_verify_layer(tmp_path: Path) -> None:
    tar = make_layer_tar([F("a", b"b")])
    blob = zstandard.ZstdCompressor().compress(tar)
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    verify_layer(io.BytesIO(blob), diff_id=diff_id)
    verify_layer(io.BytesIO(blob), blob_digest="sha256:" + hashlib.sha256(blob).hexdigest())
    with pytest.raises(ImageError, match="diff_id"):
        verify_layer(io.BytesIO(blob), diff_id="sha256:" + "1" * 64)


def test_truncated_tar_is_refused(tmp_path: Path) -> None:
    tar = make_layer_tar([F("a", b"x" * 1000)])
    dest = tmp_path / "layer"
    dest.mkdir()
    with pytest.raises(ImageError, match="not a valid tar"):
        unpack_layer(io.BytesIO(tar[:1200]), dest)


# --- root: owners, capabilities, whiteouts and opaque directories ---------------------------


@needs_root
def test_owners_and_capabilities_preserved(tmp_path: Path) -> None:
    # VFS_CAP_REVISION_2 | effective, CAP_NET_RAW permitted.
    cap = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
    dest = unpack(
        tmp_path,
        [
            F("home/u/", kind="dir", uid=1000, gid=1000, mode=0o700),
            F("home/u/f", b"x", uid=1000, gid=100, mode=0o2755),
            F("home/u/l", kind="symlink", target="f", uid=1001, gid=1001),
            F("bin/ping", b"elf", mode=0o755, uid=0, gid=0, xattrs={"security.capability": cap}),
            F("bin/own", b"elf", mode=0o755, uid=5, gid=5, xattrs={"security.capability": cap}),
        ],
    )
    st = (dest / "home/u").stat()
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    st = (dest / "home/u/f").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 100, 0o2755)
    assert os.lstat(dest / "home/u/l").st_uid == 1001
    assert os.getxattr(dest / "bin/ping", "security.capability") == cap
    # chown runs before setxattr (chown drops security.capability).
    assert os.getxattr(dest / "bin/own", "security.capability") == cap


def is_whiteout(p: Path) -> bool:
    st = os.lstat(p)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(p: Path) -> bool:
    try:
        return os.getxattr(p, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


@needs_root
def test_whiteouts_become_overlay_char_devices(tmp_path: Path) -> None:
    dest = unpack(
        tmp_path,
        [
            F("etc/.wh.motd"),
            F(".wh.toplevel"),
            F("var/lib/.wh.gone", mtime=1),
            F("dev/wh", kind="chr"),  # already in overlay form
        ],
    )
    for p in ("etc/motd", "toplevel", "var/lib/gone", "dev/wh"):
        assert is_whiteout(dest / p), p
    assert not any(p.name.startswith(".wh.") for p in dest.rglob("*"))


@needs_root
def test_opaque_directories(tmp_path: Path) -> None:
    dest = unpack(
        tmp_path,
        [
            F("opt/data/.wh..wh..opq"),  # before its directory entry, as umoci writes it
            F("opt/data/", kind="dir", mode=0o750, mtime=1_300_000_000),
            F("opt/data/c", b"new"),
            F("srv/", kind="dir"),
            F("srv/x", b"x"),
            F("srv/.wh..wh..opq"),  # after
            F("implicit/.wh..wh..opq"),  # directory not otherwise in the layer
            F(".wh..wh.plnk"),  # AUFS bookkeeping: skipped
        ],
    )
    for d in ("opt/data", "srv", "implicit"):
        assert is_opaque(dest / d), d
    assert not is_opaque(dest / "opt")
    assert stat.S_IMODE((dest / "opt/data").stat().st_mode) == 0o750
    assert (dest / "opt/data").stat().st_mtime == 1_300_000_000
    assert (dest / "opt/data/c").read_bytes() == b"new"
    assert not (dest / ".wh..wh.plnk").exists() and not (dest / "plnk").exists()


@needs_root
def test_whiteout_and_entry_of_the_same_name_in_one_layer(tmp_path: Path) -> None:
    dest = unpack(
        tmp_path,
        [
            F("a/.wh.dir1"),
            F("a/dir1/", kind="dir"),  # recreated after its whiteout: only this layer's content
            F("a/dir1/new", b"n"),
            F("a/dir2/old", b"o"),
            F("a/.wh.dir2"),  # whiteout of a directory of this layer
            F("a/file1", b"f"),
            F("a/.wh.file1"),  # this layer's file stays
            F("a/.wh.file2"),
            F("a/file2", b"g"),  # replaces the whiteout
        ],
    )
    assert is_opaque(dest / "a/dir1") and (dest / "a/dir1/new").exists()
    assert is_opaque(dest / "a/dir2") and (dest / "a/dir2/old").exists()
    assert (dest / "a/file1").read_bytes() == b"f"
    assert (dest / "a/file2").read_bytes() == b"g"


@needs_root
def test_overlay_xattrs_from_the_archive_are_dropped(tmp_path: Path) -> None:
    dest = unpack(
        tmp_path,
        [
            F(
                "d/",
                kind="dir",
                xattrs={"trusted.overlay.redirect": b"/etc", "trusted.other": b"1"},
            ),
            F("e/", kind="dir", xattrs={"trusted.overlay.opaque": b"y"}),
        ],
    )
    names = os.listxattr(dest / "d")
    assert "trusted.overlay.redirect" not in names
    assert os.getxattr(dest / "d", "trusted.other") == b"1"
    assert not is_opaque(dest / "e")


# --- names and sources ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "name"),
    [
        ("busybox", "busybox:latest"),
        ("busybox:1.36", "busybox:1.36"),
        ("docker.io/library/busybox:latest", "busybox:latest"),
        ("docker.io/bitnami/redis", "bitnami/redis:latest"),
        ("quay.io/org/app:v1", "quay.io/org/app:v1"),
        ("localhost:5000/app", "localhost:5000/app:latest"),
        ("localhost/app:x", "localhost/app:x"),
    ],
)
def test_normalize_name(ref: str, name: str) -> None:
    assert normalize_name(ref) == name


@pytest.mark.parametrize("ref", ["", "Busybox", "a b", "busybox@sha256:" + "0" * 64, "x:", ":t"])
def test_normalize_name_refuses(ref: str) -> None:
    with pytest.raises(ImageError):
        normalize_name(ref)


# --- the store on synthetic images ---------------------------------------------------------

# dirs 0755: a tar dir entry defaults to 0644, which only root can enter (make test-unit runs
# as any user)
BASE = [
    F("bin/", kind="dir", mode=0o755),
    F("bin/tool", b"tool", mode=0o755),
    F("etc/os", b"test\n"),
]
TOP = [F("etc/extra", b"extra\n")]


def store_files(store: ImageStore) -> list[str]:
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*"))


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_store_imports_layout(tmp_path: Path, compression: str) -> None:
    base, top = make_layer_tar(BASE), make_layer_tar(TOP)
    img = write_oci_layout(tmp_path / "layout", [base, top], compression, "test:1")
    store = ImageStore(tmp_path / "state")
    image = store.import_path(img.layout)
    assert image.names == ("test:1",)
    assert image.id == img.config_digest.split(":")[1]
    assert image.manifest_digest == img.manifest_digest
    assert image.layers == tuple(d.split(":")[1] for d in img.diff_ids)
    assert image.size_bytes == len(base) + len(top)
    assert image.config.cmd == ("sh",)
    dirs = store.layer_dirs(image)
    assert [d.parent.name for d in dirs] == list(image.layers)
    assert (dirs[0] / "bin/tool").read_bytes() == b"tool"
    assert (dirs[1] / "etc/extra").read_bytes() == b"extra\n"
    assert all(store.has_layer(lid) for lid in image.layers)
    assert store.has_layer("sha256:" + image.layers[0])
    meta = json.loads((dirs[0].parent / "layer.json").read_text())
    assert meta["diff_id"] == img.diff_ids[0]
    assert json.loads((store.images_dir / image.id / "config.json").read_bytes())["os"] == "linux"
    assert store.list() == [image]
    assert list((store.layers_dir / ".tmp").iterdir()) == []


def test_store_docker_archive_names_and_shared_layers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, top = make_layer_tar(BASE), make_layer_tar(TOP)
    store = ImageStore(tmp_path / "state")
    oci = write_oci_layout(tmp_path / "layout", [base, top], "gzip", None)
    first = store.import_path(oci.layout)
    assert first.names == ()  # no ref.name: unnamed, reachable by id
    archive = tmp_path / "docker.tar"
    config = write_docker_archive(archive, [base, top], ["docker.io/library/app:2", "app:3"])
    assert config == oci.config_digest  # same config bytes: same image
    calls: list[str] = []
    real = unpack_layer

    def counting(*a: Any, **kw: Any) -> Any:
        calls.append(str(kw.get("diff_id")))
        return real(*a, **kw)

    monkeypatch.setattr(store_mod, "unpack_layer", counting)
    image = store.import_path(archive)
    assert calls == []  # layers shared by DiffID, whatever the compression
    assert image.id == first.id
    assert image.names == ("app:2", "app:3")
    assert store.resolve("app:2") == store.resolve("app:3") == image
    manifest = (store.images_dir / image.id / "manifest.json").read_bytes()
    assert image.manifest_digest == "sha256:" + hashlib.sha256(manifest).hexdigest()


def test_store_docker_archive_diff_id_mismatch(tmp_path: Path) -> None:
    layer = make_layer_tar(BASE)
    archive = tmp_path / "docker.tar"
    write_docker_archive(archive, [layer], ["bad:1"], config=image_config(["sha256:" + "2" * 64]))
    store = ImageStore(tmp_path / "state")
    with pytest.raises(ImageError, match="sha256:" + "2" * 64):
        store.import_path(archive)
    assert store.list() == []
    assert [p.name for p in store.layers_dir.iterdir()] == [".tmp"]


@pytest.mark.parametrize("what", ["manifest", "config", "layer", "layer-size"])
def test_store_refuses_corrupt_blobs(tmp_path: Path, what: str) -> None:
    img = write_oci_layout(tmp_path / "layout", [make_layer_tar(BASE), make_layer_tar(TOP)])
    digest = {"manifest": img.manifest_digest, "config": img.config_digest}.get(
        what, img.layer_digests[1]
    )
    blob = img.layout / "blobs/sha256" / digest.split(":")[1]
    data = bytearray(blob.read_bytes())
    if what == "layer-size":
        data += b"\0" * 10
    elif what == "layer":
        data[len(data) // 2] ^= 0xFF
    else:
        data[-2] = ord(" ") if data[-2] != ord(" ") else ord("\t")
    blob.write_bytes(bytes(data))
    store = ImageStore(tmp_path / "state")
    with pytest.raises(ImageError) as err:
        store.import_path(img.layout)
    assert digest in str(err.value)
    assert store.list() == []
    # The bottom layer unpacked before the failure is gone too.
    assert [p.name for p in store.layers_dir.iterdir()] == [".tmp"]
    assert list((store.layers_dir / ".tmp").iterdir()) == []


def test_store_several_images_in_one_layout(tmp_path: Path) -> None:
    a = write_oci_layout(tmp_path / "a", [make_layer_tar(BASE)], ref_name="app:1")
    b = write_oci_layout(tmp_path / "b", [make_layer_tar(TOP)], ref_name="latest")
    index = json.loads((a.layout / "index.json").read_text())
    index["manifests"] += json.loads((b.layout / "index.json").read_text())["manifests"]
    for blob in (b.layout / "blobs/sha256").iterdir():
        (a.layout / "blobs/sha256" / blob.name).write_bytes(blob.read_bytes())
    (a.layout / "index.json").write_text(json.dumps(index))
    store = ImageStore(tmp_path / "state")
    with pytest.raises(ImageError, match="give a name"):
        store.import_path(a.layout)
    one = store.import_path(a.layout, name="app:1")
    assert one.id == a.config_digest.split(":")[1]
    # A bare ref.name ("latest") is a tag inside the layout: it selects, the given name names.
    other = store.import_path(a.layout, name="other:latest")
    assert other.id == b.config_digest.split(":")[1]
    assert other.names == ("other:latest",)


def test_store_resolve_remove_and_names(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "state")
    base = make_layer_tar(BASE)
    a = store.import_path(write_oci_layout(tmp_path / "a", [base], ref_name="app:1").layout)
    b = store.import_path(
        write_oci_layout(tmp_path / "b", [base, make_layer_tar(TOP)], ref_name=None).layout,
        name="app:1",
    )
    # The name moved to b; a is still there, by id.
    assert store.resolve("app:1").id == b.id
    assert store.resolve(a.id).names == ()
    assert store.resolve(f"sha256:{a.id}").id == a.id
    assert store.resolve(a.id[:10]).id == a.id
    with pytest.raises(ImageNotFound, match="import it with `jaula image import PATH`"):
        store.resolve("nope")
    with pytest.raises(ImageNotFound):
        store.resolve("f" * 64)
    # Importing again adds names, never duplicates the image.
    store.import_path(tmp_path / "b", name="app:2")
    assert store.resolve("app:2").names == ("app:1", "app:2")
    assert len(store.list()) == 2
    # Removing one of several names only untags.
    store.remove("app:2")
    assert store.resolve("app:1").names == ("app:1",)
    # In use: refused, nothing changes.
    with pytest.raises(ImageInUse):
        store.remove("app:1", in_use=lambda image_id: image_id == b.id)
    store.remove("app:1", in_use=lambda image_id: False)
    assert [i.id for i in store.list()] == [a.id]
    assert store.has_layer(a.layers[0])  # still used by a
    assert not store.has_layer(b.layers[1])
    assert not (store.images_dir / b.id).exists()
    store.remove(a.id[:12])
    assert store.list() == []
    assert [p.name for p in store.layers_dir.iterdir()] == [".tmp"]


def test_store_ambiguous_prefix(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "state")
    layer = make_layer_tar(BASE)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    ids = []
    for i in range(17):  # 17 ids over 16 first hex digits: two share a prefix
        cfg = image_config([diff_id], Cmd=[f"cmd{i}"])
        img = write_oci_layout(tmp_path / f"l{i}", [layer], "none", None, config=cfg)
        ids.append(store.import_path(img.layout).id)
    firsts = [i[0] for i in ids]
    shared = next(c for c in firsts if firsts.count(c) > 1)
    with pytest.raises(AmbiguousImage, match="ambiguous"):
        store.resolve(shared)
    assert len(list(store.layers_dir.glob("[0-9a-f]*"))) == 1


def test_store_gc_and_stale_tmp(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "state")
    image = store.import_path(write_oci_layout(tmp_path / "a", [make_layer_tar(BASE)]).layout)
    orphan = store.layers_dir / ("e" * 64)
    (orphan / "diff").mkdir(parents=True)
    (store.layers_dir / ".tmp" / "crashed-import").mkdir()
    assert store.gc() == ["e" * 64]
    assert not orphan.exists()
    assert list((store.layers_dir / ".tmp").iterdir()) == []
    assert store.layer_dirs(image)[0].is_dir()


def test_store_missing_layer_is_reported(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "state")
    image = store.import_path(write_oci_layout(tmp_path / "a", [make_layer_tar(BASE)]).layout)
    shutil.rmtree(store.layers_dir / image.layers[0])
    with pytest.raises(ImageError, match="missing from the store"):
        store.layer_dirs(image)


def test_store_empty_and_bad_inputs(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "state")
    assert store.list() == []
    with pytest.raises(ImageNotFound):
        store.resolve("busybox")
    with pytest.raises(ImageError, match="does not exist"):
        store.import_path(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="neither an OCI image layout"):
        store.import_path(tmp_path / "empty")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ImageError):
        store.import_path(tmp_path / "junk.tar")


def test_store_compressed_archive_and_symlinked_blob(tmp_path: Path) -> None:
    img = write_oci_layout(tmp_path / "layout", [make_layer_tar(BASE)])
    archive = tmp_path / "image.tar.zst"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for item in ("oci-layout", "index.json", "blobs"):
            tf.add(img.layout / item, arcname=item)
    archive.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    store = ImageStore(tmp_path / "state")
    assert store.import_path(archive).names == ("test:latest",)
    # A layout blob that is a symlink to a host file is not followed.
    config = img.layout / "blobs/sha256" / img.config_digest.split(":")[1]
    real = tmp_path / "config.json"
    config.rename(real)
    config.symlink_to(real)
    with pytest.raises(ImageError, match="symlink"):
        ImageStore(tmp_path / "state2").import_path(img.layout)


def test_store_reports_progress_and_draws_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = write_oci_layout(tmp_path / "a", [make_layer_tar(BASE), make_layer_tar(TOP)]).layout
    seen: list[ImportProgress] = []
    ImageStore(tmp_path / "state").import_path(layout, on_progress=seen.append)
    assert capsys.readouterr().err == ""
    total = seen[0].total_bytes
    assert total > 0 and seen[0].done_bytes == 0 and seen[0].path == layout
    assert [p.finished for p in seen] == [False] * (len(seen) - 1) + [True]
    done = [p.done_bytes for p in seen]
    assert done == sorted(done) and done[-1] == total
    assert {p.total_bytes for p in seen} == {total}


def test_store_reports_finished_when_the_import_fails(tmp_path: Path) -> None:
    img = write_oci_layout(tmp_path / "a", [make_layer_tar(BASE)])
    layout = img.layout
    blob = layout / "blobs" / "sha256" / img.layer_digests[0].removeprefix("sha256:")
    blob.write_bytes(b"\0" * blob.stat().st_size)  # same size, wrong digest
    seen: list[ImportProgress] = []
    with pytest.raises(ImageError):
        ImageStore(tmp_path / "state").import_path(layout, on_progress=seen.append)
    assert seen and seen[-1].finished


def test_cli_import_bar_is_quiet_off_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(var, raising=False)
    bar = ImportBar(enabled=True)  # asked for, but stderr is pytest's capture, not a tty
    big = 1 << 30
    bar.update(ImportProgress(tmp_path, 0, big))
    bar.update(ImportProgress(tmp_path, big, big, finished=True))
    bar.close()
    assert capsys.readouterr().err == ""


def test_store_writers_are_serialized(tmp_path: Path) -> None:
    layer = make_layer_tar(BASE)
    layouts = [
        write_oci_layout(
            tmp_path / f"l{i}", [layer, make_layer_tar([F(f"f{i}", b"x")])], ref_name=f"app:{i}"
        ).layout
        for i in range(4)
    ]
    store = ImageStore(tmp_path / "state")
    errors: list[BaseException] = []

    def run(p: Path) -> None:
        try:
            ImageStore(tmp_path / "state").import_path(p)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in layouts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(n for i in store.list() for n in i.names) == [f"app:{i}" for i in range(4)]
    assert len(list(store.layers_dir.glob("[0-9a-f]*"))) == 5


def _read_pty(master: int) -> str:
    os.set_blocking(master, False)
    out = b""
    with contextlib.suppress(BlockingIOError, OSError):
        while chunk := os.read(master, 65536):
            out += chunk
    return out.decode(errors="replace")


def test_cli_import_bar_draws_on_a_terminal_for_a_long_import_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "TERM"):
        monkeypatch.delenv(var, raising=False)
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w") as tty:
            monkeypatch.setattr(sys, "stderr", tty)
            for total, drawn in ((1 << 30, True), (1 << 20, False), (0, True)):
                bar = ImportBar(enabled=True)
                path = tmp_path / f"img-{total}.tar"
                bar.update(ImportProgress(path, 0, total))
                bar.update(ImportProgress(path, 4096, total))
                bar.update(ImportProgress(path, 8192, total, finished=True))
                bar.close()
                tty.flush()
                assert (f"importing {path.name}" in _read_pty(master)) is drawn, total
    finally:
        os.close(master)


# --- bombs and truncated layers (issue 15, items 1 and 2) --------------------------------------

MiB = 1024 * 1024


@pytest.mark.parametrize("make", [gnu_sparse_tar, pax_sparse_tar])
def test_sparse_file_stays_sparse(tmp_path: Path, make: MakeSparse) -> None:
    # 64 MiB first: were the holes written, this fails before the 10 GiB one is tried.
    for i, size in enumerate((64 * MiB, 10 * 1024 * MiB)):
        runs = [(0, b"head"), (size // 2, b"middle"), (size - 3, b"end")]
        layer = make("var/log/lastlog", size, runs)
        assert len(layer) <= 10240  # a few blocks
        dest = tmp_path / f"layer{i}"
        dest.mkdir()
        stats = unpack_layer(io.BytesIO(gzip.compress(layer)), dest)
        f = dest / "var/log/lastlog"
        st = f.stat()
        assert st.st_size == size
        assert st.st_blocks * 512 <= MiB, f"{size} byte sparse file allocated {st.st_blocks} blocks"
        assert stat.S_IMODE(st.st_mode) == 0o644
        with open(f, "rb") as fh:
            for off, data in runs:
                fh.seek(off)
                assert fh.read(len(data)) == data
        assert stats.unpacked_bytes == size and stats.size_bytes == len(layer)
        f.unlink()


@pytest.mark.parametrize("make", [gnu_sparse_tar, pax_sparse_tar])
def test_sparse_bomb_is_refused_naming_the_entry(tmp_path: Path, make: MakeSparse) -> None:
    layer = make("bomb", 64 * MiB, [(0, b"x"), (64 * MiB - 1, b"y")])
    dest = tmp_path / "layer"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match="layer is larger than 16777216 bytes") as err:
        unpack_layer(io.BytesIO(layer), dest, limits=UnpackLimits(max_layer_bytes=16 * MiB))
    assert err.value.entry == "bomb" and "'bomb'" in str(err.value)
    assert not (dest / "bomb").exists()


def test_compression_bomb_is_refused_before_it_is_written(tmp_path: Path) -> None:
    blob = gzip.compress(make_layer_tar([F("ok", b"fine"), F("zeros", b"\0" * (64 * MiB))]))
    assert len(blob) < 128 * 1024
    dest = tmp_path / "layer"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match="larger than 8388608 bytes") as err:
        unpack_layer(io.BytesIO(blob), dest, limits=UnpackLimits(max_layer_bytes=8 * MiB))
    assert err.value.entry == "zeros"
    assert not (dest / "zeros").exists()  # refused at its header, not after 8 MiB of zeros


def test_image_bound_counts_every_layer(tmp_path: Path) -> None:
    layers = [make_layer_tar([F(f"f{i}", bytes([i]) * (600 * 1024))]) for i in range(3)]
    img = write_oci_layout(tmp_path / "layout", layers, "gzip", "big:1")
    store = ImageStore(tmp_path / "state", limits=UnpackLimits(max_image_bytes=MiB))
    with pytest.raises(UnsafeArchiveError, match=f"image is larger than {MiB} bytes") as err:
        store.import_path(img.layout)
    assert err.value.entry == "f1"
    assert store.list() == []
    assert sorted(p.name for p in store.layers_dir.iterdir()) == [".tmp"]
    assert list((store.layers_dir / ".tmp").iterdir()) == []
    # one import may bring its own bounds; stored layers count towards the image too
    store.import_path(img.layout, limits=UnpackLimits(max_image_bytes=2 * MiB))
    with pytest.raises(ImageError, match="already stored"):
        store.import_path(img.layout, limits=UnpackLimits(max_image_bytes=MiB))


def test_layer_bound_default_and_store_limits() -> None:
    limits = UnpackLimits()
    assert limits.max_layer_bytes == 32 << 30 and limits.max_image_bytes == 64 << 30
    assert limits.max_entry_bytes <= limits.max_layer_bytes <= limits.max_image_bytes


TRUNCATED_BASE = make_layer_tar([F("a", b"y" * 100), F("b", b"x" * 3000)])


@pytest.mark.parametrize("cut", sorted(cuts(TRUNCATED_BASE)))
@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_truncated_layer_is_refused(tmp_path: Path, cut: str, compression: str) -> None:
    """tarfile alone takes a tar cut on or inside a header for a complete one, dropping the
    entries after the cut (the layer's digests, made over the cut tar, all match)."""
    tar = cuts(TRUNCATED_BASE)[cut]
    dest = tmp_path / "layer"
    dest.mkdir()
    with pytest.raises(ImageError, match="not a valid tar stream.*truncated"):
        unpack_layer(io.BytesIO(compress(tar, compression)), dest)
    img = write_oci_layout(tmp_path / "layout", [tar], compression)
    store = ImageStore(tmp_path / "state")
    with pytest.raises(ImageError, match="truncated"):
        store.import_path(img.layout)
    assert store.list() == []
    assert list((store.layers_dir / ".tmp").iterdir()) == []


def test_layer_ending_in_one_zero_block_is_complete(tmp_path: Path) -> None:
    end = member_end(TRUNCATED_BASE, 1)
    dest = tmp_path / "layer"
    dest.mkdir()
    unpack_layer(io.BytesIO(TRUNCATED_BASE[: end + 512]), dest)
    assert (dest / "b").read_bytes() == b"x" * 3000
