"""``jaula exec`` runs its program in every namespace of the container's init, the time
namespace that CRIU restores into included: after a restore the init's CLOCK_MONOTONIC is
the one it had at the dump (CRIU offsets it in a new time namespace), and an exec'd process
must read the same clock, not the host's (issue 11, item 2).

The clock check is an ordering, not a timing bound: the exec'd probe reads its clock (e1),
asks the init for its own (SIGUSR1; the init writes it to a file), and reads its clock again
once the answer is there (e2).  In one time namespace e1 <= init <= e2, however slow the
machine; with the init's clock behind by the checkpoint's length (3 s here) the init's
reading falls before e1.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers.containers import wait_lines
from tests.helpers.exec_probe import INIT, assert_one_clock_and_namespaces, probe
from tests.helpers.jaula import Jaula
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


@pytest.fixture
def py(jaula: Jaula, python_image_layout: Path) -> Jaula:
    jaula.run("image", "import", str(python_image_layout), "--name", "jaula-python:latest")
    return jaula


def test_exec_reads_the_clock_of_pid_1_after_a_restore(py: Jaula) -> None:
    py.run("run", "-d", "--name", "clk", "jaula-python", "python3", "-c", INIT)
    wait_lines(py, "clk", r"^ready$")
    assert_one_clock_and_namespaces(probe(py, "clk"))
    py.run("checkpoint", "clk")
    # long enough that a restored clock behind by it is not confused with a slow exec
    time.sleep(3)
    py.run("restore", "clk")
    seen = probe(py, "clk")
    assert_one_clock_and_namespaces(seen)
