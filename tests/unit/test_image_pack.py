"""migrate.image_pack: the small CRIU images of a migration in one tar, read back safely."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from migrate import image_pack
from migrate.errors import BundleError
from tests.helpers.tars import cuts


def _files(d: Path, sizes: dict[str, int]) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for name, size in sizes.items():
        p = d / name
        p.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
        out.append(p)
    return out


def test_split_keeps_large_images_apart(tmp_path: Path) -> None:
    files = _files(
        tmp_path,
        {
            "core-1.img": 4000,
            "pages-1.img": image_pack.PACK_MAX_FILE_BYTES + 1,
            "mm-1.img": image_pack.PACK_MAX_FILE_BYTES,
        },
    )
    small, large = image_pack.split(files)
    assert [p.name for p in small] == ["core-1.img", "mm-1.img"]
    assert [p.name for p in large] == ["pages-1.img"]


def test_pack_and_unpack_round_trip(tmp_path: Path) -> None:
    files = _files(tmp_path / "src", {"core-1.img": 1234, "files.img": 0, "mm-1.img": 70000})
    tar = tmp_path / "pack.tar"
    assert image_pack.pack(files, tar) == 3
    dest = tmp_path / "dest"
    dest.mkdir()
    names = image_pack.unpack(tar, dest, tar.stat().st_size)
    assert sorted(names) == ["core-1.img", "files.img", "mm-1.img"]
    for p in files:
        got = dest / p.name
        assert got.read_bytes() == p.read_bytes()
        assert got.stat().st_mode & 0o777 == 0o600


def _tar_with(tmp_path: Path, add: list[tarfile.TarInfo]) -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info in add:
            data = b"x" * info.size if info.isreg() else None
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(
    name: str, kind: bytes = tarfile.REGTYPE, size: int = 3, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size if kind == tarfile.REGTYPE else 0
    info.linkname = link
    return info


@pytest.mark.parametrize(
    "entry",
    [
        _info("../escape.img"),
        _info("sub/core-1.img"),
        _info("/etc/passwd"),
        _info("link.img", tarfile.SYMTYPE, link="/etc/passwd"),
        _info("hard.img", tarfile.LNKTYPE, link="core-1.img"),
        _info("dir", tarfile.DIRTYPE),
        _info("dev", tarfile.CHRTYPE),
        _info("fifo", tarfile.FIFOTYPE),
        _info("sp ace.img"),
    ],
)
def test_unpack_refuses_anything_but_plain_regular_files(
    tmp_path: Path, entry: tarfile.TarInfo
) -> None:
    tar = _tar_with(tmp_path, [entry])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(BundleError, match="not a regular file with a plain name"):
        image_pack.unpack(tar, dest, 1 << 20)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "escape.img").exists()


def test_unpack_never_overwrites(tmp_path: Path) -> None:
    tar = _tar_with(tmp_path, [_info("core-1.img"), _info("core-1.img")])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(BundleError, match="twice"):
        image_pack.unpack(tar, dest, 1 << 20)
    (dest / "core-1.img").unlink()
    (dest / "pages-1.img").write_bytes(b"from the page server")
    tar2 = _tar_with(tmp_path, [_info("pages-1.img")])
    with pytest.raises(BundleError, match="already there"):
        image_pack.unpack(tar2, dest, 1 << 20)
    assert (dest / "pages-1.img").read_bytes() == b"from the page server"


def test_unpack_bounds_the_total_and_refuses_junk(tmp_path: Path) -> None:
    tar = _tar_with(tmp_path, [_info("a.img", size=600), _info("b.img", size=600)])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(BundleError, match="more than 1000 bytes"):
        image_pack.unpack(tar, dest, 1000)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x00not a tar" * 100)
    with pytest.raises(BundleError):
        image_pack.unpack(junk, dest, 1 << 20)


@pytest.mark.parametrize("cut", ["no-end-marker-before-last", "inside-last-header"])
def test_unpack_refuses_a_truncated_pack(tmp_path: Path, cut: str) -> None:
    """A pack cut on or inside a header looked complete: its last images were dropped."""
    files = _files(tmp_path / "src", {"core-1.img": 1234, "mm-1.img": 5000})
    tar = tmp_path / "pack.tar"
    image_pack.pack(files, tar)
    tar.write_bytes(cuts(tar.read_bytes())[cut])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(BundleError, match="truncated"):
        image_pack.unpack(tar, dest, 1 << 20)
