"""Cluster state: who is in the cluster, who owns each container, leases, leaders, events.

One interface, :class:`ClusterState`, two backends chosen by the ``[state]`` table of the
cluster file (:class:`migrate.config.StateConfig`):

- ``files`` (:mod:`migrate.cluster_state.files`): the embedded default for nodes on one host
  (the demo, the tests): a directory of JSON documents, each changed under ``flock(2)`` and
  replaced atomically (temp file, fsync, rename).
- ``etcd`` (:mod:`migrate.cluster_state.etcd`): etcd 3.4+ through its gRPC gateway (JSON
  over HTTPS) with client certificates; ownership changes are etcd transactions, membership
  and leadership are etcd leases.

What the store holds, and the rules every backend keeps:

Membership
    A node service :meth:`~ClusterState.register` s with a lease of ``ttl_s`` (about 10 s)
    and :meth:`~ClusterState.renew` s it (every third of the TTL).  :meth:`~ClusterState.members`
    lists every node ever registered as ``ready``, ``draining`` (ready, but taking no new
    containers) or ``lost`` (its lease expired or was given up).  A renewal after expiry
    raises :class:`MemberLost`: the node must register again and reconcile its containers.

Ownership (the migration's commit point)
    The owner of container ``ID`` is one key holding a node name; its **revision** (a number
    that only grows, the etcd ``mod_revision``) is the fencing token.
    :meth:`~ClusterState.claim` takes an unowned id (or returns the caller's own claim);
    :meth:`~ClusterState.transfer` is a compare-and-swap from one node to another that
    succeeds only if the key still holds ``from_node`` at ``expected_revision``, so of two
    racing writers exactly one wins and the loser learns who owns the container now.

IP leases
    One address of a subnet per container, taken atomically (never two containers on one
    address); the lowest free host address after the first (the first is the gateway's).

Leadership
    :meth:`~ClusterState.campaign` returns a :class:`Leadership` when the caller leads
    ``name``; it can be lost (lease expired, store unreachable): ``lost`` is then set and
    the holder must stop acting as leader.  Its ``token`` grows with every new leader.

Events
    An append-only log for the balancer: :meth:`~ClusterState.append_event` and
    :meth:`~ClusterState.events_since` (a sequence number that only grows).

Errors all derive from :class:`ClusterStateError` (a :class:`migrate.errors.MigrationError`);
a store that cannot answer, or has no quorum, raises :class:`StateUnavailable`, whose message
says which (the caller must then refuse what needs the store, and keep what runs running).

Calls block (they are short requests or file operations); an asyncio caller runs them with
:func:`asyncio.to_thread`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, Self

from migrate.config import Cluster, StateBackend
from migrate.errors import MigrationError

__all__ = [
    "ClusterState",
    "ClusterStateError",
    "Event",
    "IpLease",
    "Leadership",
    "Member",
    "MemberLost",
    "MemberStatus",
    "NoAddressFree",
    "NotLeader",
    "Owner",
    "OwnershipConflict",
    "StaleRevision",
    "StateAuthError",
    "StateUnavailable",
    "open_state",
]


# -- errors -----------------------------------------------------------------------------------


class ClusterStateError(MigrationError):
    """Base of every cluster-state error."""


class StateUnavailable(ClusterStateError):
    """The store cannot answer now: unreachable, timed out, or (etcd) without quorum.

    Attributes:
        quorum_lost: True when etcd answered but has no leader (a majority of its members
            is down or cut off); False when nothing answered or the cause is unknown.
        maybe_applied: True when a write timed out: etcd may still apply it when it
            recovers, so read the key again before deciding what happened.
    """

    def __init__(
        self, message: str, quorum_lost: bool = False, maybe_applied: bool = False
    ) -> None:
        super().__init__(message)
        self.quorum_lost = quorum_lost
        self.maybe_applied = maybe_applied


class StateAuthError(ClusterStateError):
    """The store refused who we are: no or wrong client certificate, wrong credentials, or
    a permission our role does not have."""


class OwnershipConflict(ClusterStateError):
    """A container is owned by another node than the caller expected.

    Attributes:
        container_id: the container.
        owner: the node that owns it now (``None``: nobody does).
        revision: the owner key's revision now (0 when unowned).
    """

    def __init__(self, message: str, container_id: str, owner: str | None, revision: int) -> None:
        super().__init__(message)
        self.container_id = container_id
        self.owner = owner
        self.revision = revision


class StaleRevision(OwnershipConflict):
    """A :meth:`ClusterState.transfer` lost its compare-and-swap: the owner key is no longer
    at the expected revision (another writer came first).

    Attributes:
        expected_revision: the revision the caller expected.
    """

    def __init__(
        self,
        message: str,
        container_id: str,
        owner: str | None,
        revision: int,
        expected_revision: int,
    ) -> None:
        super().__init__(message, container_id, owner, revision)
        self.expected_revision = expected_revision


class MemberLost(ClusterStateError):
    """A node's membership lease expired (or was never granted by this client): it must
    :meth:`ClusterState.register` again and reconcile before it serves.

    Attributes:
        node: the node.
    """

    def __init__(self, message: str, node: str) -> None:
        super().__init__(message)
        self.node = node


class NotLeader(ClusterStateError):
    """A :meth:`ClusterState.campaign` timed out with another leader in place.

    Attributes:
        name: the election.
        leader: its leader now (``None`` when unknown).
    """

    def __init__(self, message: str, name: str, leader: str | None) -> None:
        super().__init__(message)
        self.name = name
        self.leader = leader


class NoAddressFree(ClusterStateError):
    """Every address of a subnet is leased (or the one asked for is another container's)."""


# -- values -----------------------------------------------------------------------------------


class MemberStatus(StrEnum):
    """A node as :meth:`ClusterState.members` sees it (``jaula node ls``)."""

    READY = "ready"
    DRAINING = "draining"
    LOST = "lost"


@dataclass(frozen=True)
class Member:
    """One node known to the store.

    Attributes:
        name: the node's name.
        status: :class:`MemberStatus`.
        registered_at: when it last registered, seconds since the epoch (its own clock).
    """

    name: str
    status: MemberStatus
    registered_at: float


@dataclass(frozen=True)
class Owner:
    """Who owns a container and the fencing token of that fact.

    Attributes:
        node: the owning node.
        revision: the owner key's revision (> 0); any later change of the key has a larger
            one.  Pass it to :meth:`ClusterState.transfer` as ``expected_revision``.
    """

    node: str
    revision: int


@dataclass(frozen=True)
class IpLease:
    """One address leased to one container.

    Attributes:
        subnet: the subnet in canonical form (``10.88.0.0/16``).
        address: the address (``10.88.0.2``).
        container_id: the container holding it.
    """

    subnet: str
    address: str
    container_id: str


@dataclass(frozen=True)
class Event:
    """One entry of the balancer's event log.

    Attributes:
        seq: its sequence number; later events have larger ones (not always consecutive).
        time: when it was appended, seconds since the epoch (the appender's clock).
        kind: what happened (``migration.started``, ``balancer.decision``...).
        node: who appended it.
        data: JSON-compatible details.
    """

    seq: int
    time: float
    kind: str
    node: str
    data: Mapping[str, Any] = field(default_factory=dict)


# -- the interface ----------------------------------------------------------------------------


class Leadership(Protocol):
    """Being the leader of one election, until :meth:`resign` or until it is lost.

    Attributes:
        name: the election (``balancer``).
        node: the leader (the caller).
        token: grows with every new leader of ``name``: a fencing token for what the leader
            writes elsewhere.
        lost: set when leadership ends for any reason (resigned, lease expired, store gone).
    """

    name: str
    node: str
    token: int
    lost: threading.Event

    def held(self) -> bool:
        """True while still the leader as far as this process knows (``not lost``)."""
        ...

    def resign(self) -> None:
        """Give leadership up now (another campaigner may take it at once); idempotent."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class ClusterState(Protocol):
    """The cluster's shared state (see the module docstring for the rules).

    Every method may raise :class:`StateUnavailable` (the store cannot answer) and
    :class:`StateAuthError` (the store refused us); the others are listed per method.
    """

    backend: StateBackend

    def close(self) -> None:
        """Stop background renewals (leaderships are lost) and release connections.  The
        membership leases are left to expire (use :meth:`deregister` to give them up)."""
        ...

    def ping(self) -> None:
        """Return when the store can take writes now (etcd: a linearizable read, which needs
        quorum), else StateUnavailable: what a migration's preflight asks before it
        freezes anything."""
        ...

    # membership
    def register(self, node: str, ttl_s: float | None = None) -> Member:
        """Start ``node``'s membership with a new lease of ``ttl_s`` seconds (default: the
        ``[state]`` ``ttl_s``); a previous lease of it is given up.  Returns it, ``ready``
        (or ``draining`` if it was draining)."""
        ...

    def renew(self, node: str) -> None:
        """Renew ``node``'s lease (call it every ``ttl_s / 3``).  MemberLost when the lease
        expired or this client never registered ``node``."""
        ...

    def set_draining(self, node: str, draining: bool) -> None:
        """Mark ``node`` as draining (or ready again); it stays a member either way.
        MemberLost when ``node`` was never registered."""
        ...

    def deregister(self, node: str) -> None:
        """Give ``node``'s lease up now: it shows as ``lost`` at once; idempotent."""
        ...

    def members(self) -> list[Member]:
        """Every node that ever registered, by name."""
        ...

    # ownership
    def claim(self, container_id: str, node: str) -> Owner:
        """Make ``node`` the owner of ``container_id`` if nobody owns it; returns the current
        claim unchanged if ``node`` already owns it.  OwnershipConflict naming the owner
        when another node does."""
        ...

    def transfer(
        self, container_id: str, from_node: str, to_node: str, expected_revision: int
    ) -> Owner:
        """Compare-and-swap the owner from ``from_node`` at ``expected_revision`` to
        ``to_node``; returns the new owner and revision.  StaleRevision when the key is not
        (any more) ``from_node`` at that revision, naming who owns it now."""
        ...

    def owner(self, container_id: str) -> Owner | None:
        """The owner of ``container_id``, or None when nobody owns it."""
        ...

    def release(self, container_id: str, node: str, expected_revision: int | None = None) -> bool:
        """Remove ``node``'s ownership of ``container_id`` (the container was deleted).
        Returns False when nobody owned it; OwnershipConflict when another node does, or
        (with ``expected_revision``) the revision differs."""
        ...

    def owned_by(self, node: str) -> dict[str, Owner]:
        """Every container ``node`` owns: container id -> :class:`Owner` (to reconcile a
        node's containers against the store when it starts)."""
        ...

    # IP leases
    def lease_ip(self, subnet: str, container_id: str, address: str | None = None) -> IpLease:
        """Lease an address of ``subnet`` (``10.88.0.0/16``) to ``container_id``: the one it
        already holds there, else ``address`` when given, else the lowest free host address
        after the first.  NoAddressFree when none is (or ``address`` is another's);
        ValueError for a bad subnet or an address outside it."""
        ...

    def release_ip(self, subnet: str, container_id: str) -> bool:
        """Give ``container_id``'s address in ``subnet`` back; False when it held none."""
        ...

    def ip_leases(self, subnet: str) -> list[IpLease]:
        """Every lease in ``subnet``, by address."""
        ...

    # leadership
    def campaign(
        self, name: str, node: str, ttl_s: float | None = None, timeout_s: float | None = None
    ) -> Leadership:
        """Become the leader of ``name``, waiting up to ``timeout_s`` seconds (None: as long
        as it takes) for the current one to go.  NotLeader on a time-out."""
        ...

    def leader(self, name: str) -> str | None:
        """The leader of ``name`` now, or None."""
        ...

    # events
    def append_event(self, kind: str, node: str, data: Mapping[str, Any] | None = None) -> Event:
        """Append one event (``data`` JSON-compatible); returns it with its sequence number."""
        ...

    def events_since(self, seq: int, limit: int = 1000) -> list[Event]:
        """The events after ``seq`` (0: from the start), oldest first, at most ``limit``."""
        ...


def open_state(cluster: Cluster, name: str, secret_key: bytes | None = None) -> ClusterState:
    """Open the store that ``cluster``'s ``[state]`` table names, as node or operator
    ``name``.

    Args:
        cluster: the loaded cluster file (:func:`migrate.config.load_cluster`).
        name: who we are: a node or operator of ``cluster``.
        secret_key: our CURVE secret key (40 Z85 bytes, the second item of
            :func:`migrate.keys.load_secret`); etcd needs it (our etcd password is derived
            from it), files does not.

    Raises:
        NodeConfigError: ``name`` is not in the cluster; etcd: no secret key, certificate
            files missing or not bound to ``name``'s CURVE key.
        StateUnavailable, StateAuthError: etcd cannot be reached or refuses us.
    """
    cfg = cluster.state
    if cfg.backend is StateBackend.ETCD:
        from migrate.cluster_state.etcd import EtcdState

        return EtcdState.open(cluster, name, secret_key)
    from migrate.cluster_state.files import FilesState

    root = cfg.path
    if root is None:
        from migrate.config import default_state_path

        if cluster.source is None:
            raise ClusterStateError(
                "the files backend needs a directory: give [state] path, or load the cluster "
                "from its file"
            )
        root = default_state_path(cluster.source)
    return FilesState(Path(root), ttl_s=cfg.ttl_s)
