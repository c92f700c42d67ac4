"""What the balancer sees of the cluster in one round: :class:`ClusterView`.

A view is a snapshot, built by the daemon from every node service's ``metrics`` reply (or by
the simulator, ``benchmarks/balancer_sim.py``), and read by the pure policy
(:func:`balancer.policy.plan`).  Nothing here talks to a node.

Figures and their units (all averaged by the node service over its sampling window)::

    NodeView                                   ContainerView
      name              str                      id                 str
      cpu_cores         float  capacity          node               str   where it runs now
      memory_bytes      int    capacity          status             ContainerStatus
      cpu_percent       float  0-100, all use    cpu_cores          float cores in use
      memory_percent    float  0-100, all use    memory_bytes       int   resident (cgroup)
      cpu_flags         frozenset[str]           dirty_bytes_per_s  float estimated rewrite rate
      image_layers      frozenset[str] digests   labels             Mapping[str, str]
      labels            Mapping[str, str]        image_layers       tuple[Layer, ...]
      draining          bool  (node drain)       cpu_flags          frozenset[str] it needs
      schedulable       bool  (takes new ones)

A node's percentages include what is not a container (the node service, the kernel), so a
move shifts ``100 * c.cpu_cores / node.cpu_cores`` CPU points and
``100 * c.memory_bytes / node.memory_bytes`` memory points between two nodes.  A container's
``cpu_flags`` are the CPU features its checkpoint will need on the destination (CRIU checks
them at restore; the daemon fills in those of the node the container started on, and an
empty set means "any").  Labels: ``jaula.balance=false`` (``jaula run --label``) pins a
container; on a node it means "never a destination".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from balancer.errors import ClusterViewError
from runtime.state import ContainerStatus

#: the label that opts a container (or a node, as a destination) out of balancing
BALANCE_LABEL = "jaula.balance"


def opted_out(labels: Mapping[str, str]) -> bool:
    """True when ``labels`` carry ``jaula.balance=false`` (also ``0``, ``no``, ``off``; the
    value's case does not matter)."""
    return labels.get(BALANCE_LABEL, "").strip().lower() in ("false", "0", "no", "off")


@dataclass(frozen=True, slots=True)
class Layer:
    """One image layer: its content ``digest`` (``sha256:...``) and packed ``size_bytes``."""

    digest: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class ContainerView:
    """One container as the balancer sees it (units in the names; see the module docstring)."""

    id: str
    node: str
    status: ContainerStatus
    cpu_cores: float
    memory_bytes: int
    dirty_bytes_per_s: float = 0.0
    labels: Mapping[str, str] = field(default_factory=dict)
    image_layers: tuple[Layer, ...] = ()
    cpu_flags: frozenset[str] = frozenset()

    @property
    def pinned(self) -> bool:
        """Labelled ``jaula.balance=false``: the balancer never moves it."""
        return opted_out(self.labels)


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as the balancer sees it (units in the names; see the module docstring).

    ``draining`` is set by ``jaula node drain``: the node takes no new containers and every
    container on it is to leave.  ``schedulable`` false (node cordoned, or it stopped
    answering) also keeps new containers away, without evacuating it.
    """

    name: str
    cpu_cores: float
    memory_bytes: int
    cpu_percent: float
    memory_percent: float
    cpu_flags: frozenset[str] = frozenset()
    image_layers: frozenset[str] = frozenset()
    labels: Mapping[str, str] = field(default_factory=dict)
    draining: bool = False
    schedulable: bool = True

    @property
    def free_memory_bytes(self) -> int:
        """Memory not in use: ``memory_bytes * (1 - memory_percent / 100)``."""
        return int(self.memory_bytes * (1.0 - self.memory_percent / 100.0))

    @property
    def accepts(self) -> bool:
        """Can be a destination: schedulable, not draining, not labelled out."""
        return self.schedulable and not self.draining and not opted_out(self.labels)


@dataclass(frozen=True, slots=True)
class ClusterView:
    """The cluster in one round: ``nodes`` and the ``containers`` on them, sampled at
    ``at_s`` (seconds, the daemon's clock: ``time.time()``)."""

    at_s: float
    nodes: tuple[NodeView, ...]
    containers: tuple[ContainerView, ...]

    @classmethod
    def of(
        cls, at_s: float, nodes: Iterable[NodeView], containers: Iterable[ContainerView]
    ) -> ClusterView:
        """A view from any iterables, checked with :meth:`validate`.

        Raises:
            ClusterViewError: see :meth:`validate`.
        """
        view = cls(at_s, tuple(nodes), tuple(containers))
        view.validate()
        return view

    def validate(self) -> None:
        """Check the view is consistent.

        Raises:
            ClusterViewError: two nodes share a name, a node has no capacity or a percentage
                outside 0-1000, a container names a node the view does not have, two
                containers share an id, or a figure is negative.
        """
        names: set[str] = set()
        for n in self.nodes:
            if n.name in names:
                raise ClusterViewError(f"node {n.name!r} is listed twice in the view")
            names.add(n.name)
            if n.cpu_cores <= 0 or n.memory_bytes <= 0:
                raise ClusterViewError(
                    f"node {n.name!r}: capacity must be > 0 (cpu_cores={n.cpu_cores}, "
                    f"memory_bytes={n.memory_bytes}); report psutil's cpu_count and total"
                )
            for what, pct in (("cpu_percent", n.cpu_percent), ("memory_percent", n.memory_percent)):
                if not 0.0 <= pct <= 1000.0:
                    raise ClusterViewError(f"node {n.name!r}: {what}={pct} is not a percentage")
        ids: set[str] = set()
        for c in self.containers:
            if c.id in ids:
                raise ClusterViewError(f"container {c.id!r} is listed twice in the view")
            ids.add(c.id)
            if c.node not in names:
                raise ClusterViewError(
                    f"container {c.id!r} is on node {c.node!r}, which the view does not list"
                )
            if c.cpu_cores < 0 or c.memory_bytes < 0 or c.dirty_bytes_per_s < 0:
                raise ClusterViewError(f"container {c.id!r}: a usage figure is negative")

    def node(self, name: str) -> NodeView:
        """The node called ``name``.

        Raises:
            ClusterViewError: the view has no such node.
        """
        for n in self.nodes:
            if n.name == name:
                return n
        raise ClusterViewError(f"the view has no node {name!r}")

    def containers_by_node(self) -> dict[str, list[ContainerView]]:
        """Node name -> its containers (every node present, maybe with an empty list)."""
        out: dict[str, list[ContainerView]] = {n.name: [] for n in self.nodes}
        for c in self.containers:
            out.setdefault(c.node, []).append(c)
        return out
