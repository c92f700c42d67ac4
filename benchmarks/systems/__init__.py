"""The systems the migration benchmark compares: what each must offer the harness.

A system starts a workload's container on its "source", moves it to its "destination"
(:meth:`System.migrate`, timed and measured), gives the workload's checks a
:class:`~benchmarks.workloads.Probe` of the container where it is now, and removes
everything it made in :meth:`System.cleanup`, also after a failure or Ctrl-C.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from benchmarks.workloads import Image, Probe, Workload


@dataclass
class Moved:
    """The figures of one migration.

    Attributes:
        downtime_s: the system's own freeze-to-resume figure: jaula's report; for runc and
            podman (which report none) the wall time from the start of the checkpoint
            command to the end of the restore command, an upper bound.
        total_s: wall time of the commands an operator types, until the source is cleaned up.
        wire_bytes: jaula: payload bytes sent to the destination; runc: the CRIU image dir
            copied; podman: the exported checkpoint archive.
        cpu_src_s, cpu_dst_s: CPU seconds (user + system) spent on the source and the
            destination side (see each system's docstring for what is counted).
        window: wall-clock (time.time) start and end of the migration.
    """

    downtime_s: float
    total_s: float
    wire_bytes: int
    cpu_src_s: float
    cpu_dst_s: float
    window: tuple[float, float]
    cpu_client_s: float | None = None
    rss_peak_mib: float | None = None
    monitor_rss_mib: float | None = None
    detail: dict[str, object] = field(default_factory=dict)


class System(ABC):
    """One system (and strategy) under test."""

    name: str = ""
    strategy: str = ""

    @property
    def key(self) -> str:
        return f"{self.name} ({self.strategy})" if self.strategy else self.name

    @abstractmethod
    def setup(self, images: dict[str, Image]) -> None:
        """Make what every run needs (images imported, services started); raise on failure."""

    @abstractmethod
    def start(self, wl: Workload, name: str) -> object:
        """Start ``wl`` in a container named ``name`` on the source; return its handle."""

    @abstractmethod
    def probe(self, ctr: object) -> Probe:
        """The container where it runs now."""

    @abstractmethod
    def migrate(self, ctr: object) -> Moved:
        """Move the container to the destination (the handle then points there)."""

    @abstractmethod
    def remove(self, ctr: object) -> list[str]:
        """Remove the container wherever it is; return the problems."""

    @abstractmethod
    def cleanup(self) -> list[str]:
        """Remove everything this system made; return the problems."""

    def version(self) -> str:
        return ""
