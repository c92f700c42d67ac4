"""A small cluster on 127.0.0.1 written into a directory: keys, cluster file, one node config
per node and one client config per operator (see :func:`write_cluster`, a thin wrapper over
:mod:`migrate.cluster_init`, the code of ``jaula cluster init``).  Used by the
``cluster_files`` fixture of ``tests/integration/conftest.py``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from migrate import keys

#: the start of the test nodes' cgroup parents: one per test session (the pytest process),
#: so that the two ``make test`` shards never remove a parent the other one is filling
CGROUP_PREFIX = f"jaula-test-{os.getpid()}"
from migrate.cluster_init import init_cluster, plan_endpoints
from migrate.config import (
    ClientConfig,
    Cluster,
    NodeConfig,
    load_client_config,
    load_cluster,
    load_node_config,
)


def free_tcp_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (the kernel picks them; another
    process could take one before we bind it, which is unlikely on a test machine)."""
    eps = plan_endpoints([f"n{k}" for k in range(n)], "127.0.0.1", 0)
    return [int(e.rsplit(":", 1)[1]) for e in eps.values()]


@dataclass(frozen=True)
class ClusterFiles:
    """What :func:`write_cluster` wrote, all under ``root``.

    Attributes:
        root: the directory holding everything.
        keys_dir: ``root/keys``: ``NAME.key`` (0644) and ``NAME.key_secret`` (0600) for every
            node and operator.
        cluster: ``root/cluster.toml``, listing every node (endpoint, key file) and operator.
        nodes: node name -> its config file ``root/NAME.toml`` (listen = its endpoint,
            state_root = ``root/state/NAME`` (created, empty), cgroup_parent
            ``jaula-test-PID-NAME``, default max_message_bytes).
        clients: operator name -> its client config ``root/NAME-client.toml``.
        endpoints: node name -> ``tcp://127.0.0.1:PORT`` (free ports when written).
    """

    root: Path
    keys_dir: Path
    cluster: Path
    nodes: dict[str, Path]
    clients: dict[str, Path]
    endpoints: dict[str, str]

    def node_config(self, name: str) -> NodeConfig:
        """Load ``nodes[name]`` with :func:`migrate.config.load_node_config`."""
        return load_node_config(self.nodes[name])

    def load_cluster(self) -> Cluster:
        """Load the cluster file with :func:`migrate.config.load_cluster`."""
        return load_cluster(self.cluster)

    def client_config(self, name: str) -> ClientConfig:
        """An operator's client config, or a node's own keys (``ClientConfig.from_node``)."""
        if name in self.clients:
            return load_client_config(self.clients[name])
        return ClientConfig.from_node(self.node_config(name))

    def public_key(self, name: str) -> bytes:
        """The Z85 public key of a node or operator."""
        return keys.load_public(self.keys_dir / f"{name}.key")


def write_cluster(
    root: Path,
    nodes: tuple[str, ...] = ("node1", "node2"),
    operators: tuple[str, ...] = ("alice",),
    max_message_bytes: int | None = None,
) -> ClusterFiles:
    """Generate keys and write the cluster, node and client files under ``root`` with
    :func:`migrate.cluster_init.init_cluster` (what ``jaula cluster init`` does) on free
    ports of 127.0.0.1, cgroup parents ``jaula-test-PID-NAME`` (:data:`CGROUP_PREFIX`: the
    two ``make test`` shards never share one); the state roots are created."""
    c = init_cluster(
        root,
        plan_endpoints(nodes, "127.0.0.1", 0),
        operators,
        cgroup_parent=CGROUP_PREFIX + "-{node}",
        max_message_bytes=max_message_bytes,
    )
    for nf in c.nodes.values():
        os.makedirs(nf.state_root, exist_ok=True)
    return ClusterFiles(
        c.root,
        c.keys_dir,
        c.cluster,
        {n: nf.config for n, nf in c.nodes.items()},
        {o: of.client_config for o, of in c.operators.items()},
        {n: nf.endpoint for n, nf in c.nodes.items()},
    )
