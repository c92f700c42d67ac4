"""Unit tests (no root): the wire protocol's schema checks, the bundle's manifest and
digests, and the rootfs-diff tar validation against hostile archives."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import msgpack
import pytest

from migrate.bundle import Bundle, Manifest
from migrate.errors import BundleError, ProtocolError
from migrate.protocol import SCHEMAS, decode, encode, error
from migrate.rootfs_diff import validate
from tests.helpers.tars import cuts, gnu_sparse_tar, make_tar

# -- protocol --------------------------------------------------------------------------------


def test_round_trip_and_payload() -> None:
    msg, payload = decode(encode("chunk", b"\x00" * 10, session="s", file=1, offset=0))
    assert msg["type"] == "chunk" and payload == b"\x00" * 10
    msg, payload = decode(encode("ps", all=True, id=7))
    assert msg == {"v": 1, "type": "ps", "all": True, "id": 7} and payload is None


@pytest.mark.parametrize(
    "frames, why",
    [
        ([], "frames"),
        ([b"a", b"b", b"c"], "frames"),
        ([b"\xc1"], "msgpack"),
        ([msgpack.packb([1, 2])], "map"),
        ([msgpack.packb({"v": 2, "type": "ps"})], "version"),
        ([msgpack.packb({"v": 1, "type": "nope"})], "unknown message type"),
        ([msgpack.packb({"v": 1, "type": "ps", "evil": 1})], "unknown field"),
        ([msgpack.packb({"v": 1, "type": "stop"})], "missing field"),
        ([msgpack.packb({"v": 1, "type": "stop", "container": 5})], "expected str"),
        (
            [
                msgpack.packb({"v": 1, "type": "chunk", "session": "s", "file": True, "offset": 0}),
                b"x",
            ],
            "bool",
        ),
        ([msgpack.packb({"v": 1, "type": "stop", "container": "x" * 300})], "limit"),
        ([msgpack.packb({"v": 1, "type": "ps"}), b"payload"], "no payload"),
        (
            [msgpack.packb({"v": 1, "type": "chunk", "session": "s", "file": 1, "offset": 0})],
            "data frame",
        ),
        ([msgpack.packb({"v": 1, "type": "ps", "id": [1]})], "id"),
    ],
)
def test_decode_refuses_malformed(frames: list[bytes], why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        decode(frames)


def test_encode_checks_what_we_send() -> None:
    with pytest.raises(ProtocolError):
        encode("stop")  # missing container
    assert decode(error("x", "y"))[0]["code"] == "x"
    assert all(isinstance(s, dict) for s in SCHEMAS.values())


def test_oversized_header_is_refused() -> None:
    with pytest.raises(ProtocolError, match="limit"):
        decode([b"\x00" * (2 << 20)])


# -- bundle ----------------------------------------------------------------------------------


def _bundle(tmp_path: Path) -> Bundle:
    b = Bundle.create(tmp_path / "b")
    (b.criu_dir / "pages-1.img").write_bytes(b"p" * 1000)
    (b.criu_dir / "inventory.img").write_bytes(b"i")
    b.rootfs_diff.write_bytes(b"t" * 10)
    b.finalize(Manifest(container={"id": "x"}, image={"layers": []}, criu_version=(4, 2, 1)))
    return b


def test_bundle_verify_and_export_import(tmp_path: Path) -> None:
    b = _bundle(tmp_path)
    m = b.verify()
    assert {f.path for f in m.files} == {
        "criu/pages-1.img",
        "criu/inventory.img",
        "rootfs-diff.tar",
    }
    out = tmp_path / "b.tar"
    b.export(out)
    b2 = Bundle.import_tar(out, tmp_path / "b2")
    assert b2.verify() == m


def test_bundle_detects_corruption_truncation_and_extra_files(tmp_path: Path) -> None:
    b = _bundle(tmp_path)
    p = b.criu_dir / "pages-1.img"
    p.write_bytes(b"q" + b"p" * 999)
    with pytest.raises(BundleError, match="sha256"):
        b.verify()
    p.write_bytes(b"p" * 10)
    with pytest.raises(BundleError, match="truncated"):
        b.verify()
    p.write_bytes(b"p" * 1000)
    (b.criu_dir / "extra.img").write_bytes(b"e")
    with pytest.raises(BundleError, match="does not list"):
        b.verify()


def test_manifest_version_and_shape() -> None:
    with pytest.raises(BundleError, match="format version"):
        Manifest.from_json({"format_version": 99})
    with pytest.raises(BundleError, match="malformed"):
        Manifest.from_json({"format_version": 1, "container": {}})
    with pytest.raises(BundleError, match="no manifest"):
        Bundle(Path("/nonexistent")).manifest()


@pytest.mark.parametrize(
    "name", ["../evil", "/etc/passwd", "criu/../../x", "other.txt", "criu/sub/dir.img"]
)
def test_bundle_import_refuses_foreign_entries(tmp_path: Path, name: str) -> None:
    t = tmp_path / "evil.tar"
    with tarfile.open(t, "w") as tf:
        info = tarfile.TarInfo(name)
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(BundleError, match="unexpected entry"):
        Bundle.import_tar(t, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("cut", ["no-end-marker-after-last", "inside-last-header"])
def test_bundle_import_refuses_a_truncated_tar(tmp_path: Path, cut: str) -> None:
    b = _bundle(tmp_path)
    out = tmp_path / "b.tar"
    b.export(out)
    out.write_bytes(cuts(out.read_bytes())[cut])
    with pytest.raises(BundleError, match="truncated"):
        Bundle.import_tar(out, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_bundle_import_never_overwrites_and_bounds_its_size(tmp_path: Path) -> None:
    t = tmp_path / "twice.tar"
    t.write_bytes(make_tar({"manifest.json": b"{}", "criu/core-1.img": b"a"}))
    with tarfile.open(t, "a") as tf:  # the same name again, appended
        info = tarfile.TarInfo("manifest.json")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"[]"))
    with pytest.raises(BundleError, match="'manifest.json' twice"):
        Bundle.import_tar(t, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    t.write_bytes(make_tar({"criu/core-1.img": b"a" * 600, "criu/mm-1.img": b"b" * 600}))
    with pytest.raises(BundleError, match="more than 1000 bytes .*'criu/mm-1.img'"):
        Bundle.import_tar(t, tmp_path / "dest", max_bytes=1000)
    assert not (tmp_path / "dest").exists()


def test_bundle_import_refuses_symlink(tmp_path: Path) -> None:
    t = tmp_path / "evil.tar"
    with tarfile.open(t, "w") as tf:
        info = tarfile.TarInfo("manifest.json")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(BundleError):
        Bundle.import_tar(t, tmp_path / "dest")


# -- rootfs diff -----------------------------------------------------------------------------


def _tar(tmp_path: Path, entries: list[tarfile.TarInfo]) -> Path:
    t = tmp_path / "diff.tar"
    with tarfile.open(t, "w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            tf.addfile(e, io.BytesIO(b"x" * e.size) if e.isreg() else None)
    return t


def _entry(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    size: int = 0,
    link: str = "",
    major: int = 0,
    minor: int = 0,
) -> tarfile.TarInfo:
    e = tarfile.TarInfo(name)
    e.type, e.size, e.linkname, e.devmajor, e.devminor = kind, size, link, major, minor
    return e


def test_rootfs_diff_accepts_overlay_form(tmp_path: Path) -> None:
    t = _tar(
        tmp_path,
        [
            _entry("./etc", tarfile.DIRTYPE),
            _entry("./etc/gone", tarfile.CHRTYPE),
            _entry("./etc/f", size=3),
            _entry("./etc/h", tarfile.LNKTYPE, link="./etc/f"),
            _entry("./bin/sh", tarfile.SYMTYPE, link="/bin/busybox"),
            _entry("./tmp/fifo", tarfile.FIFOTYPE),
        ],
    )
    assert validate(t) == 6


@pytest.mark.parametrize(
    "entries, why",
    [
        ([_entry("/abs")], "absolute"),
        ([_entry("a/../../x")], r"'\.\.'"),
        ([_entry("dev/sda", tarfile.BLKTYPE, major=8)], "device"),
        ([_entry("dev/mem", tarfile.CHRTYPE, major=1, minor=1)], "device"),
        ([_entry("l", tarfile.SYMTYPE, link="/etc"), _entry("l/passwd", size=1)], "symlink"),
        ([_entry("h", tarfile.LNKTYPE, link="/etc/shadow")], "absolute"),
        ([_entry("h", tarfile.LNKTYPE, link="never/seen")], "hardlink"),
    ],
)
def test_rootfs_diff_refuses_hostile_entries(
    tmp_path: Path, entries: list[tarfile.TarInfo], why: str
) -> None:
    with pytest.raises(BundleError, match=why):
        validate(_tar(tmp_path, entries))


def test_rootfs_diff_refuses_garbage(tmp_path: Path) -> None:
    (tmp_path / "g.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(BundleError, match="not a valid tar"):
        validate(tmp_path / "g.tar")


@pytest.mark.parametrize("cut", sorted(cuts(make_tar({"etc/a": b"y" * 100, "etc/b": b"x" * 3000}))))
def test_rootfs_diff_refuses_a_truncated_tar(tmp_path: Path, cut: str) -> None:
    """A diff cut on a header boundary or inside a header looked complete to tarfile: GNU tar
    then restored it without its last files."""
    tar = cuts(make_tar({"etc/a": b"y" * 100, "etc/b": b"x" * 3000}))[cut]
    (tmp_path / "cut.tar").write_bytes(tar)
    with pytest.raises(BundleError, match="truncated"):
        validate(tmp_path / "cut.tar")


def test_rootfs_diff_bounds_sparse_files_at_their_full_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import migrate.rootfs_diff as rd
    from runtime.tarsafe import TarLimits

    monkeypatch.setattr(rd, "_LIMITS", TarLimits(100, 1 << 40, 1 << 20))
    (tmp_path / "s.tar").write_bytes(gnu_sparse_tar("var/big", 1 << 30, [(0, b"x")]))
    with pytest.raises(BundleError, match="more than 1048576 bytes .*'var/big'"):
        validate(tmp_path / "s.tar")


def test_rootfs_diff_deleted_paths_never_name_the_upperdir(tmp_path: Path) -> None:
    from migrate.rootfs_diff import apply_deleted

    upper = tmp_path / "upper"
    (upper / "keep").mkdir(parents=True)
    for rel in (".", "", "./", "/", "../x", "/etc"):
        with pytest.raises(BundleError, match="unsafe"):
            apply_deleted(upper, [rel])
    assert (upper / "keep").is_dir()


# -- sealing of bulk data ----------------------------------------------------------------------


def test_sealed_chunks_open_only_where_they_belong() -> None:
    from migrate.errors import TransferError
    from migrate.sealing import new_key, open_chunk, seal_chunk

    k = new_key()
    sealed = seal_chunk(k, "s1", 3, 7, 4096, b"payload")
    assert open_chunk(k, "s1", 3, 7, 4096, sealed) == b"payload"
    tampered = bytes([sealed[0] ^ 1]) + sealed[1:]
    for args in (
        ("s1", 3, 7, 4096, tampered),
        ("s2", 3, 7, 4096, sealed),
        ("s1", 4, 7, 4096, sealed),
        ("s1", 3, 8, 4096, sealed),
        ("s1", 3, 7, 0, sealed),
    ):
        with pytest.raises(TransferError, match="authentication"):
            open_chunk(k, *args)
    with pytest.raises(TransferError):
        open_chunk(new_key(), "s1", 3, 7, 4096, sealed)
