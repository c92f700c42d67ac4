"""Node, cluster and client configuration files (TOML, read with :mod:`tomllib`).

A node service reads its own file, which points at its secret key and at the cluster file::

    # /etc/jaula/node1.toml
    name = "node1"
    listen = "tcp://127.0.0.1:7001"        # tcp://HOST:PORT (HOST may be * or an IP), or ipc://PATH
    state_root = "/var/lib/jaula/node1"
    secret_key = "keys/node1.key_secret"   # from `jaula node keygen`, mode 0600
    cluster = "cluster.toml"
    cgroup_parent = "jaula"                # optional (default: jaula-<hash of state_root>)
    max_message_bytes = 8388608            # optional (default 8 MiB): largest frame payload
    metrics_port = 9101                    # optional (default: off): Prometheus /metrics over
                                           # plain HTTP on listen's host (migrate.prometheus)

The cluster file is the allowlist: the transport accepts a connection only from a public key
listed here (CURVE + ZAP, see :mod:`migrate.transport`), and knows the peer by that key::

    # /etc/jaula/cluster.toml (the same file on every node)
    [nodes.node1]
    endpoint = "tcp://127.0.0.1:7001"      # where the others connect: no *
    public_key = "keys/node1.key"          # path to a public certificate, or the 40 Z85 chars
    signing_key = "<44 base64 chars>"      # optional: its bundle-signing key (node keygen)
    [nodes.node2]
    endpoint = "tcp://127.0.0.1:7002"
    public_key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    [operators.alice]                      # CLIs and the balancer: they connect, never listen
    public_key = "keys/alice.key"

The optional ``[state]`` table chooses where the cluster state lives (membership, container
ownership, IP leases, leadership, events: :mod:`migrate.cluster_state`)::

    [state]                                # absent: backend = "files" with the default path
    backend = "files"                      # one host: flock'd JSON files in one directory
    path = "cluster-state"                 # optional (default: <cluster file stem>-state/)
    ttl_s = 10                             # optional: a node's membership lease, seconds

    [state]                                # a real cluster: etcd 3.4+, TLS with client certs
    backend = "etcd"
    endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379", "https://10.0.0.3:2379"]
    ca = "etcd/ca.crt"                     # the CA that signed the members' and clients' certs
    cert = "etcd/{name}.crt"               # {name}: the node's (or operator's) own name
    key = "etcd/{name}.key"                # mode 0600
    timeout_s = 5                          # optional: one request to etcd, seconds

An operator's CLI reads ``$JAULA_CLIENT_CONFIG``, else ``$XDG_CONFIG_HOME/jaula/client.toml``
(``~/.config/jaula/client.toml``)::

    secret_key = "keys/alice.key_secret"
    cluster = "cluster.toml"
    max_message_bytes = 8388608            # optional, as for a node

Relative paths are relative to the directory of the file that names them; ``~`` is expanded.
Unknown keys are errors (a typo must not silently fall back to a default).  Every error is a
:class:`~migrate.errors.NodeConfigError` whose message names the file, the dotted key, and
what to write instead.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from migrate import keys
from migrate.errors import NodeConfigError

DEFAULT_CGROUP_PARENT = "jaula"
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MIN_MAX_MESSAGE_BYTES = 4096
MAX_MAX_MESSAGE_BYTES = 1024 * 1024 * 1024
CLIENT_CONFIG_ENV = "JAULA_CLIENT_CONFIG"

_TCP = re.compile(r"tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+|\*):(?P<port>[0-9]{1,5})")
_IPC = re.compile(r"ipc://[^\s\x00]+")
_CGROUP_PARENT = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


class PeerKind(StrEnum):
    """What a cluster entry is: a node service (has an endpoint) or an operator (a client)."""

    NODE = "node"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Peer:
    """One entry of the cluster file.

    Attributes:
        name: the table name (``node1`` in ``[nodes.node1]``).
        kind: :class:`PeerKind` (a ``str``: compares equal to ``"node"``/``"operator"``).
        public_key: its CURVE public key, 40 Z85 bytes.
        endpoint: where its node service listens (``tcp://HOST:PORT``); ``None`` for operators.
        signing_key: the node's Ed25519 bundle-signing public key, 32 raw bytes
            (:func:`migrate.keys.signing_key`); ``None`` when the file does not list it (its
            exported bundles then verify only with ``--insecure-unsigned``).
    """

    name: str
    kind: PeerKind
    public_key: bytes
    endpoint: str | None = None
    signing_key: bytes | None = None


class StateBackend(StrEnum):
    """Where the cluster state lives (the ``backend`` of the ``[state]`` table)."""

    FILES = "files"
    ETCD = "etcd"


DEFAULT_STATE_TTL_S = 10.0
DEFAULT_STATE_TIMEOUT_S = 5.0
NAME_PLACEHOLDER = "{name}"
"""Replaced by the node's or operator's name in ``[state]`` ``cert`` and ``key``."""


@dataclass(frozen=True)
class StateConfig:
    """The ``[state]`` table of the cluster file (paths absolute).

    Attributes:
        backend: :class:`StateBackend`.
        path: the ``files`` backend's directory (default ``<cluster file stem>-state`` beside
            the cluster file); ``None`` for etcd, or for a :class:`Cluster` built in code.
        endpoints: etcd's client URLs, ``https://HOST:PORT`` (etcd only).
        ca: the CA certificate that signed etcd's members and clients (etcd only).
        cert: the client certificate path with ``{name}`` in it (etcd only): see
            :meth:`cert_for`.
        key: the client key path with ``{name}`` in it (etcd only).
        ttl_s: a node's membership lease, seconds.
        timeout_s: the longest one request to the store may take, seconds (etcd only).
    """

    backend: StateBackend = StateBackend.FILES
    path: Path | None = None
    endpoints: tuple[str, ...] = ()
    ca: Path | None = None
    cert: str | None = None
    key: str | None = None
    ttl_s: float = DEFAULT_STATE_TTL_S
    timeout_s: float = DEFAULT_STATE_TIMEOUT_S

    def cert_for(self, name: str) -> Path:
        """The client certificate of node or operator ``name`` (``cert`` with ``{name}``
        replaced).  NodeConfigError when this is not an etcd configuration."""
        return Path(self._template("cert", self.cert).replace(NAME_PLACEHOLDER, name))

    def key_for(self, name: str) -> Path:
        """The client key of node or operator ``name`` (``key`` with ``{name}`` replaced)."""
        return Path(self._template("key", self.key).replace(NAME_PLACEHOLDER, name))

    def _template(self, what: str, value: str | None) -> str:
        if value is None:
            raise NodeConfigError(
                f'[state] has no {what}: only backend = "etcd" uses client certificates'
            )
        return value


def default_state_path(cluster_file: Path) -> Path:
    """The ``files`` backend's directory when ``[state]`` names none: ``STEM-state`` beside
    the cluster file (``/etc/jaula/cluster.toml`` -> ``/etc/jaula/cluster-state``)."""
    return cluster_file.with_name(f"{cluster_file.stem}-state")


@dataclass(frozen=True)
class Cluster:
    """The allowlist: every node and operator, each known by its public key.

    Attributes:
        nodes: node name -> :class:`Peer` (kind ``node``, with an endpoint).
        operators: operator name -> :class:`Peer` (kind ``operator``, no endpoint).
        source: the cluster file, when loaded from one.
        state: its ``[state]`` table (:class:`StateConfig`; files by default).
    """

    nodes: dict[str, Peer]
    operators: dict[str, Peer] = field(default_factory=dict)
    source: Path | None = None
    state: StateConfig = field(default_factory=StateConfig)
    _by_key: dict[bytes, Peer] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[bytes, Peer] = {}
        for peer in [*self.nodes.values(), *self.operators.values()]:
            other = index.setdefault(peer.public_key, peer)
            if other is not peer:
                raise NodeConfigError(
                    f"{self.source or 'cluster'}: {other.kind}s.{other.name} and "
                    f"{peer.kind}s.{peer.name} have the same public key; give each its own "
                    "keypair (`jaula node keygen`)",
                    path=str(self.source) if self.source else None,
                    key=f"{peer.kind}s.{peer.name}.public_key",
                )
        object.__setattr__(self, "_by_key", index)

    def by_key(self, z85: bytes | str) -> Peer | None:
        """The node or operator whose public key is ``z85`` (40 Z85 characters), or None."""
        if isinstance(z85, str):
            if not z85.isascii():
                return None
            z85 = z85.encode("ascii")
        return self._by_key.get(z85)

    def node(self, name: str) -> Peer:
        """The node called ``name``; NodeConfigError naming the known nodes when absent."""
        try:
            return self.nodes[name]
        except KeyError:
            known = ", ".join(sorted(self.nodes)) or "none"
            where = f"cluster file {self.source}" if self.source else "the cluster"
            raise NodeConfigError(
                f"no node {name!r} in {where} (known nodes: {known}); add a "
                f"[nodes.{name}] table with endpoint and public_key",
                path=str(self.source) if self.source else None,
                key=f"nodes.{name}",
            ) from None


@dataclass(frozen=True)
class NodeConfig:
    """A node service's own configuration (paths absolute, resolved against the file's dir).

    Attributes:
        name: this node's name; it must have a ``[nodes.NAME]`` entry in the cluster file.
        listen: the endpoint the node service binds (``tcp://HOST:PORT`` or ``ipc://PATH``).
        state_root: the runtime's state root for this node.
        secret_key: this node's ``NAME.key_secret`` file.
        cluster: the cluster file.
        cgroup_parent: parent cgroup of this node's containers (relative, e.g. ``jaula``).
        max_message_bytes: the largest frame payload accepted, in bytes (each frame of a
            message; a larger one makes libzmq drop the connection, see migrate.transport).
        metrics_port: the TCP port of the Prometheus ``/metrics`` endpoint
            (:mod:`migrate.prometheus`), or None: not served (the default).
        source: the file this was loaded from.
    """

    name: str
    listen: str
    state_root: Path
    secret_key: Path
    cluster: Path
    cgroup_parent: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    metrics_port: int | None = None
    source: Path | None = None

    @property
    def metrics_host(self) -> str:
        """The address the Prometheus endpoint binds: ``listen``'s host (``*`` is every
        address, ``0.0.0.0``), 127.0.0.1 for an ``ipc://`` endpoint."""
        if not self.listen.startswith("tcp://"):
            return "127.0.0.1"
        host = self.listen[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
        return "0.0.0.0" if host == "*" else host


@dataclass(frozen=True)
class ClientConfig:
    """Who we are when we connect to node services: our keypair and the cluster file.

    Attributes:
        public_key: our CURVE public key, 40 Z85 bytes.
        secret_key: our CURVE secret key, 40 Z85 bytes (kept out of ``repr``).
        cluster: the cluster file (load it with :func:`load_cluster`).
        max_message_bytes: the largest frame payload we accept in replies, in bytes.
        source: the file this was loaded from.
    """

    public_key: bytes
    secret_key: bytes = field(repr=False)
    cluster: Path
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    source: Path | None = None

    @classmethod
    def from_node(cls, cfg: NodeConfig) -> ClientConfig:
        """A node calling another node uses its own keypair and cluster file.

        Raises:
            NodeConfigError: the node's secret key file cannot be loaded (naming the node
                config file and its ``secret_key`` key).
        """
        public, secret = _load_key(cfg.source, "secret_key", cfg.secret_key, keys.load_secret)
        return cls(public, secret, cfg.cluster, cfg.max_message_bytes, cfg.source)


# -- reading ----------------------------------------------------------------------------------


def _read_toml(path: Path, what: str, example: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise NodeConfigError(
            f"{what} {path} does not exist; write one with lines such as: {example}", path=str(path)
        ) from e
    except tomllib.TOMLDecodeError as e:
        raise NodeConfigError(f"{path}: not valid TOML: {e}", path=str(path)) from e
    except OSError as e:
        raise NodeConfigError(
            f"cannot read {what} {path}: {e.strerror or e}", path=str(path)
        ) from e


def endpoint_problem(value: str, bind: bool) -> str | None:
    """Why ``value`` is not an endpoint jaula accepts, or None when it is one.

    Accepted: ``tcp://HOST:PORT`` (HOST a name, an IPv4 address or a bracketed IPv6 one; ``*``
    only when ``bind``, i.e. for a ``listen``; PORT 1-65535) and ``ipc://PATH``.
    """
    m = _TCP.fullmatch(value)
    if m is not None:
        if not bind and m["host"] == "*":
            return f"{value!r} is a bind address; peers need a host they can connect to"
        if not 1 <= int(m["port"]) <= 65535:
            return f"port {m['port']} is out of range 1-65535"
        return None
    if _IPC.fullmatch(value):
        return None
    return f"{value!r} is not a ZeroMQ endpoint (tcp://HOST:PORT or ipc://PATH)"


def cgroup_parent_problem(value: str) -> str | None:
    """Why ``value`` cannot be a node's ``cgroup_parent``, or None: it must be a relative
    cgroup path of letters, digits, ``_ . -`` and ``/``, without ``..``."""
    if not _CGROUP_PARENT.fullmatch(value) or ".." in value.split("/"):
        return (
            f"{value!r} must be a relative cgroup path without '..' (letters, digits, '_.-', '/')"
        )
    return None


class _Table:
    """A TOML table with the file and dotted prefix that every error message needs."""

    def __init__(self, path: Path, data: Mapping[str, Any], prefix: str = "") -> None:
        self.file = path
        self.data = data
        self.prefix = prefix

    def key(self, k: str) -> str:
        return f"{self.prefix}{k}"

    def error(self, k: str, problem: str) -> NodeConfigError:
        return NodeConfigError(
            f"{self.file}: {self.key(k)}: {problem}", path=str(self.file), key=self.key(k)
        )

    def only(self, allowed: Mapping[str, str]) -> None:
        """Refuse keys not in ``allowed`` (key -> example line)."""
        for k in self.data:
            if k not in allowed:
                lines = "; ".join(allowed.values())
                where = f"[{self.prefix[:-1]}]" if self.prefix else "the top level"
                raise self.error(k, f"unknown key; {where} takes only: {lines}")

    def string(self, k: str, example: str, default: str | None = None) -> str:
        v = self.data.get(k)
        if v is None:
            if default is not None:
                return default
            raise self.error(k, f"missing; write {example}")
        if not isinstance(v, str) or not v:
            raise self.error(k, f"must be a non-empty string, not {v!r}; write {example}")
        return v

    def integer(self, k: str, example: str, default: int, lo: int, hi: int) -> int:
        v = self.data.get(k, default)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.error(k, f"must be an integer from {lo} to {hi}, not {v!r}; write {example}")
        return v

    def path(self, k: str, example: str) -> Path:
        p = Path(self.string(k, example)).expanduser()
        return p if p.is_absolute() else self.file.parent / p

    def name(self, k: str, value: str, example: str) -> str:
        if not keys.NAME_PATTERN.fullmatch(value):
            raise self.error(
                k,
                f"{value!r} is not a valid name: use 1 to 63 letters, "
                "digits, '_', '.' or '-', starting with a letter or digit; "
                f"write {example}",
            )
        return value

    def endpoint(self, k: str, example: str, bind: bool) -> str:
        v = self.string(k, example)
        problem = endpoint_problem(v, bind)
        if problem is not None:
            raise self.error(k, f"{problem}; write {example}")
        return v

    def table(self, k: str, example: str, required: bool) -> dict[str, Any]:
        v = self.data.get(k)
        if v is None and not required:
            return {}
        if not isinstance(v, dict) or (required and not v):
            raise self.error(k, f"missing or empty; add at least one table such as {example}")
        return v


def _abs_file(path: Path | str) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _load_key(source: Path | None, key: str, key_file: Path, loader: Any) -> Any:
    """Call ``loader(key_file)``, prefixing errors with the config file and key naming it."""
    try:
        return loader(key_file)
    except NodeConfigError as e:
        if source is None:
            raise
        raise NodeConfigError(f"{source}: {key}: {e}", path=str(source), key=key) from e


_NODE_KEYS = {
    "name": 'name = "node1"',
    "listen": 'listen = "tcp://127.0.0.1:7001"',
    "state_root": 'state_root = "/var/lib/jaula/node1"',
    "secret_key": 'secret_key = "keys/node1.key_secret"',
    "cluster": 'cluster = "cluster.toml"',
    "cgroup_parent": 'cgroup_parent = "jaula"',
    "max_message_bytes": f"max_message_bytes = {DEFAULT_MAX_MESSAGE_BYTES}",
    "metrics_port": "metrics_port = 9101",
}


def load_node_config(path: Path | str) -> NodeConfig:
    """Read a node's TOML file (see the module docstring); key files are not read here.

    Raises:
        NodeConfigError: missing file, bad TOML, missing/unknown/ill-typed key.
    """
    path = _abs_file(path)
    t = _Table(
        path,
        _read_toml(
            path,
            "node config file",
            "; ".join(
                v
                for k, v in _NODE_KEYS.items()
                if k not in ("cgroup_parent", "max_message_bytes", "metrics_port")
            ),
        ),
    )
    t.only(_NODE_KEYS)
    cgroup_parent: str | None = None  # not given: the runtime derives one per state root
    if "cgroup_parent" in t.data:
        cgroup_parent = t.string(
            "cgroup_parent", _NODE_KEYS["cgroup_parent"], default=DEFAULT_CGROUP_PARENT
        )
        problem = cgroup_parent_problem(cgroup_parent)
        if problem is not None:
            raise t.error("cgroup_parent", f"{problem}; write {_NODE_KEYS['cgroup_parent']}")
    return NodeConfig(
        name=t.name("name", t.string("name", _NODE_KEYS["name"]), _NODE_KEYS["name"]),
        listen=t.endpoint("listen", _NODE_KEYS["listen"], bind=True),
        state_root=t.path("state_root", _NODE_KEYS["state_root"]),
        secret_key=t.path("secret_key", _NODE_KEYS["secret_key"]),
        cluster=t.path("cluster", _NODE_KEYS["cluster"]),
        cgroup_parent=cgroup_parent,
        max_message_bytes=t.integer(
            "max_message_bytes",
            _NODE_KEYS["max_message_bytes"],
            DEFAULT_MAX_MESSAGE_BYTES,
            MIN_MAX_MESSAGE_BYTES,
            MAX_MAX_MESSAGE_BYTES,
        ),
        metrics_port=(
            t.integer("metrics_port", _NODE_KEYS["metrics_port"], 0, 1, 65535)
            if "metrics_port" in t.data
            else None
        ),
        source=path,
    )


_CLUSTER_EXAMPLE = '[nodes.node1]; endpoint = "tcp://127.0.0.1:7001"; public_key = "keys/node1.key"'
_NODE_ENTRY_KEYS = {
    "endpoint": 'endpoint = "tcp://127.0.0.1:7001"',
    "public_key": 'public_key = "keys/node1.key" (or the 40 Z85 characters of the key)',
    "signing_key": 'signing_key = "<44 base64 characters, printed by `jaula node keygen`>"',
}
_OPERATOR_ENTRY_KEYS = {
    "public_key": 'public_key = "keys/alice.key" (or the 40 Z85 characters of the key)',
}


def _public_key(t: _Table, k: str, example: str) -> bytes:
    """A ``public_key`` value: the key's 40 Z85 characters, or a path to a ``NAME.key``."""
    v = t.string(k, example)
    if keys.is_z85_key(v) and not v.endswith(".key"):
        return v.encode("ascii")
    p = Path(v).expanduser()
    p = p if p.is_absolute() else t.file.parent / p
    try:
        return keys.load_public(p)
    except NodeConfigError as e:
        raise t.error(k, f"{e}; write {example}") from e


def load_cluster(path: Path | str) -> Cluster:
    """Read the cluster file (see the module docstring) and every public key it points at.

    Raises:
        NodeConfigError: missing file, bad TOML, no nodes, unknown keys, bad names or
            endpoints, unreadable or invalid keys, a name or a key used twice.
    """
    path = _abs_file(path)
    top = _Table(path, _read_toml(path, "cluster file", _CLUSTER_EXAMPLE))
    top.only(
        {
            "nodes": "[nodes.NAME] tables",
            "operators": "[operators.NAME] tables",
            "state": "a [state] table",
        }
    )
    peers: dict[PeerKind, dict[str, Peer]] = {PeerKind.NODE: {}, PeerKind.OPERATOR: {}}
    specs = (
        (PeerKind.NODE, "nodes", _NODE_ENTRY_KEYS, True),
        (PeerKind.OPERATOR, "operators", _OPERATOR_ENTRY_KEYS, False),
    )
    seen_keys: dict[bytes, str] = {}
    for kind, section, allowed, required in specs:
        example = _CLUSTER_EXAMPLE if required else '[operators.alice]; public_key = "..."'
        for name, entry in top.table(section, example, required).items():
            t = _Table(path, entry if isinstance(entry, dict) else {}, f"{section}.{name}.")
            if not isinstance(entry, dict):
                raise top.error(
                    f"{section}.{name}",
                    f"must be a table; write [{section}."
                    f"{name}] followed by " + "; ".join(allowed.values()),
                )
            top.name(f"{section}.{name}", name, f"[{section}.node1]")
            other = "operators" if kind is PeerKind.NODE else "nodes"
            if isinstance(top.data.get(other), dict) and name in top.data[other]:
                raise top.error(
                    f"{section}.{name}",
                    f"the name {name!r} is also used in "
                    f"[{other}.{name}]; give every node and operator its own name",
                )
            t.only(allowed)
            endpoint = (
                t.endpoint("endpoint", allowed["endpoint"], bind=False)
                if kind is PeerKind.NODE
                else None
            )
            key = _public_key(t, "public_key", allowed["public_key"])
            if key in seen_keys:
                raise t.error(
                    "public_key",
                    f"the same key as {seen_keys[key]}; give every "
                    "node and operator its own keypair "
                    "(`jaula node keygen`)",
                )
            seen_keys[key] = f"{section}.{name}"
            signing = None
            if "signing_key" in entry:
                try:
                    signing = keys.parse_signing_public(entry["signing_key"])
                except ValueError as e:
                    raise t.error("signing_key", f"{e}; write {allowed['signing_key']}") from None
            peers[kind][name] = Peer(name, kind, key, endpoint, signing)
    return Cluster(peers[PeerKind.NODE], peers[PeerKind.OPERATOR], path, _state(top))


_STATE_KEYS = {
    "backend": 'backend = "files" (or "etcd")',
    "path": 'path = "cluster-state"',
    "endpoints": 'endpoints = ["https://127.0.0.1:2379"]',
    "ca": 'ca = "etcd/ca.crt"',
    "cert": 'cert = "etcd/{name}.crt"',
    "key": 'key = "etcd/{name}.key"',
    "ttl_s": "ttl_s = 10",
    "timeout_s": "timeout_s = 5",
}
_STATE_FILES_ONLY = ("path",)
_STATE_ETCD_ONLY = ("endpoints", "ca", "cert", "key", "timeout_s")
_HTTPS = re.compile(r"https://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})")


def _state(top: _Table) -> StateConfig:
    """The ``[state]`` table of the cluster file ``top`` (see the module docstring)."""
    raw = top.data.get("state", {})
    if not isinstance(raw, dict):
        raise top.error("state", 'must be a table; write [state] followed by backend = "files"')
    t = _Table(top.file, raw, "state.")
    t.only(_STATE_KEYS)
    name = t.string("backend", _STATE_KEYS["backend"], default=StateBackend.FILES.value)
    try:
        backend = StateBackend(name)
    except ValueError:
        raise t.error(
            "backend", f'{name!r} is not a backend; write backend = "files" or "etcd"'
        ) from None
    wrong = _STATE_ETCD_ONLY if backend is StateBackend.FILES else _STATE_FILES_ONLY
    for k in wrong:
        if k in t.data:
            raise t.error(k, f'is not used by backend = "{backend}": remove it')
    ttl_s = _seconds(t, "ttl_s", DEFAULT_STATE_TTL_S, 1, 3600)
    if backend is StateBackend.FILES:
        path = t.path("path", _STATE_KEYS["path"]) if "path" in t.data else None
        return StateConfig(backend, path or default_state_path(top.file), ttl_s=ttl_s)
    endpoints = t.data.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        raise t.error("endpoints", f"missing or empty; write {_STATE_KEYS['endpoints']}")
    for e in endpoints:
        m = _HTTPS.fullmatch(e) if isinstance(e, str) else None
        if m is None or not 1 <= int(m[2]) <= 65535:
            raise t.error(
                "endpoints",
                f"{e!r} is not https://HOST:PORT (jaula talks to etcd only over TLS with "
                f"client certificates); write {_STATE_KEYS['endpoints']}",
            )
    templates = {}
    for k in ("cert", "key"):
        v = t.string(k, _STATE_KEYS[k])
        if NAME_PLACEHOLDER not in v:
            raise t.error(
                k,
                f"{v!r} has no {NAME_PLACEHOLDER}: every node has its own certificate; "
                f"write {_STATE_KEYS[k]}",
            )
        p = Path(v).expanduser()
        templates[k] = str(p if p.is_absolute() else top.file.parent / p)
    return StateConfig(
        backend,
        endpoints=tuple(endpoints),
        ca=t.path("ca", _STATE_KEYS["ca"]),
        cert=templates["cert"],
        key=templates["key"],
        ttl_s=ttl_s,
        timeout_s=_seconds(t, "timeout_s", DEFAULT_STATE_TIMEOUT_S, 0.1, 300),
    )


def _seconds(t: _Table, k: str, default: float, lo: float, hi: float) -> float:
    v = t.data.get(k, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise t.error(k, f"must be a number of seconds from {lo:g} to {hi:g}, not {v!r}")
    return float(v)


def check_node_in_cluster(cfg: NodeConfig, cluster: Cluster, public_key: bytes) -> Peer:
    """Check that ``cluster`` lists this node under its name with the key it serves with.

    ``public_key`` is the public half of ``cfg.secret_key``.  Returns the node's own entry.

    Raises:
        NodeConfigError: the node is missing from the cluster file, or is listed with a
            different public key (peers could then never authenticate it).
    """
    src = cluster.source or cfg.cluster
    me = cluster.nodes.get(cfg.name)
    if me is None:
        raise NodeConfigError(
            f"{src}: nodes.{cfg.name}: missing; node config {cfg.source} says name = "
            f"{cfg.name!r}: add [nodes.{cfg.name}] with endpoint (where peers reach "
            f"{cfg.listen}) and public_key (the NAME.key of {cfg.secret_key})",
            path=str(src),
            key=f"nodes.{cfg.name}",
        )
    if me.public_key != public_key:
        raise NodeConfigError(
            f"{src}: nodes.{cfg.name}.public_key: {me.public_key.decode()} does not belong to "
            f"this node's secret key {cfg.secret_key} (public key {public_key.decode()}); "
            "point it at the NAME.key generated with that secret key",
            path=str(src),
            key=f"nodes.{cfg.name}.public_key",
        )
    return me


def load_node(path: Path | str) -> tuple[NodeConfig, Cluster]:
    """Load a node config, its cluster file and its key, and check they agree
    (:func:`check_node_in_cluster`).  Errors as the functions it calls."""
    cfg = load_node_config(path)
    cluster = _load_key(cfg.source, "cluster", cfg.cluster, load_cluster)
    public, _ = _load_key(cfg.source, "secret_key", cfg.secret_key, keys.load_secret)
    check_node_in_cluster(cfg, cluster, public)
    return cfg, cluster


_CLIENT_KEYS = {
    "secret_key": 'secret_key = "keys/alice.key_secret"',
    "cluster": 'cluster = "cluster.toml"',
    "max_message_bytes": f"max_message_bytes = {DEFAULT_MAX_MESSAGE_BYTES}",
}


def default_client_config_path() -> Path:
    """``$XDG_CONFIG_HOME/jaula/client.toml``, else ``~/.config/jaula/client.toml``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "jaula" / "client.toml"


def load_client_config(path: Path | str | None = None) -> ClientConfig:
    """Read an operator's client config and its secret key.

    Where: ``path`` when given, else ``$JAULA_CLIENT_CONFIG`` when set, else
    :func:`default_client_config_path`.  The cluster file is not read here (see
    :func:`load_cluster`).

    Raises:
        NodeConfigError: missing file (naming where it looked), bad TOML, missing/unknown
            key, unreadable or invalid secret key (naming ``secret_key``).
    """
    if path is None:
        env = os.environ.get(CLIENT_CONFIG_ENV)
        path = env if env else default_client_config_path()
        what = (
            f"client config file (from ${CLIENT_CONFIG_ENV})"
            if env
            else f"client config file (${CLIENT_CONFIG_ENV} is not set; default)"
        )
    else:
        what = "client config file"
    path = _abs_file(path)
    t = _Table(
        path,
        _read_toml(path, what, "; ".join((_CLIENT_KEYS["secret_key"], _CLIENT_KEYS["cluster"]))),
    )
    t.only(_CLIENT_KEYS)
    secret_file = t.path("secret_key", _CLIENT_KEYS["secret_key"])
    cluster = t.path("cluster", _CLIENT_KEYS["cluster"])
    max_bytes = t.integer(
        "max_message_bytes",
        _CLIENT_KEYS["max_message_bytes"],
        DEFAULT_MAX_MESSAGE_BYTES,
        MIN_MAX_MESSAGE_BYTES,
        MAX_MAX_MESSAGE_BYTES,
    )
    public, secret = _load_key(path, "secret_key", secret_file, keys.load_secret)
    return ClientConfig(public, secret, cluster, max_bytes, path)
