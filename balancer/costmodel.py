"""What a move will cost, learnt from this cluster's own migration reports.

Every ``migrated`` reply carries a :class:`migrate.report.MigrationReport` (downtime, total
time, bytes, strategy).  :class:`CostModel` fits, per strategy, three small linear models by
weighted least squares::

    downtime_s ~ a0 + a1 * memory_GiB + a2 * dirty_GiB_per_s
    total_s    ~ b0 + b1 * memory_GiB + b2 * dirty_GiB_per_s
    bytes      ~ c0 + c1 * memory_GiB + c2 * dirty_GiB_per_s

The prior is the README's Benchmarks table (the 2026-11-29 run: memhog 16/256/1024 MiB
re-dirtying 1 % of its pages every 100 ms, Redis with 100 000 keys and an idle shell, each
strategy's median), entered as pseudo-observations of weight ``prior_weight`` each.  The
cluster's own reports (weight 1 each, the newest ``max_samples`` per strategy) are added to
them, so a young cluster predicts what the harness measured and an older one what it
measures itself.  A small ridge term (``RIDGE``) on the slopes keeps the fit defined when
memory and dirty rate move together (they do in the prior: memhog's dirty rate is 10 % of
its memory per second), at the price of sharing the slope between them until the cluster's
reports tell them apart.

Image layers: the bytes of the container's layers that the destination lacks are added to
the predicted bytes and, at ``link_bytes_per_s``, to the total time (the rootfs moves before
the freeze, so the downtime does not grow); layers already there make a move cheaper.

The idea of learning a migration's cost per VM from its own history is KubeVirt's
descheduler plugin ``KubevirtMigrationAware`` (its cool-down grows with the measured
duration of the VM's last migration); the weighing of cost against benefit is VMware DRS's
"CostBenefit" (Frank Denneman, "Disabling MinGoodness and CostBenefit", 2012).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

GIB = float(1 << 30)
MIB = 1 << 20
RIDGE = 1e-3  #: added to the diagonal of the slopes' normal equations
MIN_DOWNTIME_S = 0.05  #: a prediction is never below this (the freeze and resume steps)
MIN_TOTAL_S = 0.2

STRATEGIES = ("cold", "postcopy")


@dataclass(frozen=True, slots=True)
class MigrationSample:
    """One measured migration: what a :class:`~migrate.report.MigrationReport` says, with the
    container's memory and dirty rate as the balancer saw them when it chose the move."""

    strategy: str
    memory_bytes: int
    dirty_bytes_per_s: float
    downtime_s: float
    total_s: float
    bytes_sent: int


@dataclass(frozen=True, slots=True)
class PredictedCost:
    """The predicted cost of one move: ``downtime_s`` (frozen, seconds), ``bytes`` (on the
    wire), ``total_s`` (request to source cleaned up), for ``strategy``."""

    strategy: str
    downtime_s: float
    bytes: int
    total_s: float


def _readme_prior() -> tuple[MigrationSample, ...]:
    """README.md, "Benchmarks", latest run (2026-11-29): the median downtime (own), total and
    wire bytes per workload and strategy.  memhog dirties 10 % of its memory per second;
    Redis (about 22 MB resident) and the idle shell about nothing."""
    rows = [
        # (memory bytes, dirty B/s, cold downtime, cold total, postcopy downtime, pc total, MB)
        (16 * MIB, 0.1 * 16 * MIB, 0.164, 0.62, 0.145, 0.67, 28.1),
        (256 * MIB, 0.1 * 256 * MIB, 0.583, 1.07, 0.173, 1.02, 280.5),
        (1024 * MIB, 0.1 * 1024 * MIB, 3.424, 3.93, 0.282, 2.43, 1088.0),
        (22_000_000, 0.0, 0.201, 0.67, 0.169, 0.72, 34.3),
        (300_000, 0.0, 0.132, 0.57, 0.132, 0.62, 0.3),
    ]
    out: list[MigrationSample] = []
    for mem, dirty, cd, ct, pd, pt, mb in rows:
        out.append(MigrationSample("cold", mem, dirty, cd, ct, int(mb * 1e6)))
        out.append(MigrationSample("postcopy", mem, dirty, pd, pt, int(mb * 1e6)))
    return tuple(out)


README_PRIOR: tuple[MigrationSample, ...] = _readme_prior()


def _features(memory_bytes: float, dirty_bytes_per_s: float) -> tuple[float, float, float]:
    return (1.0, memory_bytes / GIB, dirty_bytes_per_s / GIB)


def _solve3(a: list[list[float]], b: list[float]) -> tuple[float, float, float]:
    """Solve the 3x3 system ``a x = b`` by Gaussian elimination with partial pivoting."""
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(3):
        piv = max(range(col, 3), key=lambda r: abs(m[r][col]))
        m[col], m[piv] = m[piv], m[col]
        p = m[col][col]
        if abs(p) < 1e-300:
            return (0.0, 0.0, 0.0)
        for r in range(3):
            if r != col:
                f = m[r][col] / p
                for k in range(col, 4):
                    m[r][k] -= f * m[col][k]
    return (m[0][3] / m[0][0], m[1][3] / m[1][1], m[2][3] / m[2][2])


def _fit(
    samples: Sequence[tuple[float, tuple[float, float, float], float]],
) -> tuple[float, float, float]:
    """Weighted ridge least squares of y on the three features: ``samples`` are
    ``(weight, x, y)``; returns the coefficients."""
    ata = [[0.0] * 3 for _ in range(3)]
    aty = [0.0] * 3
    for w, x, y in samples:
        for i in range(3):
            aty[i] += w * x[i] * y
            for j in range(3):
                ata[i][j] += w * x[i] * x[j]
    for i in (1, 2):
        ata[i][i] += RIDGE
    return _solve3(ata, aty)


@dataclass(frozen=True, slots=True)
class StrategyFit:
    """The fitted coefficients of one strategy (for ``[1, memory_GiB, dirty_GiB_per_s]``)
    and how many of the cluster's own reports went into them."""

    downtime: tuple[float, float, float]
    total: tuple[float, float, float]
    bytes: tuple[float, float, float]
    own_samples: int


class CostModel:
    """Per-strategy least-squares predictions of a move's cost (see the module docstring).

    Built once per round from the prior and the cluster's reports; :meth:`predict` is then
    O(1).  Immutable after construction.
    """

    __slots__ = ("fits", "link_bytes_per_s")

    def __init__(
        self,
        reports: Iterable[MigrationSample] = (),
        *,
        prior: Iterable[MigrationSample] = README_PRIOR,
        prior_weight: float = 2.0,
        max_samples: int = 500,
        link_bytes_per_s: float = 125e6,
        strategies: Sequence[str] = STRATEGIES,
    ) -> None:
        own: dict[str, list[MigrationSample]] = {s: [] for s in strategies}
        for r in reports:
            if r.strategy in own:
                own[r.strategy].append(r)
        base: dict[str, list[MigrationSample]] = {s: [] for s in strategies}
        for p in prior:
            if p.strategy in base:
                base[p.strategy].append(p)
        fits: dict[str, StrategyFit] = {}
        for s in strategies:
            mine = own[s][-max_samples:]
            weighted = [(prior_weight, p) for p in base[s]] + [(1.0, r) for r in mine]
            if not weighted:
                continue
            rows = [(w, _features(r.memory_bytes, r.dirty_bytes_per_s), r) for w, r in weighted]
            fits[s] = StrategyFit(
                downtime=_fit([(w, x, r.downtime_s) for w, x, r in rows]),
                total=_fit([(w, x, r.total_s) for w, x, r in rows]),
                bytes=_fit([(w, x, float(r.bytes_sent)) for w, x, r in rows]),
                own_samples=len(mine),
            )
        self.fits: Mapping[str, StrategyFit] = fits
        self.link_bytes_per_s = link_bytes_per_s

    @property
    def strategies(self) -> tuple[str, ...]:
        """The strategies it can predict (those with a prior or a report)."""
        return tuple(self.fits)

    def predict(
        self,
        strategy: str,
        memory_bytes: int,
        dirty_bytes_per_s: float,
        missing_layer_bytes: int = 0,
    ) -> PredictedCost:
        """The predicted cost of moving a container of ``memory_bytes`` rewriting
        ``dirty_bytes_per_s`` with ``strategy``, when the destination lacks
        ``missing_layer_bytes`` of its image.

        Raises:
            KeyError: the model has no fit for ``strategy``.
        """
        f = self.fits[strategy]
        x = _features(memory_bytes, dirty_bytes_per_s)
        down = sum(c * v for c, v in zip(f.downtime, x, strict=True))
        total = sum(c * v for c, v in zip(f.total, x, strict=True))
        nbytes = sum(c * v for c, v in zip(f.bytes, x, strict=True))
        down = max(MIN_DOWNTIME_S, down)
        total = max(MIN_TOTAL_S, total, down) + missing_layer_bytes / self.link_bytes_per_s
        return PredictedCost(strategy, down, int(max(0.0, nbytes) + missing_layer_bytes), total)
