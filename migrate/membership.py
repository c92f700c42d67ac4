"""A node's place in the cluster state: its membership and the ownership of its containers.

The cluster state (:mod:`migrate.cluster_state`) is opened by the node service at start
(:meth:`migrate.node.NodeService.serve`), which then:

1. registers the node with a lease of ``[state] ttl_s`` and renews it every third of it
   (:class:`Membership`); a renewal that finds the lease gone (:class:`MemberLost`: the
   service was stopped for longer than the TTL, or the store lost it) registers again and
   reconciles; a clean stop gives the lease up (``deregister``), so ``jaula node ls``
   shows the node ``lost`` at once;
2. reconciles (:func:`reconcile`): every container of this state root that may run here is
   claimed for the node, and every claim the store holds for the node with no container
   here any more (removed while the store could not be told) is released;
3. writes ``STATE_ROOT/cluster-node.json`` (:data:`NODE_FILE`): ``{"node": NAME,
   "config": "/abs/NODE.toml"}``, so that the local CLI acting on this state root
   (``jaula --state-root R run|restore|rm``) claims and releases as this node
   (:func:`local_admission`).

Ownership as the runtime sees it is :class:`NodeOwnership`, a
:class:`runtime.container.Admission`: ``run`` claims the new id before the container's
first process starts, ``restore`` and ``restore --import`` claim the id they bring back
(another node's claim refuses them, naming it: the double-import of a ``--leave-running``
export), a removal releases.  The migration moves the claim at its commit point
(:meth:`migrate.source.SourceSession._commit`).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import structlog

from migrate.cluster_state import (
    ClusterState,
    ClusterStateError,
    MemberLost,
    OwnershipConflict,
    StateUnavailable,
    open_state,
)
from migrate.config import Cluster, NodeConfig
from migrate.errors import MigrationError
from runtime.container import Runtime
from runtime.state import ContainerStatus

log = structlog.get_logger(__name__)
S = ContainerStatus

#: in a node's state root: which node (and config) it is, for the local CLI
NODE_FILE = "cluster-node.json"


class OwnershipRefused(MigrationError):
    """A container may not come to life here: another node owns it, or the cluster state
    cannot say who does."""


def open_node_state(cfg: NodeConfig, cluster: Cluster) -> ClusterState:
    """The cluster state as node ``cfg.name`` (its CURVE secret key is its etcd password).

    Raises NodeConfigError (the key cannot be read, etcd certificates missing),
    StateUnavailable, StateAuthError."""
    from migrate import keys

    _, secret = keys.load_secret(cfg.secret_key)
    return open_state(cluster, cfg.name, secret)


def operator_name(cluster: Cluster, public_key: bytes) -> str | None:
    """The operator (or node) of ``cluster`` whose CURVE public key is ``public_key``."""
    for name, peer in {**cluster.nodes, **cluster.operators}.items():
        if peer.public_key == public_key:
            return name
    return None


class NodeOwnership:
    """Claims and releases container ids for ``node`` (a :class:`runtime.container.Admission`).

    Args:
        state: the cluster state, opened as ``node``.
        node: this node's name.
    """

    def __init__(self, state: ClusterState, node: str) -> None:
        self.state = state
        self.node = node

    def claim(self, container_id: str) -> bool:
        """Claim ``container_id`` for this node; True when the claim is new.

        Raises OwnershipRefused: another node owns it (named), or the store cannot answer
        (nothing may start without a claim)."""
        try:
            before = self.state.owner(container_id)
            if before is not None and before.node == self.node:
                return False
            self.state.claim(container_id, self.node)
        except OwnershipConflict as e:
            raise OwnershipRefused(
                f"container {container_id[:12]} is owned by node {e.owner} (revision "
                f"{e.revision}): it runs, or may run, there; one id never runs on two nodes: "
                f"move it with `jaula migrate`, or remove it on {e.owner} first"
            ) from e
        except ClusterStateError as e:
            raise OwnershipRefused(
                f"cannot claim container {container_id[:12]} for {self.node}: the cluster "
                f"state is unavailable ({e}); nothing was started, retry when it is back"
            ) from e
        return True

    def release(self, container_id: str) -> None:
        """Give this node's claim of ``container_id`` up (it was removed).  Never raises:
        another node's claim stays (the container left for it); a store that cannot answer
        is logged, and the node's next reconcile releases the claim."""
        try:
            self.state.release(container_id, self.node)
        except OwnershipConflict:
            pass  # another node owns it: this was the record of a container that left
        except ClusterStateError as e:
            log.warning("ownership.release_failed", id=container_id[:12], error=str(e))


def write_node_file(root: Path, node: str, config: Path) -> None:
    """Record in state root ``root`` that it is node ``node`` configured by ``config``."""
    tmp = root / f".{NODE_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"node": node, "config": str(Path(config).resolve())}) + "\n")
    os.replace(tmp, root / NODE_FILE)


def node_config_of(root: Path) -> Path | None:
    """The node config recorded in state root ``root`` by its node service
    (:func:`write_node_file`), or None when it never belonged to one or the record cannot
    be read."""
    try:
        return Path(json.loads((root / NODE_FILE).read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def local_admission(rt: Runtime) -> NodeOwnership | None:
    """The ownership of the node whose state root ``rt`` is (its :data:`NODE_FILE`), for a
    local command; None when the state root never belonged to a node service.

    Raises NodeConfigError (its node config or keys cannot be loaded), OwnershipRefused
    (the store cannot be opened)."""
    path = rt.root / NODE_FILE
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise MigrationError(f"cannot read {path}: {e}; remove it or restart the node") from e
    from migrate.config import load_node

    cfg, cluster = load_node(rec["config"])
    try:
        return NodeOwnership(open_node_state(cfg, cluster), cfg.name)
    except StateUnavailable as e:
        raise OwnershipRefused(
            f"the cluster state of node {cfg.name} is unavailable ({e}): a container cannot "
            "be started, restored or released without it; retry when it is back"
        ) from e


def _may_run_here(status: ContainerStatus, incoming: bool) -> bool:
    """Whether a local container of this status is this node's to own: not a record of one
    that left (``migrated``), not one still arriving (its claim comes with the commit)."""
    if status is S.MIGRATED:
        return False
    return not (status is S.MIGRATING and incoming)


def reconcile(rt: Runtime, state: ClusterState, node: str) -> dict[str, Any]:
    """Bring the store's claims of ``node`` and the containers of ``rt`` together: claim
    each local container that may run here, release each claim with no container here.

    The claims are read before the containers are listed: a container being created claims
    after its directory exists, so it is never taken for a stale claim.  Conflicts (another
    node owns a local container) are logged and left alone.  Returns counts
    ``{"claimed", "released", "conflicts"}``.  Raises ClusterStateError (the store)."""
    owned = state.owned_by(node)
    local = {c.id: c for c in rt.list(all=True)}
    out = {"claimed": 0, "released": 0, "conflicts": 0}
    for cid, c in local.items():
        if not _may_run_here(c.status, c.state.incoming):
            continue
        if cid in owned:
            continue
        try:
            state.claim(cid, node)
            out["claimed"] += 1
        except OwnershipConflict as e:
            out["conflicts"] += 1
            log.error(
                "ownership.conflict",
                id=cid[:12],
                status=c.status.value,
                owner=e.owner,
                node=node,
            )
    for cid in owned:
        here = local.get(cid)
        if here is None or here.status is S.MIGRATED:
            try:
                if state.release(cid, node):
                    out["released"] += 1
            except OwnershipConflict:
                pass
    return out


class Membership:
    """Keep ``node`` registered in ``state`` while a node service runs.

    Args:
        rt: the node's runtime (reconciled when the lease had to be taken again).
        state: the cluster state opened as ``node``.
        node: the node's name.
        ttl_s: the lease; renewed every ``ttl_s / 3``.
    """

    def __init__(self, rt: Runtime, state: ClusterState, node: str, ttl_s: float) -> None:
        self.rt = rt
        self.state = state
        self.node = node
        self.ttl_s = ttl_s

    def join(self) -> None:
        """Register, then reconcile (blocking).  Raises ClusterStateError."""
        self.state.register(self.node, self.ttl_s)
        counts = reconcile(self.rt, self.state, self.node)
        log.info("membership.joined", node=self.node, ttl_s=self.ttl_s, **counts)

    async def keep(self) -> None:
        """Renew until cancelled; register again (and reconcile) when the lease was lost;
        a store that cannot answer is logged and tried again at the next period."""
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                await asyncio.to_thread(self.state.renew, self.node)
            except MemberLost as e:
                log.warning("membership.lost", node=self.node, error=str(e))
                try:
                    await asyncio.to_thread(self.join)
                except ClusterStateError as e2:
                    log.warning("membership.rejoin_failed", node=self.node, error=str(e2))
            except ClusterStateError as e:
                log.warning("membership.renew_failed", node=self.node, error=str(e))

    def leave(self) -> None:
        """Give the lease up now and close the store (blocking; errors logged)."""
        try:
            self.state.deregister(self.node)
        except ClusterStateError as e:
            log.warning("membership.deregister_failed", node=self.node, error=str(e))
        finally:
            try:
                self.state.close()
            except ClusterStateError as e:
                log.warning("membership.close_failed", node=self.node, error=str(e))
