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

import json
import time
from pathlib import Path

import pytest

from tests.linux.conftest import Jaula, needs_criu
from tests.linux.test_cases import wait_lines

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]

#: The container init: answers SIGUSR1 by writing its CLOCK_MONOTONIC to /tmp/mono.
INIT = """
import os, signal, time
def answer(*_):
    with open('/tmp/mono.tmp', 'w') as f:
        f.write(repr(time.clock_gettime(time.CLOCK_MONOTONIC)))
    os.rename('/tmp/mono.tmp', '/tmp/mono')
signal.signal(signal.SIGUSR1, answer)
print('ready', flush=True)
while True:
    time.sleep(1)
"""

#: The exec'd probe: its namespaces and pid 1's, and the bracketed clock readings.
PROBE = """
import json, os, signal, time
NS = ('cgroup', 'ipc', 'mnt', 'net', 'pid', 'time', 'user', 'uts')
try:
    os.unlink('/tmp/mono')
except FileNotFoundError:
    pass
e1 = time.clock_gettime(time.CLOCK_MONOTONIC)
os.kill(1, signal.SIGUSR1)
for _ in range(6000):  # up to a minute: progress, not a bound
    if os.path.exists('/tmp/mono'):
        break
    time.sleep(0.01)
e2 = time.clock_gettime(time.CLOCK_MONOTONIC)
with open('/tmp/mono') as f:
    init = float(f.read())
print(json.dumps({
    'e1': e1, 'init': init, 'e2': e2,
    'self': {n: os.readlink(f'/proc/self/ns/{n}') for n in NS},
    'pid1': {n: os.readlink(f'/proc/1/ns/{n}') for n in NS},
}))
"""


def probe(j: Jaula, ref: str) -> dict:
    """Run :data:`PROBE` with ``jaula exec`` in ``ref`` and return what it printed."""
    return json.loads(j.out("exec", ref, "python3", "-c", PROBE))


def assert_one_clock_and_namespaces(seen: dict) -> None:
    """The exec'd process is in pid 1's namespaces and reads pid 1's CLOCK_MONOTONIC."""
    assert seen["e1"] <= seen["init"] <= seen["e2"], (
        f"CLOCK_MONOTONIC differs between pid 1 ({seen['init']:.3f} s) and an exec'd "
        f"process ({seen['e1']:.3f} .. {seen['e2']:.3f} s)"
    )
    assert seen["self"] == seen["pid1"], (
        "the exec'd process is not in the namespaces of the container's init: "
        + ", ".join(n for n in seen["self"] if seen["self"][n] != seen["pid1"][n])
    )


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
