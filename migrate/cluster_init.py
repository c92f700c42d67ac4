"""A cluster directory written in one go: ``jaula cluster init`` and ``jaula cluster join``.

:func:`init_cluster` writes, under a directory ``DIR`` (the formats are
:mod:`migrate.config`'s and :mod:`migrate.keys`'s)::

    DIR/
      keys/NAME.key          public certificate of every node and operator, 0644
      keys/NAME.key_secret   its secret certificate, 0600 (keys/ is made 0700)
      cluster.toml           [nodes.NAME] endpoint + public_key = "keys/NAME.key" for every
                             node, [operators.NAME] public_key for every operator
      NODE.toml              one per node: name, listen (= its endpoint), state_root
                             (STATE_DIR/NODE, relative when inside DIR), secret_key =
                             "keys/NODE.key_secret", cluster = "cluster.toml", and when asked
                             cgroup_parent, max_message_bytes
      OPERATOR-client.toml   one per operator: secret_key, cluster (for --client-config or
                             $JAULA_CLIENT_CONFIG)

Paths inside the files are relative to ``DIR`` whenever they lie in it, so the directory can
be moved or copied whole.  :func:`join_cluster` adds one node to such a directory: its
keypair, its ``NODE.toml`` and its ``[nodes.NODE]`` table appended to ``cluster.toml`` (the
rest of the file, comments included, is kept as it was).  Node services read the cluster
file when they start: restart the running ones for them to accept the new node.

Both refuse to overwrite a file (``cluster.toml`` is only ever extended by a join), check
every name and endpoint before writing anything, load what they wrote with
:mod:`migrate.config`'s own loaders, and remove what they wrote when any step fails.  State
roots are not created (the runtime makes its own).  For a cluster of several hosts, copy to
each host the directory without the other hosts' ``*.key_secret``.

Errors: :class:`~migrate.errors.NodeConfigError` with a one-line message naming what is
wrong and what to do.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from migrate import keys
from migrate.config import (
    CLIENT_CONFIG_ENV,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_MAX_MESSAGE_BYTES,
    MIN_MAX_MESSAGE_BYTES,
    cgroup_parent_problem,
    check_node_in_cluster,
    endpoint_problem,
    load_client_config,
    load_cluster,
    load_node,
    load_node_config,
)
from migrate.errors import NodeConfigError

CLUSTER_FILE = "cluster.toml"
KEYS_DIR = "keys"
STATE_DIR = "state"
NODE_PLACEHOLDER = "{node}"
"""Replaced by the node's name in a ``cgroup_parent`` template (``jaula-{node}``)."""


@dataclass(frozen=True)
class NodeFiles:
    """One node of a cluster directory.

    Attributes:
        name: the node's name (its ``[nodes.NAME]`` table).
        endpoint: where the other nodes and operators connect (``tcp://HOST:PORT``).
        listen: what its service binds (the same as ``endpoint`` unless given).
        config: its node config file, ``DIR/NAME.toml``.
        public_key: ``DIR/keys/NAME.key``.
        secret_key: ``DIR/keys/NAME.key_secret``.
        state_root: its state root (absolute; not created).
    """

    name: str
    endpoint: str
    listen: str
    config: Path
    public_key: Path
    secret_key: Path
    state_root: Path


@dataclass(frozen=True)
class OperatorFiles:
    """One operator of a cluster directory.

    Attributes:
        name: the operator's name (its ``[operators.NAME]`` table).
        client_config: ``DIR/NAME-client.toml``.
        public_key: ``DIR/keys/NAME.key``.
        secret_key: ``DIR/keys/NAME.key_secret``.
    """

    name: str
    client_config: Path
    public_key: Path
    secret_key: Path


@dataclass(frozen=True)
class ClusterDir:
    """What :func:`init_cluster` wrote.

    Attributes:
        root: the directory (absolute).
        cluster: ``root/cluster.toml``.
        keys_dir: ``root/keys``.
        nodes: node name -> :class:`NodeFiles`, in the order given.
        operators: operator name -> :class:`OperatorFiles`, in the order given.
        written: every file written, in the order written.
    """

    root: Path
    cluster: Path
    keys_dir: Path
    nodes: dict[str, NodeFiles]
    operators: dict[str, OperatorFiles]
    written: tuple[Path, ...]


@dataclass(frozen=True)
class Joined:
    """What :func:`join_cluster` did.

    Attributes:
        node: the new node's files.
        cluster: the cluster file it was appended to.
        written: the new files (keys, node config), in the order written.
    """

    node: NodeFiles
    cluster: Path
    written: tuple[Path, ...]


def plan_endpoints(nodes: Sequence[str], host: str, base_port: int) -> dict[str, str]:
    """``tcp://HOST:PORT`` for each node: ``base_port``, ``base_port + 1``, ... in order, or
    with ``base_port`` 0 ports the kernel reports free on ``host`` right now (for a cluster
    on this host; another process could take one before its node binds it).

    An IPv6 ``host`` is written in brackets.

    Raises:
        NodeConfigError: a port beyond 65535, ``host`` that is ``*`` or makes no valid
            endpoint, or (base port 0) ``host`` is not an address of this host.
    """
    if not 0 <= base_port <= 65535 or base_port + len(nodes) - 1 > 65535:
        raise NodeConfigError(
            f"base port {base_port} with {len(nodes)} node(s) goes beyond port 65535: "
            "give a lower --base-port (or 0 for free ports)"
        )
    h = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    shown = f"[{h}]" if ":" in h else h
    if h in ("", "*"):
        raise NodeConfigError(
            f"listen host {host!r} is not an address the others can connect to: give the "
            "host's name or IP address (e.g. 127.0.0.1)"
        )
    ports = _free_ports(h, len(nodes)) if base_port == 0 else range(base_port, 65536)
    endpoints = {n: f"tcp://{shown}:{p}" for n, p in zip(nodes, ports, strict=False)}
    for e in endpoints.values():
        problem = endpoint_problem(e, bind=False)
        if problem is not None:
            raise NodeConfigError(f"listen host {host!r}: {problem}")
    return endpoints


def _free_ports(host: str, n: int) -> list[int]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    except OSError as e:
        raise NodeConfigError(
            f"cannot find free ports on {host!r}: {e.strerror or e} (with --base-port 0 the "
            "listen host must be an address of this host)"
        ) from e
    finally:
        for s in socks:
            s.close()


def init_cluster(
    root: Path,
    endpoints: Mapping[str, str],
    operators: Sequence[str] = ("admin",),
    *,
    state_dir: Path | None = None,
    cgroup_parent: str | None = None,
    max_message_bytes: int | None = None,
) -> ClusterDir:
    """Write a new cluster under ``root`` (the layout of the module docstring).

    Args:
        root: the directory; created when missing, may hold other files.
        endpoints: node name -> its endpoint (:func:`plan_endpoints`); each node listens on
            its endpoint.  At least one node.
        operators: names of the operators (CLIs, a balancer); may be empty.
        state_dir: parent of each node's state root (default ``root/state``).
        cgroup_parent: written as each node's ``cgroup_parent`` with ``{node}`` replaced by
            its name; ``None``: not written (the runtime derives one per state root).
        max_message_bytes: written in every node and client config when given.

    Raises:
        NodeConfigError: no node, a bad or repeated name, a bad endpoint, cgroup parent or
            size, a file that already exists, or a file that cannot be written.
    """
    root = Path(os.path.abspath(root))
    nodes = list(endpoints)
    if not nodes:
        raise NodeConfigError("a cluster needs at least one node: give --nodes NAME[,NAME...]")
    _check_names(nodes, list(operators))
    for n, e in endpoints.items():
        _check_endpoint(f"endpoint of {n}", e, bind=False)
    _check_size(max_message_bytes)
    _check_cgroup_parent(cgroup_parent, nodes)
    state = Path(os.path.abspath(root / (state_dir or STATE_DIR)))
    keys_dir = root / KEYS_DIR
    node_files = {n: _node_files(root, n, endpoints[n], endpoints[n], state) for n in nodes}
    op_files = {
        o: OperatorFiles(o, root / f"{o}-client.toml", *keys.key_paths(keys_dir, o))
        for o in operators
    }
    cluster = root / CLUSTER_FILE
    owners = {cluster: "the cluster file"}
    for nf in node_files.values():
        _claim(owners, nf.config, f"node {nf.name}'s config")
    for of in op_files.values():
        _claim(owners, of.client_config, f"operator {of.name}'s client config")
    targets = list(owners)
    for nf in node_files.values():
        targets += [nf.public_key, nf.secret_key]
    for of in op_files.values():
        targets += [of.public_key, of.secret_key]
    _refuse_existing(
        targets, "cluster init", "choose a new directory, or add nodes with `jaula cluster join`"
    )

    written: list[Path] = []
    made = [d for d in (root, keys_dir) if not d.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
        for name in (*nodes, *operators):
            written += keys.generate(keys_dir, name)
        table: dict[str, Any] = {
            "nodes": {n: _cluster_entry(root, nf) for n, nf in node_files.items()}
        }
        if op_files:
            table["operators"] = {
                o: {"public_key": _rel(root, of.public_key)} for o, of in op_files.items()
            }
        _write_new(
            cluster,
            _toml(table, "the cluster file: the allowlist, the same on every node", "init"),
        )
        written.append(cluster)
        for nf in node_files.values():
            _write_new(nf.config, _node_toml(root, nf, cgroup_parent, max_message_bytes, "init"))
            written.append(nf.config)
        for of in op_files.values():
            client: dict[str, Any] = {
                "secret_key": _rel(root, of.secret_key),
                "cluster": CLUSTER_FILE,
            }
            if max_message_bytes is not None:
                client["max_message_bytes"] = max_message_bytes
            title = f"operator {of.name}'s client config (--client-config, ${CLIENT_CONFIG_ENV})"
            _write_new(of.client_config, _toml(client, title, "init"))
            written.append(of.client_config)
        for nf in node_files.values():  # what a node service will check when it starts
            load_node(nf.config)
        for of in op_files.values():
            load_cluster(load_client_config(of.client_config).cluster)
        _fsync_dir(root)
    except OSError as e:
        _undo(e, written, made)
        raise NodeConfigError(f"cannot write a cluster in {root}: {e.strerror or e}") from e
    except BaseException as e:
        _undo(e, written, made)
        raise
    return ClusterDir(root, cluster, keys_dir, node_files, op_files, tuple(written))


def join_cluster(
    root: Path,
    node: str,
    endpoint: str,
    *,
    listen: str | None = None,
    state_dir: Path | None = None,
    cgroup_parent: str | None = None,
    max_message_bytes: int | None = None,
) -> Joined:
    """Add ``node`` to the cluster directory ``root``: its keypair, ``root/NODE.toml`` and its
    ``[nodes.NODE]`` table appended to ``root/cluster.toml`` (replaced atomically).

    Args:
        root: a directory written by :func:`init_cluster` (or laid out the same way).
        node: the new node's name.
        endpoint: where the others reach it (``tcp://HOST:PORT``, no ``*``).
        listen: what it binds (default: ``endpoint``; ``tcp://*:PORT`` for every address).
        state_dir, cgroup_parent, max_message_bytes: as for :func:`init_cluster`.

    Raises:
        NodeConfigError: the cluster file is missing or invalid, the name is taken or bad,
            the endpoint is bad or another node's, a file already exists, or a file cannot
            be written.
    """
    root = Path(os.path.abspath(root))
    cluster_path = root / CLUSTER_FILE
    if not cluster_path.exists():
        raise NodeConfigError(
            f"{cluster_path} does not exist: `jaula cluster join` adds a node to a directory "
            "made by `jaula cluster init`",
            path=str(cluster_path),
        )
    cluster = load_cluster(cluster_path)
    keys.check_name(node, "node name")
    if node in cluster.nodes or node in cluster.operators:
        kind = "node" if node in cluster.nodes else "operator"
        raise NodeConfigError(
            f"{cluster_path}: {kind}s.{node} already exists: give the new node another name",
            path=str(cluster_path),
            key=f"{kind}s.{node}",
        )
    _check_endpoint("--endpoint", endpoint, bind=False)
    for other in cluster.nodes.values():
        if other.endpoint == endpoint:
            raise NodeConfigError(
                f"{cluster_path}: nodes.{other.name} already listens at {endpoint}: give "
                f"{node} another host or port",
                path=str(cluster_path),
                key=f"nodes.{other.name}.endpoint",
            )
    listen = listen or endpoint
    _check_endpoint("--listen", listen, bind=True)
    _check_size(max_message_bytes)
    _check_cgroup_parent(cgroup_parent, [node])
    state = Path(os.path.abspath(root / (state_dir or STATE_DIR)))
    nf = _node_files(root, node, endpoint, listen, state)
    targets = [nf.config, nf.public_key, nf.secret_key]
    _claim({cluster_path: "the cluster file"}, nf.config, f"node {node}'s config")
    _refuse_existing(targets, "cluster join", "choose another node name")

    written: list[Path] = []
    tmp = root / f".{CLUSTER_FILE}.join-{os.getpid()}"
    try:
        written += keys.generate(root / KEYS_DIR, node)
        _write_new(nf.config, _node_toml(root, nf, cgroup_parent, max_message_bytes, "join"))
        written.append(nf.config)
        old = cluster_path.read_text()
        sep = "" if not old or old.endswith("\n\n") else ("\n" if old.endswith("\n") else "\n\n")
        _write_new(tmp, old + sep + tomli_w.dumps({"nodes": {node: _cluster_entry(root, nf)}}))
        os.chmod(tmp, stat.S_IMODE(cluster_path.stat().st_mode))
        cfg = load_node_config(nf.config)
        try:
            check_node_in_cluster(cfg, load_cluster(tmp), keys.load_secret(nf.secret_key)[0])
        except NodeConfigError as e:
            raise NodeConfigError(
                f"{cluster_path} with [nodes.{node}] appended does not load: "
                f"{str(e).replace(str(tmp), str(cluster_path))}; add the table by hand",
                path=str(cluster_path),
            ) from e
        os.replace(tmp, cluster_path)
        _fsync_dir(root)
    except OSError as e:
        _undo(e, [*written, tmp], [])
        raise NodeConfigError(
            f"cannot add {node} to {cluster_path}: {e.strerror or e}", path=str(cluster_path)
        ) from e
    except BaseException as e:
        _undo(e, [*written, tmp], [])
        raise
    return Joined(nf, cluster_path, tuple(written))


# -- helpers ----------------------------------------------------------------------------------


def _node_files(root: Path, name: str, endpoint: str, listen: str, state: Path) -> NodeFiles:
    public, secret = keys.key_paths(root / KEYS_DIR, name)
    return NodeFiles(name, endpoint, listen, root / f"{name}.toml", public, secret, state / name)


def _cluster_entry(root: Path, nf: NodeFiles) -> dict[str, Any]:
    """The node's ``[nodes.NAME]`` entry; its keys must exist (the bundle-signing key is
    derived from its secret)."""
    _, secret = keys.load_secret(nf.secret_key)
    return {
        "endpoint": nf.endpoint,
        "public_key": _rel(root, nf.public_key),
        "signing_key": keys.signing_public(secret),
    }


def _node_toml(
    root: Path,
    nf: NodeFiles,
    cgroup_parent: str | None,
    max_message_bytes: int | None,
    command: str,
) -> str:
    t: dict[str, Any] = {
        "name": nf.name,
        "listen": nf.listen,
        "state_root": _rel(root, nf.state_root),
        "secret_key": _rel(root, nf.secret_key),
        "cluster": CLUSTER_FILE,
    }
    if cgroup_parent is not None:
        t["cgroup_parent"] = cgroup_parent.replace(NODE_PLACEHOLDER, nf.name)
    if max_message_bytes is not None:
        t["max_message_bytes"] = max_message_bytes
    return _toml(t, f"node {nf.name}'s config (jaula node serve --config FILE)", command)


def _toml(table: Mapping[str, Any], title: str, command: str) -> str:
    return f"# {title}; written by `jaula cluster {command}`\n" + tomli_w.dumps(table)


def _rel(root: Path, p: Path) -> str:
    """``p`` relative to ``root`` when inside it (as the loaders resolve it), else absolute."""
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return str(p)


def _check_names(nodes: list[str], operators: list[str]) -> None:
    for n in nodes:
        keys.check_name(n, "node name")
    for o in operators:
        keys.check_name(o, "operator name")
    seen: set[str] = set()
    for name in (*nodes, *operators):
        if name in seen:
            raise NodeConfigError(
                f"the name {name!r} is given twice: every node and operator needs its own name"
            )
        seen.add(name)


def _check_endpoint(what: str, value: str, bind: bool) -> None:
    problem = endpoint_problem(value, bind)
    if problem is not None:
        raise NodeConfigError(f"{what}: {problem}")


def _check_size(max_message_bytes: int | None) -> None:
    if max_message_bytes is not None and not (
        MIN_MAX_MESSAGE_BYTES <= max_message_bytes <= MAX_MAX_MESSAGE_BYTES
    ):
        raise NodeConfigError(
            f"max_message_bytes {max_message_bytes} is not from {MIN_MAX_MESSAGE_BYTES} to "
            f"{MAX_MAX_MESSAGE_BYTES} (default {DEFAULT_MAX_MESSAGE_BYTES})"
        )


def _check_cgroup_parent(template: str | None, nodes: list[str]) -> None:
    if template is None:
        return
    for n in nodes:
        problem = cgroup_parent_problem(template.replace(NODE_PLACEHOLDER, n))
        if problem is not None:
            raise NodeConfigError(f"cgroup parent {template!r} for node {n}: {problem}")


def _claim(owners: dict[Path, str], path: Path, owner: str) -> None:
    """Record that ``owner`` writes ``path``; two owners of one file (a node named
    ``cluster``, a node ``x-client`` beside an operator ``x``) are refused."""
    if path in owners:
        raise NodeConfigError(
            f"{owner} and {owners[path]} would both be {path.name}: rename one of them"
        )
    owners[path] = owner


def _refuse_existing(targets: list[Path], command: str, what_to_do: str) -> None:
    there = [t for t in targets if os.path.lexists(t)]
    if there:
        more = f" (and {len(there) - 1} more)" if len(there) > 1 else ""
        raise NodeConfigError(
            f"{there[0]} already exists{more}: `jaula {command}` never overwrites a file; "
            f"{what_to_do}",
            path=str(there[0]),
        )


def _write_new(path: Path, text: str) -> None:
    """Create ``path`` (mode 0644) with ``text``, fsynced; fail if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError as e:
        raise NodeConfigError(
            f"{path} already exists: jaula never overwrites it", path=str(path)
        ) from e
    except OSError as e:
        raise NodeConfigError(f"cannot create {path}: {e.strerror or e}", path=str(path)) from e
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise NodeConfigError(f"cannot write {path}: {e.strerror or e}", path=str(path)) from e


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _undo(e: BaseException, files: list[Path], dirs: list[Path]) -> None:
    """Remove ``files`` and then the (empty) ``dirs`` we made; what cannot be removed is
    added to ``e`` as a note."""
    for p in reversed(files):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            e.add_note(f"left behind: {p} ({err.strerror or err})")
    for d in reversed(dirs):
        try:
            d.rmdir()
        except FileNotFoundError:
            pass
        except OSError as err:
            e.add_note(f"left behind: {d} ({err.strerror or err})")


ETCD_DIR = "etcd"


def add_etcd_state(
    root: Path,
    endpoints: Sequence[str],
    member_hosts: Sequence[str] | None = None,
    ttl_s: float | None = None,
) -> list[Path]:
    """Give the cluster in ``root`` (written by :func:`init_cluster`) the etcd backend:
    the etcd CA, a member certificate per endpoint (``member-mN``, for the endpoint's host
    and ``member_hosts``), a client certificate per node and operator bound to its CURVE
    key (:mod:`migrate.cluster_state.pki`), all under ``root/etcd``, and the ``[state]``
    table at the end of ``cluster.toml``.  Returns the files written.

    The members then run with these certificates (README "Cluster state"); once they
    answer, :func:`provision_etcd` creates the users and roles and turns auth on.

    Raises NodeConfigError: no endpoint, an endpoint that is not ``https://HOST:PORT``,
    ``cluster.toml`` has a ``[state]`` table already, or ``root/etcd`` exists."""
    from urllib.parse import urlsplit

    from migrate.cluster_state.pki import issue_client, issue_member, make_ca

    cluster = root / CLUSTER_FILE
    text = cluster.read_text()
    if "\n[state]" in f"\n{text}":
        raise NodeConfigError(f"{cluster} has a [state] table already: edit it by hand")
    if not endpoints:
        raise NodeConfigError("--state etcd needs --etcd-endpoints https://HOST:2379[,...]")
    hosts = []
    for e in endpoints:
        u = urlsplit(e)
        if u.scheme != "https" or not u.hostname or u.port is None:
            raise NodeConfigError(f"{e!r} is not an etcd endpoint https://HOST:PORT")
        hosts.append(u.hostname)
    d = root / ETCD_DIR
    if d.exists():
        raise NodeConfigError(f"{d} exists: remove it, or write [state] by hand")
    c = load_cluster(cluster)
    ca = make_ca(d)
    written = [ca.cert, ca.key]
    for i, h in enumerate(hosts):
        m = issue_member(ca, d, f"m{i}", sorted({h, *(member_hosts or ())}))
        written += [m.cert, m.key]
    for name, peer in sorted({**c.nodes, **c.operators}.items()):
        cf = issue_client(ca, d, name, peer.public_key)
        written += [cf.cert, cf.key]
    table: dict[str, Any] = {
        "backend": "etcd",
        "endpoints": list(endpoints),
        "ca": f"{ETCD_DIR}/ca.crt",
        "cert": f"{ETCD_DIR}/{{name}}.crt",
        "key": f"{ETCD_DIR}/{{name}}.key",
    }
    if ttl_s is not None:
        table["ttl_s"] = ttl_s
    with open(cluster, "a") as f:
        f.write("\n# the cluster state (jaula cluster init --state etcd)\n")
        f.write(tomli_w.dumps({"state": table}))
        f.flush()
        os.fsync(f.fileno())
    load_cluster(cluster)  # what every node will load
    return written


def provision_etcd(root: Path, admin: str | None = None) -> str:
    """Create the etcd users and roles of the cluster in ``root`` and turn auth on
    (idempotent; :func:`migrate.cluster_state.etcd.provision`), with the secret keys in
    ``root/keys`` and operator ``admin``'s certificate (default: the first operator).
    Returns the admin's name.  Raises NodeConfigError (no operator, a key missing),
    StateUnavailable (etcd does not answer)."""
    from migrate.cluster_state import etcd as etcd_backend

    c = load_cluster(root / CLUSTER_FILE)
    admin = admin or next(iter(sorted(c.operators)), None)
    if admin is None:
        raise NodeConfigError("provisioning etcd needs an operator (the etcd root's key)")

    def secret(name: str) -> bytes:
        return keys.load_secret(root / KEYS_DIR / f"{name}.key_secret")[1]

    etcd_backend.provision(
        c.state,
        admin,
        secret(admin),
        {n: secret(n) for n in c.nodes},
        {o: secret(o) for o in c.operators},
    )
    return admin
