"""Waiting for a condition that nothing announces (a process gone, a file made, a cgroup
frozen): the one polling loop jaula uses, with a back-off from 1 ms so that a quick
condition costs almost nothing and a slow one little CPU.

Prefer an event where one exists (a pidfd, a pipe closing, an asyncio future); poll only
what the kernel or another process gives no notification of.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _next(interval: float, max_interval_s: float) -> float:
    return min(interval * 2, max_interval_s)


def wait_for(
    condition: Callable[[], T],
    timeout_s: float | None,
    max_interval_s: float = 0.05,
) -> T:
    """Call ``condition`` until it returns something true or ``timeout_s`` seconds have
    passed (None: no limit); returns its last result (false on a time-out: the caller
    decides what that means).

    The interval starts at 1 ms and doubles up to ``max_interval_s`` (seconds).  Whatever
    ``condition`` raises goes to the caller at once."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    interval = 0.001
    while True:
        result = condition()
        if result:
            return result
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return condition()
            time.sleep(min(interval, left))
        else:
            time.sleep(interval)
        interval = _next(interval, max_interval_s)


async def await_for(
    condition: Callable[[], T],
    timeout_s: float | None,
    max_interval_s: float = 0.05,
) -> T:
    """:func:`wait_for` for the event loop: sleeps with :func:`asyncio.sleep`."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    interval = 0.001
    while True:
        result = condition()
        if result:
            return result
        if deadline is not None:
            left = deadline - loop.time()
            if left <= 0:
                return condition()
            await asyncio.sleep(min(interval, left))
        else:
            await asyncio.sleep(interval)
        interval = _next(interval, max_interval_s)
