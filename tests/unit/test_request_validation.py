"""Issue 15, item 5: what the node service's schema check refuses, each with a one-line
error naming the field (no root: the checks are in migrate.protocol)."""

from __future__ import annotations

import msgpack
import pytest

from migrate.errors import ProtocolError
from migrate.protocol import decode, encode, request_id

RID = "0123456789abcdef-1"


def _frames(**msg: object) -> list[bytes]:
    return [msgpack.packb({"v": 1, **msg}, use_bin_type=True)]


@pytest.mark.parametrize(
    ("msg", "why"),
    [
        (
            {"type": "exec", "id": RID, "container": "c", "args": ["sh", "a\0b"]},
            r"exec\.args: item 1 contains a NUL",
        ),
        (
            {"type": "exec", "id": RID, "container": "c", "args": [1, {}, None]},
            r"exec\.args: item 0 is int",
        ),
        (
            {"type": "exec", "id": RID, "container": "c", "args": []},
            r"exec\.args: needs at least 1",
        ),
        (
            {"type": "exec", "id": RID, "container": "c", "args": ["true"], "env": [7]},
            r"exec\.env: item 0 is int",
        ),
        (
            {
                "type": "exec",
                "id": RID,
                "container": "c",
                "args": ["true"],
                "env": ["A=1", "nokey"],
            },
            r"exec\.env: item 1 'nokey' is not NAME=VALUE",
        ),
        (
            {"type": "exec", "id": RID, "container": "c\0x", "args": ["true"]},
            r"exec\.container: contains a NUL",
        ),
        ({"type": "logs", "container": "c", "tail": -1}, r"logs\.tail: -1 is out of range"),
        ({"type": "logs", "container": "c", "tail": 2**63 - 1}, r"logs\.tail: .* out of range"),
        ({"type": "logs", "container": "c", "tail": -(2**63)}, r"logs\.tail: .* out of range"),
        (
            {"type": "stop", "id": RID, "container": "c", "timeout_s": float("nan")},
            r"stop\.timeout_s: nan is out of range",
        ),
        ({"type": "stop", "id": RID, "container": "c", "timeout_s": -5}, r"stop\.timeout_s"),
        ({"type": "rm", "container": "c"}, r"rm\.id: a rm request needs a unique string id"),
        (
            {"type": "rm", "id": 1, "container": "c"},
            r"rm\.id: a rm request needs a unique string id",
        ),
        ({"type": "migrate", "id": "short", "container": "c", "destination": "n"}, r"migrate\.id"),
        ({"type": "ps", "id": True}, r"ps\.id: must be an int or a string"),
    ],
)
def test_hostile_requests_are_refused_naming_the_field(msg: dict[str, object], why: str) -> None:
    with pytest.raises(ProtocolError, match=why) as e:
        decode(_frames(**msg))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("v", [1.0, True, "1"])
def test_the_version_must_be_the_integer_1(v: object) -> None:
    with pytest.raises(ProtocolError, match="protocol version"):
        decode([msgpack.packb({"v": v, "type": "ping"})])


def test_valid_requests_still_pass_and_errors_find_their_request() -> None:
    msg, _ = decode(encode("exec", id=RID, container="c", args=["sh", "-c", "x"], env=["A=1"]))
    assert msg["args"] == ["sh", "-c", "x"]
    assert decode(encode("logs", container="c", tail=10))[0]["tail"] == 10
    bad = _frames(type="exec", id=RID, container="c", args=[1])
    assert request_id(bad) == RID and request_id([b"\xc1junk"]) is None
