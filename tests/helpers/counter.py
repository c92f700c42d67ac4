"""The counter workload the checkpoint and migration tests use, and how they read it.

The container prints ``tick N`` every 50 ms and keeps N in ``/tmp/count``: after a
checkpoint or a migration, its log must hold every tick exactly once, in order (nothing
lost, nothing run twice), and the count must go on from where it was."""

from __future__ import annotations

import re
import time

from tests.helpers.jaula import Jaula

COUNTER = 'i=0; while true; do i=$((i+1)); echo $i > /tmp/count; echo "tick $i"; sleep 0.05; done'


def count(j: Jaula, ref: str) -> int:
    """The counter as the container sees it now."""
    return int(j.out("exec", ref, "cat", "/tmp/count"))


def ticks(j: Jaula, ref: str) -> list[int]:
    """Every ``tick N`` in the container's log, in order."""
    return [int(m) for m in re.findall(r"^tick (\d+)$", j.out("logs", ref), re.MULTILINE)]


def wait_ticks(j: Jaula, ref: str, n: int, timeout: float = 15) -> None:
    """Wait until the container has printed tick ``n``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = ticks(j, ref)
        if t and t[-1] >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{ref} did not reach tick {n}: {ticks(j, ref)[-3:]}")


def assert_continuous(t: list[int]) -> None:
    """Every tick once, in order: nothing lost, nothing run twice."""
    assert t == list(range(1, len(t) + 1)), f"a tick was lost or ran twice: {t}"
