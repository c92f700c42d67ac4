"""Command lines of the migrate layer.

- ``jaula``: the runtime's commands (:mod:`runtime.cli`) plus ``checkpoint``, ``restore``,
  ``migrate``, ``node keygen|serve|ls``, ``cluster init|join`` (:mod:`migrate.cluster_init`), and ``--node NAME`` before ``ps``, ``inspect``,
  ``logs``, ``exec``, ``stop`` and ``rm`` to act on a node of the cluster through its service.
- ``migrate CTR NODE``: the same as ``jaula migrate CTR NODE``.

Who we are on the network: ``--client-config FILE`` (else ``$JAULA_CLIENT_CONFIG``, else
``~/.config/jaula/client.toml``): an operator keypair and the cluster file.

On a node's state root (one a node service has served: :mod:`migrate.membership`),
``run``, ``restore`` and ``rm`` claim and release the container's ownership in the cluster
state as that node.

Thin: parse, call the library, print.  Exit codes as :mod:`runtime.cli` (125 for jaula's own
errors).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from migrate.bundle import INSECURE_FLAG, INSECURE_RISK
from migrate.errors import KeyRefused, MigrationError, PeerUnavailable
from runtime import cli as runtime_cli
from runtime.container import Runtime
from runtime.errors import JaulaError
from runtime.store import CRIU_LOGS_DIR

REMOTE_COMMANDS = ("ps", "inspect", "logs", "exec", "stop", "rm")
#: local commands that bring a container to life or remove one: they claim or release its
#: ownership in the cluster state when the state root is a node's
OWNING_COMMANDS = ("run", "restore", "rm")


class MigrateCommands:
    """The migrate layer's commands for ``jaula`` (a :class:`runtime.cli.CliExtension`)."""

    def add_global_options(self, p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--node",
            help="act on this node of the cluster, through its service "
            "(ps, inspect, logs, exec, stop, rm)",
        )
        p.add_argument(
            "--client-config",
            type=Path,
            help="operator keypair and cluster file "
            "(default: $JAULA_CLIENT_CONFIG or ~/.config/jaula/client.toml)",
        )

    def is_remote(self, a: argparse.Namespace) -> bool:
        return (
            a.cmd == "cluster"  # writes files only: no root, no local state
            or (a.node is not None and a.cmd in REMOTE_COMMANDS)
            or a.cmd == "migrate"
            or (a.cmd == "node" and a.node_cmd in ("ls", "drain", "undrain"))
        )

    def add_commands(self, sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        cp = sub.add_parser("checkpoint", help="checkpoint a running container with CRIU")
        cp.add_argument(
            "--leave-running",
            action="store_true",
            help="keep the container running after the checkpoint",
        )
        cp.add_argument(
            "-e",
            "--export",
            type=Path,
            metavar="FILE",
            help="also write the checkpoint bundle as one tar file",
        )
        cp.add_argument("--json", action="store_true", help="print the report as JSON")
        _node_config_option(cp, "sign the exported bundle with this node's key")
        cp.add_argument("container", help="name, id or id prefix")
        rs = sub.add_parser("restore", help="restore a checkpointed container")
        rs.add_argument(
            "-i",
            "--import",
            dest="import_file",
            type=Path,
            metavar="FILE",
            help="restore from an exported checkpoint bundle",
        )
        rs.add_argument("-n", "--name", help="name for the restored container (with --import)")
        _node_config_option(
            rs, "check the imported bundle's signature against this node's cluster file"
        )
        rs.add_argument(
            INSECURE_FLAG,
            dest="insecure_unsigned",
            action="store_true",
            help="restore an imported bundle that is unsigned, or signed by a node the "
            f"cluster file does not list. Risk: {INSECURE_RISK}",
        )
        rs.add_argument("container", nargs="?", help="a checkpointed container")

        mg = sub.add_parser("migrate", help="move a running container to another node")
        add_migrate_arguments(mg)

        node = sub.add_parser("node", help="node services: keys, serve, list")
        nsub = node.add_subparsers(dest="node_cmd", required=True, metavar="COMMAND")
        kg = nsub.add_parser("keygen", help="make a CURVE keypair (NAME.key, NAME.key_secret)")
        kg.add_argument("--out", type=Path, required=True, help="directory for the key files")
        kg.add_argument("--name", default="node", help="file name stem (default: node)")
        sv = nsub.add_parser("serve", help="run this node's migration service")
        sv.add_argument("--config", type=Path, required=True, help="the node's TOML config")
        sv.add_argument(
            "--peer-timeout",
            type=float,
            default=20.0,
            help="seconds a peer may stay silent in a migration (default 20)",
        )
        nsub.add_parser("ls", help="every node of the cluster: reachable, load, containers")
        dr = nsub.add_parser(
            "drain",
            help="mark a node draining in the cluster state: it takes no new containers and "
            "the balancer moves every one off it, one at a time",
        )
        dr.add_argument("drain_node", metavar="NODE", help="the node to drain")
        ud = nsub.add_parser("undrain", help="mark a drained node ready again")
        ud.add_argument("drain_node", metavar="NODE", help="the node")
        add_cluster_commands(sub)

    def dispatch(self, rt: Runtime | None, a: argparse.Namespace) -> int | None:
        if a.cmd == "cluster":
            if a.node is not None:
                raise JaulaError("--node does not go with `cluster`: it writes files here")
            return cluster_command(a)
        if self.is_remote(a):
            return asyncio.run(remote(a))
        if a.node is not None:  # never act on the local state root instead of that node
            raise JaulaError(
                f"--node works with {', '.join(REMOTE_COMMANDS)}, `migrate` and "
                f"`node ls`, not with `{a.cmd}`: run `{a.cmd}` on node "
                f"{a.node}'s host, or here with --state-root set to its "
                "state root"
            )
        if rt is not None and a.cmd in OWNING_COMMANDS:
            _set_admission(rt, a.cmd)
        if rt is not None and "node_config" in a and a.node_config is None:
            # a node's own state root: sign and verify bundles as that node by default
            from migrate.membership import node_config_of

            a.node_config = node_config_of(rt.root)
        if rt is not None:
            # a failed CRIU action's log is kept under this state root (and the restorer,
            # which runs in the container's monitor, learns it from the environment)
            os.environ.setdefault("JAULA_CRIU_LOG_DIR", str(rt.root / CRIU_LOGS_DIR))
        if a.cmd == "checkpoint":
            from migrate.checkpoint import checkpoint

            assert rt is not None
            signer = None
            if a.export is not None:
                signer = _signer(a.node_config)
                if signer is None:
                    print(
                        f"jaula: warning: {a.export} is unsigned (no --node-config nor "
                        f"${NODE_CONFIG_ENV}): restoring it will need {INSECURE_FLAG}",
                        file=sys.stderr,
                    )
            r = checkpoint(
                rt, a.container, leave_running=a.leave_running, export=a.export, signer=signer
            )
            if a.json:
                print(
                    json.dumps(
                        {k: str(v) if isinstance(v, Path) else v for k, v in asdict(r).items()},
                        indent=1,
                    )
                )
            else:
                print(r.container_id)
                print(
                    f"frozen {r.frozen_s:.3f} s (dump {r.dump_s:.3f} s, rootfs "
                    f"{r.rootfs_s:.3f} s), bundle {r.bundle_bytes / 1e6:.1f} MB"
                    + (f", exported to {r.exported}" if r.exported else ""),
                    file=sys.stderr,
                )
            return 0
        if a.cmd == "restore":
            from migrate.restore import restore

            assert rt is not None
            if (a.container is None) == (a.import_file is None):
                print(
                    "jaula: error: restore takes a container or --import FILE (one of them)",
                    file=sys.stderr,
                )
                return runtime_cli.EXIT_ERROR
            if a.name and a.import_file is None:
                print("jaula: error: --name goes with --import", file=sys.stderr)
                return runtime_cli.EXIT_ERROR
            c = restore(
                rt,
                a.container,
                import_file=a.import_file,
                name=a.name,
                signers=_signers(a.node_config) if a.import_file is not None else {},
                insecure_unsigned=a.insecure_unsigned,
            )
            print(c.id)
            return 0
        if a.cmd == "node" and a.node_cmd == "keygen":
            from migrate.keys import keygen_command, load_public, load_secret, signing_public

            pub, sec = keygen_command(a.out, a.name)
            print(f"{pub}\n{sec}\npublic key: {load_public(pub).decode()}")
            # for the cluster file's signing_key: the key its exported bundles are signed with
            print(f"signing key: {signing_public(load_secret(sec)[1])}")
            return 0
        if a.cmd == "node" and a.node_cmd == "serve":
            from migrate.config import load_node
            from migrate.node import NodeService

            cfg, cluster = load_node(a.config)
            try:
                asyncio.run(_serve_until_stopped(NodeService(cfg, cluster, a.peer_timeout)))
            except KeyboardInterrupt:
                pass
            return 0
        return None


NODE_CONFIG_ENV = "JAULA_NODE_CONFIG"


def _node_config_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--node-config",
        type=Path,
        default=os.environ.get(NODE_CONFIG_ENV) or None,
        metavar="FILE",
        help=f"this node's TOML config: {what} (default: ${NODE_CONFIG_ENV}, else the node "
        "whose state root this is)",
    )


def _signer(node_config: Path | None) -> tuple[str, Any] | None:
    """(node name, Ed25519 signing key) of the node config, or None without one."""
    if node_config is None:
        return None
    from migrate import keys
    from migrate.config import load_node

    cfg, _ = load_node(node_config)
    _, secret = keys.load_secret(cfg.secret_key)
    return cfg.name, keys.signing_key(secret)


def _signers(node_config: Path | None) -> dict[str, bytes]:
    """node -> bundle-signing public key, from the cluster file of the node config."""
    if node_config is None:
        return {}
    from migrate.config import load_node

    _, cluster = load_node(node_config)
    return {n: p.signing_key for n, p in cluster.nodes.items() if p.signing_key is not None}


def _set_admission(rt: Runtime, cmd: str) -> None:
    """Claim and release as the node whose state root ``rt`` is.  ``rm`` works without the
    store (the node's next reconcile releases the claim); ``run`` and ``restore`` do not."""
    from migrate.membership import local_admission

    try:
        rt.admission = local_admission(rt)
        if rt.admission is not None:  # and its leases: one store for service and commands
            from migrate.net_leases import ClusterLeases

            rt.leases = ClusterLeases(rt.admission.state)
    except JaulaError as e:  # the store, or the node's config or keys
        if cmd != "rm":
            raise
        print(f"jaula: warning: {e}; removing without releasing the claim", file=sys.stderr)


async def _serve_until_stopped(service: Any) -> None:
    """Serve until SIGTERM or SIGINT, then stop cleanly (the membership lease is given up,
    so `jaula node ls` shows the node lost at once)."""
    import signal

    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(service.serve())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass


def add_migrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("container", help="name, id or id prefix of a running container")
    p.add_argument("destination", help="name of the node to move it to")
    p.add_argument(
        "--from", dest="source", help="the node it runs on (default: found by asking every node)"
    )
    p.add_argument(
        "--strategy",
        default="cold",
        choices=["cold", "postcopy"],
        help="cold: stop-and-copy (default); postcopy: restore first and fetch "
        "the memory pages after the resume (CRIU lazy pages): shorter downtime, "
        "but until the last page arrives the container needs both nodes",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


# -- cluster init / join -----------------------------------------------------------------------


def add_cluster_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cl = sub.add_parser("cluster", help="write a cluster directory: keys, cluster file, configs")
    csub = cl.add_subparsers(dest="cluster_cmd", required=True, metavar="COMMAND")
    ini = csub.add_parser(
        "init",
        help="new cluster in DIR: keys, cluster.toml, NODE.toml per node, "
        "OPERATOR-client.toml per operator (never overwrites a file)",
    )
    ini.add_argument("dir", type=Path, help="the directory (created when missing)")
    ini.add_argument(
        "--nodes", required=True, help="node names, comma-separated (e.g. node1,node2)"
    )
    ini.add_argument(
        "--operators",
        default="admin",
        help="operator names, comma-separated, or '' for none (default: admin)",
    )
    ini.add_argument(
        "--listen-host",
        default="127.0.0.1",
        help="host the nodes listen on and are reached at (default 127.0.0.1)",
    )
    ini.add_argument(
        "--base-port",
        type=int,
        default=7001,
        help="port of the first node, the next ones follow (default 7001; 0: free ports "
        "the kernel picks on the listen host now)",
    )
    ini.add_argument(
        "--state",
        choices=["files", "etcd"],
        default="files",
        help="the cluster state: files (one host, the default) or etcd (writes its CA, "
        "member and client certificates in DIR/etcd and the [state] table)",
    )
    ini.add_argument(
        "--etcd-endpoints",
        default="",
        metavar="URLS",
        help="with --state etcd: the members' client URLs, comma-separated "
        "(https://HOST:2379,...); one member certificate each",
    )
    ini.add_argument(
        "--etcd-hosts",
        default="",
        metavar="HOSTS",
        help="with --state etcd: more names or IPs every member certificate is valid for",
    )
    pe = csub.add_parser(
        "provision-etcd",
        help="create the etcd users and roles of the cluster in DIR and turn auth on "
        "(once its etcd members run; idempotent)",
    )
    pe.add_argument("dir", type=Path, help="a directory made by `jaula cluster init --state etcd`")
    pe.add_argument("--admin", help="the operator whose key is etcd's root (default: the first)")
    jn = csub.add_parser(
        "join", help="add a node to the cluster in DIR: its keys, NODE.toml, its cluster.toml entry"
    )
    jn.add_argument("dir", type=Path, help="a directory made by `jaula cluster init`")
    jn.add_argument("--node", dest="join_node", metavar="NAME", required=True, help="its name")
    jn.add_argument("--endpoint", required=True, help="where the others reach it: tcp://HOST:PORT")
    jn.add_argument("--listen", help="what it binds (default: the endpoint; tcp://*:PORT: all)")
    for p in (ini, jn):
        p.add_argument(
            "--state-dir",
            type=Path,
            help="parent of each node's state root (default DIR/state: node N gets DIR/state/N)",
        )
        p.add_argument(
            "--cgroup-parent",
            metavar="TEMPLATE",
            help="each node's cgroup_parent, {node} replaced by its name (default: none "
            "written; the runtime derives jaula-<hash of the state root>)",
        )


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def cluster_command(a: argparse.Namespace) -> int:
    """``jaula cluster init|join``: call :mod:`migrate.cluster_init`, print what it wrote."""
    from migrate import cluster_init

    if a.cluster_cmd == "provision-etcd":
        admin = cluster_init.provision_etcd(a.dir, a.admin)
        print(f"etcd provisioned for {a.dir / cluster_init.CLUSTER_FILE} (root: {admin})")
        return 0
    if a.cluster_cmd == "init":
        if a.state == "files" and (a.etcd_endpoints or a.etcd_hosts):
            raise JaulaError("--etcd-endpoints and --etcd-hosts go with --state etcd")
        endpoints = cluster_init.plan_endpoints(_names(a.nodes), a.listen_host, a.base_port)
        c = cluster_init.init_cluster(
            a.dir,
            endpoints,
            _names(a.operators),
            state_dir=a.state_dir,
            cgroup_parent=a.cgroup_parent,
        )
        written = list(c.written)
        if a.state == "etcd":
            written += cluster_init.add_etcd_state(
                c.root, _names(a.etcd_endpoints), _names(a.etcd_hosts)
            )
        for f in written:
            print(f)
        for nf in c.nodes.values():
            print(
                f"node {nf.name}: {nf.endpoint}, state root {nf.state_root}; start it with "
                f"`jaula node serve --config {nf.config}`",
                file=sys.stderr,
            )
        for of in c.operators.values():
            print(
                f"operator {of.name}: export JAULA_CLIENT_CONFIG={of.client_config} "
                "(or --client-config)",
                file=sys.stderr,
            )
        if a.state == "etcd":
            print(
                f'etcd: start each member with {c.root}/etcd/member-mN.crt (README "Cluster '
                f'state"), then `jaula cluster provision-etcd {c.root}`; keep etcd/ca.key '
                "off the nodes",
                file=sys.stderr,
            )
        return 0
    j = cluster_init.join_cluster(
        a.dir,
        a.join_node,
        a.endpoint,
        listen=a.listen,
        state_dir=a.state_dir,
        cgroup_parent=a.cgroup_parent,
    )
    for f in j.written:
        print(f)
    print(f"{j.cluster} (added [nodes.{j.node.name}])")
    print(
        f"node {j.node.name}: {j.node.endpoint}, state root {j.node.state_root}; start it with "
        f"`jaula node serve --config {j.node.config}`, and restart the running node services "
        "so that they accept it",
        file=sys.stderr,
    )
    return 0


# -- talking to node services -------------------------------------------------------------------


class Nodes:
    """Request/reply with the cluster's node services, as an operator."""

    def __init__(self, client_config: Path | None) -> None:
        from migrate.config import load_client_config, load_cluster

        self.client_cfg = load_client_config(client_config)
        self.cluster = load_cluster(self.client_cfg.cluster)
        self._next = 0
        self._session = secrets.token_hex(8)

    async def request(
        self,
        node: str,
        mtype: str,
        wait_s: float = 30.0,
        on_progress: Any = None,
        on_silence: Callable[[], Awaitable[None]] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Send one request to ``node`` and return its reply (``progress`` messages go to
        ``on_progress``).  When nothing arrives for ``wait_s`` seconds, ``on_silence`` is
        awaited: it raises to give up, or returns to wait ``wait_s`` more.

        Raises PeerUnavailable (silence, without ``on_silence``), MigrationError with the
        node's error, or what ``on_silence`` raises."""
        from migrate.protocol import decode, encode
        from migrate.transport import Client

        self._next += 1
        # unique across processes: a node refuses a state-changing request whose id it saw
        rid = f"{self._session}-{self._next}"
        client = await Client.for_peer(self.client_cfg, self.cluster, node)
        try:
            await client.send(encode(mtype, id=rid, **fields))
            while True:
                try:
                    frames = await client.recv(timeout_s=wait_s)
                except PeerUnavailable as e:
                    if on_silence is None or isinstance(e, KeyRefused):
                        raise
                    await on_silence()
                    continue
                msg, _ = decode(frames)
                if msg.get("id") != rid:
                    continue
                if msg["type"] == "progress":
                    if on_progress:
                        on_progress(msg)
                    continue
                if msg["type"] == "error":
                    raise MigrationError(f"{node}: {msg['message']}")
                return msg
        finally:
            client.close()


async def remote(a: argparse.Namespace) -> int:
    nodes = Nodes(a.client_config)
    if a.cmd == "node" and a.node_cmd in ("drain", "undrain"):
        return await asyncio.to_thread(_drain, nodes, a.drain_node, a.node_cmd == "drain")
    if a.cmd == "node":
        return await _node_ls(nodes)
    if a.cmd == "migrate":
        return await _migrate(nodes, a)
    node = a.node
    match a.cmd:
        case "ps":
            r = await nodes.request(node, "ps", all=a.all)
            _print_ps(r["items"], a.quiet, a.format)
        case "inspect":
            out = [
                (await nodes.request(node, "inspect", container=c))["info"] for c in a.containers
            ]
            print(json.dumps(out, indent=1))
        case "logs":
            if getattr(a, "follow", False):
                raise JaulaError("logs -f is local only: without -f, --node prints the log once")
            r = await nodes.request(
                node, "logs", container=a.container, **({"tail": a.tail} if a.tail else {})
            )
            sys.stdout.buffer.write(r["data"])
        case "exec":
            cmd = [x for x in a.command if x != "--"] if a.command[:1] == ["--"] else a.command
            r = await nodes.request(
                node, "exec", wait_s=90, container=a.container, args=list(cmd), env=list(a.env)
            )
            sys.stdout.buffer.write(r["stdout"])
            sys.stderr.buffer.write(r["stderr"])
            return int(r["exit_code"])
        case "stop":
            for c in a.containers:
                await nodes.request(
                    node, "stop", max(30.0, a.time + 30), container=c, timeout_s=a.time
                )
                print(c)
        case "rm":
            for c in a.containers:
                await nodes.request(node, "rm", container=c, force=a.force)
                print(c)
    return 0


def _print_ps(items: list[dict[str, Any]], quiet: bool = False, fmt: str = "table") -> None:
    if quiet:
        for i in items:
            print(i["id"][:12])
        return
    if fmt == "json":
        print(json.dumps(items, indent=1))
        return
    rows = [("CONTAINER ID", "IMAGE", "COMMAND", "STATUS", "NAMES")]
    for i in items:
        status = i["status"] + (f" -> {i['migrated_to']}" if i.get("migrated_to") else "")
        cmd = i["command"] if len(i["command"]) <= 20 else i["command"][:17] + "..."
        rows.append((i["id"][:12], i["image"], cmd, status, i["name"]))
    widths = [max(len(r[k]) for r in rows) for k in range(5)]
    for r in rows:
        print("  ".join(v.ljust(widths[k]) for k, v in enumerate(r)).rstrip())


def _cluster_members(nodes: Nodes) -> tuple[dict[str, str], dict[str, list[str]], str]:
    """From the cluster state: node -> ``ready``/``draining``/``lost``, node -> the
    containers it owns, and why the store could not be read ("" when it could)."""
    from migrate.cluster_state import ClusterStateError, open_state
    from migrate.membership import operator_name

    me = operator_name(nodes.cluster, nodes.client_cfg.public_key)
    if me is None:
        return {}, {}, "this client's key is not in the cluster file"
    try:
        state = open_state(nodes.cluster, me, nodes.client_cfg.secret_key)
    except (ClusterStateError, JaulaError) as e:
        return {}, {}, str(e)
    try:
        status = {m.name: m.status.value for m in state.members()}
        owned = {n: sorted(state.owned_by(n)) for n in nodes.cluster.nodes}
    except ClusterStateError as e:
        return {}, {}, str(e)
    finally:
        state.close()
    return status, owned, ""


async def _node_ls(nodes: Nodes) -> int:
    status, owned, why = await asyncio.to_thread(_cluster_members, nodes)
    if why:
        print(f"jaula: warning: cluster state not read: {why}", file=sys.stderr)
    rows = [("NODE", "STATE", "ENDPOINT", "REACHABLE", "LOAD", "MEM FREE", "CONTAINERS")]
    for name, peer in sorted(nodes.cluster.nodes.items()):
        st = status.get(name, "?" if why else "unregistered")
        if st == "lost":
            # never asked, never started elsewhere: what it owned is unknown until it returns
            lost = ", ".join(f"{cid[:12]} unknown (node lost)" for cid in owned.get(name, []))
            rows.append((name, st, peer.endpoint or "", "-", "-", "-", lost or "-"))
            continue
        try:
            pong = await nodes.request(name, "ping", wait_s=3.0)
            ps = await nodes.request(name, "ps", wait_s=5.0)
            load = pong.get("load", {})
            names = ",".join(i["name"] for i in ps["items"]) or "-"
            rows.append(
                (
                    name,
                    st,
                    peer.endpoint or "",
                    "yes",
                    f"{load.get('loadavg1', 0):.2f}",
                    f"{load.get('mem_available_bytes', 0) / 2**30:.1f} GiB",
                    names,
                )
            )
        except (PeerUnavailable, MigrationError) as e:
            rows.append((name, st, peer.endpoint or "", "no", "-", "-", str(e)[:60]))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(widths[k]) for k, v in enumerate(r)).rstrip())
    return 0


def operator_name(nodes: Nodes) -> str:
    """Our name in the cluster file: the operator (or node) whose public key we hold.

    Raises:
        MigrationError: the cluster file does not list our key."""
    peer = nodes.cluster.by_key(nodes.client_cfg.public_key)
    if peer is None:
        raise MigrationError(
            f"the cluster file {nodes.cluster.source} does not list the public key of "
            f"{nodes.client_cfg.source}: add it under [operators] (`jaula cluster init`)"
        )
    return peer.name


def _drain(nodes: Nodes, node: str, draining: bool) -> int:
    """``jaula node drain|undrain NODE``: the member's ``draining`` flag in the cluster
    state (the balancer empties a draining node and sends nothing to it)."""
    from migrate.cluster_state import MemberLost, open_state

    if node not in nodes.cluster.nodes:
        raise MigrationError(
            f"unknown node {node!r}: the cluster has {', '.join(sorted(nodes.cluster.nodes))}"
        )
    state = open_state(nodes.cluster, operator_name(nodes), nodes.client_cfg.secret_key)
    try:
        state.set_draining(node, draining)
        state.append_event(
            "node.drain" if draining else "node.undrain", operator_name(nodes), {"node": node}
        )
    except MemberLost:
        raise MigrationError(
            f"node {node} never registered in the cluster state: start its service "
            "(`jaula node serve`), which registers it, then drain it"
        ) from None
    finally:
        state.close()
    print(f"{node} {'draining' if draining else 'ready'}")
    return 0


async def find_container(nodes: Nodes, ref: str) -> str:
    """The node where ``ref`` is running (asks every node)."""
    found = []
    unreachable = []
    for name in sorted(nodes.cluster.nodes):
        try:
            r = await nodes.request(name, "ps", wait_s=5.0, all=False)
        except (PeerUnavailable, MigrationError):
            unreachable.append(name)
            continue
        if any(ref in (i["name"], i["id"]) or i["id"].startswith(ref) for i in r["items"]):
            found.append(name)
    if not found:
        down = (
            (
                f"; not reachable, so not asked: {', '.join(unreachable)} (start their "
                "service, or give --from)"
            )
            if unreachable
            else ""
        )
        raise MigrationError(
            f"no reachable node runs a container {ref!r} (see `jaula node ls`){down}"
        )
    if len(found) > 1:
        raise MigrationError(f"{ref!r} runs on several nodes ({', '.join(found)}): give --from")
    return found[0]


#: seconds without a heartbeat from the source before the CLI asks whether it is still there
#: (the service sends one every migrate.protocol.HEARTBEAT_S)
SILENCE_S = 5.0
#: seconds a silent source may stay unreachable (a restart takes a second or two) before
#: the CLI gives up on it and looks for the container
SOURCE_GONE_S = 30.0
#: seconds to wait for the nodes to settle where the container runs after that
SETTLE_S = 60.0


class _SourceLost(Exception):
    """The source service restarted (``restarted``) or is gone, and our request with it."""

    def __init__(self, restarted: bool, phase: str) -> None:
        super().__init__(phase)
        self.restarted = restarted
        self.phase = phase


class _Watch:
    """What the CLI heard of the source during a migration: its incarnation (from the ping
    before the request), the last phase its heartbeat named.  :meth:`silence` is the
    request's ``on_silence``: it pings the source and raises :class:`_SourceLost` when
    another incarnation answers, or none for SOURCE_GONE_S seconds."""

    def __init__(self, nodes: Nodes, source: str, incarnation: str, progress: _Progress) -> None:
        self.nodes = nodes
        self.source = source
        self.incarnation = incarnation
        self.progress = progress
        self.phase = "preflight"

    def update(self, msg: dict[str, Any]) -> None:
        self.phase = msg.get("phase", self.phase)
        if not msg.get("heartbeat"):
            self.progress.update(msg)

    async def silence(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SOURCE_GONE_S
        while True:
            try:
                pong = await self.nodes.request(self.source, "ping", wait_s=2.0)
            except (PeerUnavailable, MigrationError):
                pong = None
            if pong is not None:
                if pong.get("incarnation") == self.incarnation:
                    return  # the same service, slow to speak: wait on
                raise _SourceLost(True, self.phase)
            if loop.time() > deadline:
                raise _SourceLost(False, self.phase)
            await asyncio.sleep(1.0)


async def _locate(nodes: Nodes, cid: str) -> dict[str, str]:
    """node -> status of container ``cid`` there, once the nodes agree (it runs on one node
    and is migrating on none) or SETTLE_S seconds passed; unreachable nodes are left out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_S
    while True:
        where: dict[str, str] = {}
        for name in sorted(nodes.cluster.nodes):
            try:
                r = await nodes.request(name, "ps", wait_s=5.0, all=True)
            except (PeerUnavailable, MigrationError):
                continue
            for i in r["items"]:
                if i["id"] == cid:
                    where[name] = i["status"]
        statuses = list(where.values())
        settled = statuses.count("running") == 1 and "migrating" not in statuses
        if settled or loop.time() > deadline:
            return where
        await asyncio.sleep(1.0)


async def _container_id(nodes: Nodes, node: str, ref: str) -> str:
    """The id of ``ref`` on ``node`` (running ones first), or ``ref`` itself when the node
    has none such: its service then refuses the migration and says why."""
    r = await nodes.request(node, "ps", wait_s=5.0, all=True)
    items = sorted(r["items"], key=lambda i: i["status"] != "running")
    for i in items:
        if ref in (i["name"], i["id"]) or i["id"].startswith(ref):
            return str(i["id"])
    return ref


async def _after_source_lost(
    nodes: Nodes, a: argparse.Namespace, source: str, cid: str, lost: _SourceLost
) -> int:
    """The source restarted or went away during the migration: say where the container
    runs now.  Returns 0 when it runs on the destination (the migration went through, its
    report is lost); raises MigrationError otherwise."""
    what = (
        f"{source}'s service restarted during the migration (phase {lost.phase}), and the "
        "request died with it"
        if lost.restarted
        else f"{source}'s service stopped answering during the migration (phase "
        f"{lost.phase}) and did not come back within {SOURCE_GONE_S:.0f} s"
    )
    print(f"jaula: {what}; looking for {a.container}...", file=sys.stderr)
    where = await _locate(nodes, cid)
    running = [n for n, st in where.items() if st == "running"]
    seen = ", ".join(f"{n} {st}" for n, st in sorted(where.items())) or "on no reachable node"
    if running == [a.destination]:
        print(
            f"migrated {a.container} ({cid[:12]}) {source} -> {a.destination} ({what}; "
            "the report is lost)"
        )
        return 0
    if len(running) == 1:
        raise MigrationError(
            f"{what}: {a.container} ({cid[:12]}) runs on {running[0]} now; "
            f"migrate it again if you still want it on {a.destination}"
        )
    raise MigrationError(
        f"{what}: where {a.container} ({cid[:12]}) runs is not settled after {SETTLE_S:.0f} s "
        f"({seen}): see `jaula node ls` and the node services' logs"
    )


async def _migrate(nodes: Nodes, a: argparse.Namespace) -> int:
    source = a.source or await find_container(nodes, a.container)
    try:  # a short question first: a migration may rightly take minutes, a ping not
        pong = await nodes.request(source, "ping", wait_s=5.0)
    except PeerUnavailable as e:
        raise MigrationError(
            f"{source} is not reachable ({e}): start its service (`jaula node "
            "serve`) or check the cluster file; nothing was done"
        ) from e
    cid = await _container_id(nodes, source, a.container)
    progress = _Progress(enabled=sys.stderr.isatty() and not a.json)
    incarnation = pong.get("incarnation")
    watch = _Watch(nodes, source, str(incarnation), progress)
    try:
        r = await nodes.request(
            source,
            "migrate",
            # a service without heartbeats (no incarnation) is given the old 600 s
            wait_s=SILENCE_S if incarnation else 600.0,
            on_progress=watch.update,
            on_silence=watch.silence if incarnation else None,
            container=a.container,
            destination=a.destination,
            strategy=a.strategy,
        )
    except _SourceLost as lost:
        progress.close()  # before we print
        return await _after_source_lost(nodes, a, source, cid, lost)
    finally:
        progress.close()
    rep = r["report"]
    if a.json:
        print(json.dumps(rep, indent=1))
        return 0
    print(
        f"migrated {rep['name']} ({rep['container_id'][:12]}) {rep['source']} -> "
        f"{rep['destination']}"
    )
    for ph, t in rep["phases_s"].items():
        print(f"  {ph:<10} {t:8.3f} s")
    ps = rep.get("page_server_bytes", 0)
    pages = f" (memory pages {ps / 1e6:.1f} MB through the page server)" if ps else ""
    print(
        f"downtime {rep['downtime_s']:.3f} s, total {rep['total_s']:.3f} s, "
        f"{rep['bytes_sent'] / 1e6:.1f} MB sent{pages}, {rep['files']} files"
        + ("" if rep["resume_confirmed"] else " (resume not yet confirmed by the destination)")
    )
    if rep.get("postcopy_s"):
        print(f"post-copy: the last page arrived {rep['postcopy_s']:.3f} s after the resume")
    if rep.get("postcopy_error"):
        print(f"error: post-copy failed after the commit: {rep['postcopy_error']}", file=sys.stderr)
        return 1
    return 0


class _Progress:
    """A rich progress bar for the byte-moving phases, on a terminal only."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.tasks: dict[str, Any] = {}

    def update(self, msg: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        if self.bar is None:
            self.bar = Progress(
                TextColumn("{task.description:<10}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                transient=True,
            )
            self.bar.start()
        phase = msg["phase"]
        total = msg.get("total_bytes") or None
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(phase, total=total)
        self.bar.update(self.tasks[phase], completed=msg.get("done_bytes", 0), total=total)

    def close(self) -> None:
        """Stop the bar (idempotent)."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


EXTENSIONS = (MigrateCommands(),)


def jaula_main(argv: Sequence[str] | None = None) -> int:
    """The ``jaula`` console script."""
    return runtime_cli.main(argv, EXTENSIONS)


def migrate_main(argv: Sequence[str] | None = None) -> int:
    """The ``migrate`` console script: ``migrate CTR NODE`` = ``jaula migrate CTR NODE``."""
    args = list(sys.argv[1:] if argv is None else argv)
    globals_ = []
    while args and args[0] in ("--client-config", "--log-level"):
        globals_ += args[:2]
        args = args[2:]
    return jaula_main([*globals_, "migrate", *args])


if __name__ == "__main__":
    sys.exit(jaula_main())
