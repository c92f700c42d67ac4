"""Helpers for fault tests with real node services: a container big enough that a
migration lasts long enough to break it in the middle, a migration run in the background,
waiting until the transfer is under way, and checking that the container continues on one
node (the two-outcome rule: it runs on exactly one node, its counter intact)."""

from __future__ import annotations

import subprocess
import time

from tests.helpers.counter import COUNTER, assert_continuous, ticks, wait_ticks
from tests.helpers.jaula import JAULA, REPO, Jaula
from tests.helpers.nodes import Cluster2


def big_container(j: Jaula, name: str, mib: int = 300) -> None:
    """Run ``name`` (the counter) with ``mib`` MB of random data in its upperdir: the
    pre-copy then lasts long enough to break things in the middle."""
    j.run(
        "run",
        "-d",
        "--name",
        name,
        "busybox",
        "sh",
        "-c",
        f"head -c {mib}000000 /dev/urandom > /big; " + COUNTER,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not ticks(j, name):
        time.sleep(0.1)


def migrate_async(
    nodes: Cluster2, name: str, dest: str, *extra: str, client: str = "alice"
) -> subprocess.Popen[str]:
    """``jaula migrate NAME DEST`` as a background process (stdout, stderr piped)."""
    return subprocess.Popen(
        [
            *JAULA,
            "--client-config",
            str(nodes.files.clients[client]),
            "migrate",
            name,
            dest,
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def wait_incoming(nodes: Cluster2, dest: str, min_bytes: int = 20 << 20) -> None:
    """Until ``dest`` has received ``min_bytes`` of the rootfs of an incoming session."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for f in (p / "rootfs-base.tar" for p in nodes.incoming(dest)):
            if f.exists() and f.stat().st_size >= min_bytes:
                return
        time.sleep(0.02)
    raise AssertionError("the transfer never started")


def continues_on(nodes: Cluster2, name: str, node: str) -> None:
    """``name`` runs on ``node`` only, and its counter goes on without gap or repeat."""
    j = nodes.local(node)
    nodes.assert_only_on(name, node)
    n = ticks(j, name)[-1]
    wait_ticks(j, name, n + 5)
    assert_continuous(ticks(j, name))
