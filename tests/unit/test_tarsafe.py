"""runtime.tarsafe: the one safe tar reader (names, limits, truncation, sparse data, the flat
extractor), on tars built in memory.  No root needed."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from runtime.errors import (
    ArchiveError,
    ArchiveLimitError,
    CorruptArchiveError,
    UnsafeArchiveError,
)
from runtime.tarsafe import TarLimits, entry_parts, extract_flat, open_tar
from tests.helpers.tars import cuts, gnu_sparse_tar, make_tar, pax_sparse_tar

MiB = 1024 * 1024
GiB = 1024 * MiB
MakeSparse = Callable[[str, int, list[tuple[int, bytes]]], bytes]
WIDE = TarLimits(max_entries=1000, max_entry_bytes=16 * GiB, max_total_bytes=32 * GiB)


def names(tar: bytes, limits: TarLimits = WIDE) -> list[str]:
    with open_tar(io.BytesIO(tar), limits, "the test tar") as reader:
        return [m.name for m in reader]


TWO = make_tar({"a": b"y" * 100, "b": b"x" * 3000})


@pytest.mark.parametrize(
    ("name", "parts"),
    [("", ()), ("/", ()), ("./", ()), ("./a/./b//c/", ("a", "b", "c")), ("a", ("a",))],
)
def test_entry_parts(name: str, parts: tuple[str, ...]) -> None:
    assert entry_parts(name) == parts


@pytest.mark.parametrize(
    ("name", "why"),
    [("/etc/passwd", "absolute"), ("a/../../b", r"'\.\.'"), ("..", r"'\.\.'"), ("a\0b", "NUL")],
)
def test_entry_parts_refuses(name: str, why: str) -> None:
    with pytest.raises(UnsafeArchiveError, match=why) as err:
        entry_parts(name, entry="member")
    assert err.value.entry == "member"


def test_complete_archives_are_read_whole() -> None:
    assert names(TWO) == ["a", "b"]
    assert names(make_tar({})) == []
    # a lone zero block ends an archive too (GNU tar accepts it, with a warning)
    end = TWO.index(b"x" * 3000) + 3072
    assert names(TWO[: end + 512]) == ["a", "b"]
    assert names(TWO + b"trailing junk after the end-of-archive marker") == ["a", "b"]


@pytest.mark.parametrize("cut", sorted(cuts(TWO)))
def test_truncated_archive_is_refused(cut: str) -> None:
    with pytest.raises(CorruptArchiveError, match="truncated") as err:
        names(cuts(TWO)[cut])
    assert err.value.entry in ("a", "b")
    assert str(err.value).startswith("the test tar is not a valid tar: ")


def test_garbage_after_a_member_is_refused() -> None:
    end = TWO.index(b"x" * 3000) + 3072
    with pytest.raises(CorruptArchiveError, match="header is invalid"):
        names(TWO[:end] + b"garbage!" * 64)


@pytest.mark.parametrize("junk", [b"", b"not a tar" * 100, b"\0" * 100])
def test_not_a_tar_is_refused(junk: bytes) -> None:
    with pytest.raises(CorruptArchiveError, match="not a valid tar"):
        names(junk)


def test_limits_name_the_entry() -> None:
    tar = make_tar({f"f{i}": b"x" * 100 for i in range(10)})
    with pytest.raises(ArchiveLimitError, match="more than 5 entries") as err:
        names(tar, TarLimits(max_entries=5, max_entry_bytes=MiB, max_total_bytes=MiB))
    assert (err.value.entry, err.value.limit, err.value.bound) == ("f5", "entries", 5)
    with pytest.raises(ArchiveLimitError, match="over the 99 byte limit") as err:
        names(tar, TarLimits(max_entries=99, max_entry_bytes=99, max_total_bytes=MiB))
    assert (err.value.entry, err.value.limit) == ("f0", "entry_bytes")
    with pytest.raises(ArchiveLimitError, match="unpacks to more than 450 bytes") as err:
        names(tar, TarLimits(max_entries=99, max_entry_bytes=MiB, max_total_bytes=450))
    assert (err.value.entry, err.value.limit) == ("f4", "total_bytes")


@pytest.mark.parametrize("make", [gnu_sparse_tar, pax_sparse_tar])
def test_sparse_members_count_at_their_full_size(make: MakeSparse) -> None:
    tar = make("sparse", 10 * GiB, [(0, b"head"), (5 * GiB, b"tail")])
    assert len(tar) <= 10240  # a few blocks declaring 10 GiB
    with pytest.raises(ArchiveLimitError, match="sparse") as err:
        names(tar, TarLimits(max_entries=9, max_entry_bytes=16 * GiB, max_total_bytes=GiB))
    assert err.value.limit == "total_bytes"


@pytest.mark.parametrize("make", [gnu_sparse_tar, pax_sparse_tar])
def test_sparse_data_is_written_with_holes(make: MakeSparse, tmp_path: Path) -> None:
    runs = [(0, b"head"), (3 * MiB, b"middle" * 100), (64 * MiB - 3, b"end")]
    tar = make("sparse", 64 * MiB, runs)
    out = tmp_path / "out"
    with open_tar(io.BytesIO(tar), WIDE, "the test tar") as reader:
        for m in reader:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                assert reader.write_data(m, fd) == sum(len(d) for _, d in runs)
            finally:
                os.close(fd)
    st = out.stat()
    assert st.st_size == 64 * MiB
    assert st.st_blocks * 512 <= MiB, "the holes were written"
    with open(out, "rb") as f:
        for off, data in runs:
            f.seek(off)
            assert f.read(len(data)) == data
        f.seek(MiB)
        assert f.read(4096) == b"\0" * 4096


def test_sparse_map_past_the_file_is_refused(tmp_path: Path) -> None:
    tar = gnu_sparse_tar("sparse", 1000, [(0, b"a"), (2000, b"b")])
    with open_tar(io.BytesIO(tar), WIDE, "the test tar") as reader:
        for m in reader:
            fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                with pytest.raises(CorruptArchiveError, match="sparse map"):
                    reader.write_data(m, fd)
            finally:
                os.close(fd)
            break


# --- the flat extractor ------------------------------------------------------------------------


def flat(tar: bytes, dest: Path, limits: TarLimits = WIDE) -> list[str]:
    return extract_flat(
        io.BytesIO(tar),
        dest,
        allowed=lambda parts: len(parts) == 1 or parts[0] == "sub",
        expected="a test file",
        limits=limits,
        what="the test tar",
    )


def test_flat_extract_writes_allowed_files_0600(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    assert flat(make_tar({"a": b"1", "sub/b": b"22"}), tmp_path) == ["a", "sub/b"]
    assert (tmp_path / "a").read_bytes() == b"1"
    assert (tmp_path / "sub/b").read_bytes() == b"22"
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("name", ["./a", "a/", "other/b", "sub//b", "/a", "../a", "sub/../a"])
def test_flat_extract_refuses_names_not_plain_or_not_allowed(tmp_path: Path, name: str) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/sub").mkdir()
    (tmp_path / "d/other").mkdir()
    with pytest.raises(UnsafeArchiveError, match="unexpected entry .* not a test file") as err:
        flat(make_tar({name: b"x"}), tmp_path / "d")
    assert err.value.entry == name.rstrip("/") or err.value.entry == name
    assert not (tmp_path / "a").exists()
    assert sorted(p.name for p in (tmp_path / "d").rglob("*")) == ["other", "sub"]


def test_flat_extract_refuses_links_and_dirs(tmp_path: Path) -> None:
    for kind in (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            info = tarfile.TarInfo("a")
            info.type, info.linkname = kind, "/etc/passwd"
            tf.addfile(info)
        with pytest.raises(UnsafeArchiveError, match="unexpected entry 'a'"):
            flat(buf.getvalue(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_flat_extract_never_writes_through_a_symlinked_dir(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)
    with pytest.raises(UnsafeArchiveError, match="not a directory"):
        flat(make_tar({"sub/b": b"x"}), dest)
    assert list(outside.iterdir()) == []


def test_flat_extract_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"mine")
    with pytest.raises(UnsafeArchiveError, match="already there"):
        flat(make_tar({"a": b"theirs"}), tmp_path)
    assert (tmp_path / "a").read_bytes() == b"mine"
    (tmp_path / "a").unlink()
    (tmp_path / "b").symlink_to(tmp_path / "target")
    with pytest.raises(UnsafeArchiveError, match="already there"):
        flat(make_tar({"b": b"theirs"}), tmp_path)
    assert not (tmp_path / "target").exists()


def test_flat_extract_refuses_truncated_and_over_limit(tmp_path: Path) -> None:
    for cut in cuts(TWO).values():
        d = tmp_path / f"d{len(cut)}"
        d.mkdir()
        with pytest.raises(CorruptArchiveError):
            flat(cut, d)
    (tmp_path / "small").mkdir()
    with pytest.raises(ArchiveLimitError, match="more than 1000 bytes"):
        flat(TWO, tmp_path / "small", TarLimits(9, MiB, 1000))


def test_errors_share_one_base() -> None:
    assert issubclass(UnsafeArchiveError, ArchiveError)
    assert issubclass(ArchiveLimitError, UnsafeArchiveError)
    assert issubclass(CorruptArchiveError, ArchiveError)
