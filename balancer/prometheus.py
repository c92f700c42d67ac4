"""The balancer's figures for Prometheus: ``jaula balancer run --prometheus-port PORT``.

The daemon already polls every node's ``metrics`` each round, so it serves them for the
whole cluster in one place (one scrape target per cluster), with its own decisions and the
measured cost of its moves.  Names and units (Prometheus conventions)::

    jaula_node_cpu_percent{node}                   gauge      0-100, as the balancer judges it
    jaula_node_memory_percent{node}                gauge      0-100
    jaula_node_load{node}                          gauge      mean of the two, 0-1
    jaula_node_draining{node}                      gauge      1 while draining
    jaula_container_cpu_cores{node,container}      gauge      cores in use over the window
    jaula_container_memory_bytes{node,container}   gauge
    jaula_container_dirty_bytes_per_second{...}    gauge      the node's estimate
    jaula_balancer_imbalance                       gauge      stddev / mean of the node loads
    jaula_balancer_rounds_total{reason}            counter
    jaula_balancer_moves_total{result}             counter    result: finished | failed
    jaula_migration_downtime_seconds               histogram  of the balancer's moves
    jaula_migration_total_seconds                  histogram
    jaula_migration_bytes                          histogram  bytes on the wire

Container series are dropped when the container is gone from the view (a moved container's
series moves to its new node).  The figures are those of the last round.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from balancer.cluster import ClusterView
from balancer.policy import Decision, node_load

DOWNTIME_BUCKETS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
TOTAL_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
BYTES_BUCKETS = tuple(float(1 << k) for k in range(16, 37, 2))  # 64 KiB .. 64 GiB


class Exporter:
    """The registry of the figures above; :meth:`serve` exposes it over HTTP.

    Args:
        registry: where the metrics live (a fresh one by default, so that two exporters in
            one process, as in the tests, do not collide).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.node_cpu = Gauge("jaula_node_cpu_percent", "node CPU use", ["node"], registry=r)
        self.node_mem = Gauge("jaula_node_memory_percent", "node memory use", ["node"], registry=r)
        self.node_load = Gauge("jaula_node_load", "node load (0-1)", ["node"], registry=r)
        self.node_draining = Gauge("jaula_node_draining", "1 when draining", ["node"], registry=r)
        labels = ["node", "container"]
        self.ctr_cpu = Gauge("jaula_container_cpu_cores", "cores in use", labels, registry=r)
        self.ctr_mem = Gauge("jaula_container_memory_bytes", "memory charged", labels, registry=r)
        self.ctr_dirty = Gauge(
            "jaula_container_dirty_bytes_per_second", "dirty-rate estimate", labels, registry=r
        )
        self.imbalance = Gauge("jaula_balancer_imbalance", "stddev / mean of loads", registry=r)
        self.rounds = Counter("jaula_balancer_rounds", "rounds decided", ["reason"], registry=r)
        self.moves = Counter("jaula_balancer_moves", "moves ended", ["result"], registry=r)
        self.downtime = Histogram(
            "jaula_migration_downtime_seconds",
            "downtime of the balancer's moves",
            buckets=DOWNTIME_BUCKETS,
            registry=r,
        )
        self.total = Histogram(
            "jaula_migration_total_seconds",
            "total time of the balancer's moves",
            buckets=TOTAL_BUCKETS,
            registry=r,
        )
        self.bytes = Histogram(
            "jaula_migration_bytes",
            "bytes on the wire of the balancer's moves",
            buckets=BYTES_BUCKETS,
            registry=r,
        )
        self._series: set[tuple[str, str]] = set()

    def observe_round(self, view: ClusterView, decision: Decision) -> None:
        """Set the gauges from one round's view and count its decision."""
        for n in view.nodes:
            self.node_cpu.labels(n.name).set(n.cpu_percent)
            self.node_mem.labels(n.name).set(n.memory_percent)
            self.node_load.labels(n.name).set(node_load(n.cpu_percent, n.memory_percent))
            self.node_draining.labels(n.name).set(1.0 if n.draining else 0.0)
        now: set[tuple[str, str]] = set()
        for c in view.containers:
            key = (c.node, c.id)
            now.add(key)
            self.ctr_cpu.labels(*key).set(c.cpu_cores)
            self.ctr_mem.labels(*key).set(c.memory_bytes)
            self.ctr_dirty.labels(*key).set(c.dirty_bytes_per_s)
        for key in self._series - now:
            for g in (self.ctr_cpu, self.ctr_mem, self.ctr_dirty):
                try:
                    g.remove(*key)
                except KeyError:
                    pass
        self._series = now
        self.imbalance.set(decision.imbalance)
        self.rounds.labels(decision.reason.value).inc()

    def observe_move(self, ok: bool, downtime_s: float, total_s: float, bytes_sent: int) -> None:
        """Count one ended move; a finished one adds its measured cost to the histograms."""
        self.moves.labels("finished" if ok else "failed").inc()
        if ok:
            self.downtime.observe(downtime_s)
            self.total.observe(total_s)
            self.bytes.observe(bytes_sent)

    def serve(self, port: int, addr: str = "127.0.0.1") -> WSGIServer:
        """Serve ``/metrics`` on ``addr:port`` from a daemon thread of this process; returns
        the server (``shutdown()`` and ``server_close()`` end it).

        Raises:
            OSError: the port cannot be bound.
        """
        server, _thread = start_http_server(port, addr, registry=self.registry)
        return server
