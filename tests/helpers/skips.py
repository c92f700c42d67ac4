"""Skip marks for tests that need what not every host has, each saying why it skips."""

from __future__ import annotations

import functools
import os

import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)")


@functools.cache
def criu_works() -> str | None:
    """None when CRIU and pycriu are usable here, else the reason to skip (asked once)."""
    try:
        from migrate import criu

        criu.require()
    except Exception as e:  # noqa: BLE001 - any failure is a reason to skip
        return f"CRIU unavailable: {e}"
    return None


needs_criu = pytest.mark.skipif(criu_works() is not None, reason=str(criu_works()))
