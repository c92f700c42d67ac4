"""The user namespace's pure parts (no root): ``--uidmap`` parsing, the overlap check the
kernel would refuse with EINVAL, and the files backend of the id-range allocator (disjoint
ranges, the holder named when an exact range is taken, released ranges reused)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.errors import ConfigError, ContainerError
from runtime.spec import ContainerConfig
from runtime.userns import (
    AUTO_FIRST,
    AUTO_SIZE,
    FileIdAllocator,
    IdMapping,
    check_maps,
    host_id,
    parse_idmap,
    range_of,
)


def test_parse_idmap() -> None:
    assert parse_idmap("0:100000:65536") == IdMapping(0, 100000, 65536)
    for bad in ("0:1", "a:b:c", "0:1:0", "0:4294967295:2"):
        with pytest.raises(ConfigError, match="--uidmap"):
            parse_idmap(bad)


def test_overlapping_maps_are_refused() -> None:
    check_maps([IdMapping(0, 1000, 10), IdMapping(10, 2000, 10)])
    with pytest.raises(ConfigError, match="container side"):
        check_maps([IdMapping(0, 1000, 10), IdMapping(5, 2000, 10)])
    with pytest.raises(ConfigError, match="host side"):
        check_maps([IdMapping(0, 1000, 10), IdMapping(100, 1005, 10)])


def test_host_id_and_range() -> None:
    maps = (IdMapping(0, 1000, 10), IdMapping(10, 5000, 10))
    assert (host_id(maps, 0), host_id(maps, 12), host_id(maps, 20)) == (1000, 5002, None)
    assert range_of(maps) == (1000, 4010)


def test_the_maps_round_trip_through_the_config() -> None:
    maps = (IdMapping(0, AUTO_FIRST, AUTO_SIZE),)
    cfg = ContainerConfig("a" * 64, "n", "i", "r", ("l",), ("sh",), (), userns="auto",
                          uid_map=maps, gid_map=maps)  # fmt: skip
    back = ContainerConfig.from_json(cfg.to_json())
    assert back == cfg and back.in_userns


def test_file_allocator_hands_out_disjoint_ranges(tmp_path: Path) -> None:
    a = FileIdAllocator(tmp_path)
    first, second = a.reserve("a"), a.reserve("b")
    assert first == AUTO_FIRST and second == AUTO_FIRST + AUTO_SIZE
    assert a.reserve("a") == first  # the range it holds already
    a.release("a")
    assert a.reserve("c") == first  # the gap is reused
    with pytest.raises(ContainerError, match="taken by container b"):
        a.reserve_exact("d", second + 10, AUTO_SIZE)
    a.reserve_exact("b", second, AUTO_SIZE)  # its own: fine
    assert FileIdAllocator(tmp_path).held() == {"b": (second, AUTO_SIZE), "c": (first, AUTO_SIZE)}
