"""migrate.rootfs_diff: the delta after the freeze keeps the source's hardlinks, no more and
no fewer.  The base tar of the pre-copy links two names on the destination; when the source
then gives one of them a new inode (a save that keeps a backup: ``ln A A~``, write
``A.tmp``, rename it over ``A``), extracting the delta in place wrote the old content it
carries for ``A~`` through the link into ``A``: the new ``A`` was lost, silently."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from migrate import rootfs_diff
from migrate.errors import BundleError


def _tree(d: Path) -> dict[str, tuple[bytes, frozenset[str]]]:
    """Every regular file of ``d``: relative path -> (content, the names linked to it)."""
    by_ino: dict[int, set[str]] = {}
    files: dict[str, tuple[bytes, int]] = {}
    for dirpath, _dirs, names in os.walk(d):
        for n in names:
            p = Path(dirpath) / n
            rel = str(p.relative_to(d))
            ino = p.lstat().st_ino
            by_ino.setdefault(ino, set()).add(rel)
            files[rel] = (p.read_bytes(), ino)
    return {rel: (data, frozenset(by_ino[ino])) for rel, (data, ino) in files.items()}


def _migrate(
    tmp_path: Path, prepare: Callable[[Path], None], change: Callable[[Path], None]
) -> tuple[Path, Path]:
    """A pre-copy of ``prepare``'s upperdir, then ``change`` on the source, then the delta
    applied on the destination as a migration does; returns (source, destination)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    prepare(src)
    before = rootfs_diff.snapshot(src)
    rootfs_diff.write(src, tmp_path / "base.tar")
    rootfs_diff.extract(tmp_path / "base.tar", dst)
    change(src)
    deleted, _ = rootfs_diff.write_delta(src, before, tmp_path / "delta.tar")
    rootfs_diff.apply_deleted(dst, deleted)
    rootfs_diff.extract_over(tmp_path / "delta.tar", dst)
    return src, dst


def _linked(d: Path) -> None:
    (d / "etc").mkdir()
    (d / "etc" / "conf").write_text("old\n")
    os.link(d / "etc" / "conf", d / "etc" / "conf~")


def _save_with_backup(d: Path) -> None:
    (d / "etc" / "conf.tmp").write_text("new\n")
    os.rename(d / "etc" / "conf.tmp", d / "etc" / "conf")


def _break_and_rewrite(d: Path) -> None:
    os.unlink(d / "etc" / "conf~")
    (d / "etc" / "conf~").write_text("other\n")


def _write_through(d: Path) -> None:
    with open(d / "etc" / "conf", "a") as f:
        f.write("more\n")


def _link_more(d: Path) -> None:
    os.link(d / "etc" / "conf", d / "etc" / "conf.2")


def _plain(d: Path) -> None:
    (d / "a").write_text("a\n")
    (d / "b").write_text("b\n")


def _link_plain(d: Path) -> None:
    os.unlink(d / "b")
    os.link(d / "a", d / "b")


@pytest.mark.parametrize(
    ("prepare", "change"),
    [
        (_linked, _save_with_backup),
        (_linked, _break_and_rewrite),
        (_linked, _write_through),
        (_linked, _link_more),
        (_plain, _link_plain),
    ],
    ids=["save-with-backup", "break-and-rewrite", "write-through", "link-more", "link-two"],
)
def test_the_delta_keeps_the_sources_contents_and_links(
    tmp_path: Path, prepare: Callable[[Path], None], change: Callable[[Path], None]
) -> None:
    src, dst = _migrate(tmp_path, prepare, change)
    assert _tree(dst) == _tree(src)


def test_the_delta_still_refuses_an_entry_outside_the_upperdir(tmp_path: Path) -> None:
    """The unlinking before the extraction stays inside the upperdir: a symlinked parent
    on the destination that leads out of it is refused, and nothing outside is removed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("keep\n")

    def prepare(d: Path) -> None:
        (d / "sub").mkdir()
        (d / "sub" / "f").write_text("x\n")

    def change(d: Path) -> None:
        (d / "sub" / "f").write_text("y\n")

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    prepare(src)
    before = rootfs_diff.snapshot(src)
    rootfs_diff.write(src, tmp_path / "base.tar")
    rootfs_diff.extract(tmp_path / "base.tar", dst)
    change(src)
    rootfs_diff.write_delta(src, before, tmp_path / "delta.tar")
    # the destination's copy of sub/ became a symlink out of the upperdir
    (dst / "sub" / "f").unlink()
    (dst / "sub").rmdir()
    (dst / "sub").symlink_to(outside)
    with pytest.raises(BundleError, match="leaves the upperdir"):
        rootfs_diff.extract_over(tmp_path / "delta.tar", dst)
    assert (outside / "f").read_text() == "keep\n"
