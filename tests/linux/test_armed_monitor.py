"""An armed monitor (Runtime.arm / wait_armed / disarm): it is ready only once it has
loaded its restorer; one that dies first is reported, not waited for; a ready one is
called off cleanly.  Real monitor processes; no container is restored."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import syscalls as sc
from runtime.container import Runtime
from runtime.errors import ContainerError
from runtime.state import ContainerStatus, State, atomic_write_json

pytestmark = [pytest.mark.root]


@pytest.fixture
def incoming(tmp_path: Path) -> Iterator[tuple[Runtime, str]]:
    """A runtime with the directory of an incoming container (as a migration's
    destination makes it), removed at the end."""
    rt = Runtime(tmp_path / "root")
    cid = secrets.token_hex(32)
    rt.store.ensure()
    d = rt.store.create_dir(cid)
    atomic_write_json(
        d / "config.json",
        {
            "id": cid,
            "name": "armed",
            "image_id": "x",
            "image_ref": "x",
            "layers": [],
            "args": ["true"],
            "env": [],
        },
    )
    atomic_write_json(d / "state.json", State(status=ContainerStatus.MIGRATING).to_json())
    yield rt, cid


def test_ready_then_called_off(incoming: tuple[Runtime, str]) -> None:
    rt, cid = incoming
    armed = rt.arm(cid, "migrate.restorer:criu_restorer", "{}")
    try:
        rt.wait_armed(armed, timeout_s=60)
        assert (Path(armed.fifo).parent / "armed").exists()
        assert sc.is_alive(armed.mon_pid, armed.mon_start)
    finally:
        rt.disarm(armed)
    assert not sc.is_alive(armed.mon_pid, armed.mon_start)


def test_a_monitor_that_dies_before_it_is_ready_is_reported(incoming: tuple[Runtime, str]) -> None:
    rt, cid = incoming
    armed = rt.arm(cid, "no_such_module_here:restore", "{}")  # its import fails
    with pytest.raises(ContainerError, match="died before it was ready"):
        rt.wait_armed(armed, timeout_s=60)
    assert not (Path(armed.fifo).parent / "armed").exists()
