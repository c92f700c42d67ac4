"""Waiting for a condition that nothing announces (a process gone, a file made, a cgroup
frozen): the one polling loop jaula uses, with a back-off from 1 ms so that a quick
condition costs almost nothing and a slow one little CPU.

Prefer an event where one exists (a pidfd, a pipe closing, an asyncio future); poll only
what the kernel or another process gives no notification of.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


def _pauses(timeout_s: float | None, max_interval_s: float) -> Iterator[float]:
    """Seconds to sleep between two looks: from 1 ms, doubling up to ``max_interval_s``,
    never past the deadline; ends when ``timeout_s`` (None: never) has passed."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    interval = 0.001
    while True:
        if deadline is None:
            yield interval
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            yield min(interval, left)
        interval = min(interval * 2, max_interval_s)


def wait_for(
    condition: Callable[[], T], timeout_s: float | None, max_interval_s: float = 0.05
) -> T:
    """Call ``condition`` until it returns something true or ``timeout_s`` seconds have
    passed (None: no limit); returns its last result (false on a time-out: the caller
    decides what that means).  Whatever ``condition`` raises goes to the caller at once."""
    for pause in _pauses(timeout_s, max_interval_s):
        if result := condition():
            return result
        time.sleep(pause)
    return condition()


async def await_for(
    condition: Callable[[], T], timeout_s: float | None, max_interval_s: float = 0.05
) -> T:
    """:func:`wait_for` for the event loop: sleeps with :func:`asyncio.sleep`."""
    for pause in _pauses(timeout_s, max_interval_s):
        if result := condition():
            return result
        await asyncio.sleep(pause)
    return condition()
