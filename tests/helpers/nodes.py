"""Two real node services on 127.0.0.1 for migration tests: started as subprocesses
(``jaula node serve``), each with its own state root, cgroup parent and keys; an operator
client (alice).  Everything is stopped and removed by :meth:`Cluster2.close`, which also
reports leaks (mounts, cgroups, processes) of the containers the nodes ever had."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.jaula import JAULA, REPO, Jaula
from tests.helpers.leaks import mounts_under
from tests.integration.cluster_setup import CGROUP_PREFIX, ClusterFiles, write_cluster

#: the environment variable naming the cluster-state backend of :func:`make_cluster`'s
#: clusters when a test does not choose (``files`` or ``etcd``)
STATE_ENV = "JAULA_TEST_STATE"
#: members of the etcd cluster behind an ``etcd`` cluster (issue 13: a 3-member etcd)
ETCD_MEMBERS = 3
#: run a test taking the ``nodes`` fixture once per cluster-state backend (``files``, and
#: ``etcd`` with 3 members); the tests that carry it are `make test`'s etcd subset
both_backends = pytest.mark.parametrize("nodes", ["files", "etcd"], indirect=True)


@dataclass
class Cluster2:
    files: ClusterFiles
    peer_timeout_s: float = 3.0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    seen_ids: set[str] = field(default_factory=set)
    #: the cluster-state backend, ``files`` or ``etcd`` (see :func:`make_cluster`)
    backend: str = "files"
    #: what stops the backend's etcd members (closed last by :meth:`close`)
    state_stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def state_root(self, node: str) -> Path:
        return self.files.root / "state" / node

    def scratch(self, node: str) -> list[Path]:
        """Where the node's sessions keep their transient files (tmpfs or state root)."""
        from migrate.scratch import scratch_dirs
        from runtime.container import Runtime

        return scratch_dirs(Runtime(self.state_root(node)))

    def incoming(self, node: str) -> list[Path]:
        """The node's unfinished incoming session dirs."""
        return [d for s in self.scratch(node) if s.is_dir() for d in s.glob("incoming-*")]

    def local(self, node: str) -> Jaula:
        """The node's runtime through the local CLI (``--state-root``)."""
        return Jaula(self.state_root(node))

    def start(self, node: str, env: dict[str, str] | None = None) -> None:
        """Start ``node``'s service (``env``: more environment for it) and wait until it
        answers."""
        log = open(self.files.root / f"{node}.log", "ab")  # noqa: SIM115 - owned by the proc
        p = subprocess.Popen(
            [
                *JAULA,
                "--log-level",
                "info",
                "node",
                "serve",
                "--config",
                str(self.files.nodes[node]),
                "--peer-timeout",
                str(self.peer_timeout_s),
            ],
            stdout=log,
            stderr=log,
            cwd=REPO,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        log.close()
        self.procs[node] = p
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._reachable(node):
                return
            if p.poll() is not None:
                raise AssertionError(f"{node} service died: {self.log(node)}")
            time.sleep(0.2)
        raise AssertionError(f"{node} service did not come up: {self.log(node)}")

    def _reachable(self, node: str) -> bool:
        return self.op("--node", node, "ps", check=False, timeout=30).returncode == 0

    def kill(self, node: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs.pop(node, None)
        if p is not None and p.poll() is None:
            os.kill(p.pid, sig)
            p.wait(timeout=20)

    def log(self, node: str) -> str:
        f = self.files.root / f"{node}.log"
        return f.read_text()[-3000:] if f.exists() else ""

    def op(
        self, *args: str, check: bool = True, timeout: float = 120, client: str = "alice"
    ) -> subprocess.CompletedProcess[str]:
        """The CLI as operator ``client`` (remote commands, migrate, node ls)."""
        p = subprocess.run(
            [*JAULA, "--client-config", str(self.files.clients[client]), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            check=False,
        )
        if check and p.returncode != 0:
            raise AssertionError(
                f"jaula {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n"
                f"{p.stderr}\nnode1: {self.log('node1')}\nnode2: "
                f"{self.log('node2')}"
            )
        return p

    def where(self, name: str) -> dict[str, str]:
        """node -> status of container ``name`` there (per the nodes' own state)."""
        out = {}
        for node in self.files.nodes:
            for c in json.loads(self.local(node).out("ps", "-a", "--format", "json")):
                self.seen_ids.add(c["Id"])
                if c["Name"] == name:
                    out[node] = c["Status"]
        return out

    def assert_only_on(self, name: str, node: str) -> None:
        """Container ``name`` runs on ``node`` and on no other node."""
        where = self.where(name)
        running = [n for n, s in where.items() if s == "running"]
        assert running == [node], f"{name} runs on {running}, expected only {node}: {where}"

    def close(self) -> list[str]:
        problems = []
        for node in list(self.procs):
            self.kill(node, signal.SIGTERM)
        for node in self.files.nodes:
            j = self.local(node)
            for cid in j.container_ids():
                self.seen_ids.add(cid)
                p = j.run("rm", "-f", cid, check=False)
                if p.returncode:
                    problems.append(f"{node}: rm -f {cid[:12]}: {p.stderr.strip()}")
        for m in mounts_under(self.files.root):
            problems.append(f"leaked mount {m}")
            subprocess.run(["umount", "-l", m], check=False)
        for cid in self.seen_ids:
            for d in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_PREFIX}-*/{cid}"):
                problems.append(f"leaked cgroup {d}")
        from migrate.hold import stale_hold_sockets
        from runtime.container import Runtime

        for node in self.files.nodes:
            for sock in stale_hold_sockets(Runtime(self.state_root(node)), set()):
                problems.append(f"{node}: hold socket left: {sock}")
                sock.unlink(missing_ok=True)
            for scratch in self.scratch(node):
                if scratch.is_dir():
                    left = list(scratch.iterdir())
                    if left:
                        problems.append(f"{node}: session files left in {scratch}: {left}")
                    if scratch.is_relative_to("/dev/shm"):
                        import shutil

                        shutil.rmtree(scratch, ignore_errors=True)
            for parent in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_PREFIX}-{node}"):
                try:
                    parent.rmdir()
                except OSError:
                    pass
        # the containers are gone (their ownership released): the etcd members may stop
        self.state_stack.close()
        return problems


@contextlib.contextmanager
def serving(c: Cluster2, *names: str) -> Iterator[Cluster2]:
    """Start ``names`` (default node1 and node2) and yield; at the end stop every service,
    remove every container and fail on anything left (mounts, cgroups, session files)."""
    try:
        for n in names or ("node1", "node2"):
            c.start(n)
        yield c
    finally:
        problems = c.close()
        assert not problems, "\n".join(problems)


def make_cluster(
    root: Path,
    busybox_layout: Path,
    peer_timeout_s: float = 3.0,
    import_on: tuple[str, ...] = ("node1", "node2"),
    nodes: tuple[str, ...] = ("node1", "node2"),
    operators: tuple[str, ...] = ("alice",),
    backend: str | None = None,
) -> Cluster2:
    """A cluster of ``nodes`` (two by default; the balancer's tests use three) and
    ``operators``, busybox imported on ``import_on``; no node service started.

    ``backend`` is the cluster-state backend: ``files`` (the cluster file has no
    ``[state]`` table: the embedded default) or ``etcd``: a real 3-member etcd on loopback
    (TLS, auth on, provisioned for ``nodes`` and ``operators``; :func:`tests.helpers.etcd.
    state_for`), started now and stopped by :meth:`Cluster2.close`, after the containers are
    removed.  None: ``$JAULA_TEST_STATE`` (``make test-etcd`` sets ``etcd``), else ``files``.
    Skips the test when etcd is wanted and not installed.  Raises ValueError for another
    name."""
    backend = backend or os.environ.get(STATE_ENV) or "files"
    if backend not in ("files", "etcd"):
        raise ValueError(f"{STATE_ENV}={backend!r}: the cluster-state backend is files or etcd")
    c = Cluster2(write_cluster(root, nodes, operators), peer_timeout_s, backend=backend)
    if backend == "etcd":
        from tests.helpers.etcd import ETCD, state_for

        if not os.access(ETCD, os.X_OK):
            pytest.skip("etcd not installed (make setup installs etcd-server)")
        c.state_stack.enter_context(
            state_for(root, "etcd", nodes, operators, members=ETCD_MEMBERS, ttl_s=2.0)
        )
    try:
        for node in import_on:
            c.local(node).run("image", "import", str(busybox_layout), "--name", "busybox:latest")
    except BaseException:
        c.state_stack.close()
        raise
    return c


@contextlib.contextmanager
def in_process_node(c: Cluster2, node: str, peer_timeout_s: float = 3.0) -> Iterator[None]:
    """Serve ``node`` from a thread of this process rather than a service process, so that
    a test can patch what it does (a fault that cannot be caused for real on demand); the
    service is cancelled and its thread joined on the way out, also on failure."""
    import asyncio
    import threading

    from migrate.node import NodeService

    loop = asyncio.new_event_loop()
    svc = NodeService(
        c.files.node_config(node), c.files.load_cluster(), peer_timeout_s=peer_timeout_s
    )
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        task = loop.create_task(svc.serve())
        loop.call_soon(started.set)
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    started.wait(10)
    try:
        yield
    finally:
        for task in asyncio.all_tasks(loop):
            loop.call_soon_threadsafe(task.cancel)
        t.join(20)
