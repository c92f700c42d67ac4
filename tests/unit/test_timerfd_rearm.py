"""migrate.criu.rearm_expired_timerfds on CRIU files.img entries written with pycriu:
periodic timers caught expired (ticks pending) or expiring (the tick not counted yet) get
one interval to fire again; running and disarmed timers are left as they are."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from migrate import criu

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pycriu") is None, reason="pycriu not installed"
)
MS50 = 50_000_000


def _tfd(i: int, value_ns: int, interval_ns: int, ticks: int) -> dict[str, Any]:
    return {
        "type": "TIMERFD",
        "id": i,
        "tfd": {
            "id": i,
            "flags": 2048,
            "fown": {"uid": 0, "euid": 0, "signum": 0, "pid_type": 0, "pid": 0},
            "clockid": 1,
            "ticks": ticks,
            "settime_flags": 0,
            "vsec": 0,
            "vnsec": value_ns,
            "isec": 0,
            "insec": interval_ns,
        },
    }


def _roundtrip(tmp_path: Path, entries: list[dict[str, Any]]) -> tuple[int, list[Any]]:
    from pycriu import images

    with open(tmp_path / "files.img", "wb") as f:
        images.dump({"magic": "FILES", "entries": entries}, f)
    n = criu.rearm_expired_timerfds(tmp_path)
    with open(tmp_path / "files.img", "rb") as f:
        return n, [e["tfd"] for e in images.load(f)["entries"]]


def test_expired_and_expiring_periodic_timers_fire_again(tmp_path: Path) -> None:
    n, out = _roundtrip(
        tmp_path,
        [
            _tfd(1, 0, MS50, 2),  # expired twice, unread (CRIU issue 3162)
            _tfd(2, 0, MS50, 0),  # at its expiry, the tick not counted yet
            _tfd(3, 20_000_000, MS50, 0),  # running: 20 ms to go
            _tfd(4, 0, 0, 0),  # disarmed
            _tfd(5, 30_000_000, 0, 0),  # one-shot, running
        ],
    )
    assert n == 2
    by_id = {t["id"]: t for t in out}
    assert (by_id[1]["vnsec"], by_id[1]["ticks"]) == (MS50, 2)
    assert (by_id[2]["vnsec"], by_id[2]["ticks"]) == (MS50, 1)
    assert (by_id[3]["vnsec"], by_id[3]["ticks"]) == (20_000_000, 0)
    assert (by_id[4].get("vnsec", 0), by_id[4].get("insec", 0)) == (0, 0)
    assert by_id[5]["vnsec"] == 30_000_000


def test_nothing_to_fix_leaves_the_file_alone(tmp_path: Path) -> None:
    n, _ = _roundtrip(tmp_path, [_tfd(3, 20_000_000, MS50, 0)])
    assert n == 0
