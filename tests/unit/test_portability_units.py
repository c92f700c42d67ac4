"""migrate.portability without root: the offer's ``needs`` field, volume identities, the
/proc parsers, and ``-v`` options."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from migrate.errors import PreflightError, ProtocolError
from migrate.portability import (
    BoundSocket,
    NodeNeeds,
    PrivateMapping,
    _hex_address,
    check_volumes,
    identify,
)
from migrate.protocol import decode, encode
from runtime.errors import ConfigError
from runtime.spec import parse_volume


def test_needs_round_trip_through_the_offer(tmp_path: Path) -> None:
    needs = NodeNeeds(
        volumes=(identify(str(tmp_path), "/data", str(tmp_path)),),
        sockets=(BoundSocket("::1", 8080, True, 7, "srv"),),
        largest_mapping=PrivateMapping(7, "srv", "7f00", 1 << 38),
        private_bytes=1 << 39,
    )
    frames = encode("offer", session="s", container={}, image={}, criu_version=[4, 2],
                    needs=needs.to_json())  # fmt: skip
    msg, _ = decode(frames)
    assert NodeNeeds.from_json(msg["needs"]) == needs
    assert NodeNeeds.from_json({}) == NodeNeeds()


def test_malformed_needs_are_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="offer.needs"):
        NodeNeeds.from_json({"volumes": [{"destination": "/x"}]})


def test_a_volume_is_the_same_only_as_itself(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    ia = identify(str(a), "/data", str(a))
    assert ia.same_file(identify(str(a)))
    assert not ia.same_file(identify(str(b)))
    check_volumes([ia], "c", "n1", "n2")  # the same directory: fine
    with pytest.raises(PreflightError, match=r"not the directory .* `-v HOST:CTR:shared`"):
        check_volumes([replace(ia, source=str(b))], "c", "n1", "n2")
    check_volumes([replace(ia, source=str(b), shared=True)], "c", "n1", "n2")
    with pytest.raises(PreflightError, match="does not exist on n2"):
        check_volumes([replace(ia, source=str(tmp_path / "gone"), shared=True)], "c", "n1", "n2")
    (tmp_path / "f").write_text("")
    with pytest.raises(PreflightError, match="declared shared, but on n2 it is a file"):
        check_volumes([replace(ia, source=str(tmp_path / "f"), shared=True)], "c", "n1", "n2")


def test_proc_net_tcp_addresses() -> None:
    assert _hex_address("0100007F:1F90") == ("127.0.0.1", 8080)
    assert _hex_address("00000000000000000000000001000000:0050") == ("::1", 80)


def test_volume_options(tmp_path: Path) -> None:
    m = parse_volume(f"{tmp_path}:/data:ro,shared")
    assert (m.readonly, m.shared) == (True, True)
    assert parse_volume(f"{tmp_path}:/data").shared is False
    with pytest.raises(ConfigError, match="ro or rw, and shared"):
        parse_volume(f"{tmp_path}:/data:ro,rw")
