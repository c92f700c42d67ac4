"""runtime.poll: the one polling loop (no timing asserted, only results)."""

from __future__ import annotations

import asyncio
import itertools

from runtime.poll import await_for, wait_for


def test_returns_the_first_true_result() -> None:
    calls = itertools.count()
    assert wait_for(lambda: next(calls) >= 3 and "done", 30.0) == "done"


def test_a_time_out_returns_the_last_false_result() -> None:
    assert wait_for(list, 0.01) == []
    assert wait_for(lambda: 0, 0.0) == 0


def test_what_the_condition_raises_goes_to_the_caller() -> None:
    def boom() -> bool:
        raise KeyError("x")

    try:
        wait_for(boom, 30.0)
    except KeyError:
        pass
    else:
        raise AssertionError("the error was swallowed")


def test_the_async_twin() -> None:
    calls = itertools.count()
    assert asyncio.run(await_for(lambda: next(calls) >= 2, None)) is True
    assert asyncio.run(await_for(lambda: None, 0.01)) is None
