"""The balancer's integration helpers: a balancer config file, ``jaula balancer run`` as a
subprocess (stopped, and its output kept, on the way out), the cluster state's events, and
the CPU-burning workload.  Waits are bounded polls (:func:`tests.helpers.containers.wait_for`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrate.cluster_state import ClusterState, Event, open_state
from runtime.poll import wait_for
from tests.helpers.jaula import REPO
from tests.helpers.nodes import Cluster2

#: the jaula CLI with every layer's commands (``balancer`` included)
JAULA_ALL = [sys.executable, "-m", "balancer.cli"]

#: a bounded CPU burner (a shell busy loop; run it with --cpus so it takes half a core)
BURN = "while :; do :; done"
IDLE = "while :; do sleep 1; done"
#: a CPU burner that counts: ``tick N`` every 5000 turns of its busy loop (read it with
#: :func:`tests.helpers.counter.ticks`: every tick once, in order, across a move)
BUSY_COUNTER = (
    'i=0; while :; do i=$((i+1)); [ $((i % 5000)) -eq 0 ] && echo "tick $((i / 5000))"; done'
)

#: a CPU burst of about four seconds, then idle (the brief spike: shorter than a long hold)
BURST = (
    "end=$(($(date +%s) + 4)); while [ $(date +%s) -lt $end ]; do :; done; "
    "while :; do sleep 1; done"
)


def big_busy(mib: int) -> str:
    """A counting burner that first writes ``mib`` MB of random data into its upper dir, so
    that its move lasts long enough to break it in the middle."""
    return f"head -c {mib}000000 /dev/urandom > /big; {BUSY_COUNTER}"


#: a fast, test-sized policy: 1 s rounds, a hold of 2, nodes judged by their containers
#: (all nodes share this host), cold moves only, long cool-downs (nothing moves twice)
FAST = {
    "interval_s": 1.0,
    "hold_rounds": 2,
    "load_from": "containers",
    "strategies": ["cold"],
    "cooldown_s": 3600.0,
    "cooldown_max_s": 3600.0,
    "memory_reserve_bytes": 0,
}


def write_config(path: Path, **overrides: Any) -> Path:
    """A ``[balancer]`` TOML file of :data:`FAST` with ``overrides``."""
    import tomli_w

    path.write_text(tomli_w.dumps({"balancer": {**FAST, **overrides}}))
    return path


def state_of(c: Cluster2, who: str = "alice") -> ClusterState:
    """The cluster's state store (files backend), opened as operator ``who``."""
    return open_state(c.files.load_cluster(), who)


def events(c: Cluster2, kind_prefix: str = "balancer.") -> list[Event]:
    """Every event whose kind starts with ``kind_prefix``, oldest first."""
    st = state_of(c)
    try:
        return [e for e in st.events_since(0, 1_000_000) if e.kind.startswith(kind_prefix)]
    finally:
        st.close()


def register(c: Cluster2, *nodes: str) -> None:
    """Register ``nodes`` as members for an hour: what their services do at start once
    the cluster-state wiring lands (``jaula node drain`` needs a registered member)."""
    st = state_of(c)
    try:
        for n in nodes:
            st.register(n, ttl_s=3600.0)
    finally:
        st.close()


@dataclass
class Daemons:
    """``jaula balancer run`` processes started by a test (by operator name)."""

    c: Cluster2
    config: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log_path(self, who: str) -> Path:
        return self.c.files.root / f"balancer-{who}.log"

    def start(self, who: str = "alice", *extra: str) -> None:
        log = open(self.log_path(who), "ab")  # noqa: SIM115 - owned by the process
        self.procs[who] = subprocess.Popen(
            [
                *JAULA_ALL,
                "--client-config",
                str(self.c.files.clients[who]),
                "--log-level",
                "info",
                "balancer",
                "run",
                "--config",
                str(self.config),
                *extra,
            ],
            stdout=log,
            stderr=log,
            cwd=REPO,
            start_new_session=True,
        )
        log.close()

    def kill(self, who: str, sig: int = signal.SIGTERM) -> None:
        p = self.procs.pop(who, None)
        if p is not None and p.poll() is None:
            os.kill(p.pid, sig)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=10)

    def log(self, who: str) -> str:
        f = self.log_path(who)
        return f.read_text()[-4000:] if f.exists() else ""

    def alive(self, who: str) -> bool:
        p = self.procs.get(who)
        return p is not None and p.poll() is None


@contextlib.contextmanager
def balancers(c: Cluster2, config: Path) -> Iterator[Daemons]:
    """Yield a :class:`Daemons`; every daemon it started is stopped at the end."""
    d = Daemons(c, config)
    try:
        yield d
    finally:
        for who in list(d.procs):
            d.kill(who)


def op_all(c: Cluster2, *args: str, who: str = "alice") -> subprocess.CompletedProcess[str]:
    """``jaula`` with every command, as operator ``who``; AssertionError when it fails."""
    p = subprocess.run(
        [*JAULA_ALL, "--client-config", str(c.files.clients[who]), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    if p.returncode != 0:
        raise AssertionError(f"jaula {' '.join(args)} exited {p.returncode}:\n{p.stdout}{p.stderr}")
    return p


def wait_receiving(c: Cluster2, nodes: tuple[str, ...], min_bytes: int, timeout_s: float) -> str:
    """The first of ``nodes`` whose unfinished incoming session has received at least
    ``min_bytes`` of the rootfs (the source is in its transfer); polled every 20 ms at most.

    Raises:
        AssertionError: none did within ``timeout_s``.
    """

    def receiving() -> str | None:
        for n in nodes:
            for f in (d / "rootfs-base.tar" for d in c.incoming(n)):
                with contextlib.suppress(OSError):
                    if f.stat().st_size >= min_bytes:
                        return n
        return None

    if got := wait_for(receiving, timeout_s, max_interval_s=0.02):
        return got
    raise AssertionError(f"no transfer into {nodes} within {timeout_s:g} s")


def running_on(c: Cluster2, name: str) -> list[str]:
    """The nodes where container ``name`` is running."""
    return [n for n, s in c.where(name).items() if s == "running"]
