"""What a container needs of its destination is checked there before anything freezes
(issue 11, items 1, 5, 8): its volumes, the ports it holds in the host's network, the
private mappings CRIU will map at restore.  Two real node services on this host; each
refusal names the object, and the container keeps running untouched on its source (every
tick once)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.poll import wait_for
from tests.helpers.counter import COUNTER, assert_continuous, ticks, wait_ticks
from tests.helpers.nodes import Cluster2, make_cluster, serving
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]

PY_IMAGE = "jaula-python:latest"


@pytest.fixture
def pynodes(
    tmp_path: Path, busybox_image_layout: Path, python_image_layout: Path
) -> Iterator[Cluster2]:
    """node1 and node2 serving, busybox and the python image on both."""
    c = make_cluster(tmp_path / "cluster", busybox_image_layout)
    for node in ("node1", "node2"):
        c.local(node).run("image", "import", str(python_image_layout), "--name", PY_IMAGE)
    with serving(c) as c:
        yield c


def _refused_and_still_on_node1(nodes: Cluster2, name: str, *needles: str) -> str:
    """``migrate name node2`` is refused with one line holding ``needles``; the container
    runs on node1 only, every tick once.  Returns the message."""
    n1 = nodes.local("node1")
    before = ticks(n1, name)[-1]
    p = nodes.op("migrate", name, "node2", check=False, timeout=180)
    assert p.returncode == 125, f"the migration was not refused: {p.stdout}{p.stderr}"
    msg = p.stderr.strip()
    assert len(msg.splitlines()) == 1, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    assert "nothing was frozen" in msg, msg
    nodes.assert_only_on(name, "node1")
    wait_ticks(n1, name, before + 5)
    assert_continuous(ticks(n1, name))
    assert nodes.local("node2").container_ids() == []
    return msg


def test_a_local_volume_that_is_another_directory_on_the_destination_is_refused(
    nodes: Cluster2, tmp_path: Path
) -> None:
    """Item 1: the destination's HOST path names another (empty) directory than the one
    the container has mounted: refused, naming the volume (it used to migrate, and the
    workload wrote into the wrong directory)."""
    vol = tmp_path / "vol"
    vol.mkdir()
    n1 = nodes.local("node1")
    n1.run("run", "-d", "--name", "cv", "-v", f"{vol}:/data", "busybox", "sh", "-c",
           f"echo kept > /data/mine; {COUNTER}")  # fmt: skip
    wait_ticks(n1, "cv", 3)
    vol.rename(tmp_path / "vol-on-node1")  # what node2 sees at that path: another directory
    vol.mkdir()
    _refused_and_still_on_node1(nodes, "cv", str(vol), "/data", "-v HOST:CTR:shared")
    assert (tmp_path / "vol-on-node1" / "mine").read_text() == "kept\n"
    assert list(vol.iterdir()) == []


def test_a_shared_volume_needs_only_its_path_on_the_destination(
    nodes: Cluster2, tmp_path: Path
) -> None:
    """Item 1: a volume declared shared (``:shared``) is refused only when its path is
    missing on the destination; once there, the container migrates and uses it."""
    vol = tmp_path / "shared"
    vol.mkdir()
    n1 = nodes.local("node1")
    n1.run("run", "-d", "--name", "sv", "-v", f"{vol}:/data:shared", "busybox", "sh", "-c",
           f"echo $$ > /data/pid; {COUNTER}")  # fmt: skip
    wait_ticks(n1, "sv", 3)
    vol.rename(tmp_path / "shared-elsewhere")
    _refused_and_still_on_node1(nodes, "sv", str(vol), "does not exist on node2")
    vol.mkdir()  # the shared storage, mounted on node2 at last
    nodes.op("migrate", "sv", "node2", timeout=180)
    n2 = nodes.local("node2")
    nodes.assert_only_on("sv", "node2")
    n = ticks(n2, "sv")[-1]
    wait_ticks(n2, "sv", n + 3)
    assert_continuous(ticks(n2, "sv"))
    n2.run("exec", "sv", "sh", "-c", "echo moved > /data/here")
    assert (vol / "here").read_text() == "moved\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _taken(port: int) -> bool:
    """Whether 127.0.0.1:port is bound (probed without connecting: a connection never
    accepted would be one more thing for CRIU to refuse)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_a_port_taken_on_the_destination_is_refused_naming_it(pynodes: Cluster2) -> None:
    """Item 5: a ``--network host`` container listening on a port the destination has
    taken (on this host: by the container itself) is refused before the freeze, naming
    address:port (it used to fail the restore, after the freeze)."""
    port = _free_port()
    listener = (
        "import socket, time\n"
        "s = socket.socket()\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('127.0.0.1', {port})); s.listen()\n"
        "while True: time.sleep(1)\n"
    )
    n1 = pynodes.local("node1")
    n1.run("run", "-d", "--name", "hp", "--network", "host", PY_IMAGE, "sh", "-c",
           f"python3 -c \"{listener}\" & {COUNTER}")  # fmt: skip
    wait_ticks(n1, "hp", 3)
    assert wait_for(lambda: _taken(port), 15), "the container did not listen"
    _refused_and_still_on_node1(pynodes, "hp", f"127.0.0.1:{port}", "taken on node2")


RESERVATION = (
    "import mmap, os, time\n"
    "m = mmap.mmap(-1, 256 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=0)\n"
    "if os.fork() == 0:\n"
    "    time.sleep(100000)\n"
    "while True: time.sleep(1)\n"
)


def test_a_reservation_the_destination_cannot_map_is_refused_naming_its_size(
    pynodes: Cluster2,
) -> None:
    """Item 8: a 256 GiB PROT_NONE private reservation plus a fork.  The source never
    charged it; CRIU maps it writable at restore, which this node's overcommit policy
    refuses (vm.overcommit_memory 0: one mapping over RAM plus swap).  Refused before the
    freeze, naming the size (it used to fail the restore: "Unable to map ANON_VMA")."""
    mode = int(Path("/proc/sys/vm/overcommit_memory").read_text())
    if mode == 1:
        pytest.skip("vm.overcommit_memory is 1 here: any mapping can be restored")
    n1 = pynodes.local("node1")
    n1.run("run", "-d", "--name", "rv", PY_IMAGE, "sh", "-c",
           f"python3 -c \"{RESERVATION}\" & {COUNTER}")  # fmt: skip
    wait_ticks(n1, "rv", 3)
    _refused_and_still_on_node1(pynodes, "rv", "256.0 GiB", "vm.overcommit_memory")
