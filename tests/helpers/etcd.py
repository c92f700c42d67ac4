"""Real etcd members on 127.0.0.1 for the cluster-state tests and the benchmark.

:class:`EtcdCluster` starts 1 or 3 members of Debian's ``etcd`` (3.4) with TLS everywhere:
clients need a certificate of the test CA (``--client-cert-auth``), members talk to each
other with theirs (``--peer-client-cert-auth``).  Ports are free ones of 127.0.0.1, data
dirs live under the given directory, logs in ``DIR/member-N.log``.  Only the processes it
started are ever signalled (kept as :class:`subprocess.Popen` objects), and :meth:`close`
kills what still runs.

:func:`state_cluster` builds what a test needs around it: a cluster directory (``jaula
cluster init`` with nodes node1..node3 and operator admin), the PKI (CA, member and client
certificates, :mod:`migrate.cluster_state.pki`), the ``[state]`` table, the members
started and provisioned (users, roles, auth on).  With ``backend="files"`` only the cluster
directory is made.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import tomli_w

from migrate import keys
from migrate.cluster_init import init_cluster, plan_endpoints
from migrate.cluster_state import ClusterState, open_state
from migrate.cluster_state import etcd as etcd_backend
from migrate.cluster_state.pki import CertFiles, issue_client, issue_member, make_ca
from migrate.config import Cluster, load_cluster
from runtime.poll import wait_for

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
NODES = ("node1", "node2", "node3")
ADMIN = "admin"
#: raft timing for tests: quick elections on loopback (etcd's minimum lease TTL is then
#: 1.5 * election timeout = 1.5 s)
HEARTBEAT_MS = 100
ELECTION_MS = 1000

needs_etcd = pytest.mark.skipif(
    not os.access(ETCD, os.X_OK), reason="etcd not installed (make setup installs etcd-server)"
)


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Member:
    """One etcd member and the process running it (None while stopped)."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    certs: CertFiles
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"https://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"https://127.0.0.1:{self.peer_port}"


@dataclass
class EtcdCluster:
    """``size`` etcd members under ``root`` (see the module docstring)."""

    root: Path
    size: int
    ca: CertFiles
    probe: CertFiles  # a client certificate for the health checks
    members: list[Member] = field(default_factory=list)

    @classmethod
    def make(cls, root: Path, size: int, ca: CertFiles, probe: CertFiles) -> EtcdCluster:
        ports = free_ports(2 * size)
        c = cls(root, size, ca, probe)
        for i in range(size):
            name = f"m{i}"
            c.members.append(
                Member(
                    name,
                    ports[2 * i],
                    ports[2 * i + 1],
                    root / f"{name}.etcd",
                    root / f"member-{i}.log",
                    issue_member(ca, root / "pki", name, ["127.0.0.1", "localhost"]),
                )
            )
        return c

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def _argv(self, m: Member) -> list[str]:
        initial = ",".join(f"{o.name}={o.peer_url}" for o in self.members)
        return [
            ETCD,
            f"--name={m.name}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls={m.client_url}",
            f"--advertise-client-urls={m.client_url}",
            f"--listen-peer-urls={m.peer_url}",
            f"--initial-advertise-peer-urls={m.peer_url}",
            f"--initial-cluster={initial}",
            f"--initial-cluster-token=jaula-test-{os.getpid()}-{self.members[0].peer_port}",
            "--initial-cluster-state=new",
            "--client-cert-auth",
            f"--trusted-ca-file={self.ca.cert}",
            f"--cert-file={m.certs.cert}",
            f"--key-file={m.certs.key}",
            "--peer-client-cert-auth",
            f"--peer-trusted-ca-file={self.ca.cert}",
            f"--peer-cert-file={m.certs.cert}",
            f"--peer-key-file={m.certs.key}",
            f"--heartbeat-interval={HEARTBEAT_MS}",
            f"--election-timeout={ELECTION_MS}",
            "--logger=zap",
            "--log-outputs=stderr",
        ]

    def start(self, i: int | None = None, wait: bool = True) -> None:
        """Start member ``i`` (None: every stopped one); with ``wait``, until the cluster
        has a leader seen by every running member."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        for m in self.members if i is None else [self.members[i]]:
            if m.proc is not None and m.proc.poll() is None:
                continue
            with open(m.log, "ab") as log:
                m.proc = subprocess.Popen(
                    self._argv(m),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                )
        if wait:
            self.wait_healthy()

    def running(self) -> list[Member]:
        return [m for m in self.members if m.proc is not None and m.proc.poll() is None]

    def status(self, m: Member, timeout_s: float = 1.0) -> dict | None:
        """The member's /v3/maintenance/status reply, or None when it does not answer."""
        session = requests.Session()
        session.trust_env = False  # no proxy, no CA bundle from the environment
        try:
            r = session.post(
                m.client_url + "/v3/maintenance/status",
                json={},
                verify=str(self.ca.cert),
                cert=(str(self.probe.cert), str(self.probe.key)),
                timeout=timeout_s,
            )
        except requests.RequestException:
            return None
        finally:
            session.close()
        return r.json() if r.status_code == 200 else None

    def leader(self) -> Member | None:
        """The member that leads now (as the running members report), or None."""
        for m in self.running():
            st = self.status(m)
            if st and int(st.get("leader", 0)):
                lead = int(st["leader"])
                for o in self.running():
                    so = self.status(o)
                    if so and int(so["header"]["member_id"]) == lead:
                        return o
        return None

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        def healthy() -> bool:
            for m in self.running():
                st = self.status(m)
                if not st or not int(st.get("leader", 0)):
                    return False
            return bool(self.running())

        if not wait_for(healthy, timeout_s, max_interval_s=0.2):
            tails = "\n".join(f"{m.log}:\n{_tail(m.log)}" for m in self.members)
            raise RuntimeError(f"etcd did not become healthy in {timeout_s} s\n{tails}")

    def kill(self, i: int) -> None:
        """SIGKILL member ``i`` (our own process) and reap it."""
        m = self.members[i]
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait(timeout=30)

    def close(self) -> None:
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                m.proc.terminate()
                try:
                    m.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    m.proc.kill()
                    m.proc.wait(timeout=30)


def _tail(path: Path, n: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@dataclass
class StateCluster:
    """A cluster directory with its state backend (see :func:`state_cluster`)."""

    root: Path
    backend: str
    etcd: EtcdCluster | None
    opened: list[ClusterState] = field(default_factory=list)

    @property
    def cluster_file(self) -> Path:
        return self.root / "cluster.toml"

    def cluster(self) -> Cluster:
        return load_cluster(self.cluster_file)

    def secret(self, name: str) -> bytes:
        return keys.load_secret(self.root / "keys" / f"{name}.key_secret")[1]

    def open(self, name: str, cluster: Cluster | None = None) -> ClusterState:
        """The store as node or operator ``name`` sees it; closed with the fixture."""
        s = open_state(cluster or self.cluster(), name, self.secret(name))
        self.opened.append(s)
        return s

    def close(self) -> None:
        for s in self.opened:
            with contextlib.suppress(Exception):  # the store may be down on purpose
                s.close()
        if self.etcd is not None:
            self.etcd.close()


@dataclass
class StateNodes:
    """Node services (a :class:`tests.helpers.nodes.Cluster2`) with their cluster state:
    ``etcd`` (None for ``files``), and :meth:`store`, the store as operator alice."""

    cluster: Any
    etcd: EtcdCluster | None
    backend: str
    _store: ClusterState | None = None

    def store(self) -> ClusterState:
        if self._store is None:
            root = self.cluster.files.root
            secret = keys.load_secret(root / "keys" / "alice.key_secret")[1]
            self._store = open_state(load_cluster(root / "cluster.toml"), "alice", secret)
        return self._store

    def owner(self, container_id: str) -> str | None:
        o = self.store().owner(container_id)
        return None if o is None else o.node

    def close(self) -> None:
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.close()


def write_etcd_pki(root: Path, names: list[str]) -> CertFiles:
    """CA and client certificates for ``names`` under ``root/etcd`` (their CURVE public
    keys from ``root/keys``); returns the CA."""
    d = root / "etcd"
    ca = make_ca(d)
    for n in names:
        issue_client(ca, d, n, keys.load_public(root / "keys" / f"{n}.key"))
    return ca


def add_state_table(cluster_file: Path, table: dict) -> None:
    with open(cluster_file, "a") as f:
        f.write("\n" + tomli_w.dumps({"state": table}))


@contextmanager
def state_for(
    root: Path,
    backend: str,
    nodes: tuple[str, ...] | list[str],
    operators: tuple[str, ...] | list[str],
    members: int = 1,
    ttl_s: float = 2.0,
    timeout_s: float = 3.0,
) -> Iterator[EtcdCluster | None]:
    """Give the cluster directory ``root`` (made by ``jaula cluster init``: ``cluster.toml``
    and ``keys/``) its ``[state]`` table for ``backend``: ``files`` (yields None), or
    ``etcd`` with ``members`` real members started and provisioned for ``nodes`` and
    ``operators`` (yields the :class:`EtcdCluster`, stopped at the end, also on failure)."""
    if backend == "files":
        add_state_table(root / "cluster.toml", {"backend": "files", "ttl_s": ttl_s})
        yield None
        return
    admin = operators[0]
    ca = write_etcd_pki(root, [*nodes, *operators])
    probe = CertFiles(root / "etcd" / f"{admin}.crt", root / "etcd" / f"{admin}.key")
    cluster = EtcdCluster.make(root / "etcd-run", members, ca, probe)
    try:
        (root / "etcd-run").mkdir(exist_ok=True)
        cluster.start()
        add_state_table(
            root / "cluster.toml",
            {
                "backend": "etcd",
                "endpoints": cluster.endpoints,
                "ca": "etcd/ca.crt",
                "cert": "etcd/{name}.crt",
                "key": "etcd/{name}.key",
                "ttl_s": ttl_s,
                "timeout_s": timeout_s,
            },
        )

        def secret(name: str) -> bytes:
            return keys.load_secret(root / "keys" / f"{name}.key_secret")[1]

        etcd_backend.provision(
            load_cluster(root / "cluster.toml").state,
            admin,
            secret(admin),
            {n: secret(n) for n in nodes},
            {o: secret(o) for o in operators},
        )
        yield cluster
    finally:
        cluster.close()


@contextmanager
def state_cluster(
    root: Path, backend: str, members: int = 1, ttl_s: float = 2.0, timeout_s: float = 3.0
) -> Iterator[StateCluster]:
    """A cluster under ``root`` with nodes node1..node3, operator admin, and the ``backend``
    (``files`` or ``etcd`` with ``members`` members) running and provisioned; everything
    stopped at the end, also when the test fails."""
    init_cluster(root, plan_endpoints(list(NODES), "127.0.0.1", 0), operators=[ADMIN])
    with state_for(root, backend, NODES, (ADMIN,), members, ttl_s, timeout_s) as etcd:
        sc = StateCluster(root, backend, etcd)
        try:
            yield sc
        finally:
            sc.close()


def wait_until(condition, timeout_s: float, what: str):
    """:func:`runtime.poll.wait_for` that fails the test, naming ``what``, on a time-out."""
    t0 = time.monotonic()
    result = wait_for(condition, timeout_s, max_interval_s=0.1)
    if not result:
        pytest.fail(f"{what}: not within {timeout_s} s (waited {time.monotonic() - t0:.1f} s)")
    return result
