"""The CRIU patch series as jaula sees it at run time (migrate.criu): which patches a
strategy cannot do without (missing_patches), and the manifest that scripts/setup.sh writes
next to the binary, which counts only for the very binary it was written for."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from migrate import criu

ROOT = Path(__file__).resolve().parents[2]
PATCH_DIR = ROOT / "scripts" / "criu-patches"
ALL = [p.stem for p in sorted(PATCH_DIR.glob("*.patch"))]


# --- missing_patches --------------------------------------------------------------------


def test_every_required_patch_is_in_the_series() -> None:
    # a renamed or dropped patch must not leave a requirement nothing can satisfy
    for strategy, names in criu.REQUIRED_PATCHES.items():
        assert names, strategy
        for name in names:
            assert name in ALL, f"{strategy} requires {name}, not in scripts/criu-patches"


def test_full_series_misses_nothing() -> None:
    for strategy in criu.REQUIRED_PATCHES:
        assert criu.missing_patches(strategy, ALL) == []


def test_stock_criu_misses_all_required_in_order() -> None:
    assert criu.missing_patches("cold", []) == ["0005-page-server-client-time-limits"]
    assert criu.missing_patches("postcopy", frozenset()) == [
        "0005-page-server-client-time-limits",
        "0006-lazy-dump-commit",
        "0007-page-server-given-socket",
        "0008-lazy-pages-pipe-max-size",
        "0009-lazy-rseq-pages-eager",
    ]


def test_faster_only_patches_are_not_required() -> None:
    # a build that lacks only patches that make things faster can still do both
    slow = [n for n in ALL if not n.startswith(("0001", "0002", "0003", "0004", "0010", "0011"))]
    assert criu.missing_patches("cold", slow) == []
    assert criu.missing_patches("postcopy", slow) == []


def test_partial_build_names_what_postcopy_lacks() -> None:
    applied = (n for n in ALL if not n.startswith(("0007", "0009")))  # any iterable
    assert criu.missing_patches("postcopy", applied) == [
        "0007-page-server-given-socket",
        "0009-lazy-rseq-pages-eager",
    ]
    assert criu.missing_patches("cold", [n for n in ALL if n.startswith("0005")]) == []


def test_unknown_strategy_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match=r"unknown migration strategy 'precopy': known are cold"):
        criu.missing_patches("precopy", ALL)


def test_patches_are_format_patch_with_upstream_status() -> None:
    for p in sorted(PATCH_DIR.glob("*.patch")):
        head = p.read_text().split("\n---\n", 1)[0]
        assert head.startswith("From "), p.name
        for field in ("From: ", "Date: ", "Subject: [PATCH"):
            assert f"\n{field}" in head, f"{p.name}: no {field.strip()}"
        status = re.findall(r"^Upstream-Status: (\S.*)$", head, re.MULTILINE)
        assert len(status) == 1, p.name
        assert re.match(r"(Pending|Submitted|Accepted|Backport|Denied|Inappropriate \[)", status[0])


# --- the manifest -----------------------------------------------------------------------


def _install(prefix: Path, content: bytes = b"\x7fELF criu build 1") -> str:
    """A stand-in criu binary at PREFIX/sbin/criu (a script for build(), which runs it)."""
    sbin = prefix / "sbin"
    sbin.mkdir(parents=True, exist_ok=True)
    binary = sbin / "criu"
    script = b"#!/bin/sh\necho 'Version: 4.2.1'\necho 'GitID: jaula-0123456789'\n# "
    binary.write_bytes(script + content + b"\n")
    binary.chmod(0o755)
    return str(binary)


def _manifest(binary: str, applied: Sequence[str], not_applied: Sequence[str] = ()) -> Path:
    digest = hashlib.sha256(Path(binary).read_bytes()).hexdigest()
    lines = [
        "# jaula: test manifest",
        "format 1",
        f"binary {binary}",
        f"binary-sha256 {digest}",
        "gitid jaula-0123456789",
        "criu-version 4.2.1",
        "series " + "ab" * 32,
        *(f"applied {n}" for n in applied),
        *(f"not-applied {n}" for n in not_applied),
    ]
    path = criu.manifest_path(binary)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o644)
    return path


def test_manifest_lives_in_lib_jaula_beside_the_prefix(tmp_path: Path) -> None:
    binary = _install(tmp_path)
    assert criu.manifest_path(binary) == tmp_path / "lib" / "jaula" / "criu-patches"


def test_manifest_for_this_binary_gives_its_series(tmp_path: Path) -> None:
    binary = _install(tmp_path)
    _manifest(binary, ALL[:9], ALL[9:])
    m = criu.read_manifest(binary)
    assert m is not None
    assert m.applied == tuple(ALL[:9])
    assert m.not_applied == tuple(ALL[9:])
    assert m.criu_version == "4.2.1"
    assert criu.patch_series(binary) == frozenset(ALL[:9])


def test_stale_manifest_of_another_binary_counts_as_none(tmp_path: Path) -> None:
    binary = _install(tmp_path)
    _manifest(binary, ALL)
    assert criu.patch_series(binary) == frozenset(ALL)
    # the binary is replaced (another build, a package, another checkout's setup): the
    # manifest left behind says nothing about it
    _install(tmp_path, b"\x7fELF a stock criu, longer than the first")
    assert criu.read_manifest(binary) is None
    assert criu.patch_series(binary) == frozenset()
    assert criu.missing_patches("postcopy", criu.patch_series(binary)) == list(
        criu.REQUIRED_PATCHES["postcopy"]
    )


def test_no_manifest_is_a_stock_criu(tmp_path: Path) -> None:
    binary = _install(tmp_path)
    assert criu.read_manifest(binary) is None
    assert criu.patch_series(binary) == frozenset()


def test_manifest_writable_by_others_is_ignored(tmp_path: Path) -> None:
    binary = _install(tmp_path)
    path = _manifest(binary, ALL)
    path.chmod(0o666)
    assert criu.patch_series(binary) == frozenset()
    path.chmod(0o644)
    assert criu.patch_series(binary) == frozenset(ALL)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("binary-sha256 " + "0" * 64 + "\n", r"format '\(none\)', this jaula reads 1"),
        ("format 2\nbinary-sha256 " + "0" * 64 + "\n", r"format '2'"),
        ("format 1\nbinary-sha256 1234\n", r"binary-sha256 '1234' is not 64 hex digits"),
        ("format 1\n", r"binary-sha256 '' is not"),
    ],
)
def test_malformed_manifest_is_a_one_line_error(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        criu.parse_manifest(text)
    binary = _install(tmp_path)
    path = criu.manifest_path(binary)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    assert criu.patch_series(binary) == frozenset()  # ignored, not raised


def test_manifest_found_through_a_symlinked_binary(tmp_path: Path) -> None:
    binary = _install(tmp_path / "opt")
    _manifest(binary, ALL[:5])
    (tmp_path / "bin").mkdir()
    link = tmp_path / "bin" / "criu"
    link.symlink_to(binary)
    assert criu.patch_series(str(link)) == frozenset(ALL[:5])


def test_build_gives_version_gitid_and_series(tmp_path: Path) -> None:
    binary = _install(tmp_path)
    _manifest(binary, ALL)
    b = criu.build(binary)
    assert b.version == (4, 2, 1)
    assert b.version == criu.version(binary)  # the old API, unchanged
    assert b.gitid == "jaula-0123456789"
    assert b.patches == frozenset(ALL)
    assert b.series == "ab" * 32
    assert b.missing("postcopy") == []
    _install(tmp_path, b"rebuilt without a manifest")
    b = criu.build(binary)
    assert (b.patches, b.series) == (frozenset(), "")
    assert b.missing("cold") == ["0005-page-server-client-time-limits"]
