"""A container whose dump CRIU refuses, and the CRIU log an error quotes (issue 11, item
9), shared by the local and the migration test of kept logs."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers.counter import COUNTER

#: a deleted-but-open file larger than the ghost limit (64 MiB): CRIU refuses to dump it
GHOST = "head -c 80000000 /dev/zero > /tmp/big; exec 3</tmp/big; rm /tmp/big; " + COUNTER


def quoted_log(stderr: str) -> Path:
    """The log path a CriuError quotes (``criu log (PATH): ...``)."""
    m = re.search(r"criu log \((/[^)]+)\)", stderr)
    assert m, f"the error quotes no CRIU log: {stderr}"
    return Path(m.group(1))
