"""What a node service reports of its load: the ``metrics`` request (:mod:`migrate.node`).

A :class:`MetricsSampler` samples, every ``interval_s`` (1 s), the host's CPU times and
memory (psutil) and, per running container, its cgroup's CPU time, memory and page-fault
count (:meth:`runtime.cgroups.CgroupManager.stats`, ``memory.stat``; v1 and v2 alike).  A
``metrics`` reply averages the samples of the last ``window_s`` (10 s): rates are the
difference between the oldest and the newest sample over the time between them (for a
container that started or arrived within the window, from its first sample as running).  The
sampler starts with the first request (which then waits about ``interval_s`` for a second
sample), so a node nobody asks never samples.

The reply (``node_metrics``), units in the names::

    node            str     this node's name
    at_s            float   time.time() of the newest sample
    window_s        float   time between the oldest and newest sample averaged
    cpu_cores       float   logical CPUs of the host (psutil.cpu_count)
    memory_bytes    int     host memory (psutil.virtual_memory().total)
    cpu_percent     float   0-100, the host's busy time over the window (all CPUs)
    memory_percent  float   0-100, psutil.virtual_memory().percent (newest sample)
    cpu_flags       [str]   the host CPU's flags (/proc/cpuinfo), what CRIU checks at restore
    image_layers    [str]   every layer digest in this node's image store
    containers      [map]   one per container (any status):
        id, name, status          str
        cpu_cores                 float  cores in use over the window (cgroup CPU time / s)
        memory_bytes              int    charged now (memory.usage_in_bytes / memory.current)
        dirty_bytes_per_s         float  estimate: page faults per second x page size
                                         (memory.stat pgfault), at most memory_bytes per s
        image_layers              [str]  the layer digests of its image
        pids                      int
        labels                    {str: str}  ``jaula run --label`` (jaula.balance=false pins it)

The dirty-page estimate is a lower bound: a page written again after its first fault
costs no fault (soft-dirty tracking would see it, but clearing the bits of a running
container's pages is not free); it tells a container that keeps touching fresh memory from
an idle one, which is what the cost model's slope needs.

Several nodes on one host (the tests, the demo) all report the host's CPU and memory; the
balancer then judges each node by its containers' share instead (``load_from =
"containers"`` in its configuration, :mod:`balancer.config`).
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import structlog

from runtime.container import Runtime
from runtime.errors import JaulaError
from runtime.state import ContainerStatus

log = structlog.get_logger(__name__)

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class ContainerSample:
    """One container at one instant (see the module docstring for the units)."""

    id: str
    name: str
    status: str
    cpu_usage_ns: int
    memory_bytes: int
    pgfault: int
    pids: int
    image_layers: tuple[str, ...]
    labels: dict[str, str]


@dataclass(frozen=True, slots=True)
class Sample:
    """The host and its containers at ``at_s`` (time.time()) / ``mono_s`` (monotonic)."""

    at_s: float
    mono_s: float
    busy_s: float
    total_s: float
    memory_percent: float
    containers: dict[str, ContainerSample] = field(default_factory=dict)


def _pgfault(cg_paths: dict[str, Any]) -> int:
    """``pgfault`` of the cgroup's ``memory.stat`` (v1: the ``memory`` hierarchy, which
    also has ``total_pgfault`` for the subtree; v2: the one directory), 0 when unreadable."""
    d = cg_paths.get("memory") or cg_paths.get("")
    if d is None:
        return 0
    try:
        text = (d / "memory.stat").read_text()
    except OSError:
        return 0
    stat: dict[str, int] = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if v.strip().isdigit():
            stat[k] = int(v)
    return stat.get("total_pgfault", stat.get("pgfault", 0))


def _running(s: Sample, cid: str) -> bool:
    c = s.containers.get(cid)
    return c is not None and c.status == ContainerStatus.RUNNING.value


def take_sample(rt: Runtime) -> Sample:
    """Sample the host and every container of ``rt`` now (blocking; reads /proc and the
    cgroup files).  A container whose cgroup cannot be read counts as using nothing."""
    t = psutil.cpu_times()
    total = sum(t)
    idle = t.idle + getattr(t, "iowait", 0.0)
    vm = psutil.virtual_memory()
    out: dict[str, ContainerSample] = {}
    for c in rt.list(all=True):
        cpu_ns = mem = faults = pids = 0
        if c.status in (ContainerStatus.RUNNING, ContainerStatus.PAUSED, ContainerStatus.MIGRATING):
            try:
                cg = c.cgroup()
                st = cg.stats()
                cpu_ns, mem, pids = st.cpu_usage_ns, st.memory_bytes, st.pids
                faults = _pgfault(cg.paths())
            except (JaulaError, OSError) as e:
                log.debug("metrics.cgroup_unreadable", id=c.id[:12], error=str(e))
        out[c.id] = ContainerSample(
            c.id,
            c.name,
            c.status.value,
            cpu_ns,
            mem,
            faults,
            pids,
            tuple(c.config.layers),
            c.config.label_map(),
        )
    return Sample(time.time(), time.monotonic(), total - idle, total, vm.percent, out)


class MetricsSampler:
    """Samples ``rt`` every ``interval_s`` and averages the last ``window_s`` (module doc).

    Args:
        rt: the node's runtime.
        node: the node's name (put in the reply).
        interval_s, window_s: seconds.
    """

    def __init__(
        self, rt: Runtime, node: str, interval_s: float = 1.0, window_s: float = 10.0
    ) -> None:
        self.rt = rt
        self.node = node
        self.interval_s = interval_s
        self.window_s = window_s
        self.samples: collections.deque[Sample] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._cpu_flags: list[str] | None = None

    async def _run(self) -> None:
        while True:
            try:
                s = await asyncio.to_thread(take_sample, self.rt)
            except Exception as e:  # noqa: BLE001 - a bad sample must not end the sampling
                log.warning("metrics.sample_failed", error=str(e))
            else:
                self.samples.append(s)
                while len(self.samples) > 2 and s.mono_s - self.samples[0].mono_s > self.window_s:
                    self.samples.popleft()
            await asyncio.sleep(self.interval_s)

    def start(self) -> asyncio.Task[None]:
        """Start sampling (idempotent); the task is the caller's to cancel."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return self._task

    async def report(self) -> dict[str, Any]:
        """The ``node_metrics`` reply's fields (module docstring); waits for a second sample
        when the sampler has just started (at most ``4 * interval_s + 5`` s)."""
        self.start()
        deadline = time.monotonic() + 4 * self.interval_s + 5.0
        while len(self.samples) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not self.samples:
            raise JaulaError(f"node {self.node}: no metrics sample could be taken")
        if self._cpu_flags is None:
            from migrate.bundle import cpu_flags

            self._cpu_flags = list(cpu_flags())
        first, last = self.samples[0], self.samples[-1]
        dt = last.mono_s - first.mono_s
        host_total = last.total_s - first.total_s
        cpu_percent = 100.0 * (last.busy_s - first.busy_s) / host_total if host_total > 0 else 0.0
        containers = []
        for cid, c in last.containers.items():
            # a container that started (or arrived) within the window: from its first
            # sample as running on (its restore, when it ran nothing, would dilute the rate)
            since = next((s for s in self.samples if _running(s, cid)), last)
            before = since.containers[cid]
            span = last.mono_s - since.mono_s
            cores = dirty = 0.0
            if span > 0:
                cores = max(0, c.cpu_usage_ns - before.cpu_usage_ns) / 1e9 / span
                faults = max(0, c.pgfault - before.pgfault)
                dirty = min(float(c.memory_bytes), faults * PAGE_BYTES / span)
            containers.append(
                {
                    "id": c.id,
                    "name": c.name,
                    "status": c.status,
                    "cpu_cores": cores,
                    "memory_bytes": c.memory_bytes,
                    "dirty_bytes_per_s": dirty,
                    "image_layers": list(c.image_layers),
                    "pids": c.pids,
                    "labels": c.labels,
                }
            )
        layers = sorted({la for im in self.rt.images.list() for la in im.layers})
        return {
            "node": self.node,
            "at_s": last.at_s,
            "window_s": dt,
            "cpu_cores": float(psutil.cpu_count() or 1),
            "memory_bytes": int(psutil.virtual_memory().total),
            "cpu_percent": min(100.0, max(0.0, cpu_percent)),
            "memory_percent": float(last.memory_percent),
            "cpu_flags": self._cpu_flags,
            "image_layers": layers,
            "containers": containers,
        }
