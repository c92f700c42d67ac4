"""A node service's figures for Prometheus: ``metrics_port = PORT`` in its config file (off
when the key is absent; :mod:`migrate.config`).

The service serves ``GET /metrics`` (the text exposition format) over plain HTTP on the host of
its ``listen`` endpoint (``127.0.0.1`` for an ``ipc://`` one) and that port, from a daemon
thread of its own process (prometheus-client's server).  HTTP here carries no CURVE: bind it
where only the scraper can reach it.  The node's gauges are those of the ``metrics`` request
(:mod:`migrate.metrics`, the same sampler and the same averaging window), read at each scrape
by asking the service's event loop; the migrations it ran as their source are counted, and
the finished ones' measured cost is kept in histograms.  Names and units (Prometheus
conventions)::

    jaula_node_cpu_percent{node}                                gauge      0-100, host busy time
    jaula_node_memory_percent{node}                             gauge      0-100
    jaula_node_cpu_cores{node}                                  gauge      logical CPUs
    jaula_node_memory_bytes{node}                               gauge      host memory
    jaula_node_containers{node,status}                          gauge      containers per status
    jaula_container_cpu_cores{node,container,name}              gauge      cores over the window
    jaula_container_memory_bytes{node,container,name}           gauge      charged now
    jaula_container_dirty_bytes_per_second{node,container,name} gauge      the estimate
    jaula_node_migrations_total{node,strategy,result}           counter    result: finished | failed
    jaula_node_migration_downtime_seconds{node,strategy}        histogram  freeze to resume
    jaula_node_migration_total_seconds{node,strategy}           histogram  request to done
    jaula_node_migration_bytes{node,strategy}                   histogram  bytes on the wire

A scrape that cannot get the node's figures within ``SCRAPE_TIMEOUT_S`` (the sampler's first
samples, a stuck loop) serves the migration series alone and logs why.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = structlog.get_logger(__name__)

#: seconds, bucket bounds of the downtime histogram (a cold move's freeze to resume)
DOWNTIME_BUCKETS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
#: seconds, bucket bounds of a migration's total time
TOTAL_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: bytes, 64 KiB .. 64 GiB in steps of 4x
BYTES_BUCKETS = tuple(float(1 << k) for k in range(16, 37, 2))
#: seconds a scrape waits for the node's figures
SCRAPE_TIMEOUT_S = 10.0

#: returns the ``node_metrics`` reply's fields (:meth:`migrate.metrics.MetricsSampler.report`)
Figures = Callable[[], Awaitable[dict[str, Any]]]


class _NodeCollector(Collector):
    """The gauges, read from ``figures`` on the service's ``loop`` at each scrape."""

    def __init__(self, node: str, figures: Figures, loop: asyncio.AbstractEventLoop) -> None:
        self.node = node
        self.figures = figures
        self.loop = loop

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            fut = asyncio.run_coroutine_threadsafe(self._report(), self.loop)
            m = fut.result(timeout=SCRAPE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - a scrape serves what it has, and says why
            log.warning("prometheus.figures_unavailable", node=self.node, error=str(e) or repr(e))
            return
        node = [self.node]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["node"])
            g.add_metric(node, value)
            return g

        yield gauge(
            "jaula_node_cpu_percent", "host CPU busy over the window, 0-100", m["cpu_percent"]
        )
        yield gauge("jaula_node_memory_percent", "host memory in use, 0-100", m["memory_percent"])
        yield gauge("jaula_node_cpu_cores", "logical CPUs of the host", m["cpu_cores"])
        yield gauge("jaula_node_memory_bytes", "memory of the host", m["memory_bytes"])
        by_status = collections.Counter(str(c["status"]) for c in m["containers"])
        g = GaugeMetricFamily(
            "jaula_node_containers", "containers by status", labels=["node", "status"]
        )
        for status, n in sorted(by_status.items()):
            g.add_metric([self.node, status], n)
        yield g
        labels = ["node", "container", "name"]
        per = {
            "cpu_cores": GaugeMetricFamily(
                "jaula_container_cpu_cores", "cores in use over the window", labels=labels
            ),
            "memory_bytes": GaugeMetricFamily(
                "jaula_container_memory_bytes", "memory charged to the container", labels=labels
            ),
            "dirty_bytes_per_s": GaugeMetricFamily(
                "jaula_container_dirty_bytes_per_second", "dirty-page rate estimate", labels=labels
            ),
        }
        for c in m["containers"]:
            if c["status"] != "running":
                continue
            for key, fam in per.items():
                fam.add_metric([self.node, str(c["id"]), str(c["name"])], float(c[key]))
        yield from per.values()

    async def _report(self) -> dict[str, Any]:
        return await self.figures()


class NodeExporter:
    """One node service's registry (module docstring); :meth:`serve` exposes it.

    Args:
        node: the node's name (the ``node`` label).
        registry: where the metrics live (a fresh one by default, so that two services in
            one process, as in the tests, do not collide).
    """

    def __init__(self, node: str, registry: CollectorRegistry | None = None) -> None:
        self.node = node
        self.registry = registry or CollectorRegistry()
        r = self.registry
        by = ["node", "strategy"]
        self.migrations = Counter(
            "jaula_node_migrations",
            "migrations this node ran as their source",
            ["node", "strategy", "result"],
            registry=r,
        )
        self.downtime = Histogram(
            "jaula_node_migration_downtime_seconds",
            "downtime of the finished migrations from this node",
            by,
            buckets=DOWNTIME_BUCKETS,
            registry=r,
        )
        self.total = Histogram(
            "jaula_node_migration_total_seconds",
            "total time of the finished migrations from this node",
            by,
            buckets=TOTAL_BUCKETS,
            registry=r,
        )
        self.bytes = Histogram(
            "jaula_node_migration_bytes",
            "bytes on the wire of the finished migrations from this node",
            by,
            buckets=BYTES_BUCKETS,
            registry=r,
        )
        self._server: WSGIServer | None = None

    def observe_migration(
        self,
        strategy: str,
        ok: bool,
        downtime_s: float = 0.0,
        total_s: float = 0.0,
        bytes_sent: int = 0,
    ) -> None:
        """Count one migration that ended; a finished one adds its cost to the histograms."""
        self.migrations.labels(self.node, strategy, "finished" if ok else "failed").inc()
        if ok:
            self.downtime.labels(self.node, strategy).observe(downtime_s)
            self.total.labels(self.node, strategy).observe(total_s)
            self.bytes.labels(self.node, strategy).observe(bytes_sent)

    def serve(self, port: int, addr: str, figures: Figures) -> None:
        """Serve ``/metrics`` on ``addr:port`` from a daemon thread; the node gauges come
        from ``figures``, run on the calling (running) event loop at each scrape.

        Raises:
            OSError: the port cannot be bound (in use, or ``addr`` is not this host's).
        """
        self.registry.register(_NodeCollector(self.node, figures, asyncio.get_running_loop()))
        self._server, _thread = start_http_server(port, addr, registry=self.registry)
        log.info("prometheus.serving", node=self.node, addr=addr, port=port)

    def close(self) -> None:
        """Stop serving (idempotent); the registry keeps its figures."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
