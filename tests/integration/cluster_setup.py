"""A small cluster on 127.0.0.1 written into a directory: keys, cluster file, one node config
per node and one client config per operator (see :func:`write_cluster`).  Used by the
``cluster_files`` fixture of ``tests/integration/conftest.py``."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from migrate import keys
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
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


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
            ``jaula-test-NAME``, default max_message_bytes).
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
    """Generate keys and write the cluster, node and client files under ``root``."""
    keys_dir = root / "keys"
    for name in (*nodes, *operators):
        keys.generate(keys_dir, name)
    ports = free_tcp_ports(len(nodes))
    endpoints = {n: f"tcp://127.0.0.1:{p}" for n, p in zip(nodes, ports, strict=True)}
    lines = []
    for n in nodes:
        lines += [
            f"[nodes.{n}]",
            f'endpoint = "{endpoints[n]}"',
            f'public_key = "keys/{n}.key"',
            "",
        ]
    for o in operators:
        lines += [f"[operators.{o}]", f'public_key = "keys/{o}.key"', ""]
    cluster = root / "cluster.toml"
    cluster.write_text("\n".join(lines))
    node_files = {}
    for n in nodes:
        state_root = root / "state" / n
        os.makedirs(state_root, exist_ok=True)
        f = root / f"{n}.toml"
        f.write_text(
            f'name = "{n}"\nlisten = "{endpoints[n]}"\nstate_root = "state/{n}"\n'
            f'secret_key = "keys/{n}.key_secret"\ncluster = "cluster.toml"\n'
            f'cgroup_parent = "jaula-test-{n}"\n'
            + (
                f"max_message_bytes = {max_message_bytes}\n"
                if max_message_bytes is not None
                else ""
            )
        )
        node_files[n] = f
    client_files = {}
    for o in operators:
        f = root / f"{o}-client.toml"
        f.write_text(f'secret_key = "keys/{o}.key_secret"\ncluster = "cluster.toml"\n')
        client_files[o] = f
    return ClusterFiles(root, keys_dir, cluster, node_files, client_files, endpoints)
