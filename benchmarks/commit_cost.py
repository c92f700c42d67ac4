"""What the etcd commit point adds to a migration's downtime, against the ``files`` backend.

For each backend (``files``, and ``etcd`` with one real member on 127.0.0.1, TLS and auth
on, as the tests run it: tests/helpers/etcd.py) it starts two node services, runs one
small busybox container (a shell counter) and migrates it ``--runs`` times (cold), back and
forth.  Each report gives the downtime (the freeze to ``resumed``), the ``commit`` phase
(the owner key's compare-and-swap plus the local record) and the ``resume`` phase (the
destination's fencing read of the owner key, then the resume).  Prints one JSON object:
per backend the medians and every value; and the difference of the medians.  Everything
it started is stopped and removed.

    .venv/bin/python -m benchmarks.commit_cost [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.helpers.counter import COUNTER, wait_ticks
from tests.helpers.etcd import state_for
from tests.helpers.images import build_busybox_image, tools_missing
from tests.helpers.nodes import make_cluster, serving


def measure(backend: str, runs: int, layout: Path, work: Path) -> dict[str, Any]:
    root = work / backend
    c = make_cluster(root, layout)
    downtime, commit = [], []
    phases: dict[str, list[float]] = {}
    with state_for(root, backend, ("node1", "node2"), ("alice",)), serving(c):
        n1 = c.local("node1")
        n1.run("run", "-d", "--name", "bench", "busybox", "sh", "-c", COUNTER)
        wait_ticks(n1, "bench", 3)
        here, there = "node1", "node2"
        for _ in range(runs):
            p = c.op("migrate", "bench", there, "--from", here, "--json", timeout=180)
            rep = json.loads(p.stdout)
            downtime.append(rep["downtime_s"])
            commit.append(rep["phases_s"]["commit"])
            for ph, t in rep["phases_s"].items():
                phases.setdefault(ph, []).append(t)
            here, there = there, here
            wait_ticks(c.local(here), "bench", 1)
    return {
        "downtime_median_s": statistics.median(downtime),
        "commit_median_s": statistics.median(commit),
        "phase_medians_s": {ph: statistics.median(v) for ph, v in phases.items()},
        "downtime_s": downtime,
        "commit_s": commit,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="migrations per backend (default 5)")
    a = ap.parse_args(argv)
    if (why := tools_missing()) is not None:
        print(f"commit_cost: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="jaula-commit-cost-") as tmp:
        work = Path(tmp)
        layout = build_busybox_image(work / "image")
        out = {b: measure(b, a.runs, layout, work) for b in ("files", "etcd")}
    out["etcd_minus_files"] = {
        "downtime_median_s": round(
            out["etcd"]["downtime_median_s"] - out["files"]["downtime_median_s"], 6
        ),
        "commit_median_s": round(
            out["etcd"]["commit_median_s"] - out["files"]["commit_median_s"], 6
        ),
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
