"""How much membership and ownership traffic a local 3-member etcd takes (issue 13, "Scale").

Starts 3 etcd members on 127.0.0.1 (TLS, auth, as the tests do: tests/helpers/etcd.py),
then, as operator ``admin``:

1. registers ``--nodes`` simulated nodes, each with its own lease (``--ttl`` s);
2. writes ``--containers`` ownership keys, spread over those nodes (batched transactions);
3. for ``--duration`` seconds: ``--renewers`` threads renew the leases round-robin as fast
   as they can, while one thread makes ownership compare-and-swaps (``transfer`` of a
   random container to another node, as the migration's commit does) and times each.

Prints one JSON object: renewals per second sustained (and what the nodes need: nodes /
(ttl / 3)), CAS latency p50/p99 in ms under that load, etcd's CPU seconds per second and
RSS per member.  The load is bounded by ``--duration``; everything it started is stopped.
Note: the client is Python on the same 2 cores as etcd, so the renewal rate is a lower
bound on what etcd sustains.

    .venv/bin/python -m benchmarks.cluster_state [--duration 60] [--nodes 1000]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from migrate.cluster_state import etcd as etcd_backend
from migrate.cluster_state.pki import etcd_password
from tests.helpers.etcd import ADMIN, state_cluster


def _cpu_s(pid: int) -> float:
    """utime + stime of ``pid``, seconds (/proc/PID/stat fields 14 and 15)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--containers", type=int, default=20000)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--ttl", type=float, default=10.0, help="membership lease, seconds")
    ap.add_argument("--renewers", type=int, default=8, help="renewal threads")
    args = ap.parse_args(argv)

    with (
        tempfile.TemporaryDirectory(prefix="jaula-bench-etcd-") as tmp,
        state_cluster(Path(tmp) / "c", "etcd", members=3, ttl_s=args.ttl) as sc,
    ):
        assert sc.etcd is not None
        cfg = sc.cluster().state
        admin = sc.open(ADMIN)

        def gateway() -> etcd_backend.Gateway:
            return etcd_backend.Gateway(
                cfg.endpoints,
                cfg.ca,  # type: ignore[arg-type]
                cfg.cert_for(ADMIN),
                cfg.key_for(ADMIN),
                cfg.timeout_s,
                ADMIN,
                etcd_password(ADMIN, sc.secret(ADMIN)),
            )

        nodes = [f"sim{i:04d}" for i in range(args.nodes)]
        gw = gateway()
        t0 = time.monotonic()
        owners: dict[str, str] = {}
        batch = []
        for i in range(args.containers):
            cid, node = f"{i:064x}", nodes[i % len(nodes)]
            owners[cid] = node
            batch.append(etcd_backend._put(etcd_backend.PREFIX + f"owners/{cid}", node))
            if len(batch) == 100:
                gw.txn([], batch)
                batch = []
        if batch:
            gw.txn([], batch)
        fill_s = time.monotonic() - t0

        stop = threading.Event()
        renewals = [0] * args.renewers
        errors: list[str] = []
        # renewer k renews its own leases in turn; they arrive while the nodes register
        ids: list[list[int]] = [[] for _ in range(args.renewers)]

        def renew(k: int) -> None:
            g = gateway()
            j = k
            try:
                mine = ids[k]
                while not stop.is_set():
                    if not mine:
                        time.sleep(0.01)
                        continue
                    j = (j + 1) % len(mine)
                    if g.keepalive(mine[j]) <= 0:
                        errors.append(f"lease {mine.pop(j)} expired")
                        continue
                    renewals[k] += 1
            except Exception as e:  # noqa: BLE001 - reported, not raised
                errors.append(repr(e))
            finally:
                g.close()

        cas_ms: list[float] = []

        def cas() -> None:
            rng = random.Random(13)
            keys = list(owners)
            while not stop.is_set():
                cid = rng.choice(keys)
                cur = admin.owner(cid)
                assert cur is not None
                to = rng.choice(nodes)
                t = time.perf_counter()
                admin.transfer(cid, cur.node, to, cur.revision)
                cas_ms.append((time.perf_counter() - t) * 1000)

        threads = [threading.Thread(target=renew, args=(k,)) for k in range(args.renewers)]
        for t in threads:
            t.start()
        t0 = time.monotonic()

        def register(i: int) -> None:
            admin.register(nodes[i], args.ttl)
            ids[i % args.renewers].append(admin._leases[nodes[i]])  # type: ignore[attr-defined]

        with ThreadPoolExecutor(args.renewers) as pool:
            list(pool.map(register, range(len(nodes))))
        register_s = time.monotonic() - t0

        pids = [m.proc.pid for m in sc.etcd.members if m.proc]
        cpu0 = [_cpu_s(p) for p in pids]
        renewals[:] = [0] * args.renewers  # the window starts now
        t0 = time.monotonic()
        threads.append(threading.Thread(target=cas))
        threads[-1].start()
        stop.wait(args.duration)
        stop.set()
        for t in threads:
            t.join()
        load_s = time.monotonic() - t0
        cpu = [_cpu_s(p) - c for p, c in zip(pids, cpu0, strict=True)]
        rss = [_rss_bytes(p) for p in pids]
        lost = sum(m.status.value == "lost" for m in admin.members())
        gw.close()

    total = sum(renewals)
    out = {
        "nodes": args.nodes,
        "containers": args.containers,
        "ttl_s": args.ttl,
        "register_s": round(register_s, 2),
        "fill_s": round(fill_s, 2),
        "load_s": round(load_s, 1),
        "renewals_per_s": round(total / load_s, 1),
        "renewals_needed_per_s": round(args.nodes / (args.ttl / 3), 1),
        "cas_count": len(cas_ms),
        "cas_p50_ms": round(statistics.median(cas_ms), 2) if cas_ms else None,
        "cas_p99_ms": round(_pct(cas_ms, 99), 2),
        "etcd_cpu_s_per_s": [round(c / load_s, 2) for c in cpu],
        "etcd_rss_mib": [round(r / 2**20, 1) for r in rss],
        "members_lost_at_end": lost,
        "errors": errors[:5],
    }
    print(json.dumps(out, indent=2))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
