"""The clock-and-namespaces probe of ``jaula exec`` (issue 11, item 2), shared by the
restore test (tests/linux/test_exec_namespaces.py) and the migration one
(tests/integration/test_exec_after_migration.py)."""

from __future__ import annotations

import json

from tests.helpers.jaula import Jaula

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
