"""A fault campaign against real node services (``make chaos``; a sample in ``make test``).

Two node services on 127.0.0.1 (:class:`tests.helpers.nodes.Cluster2`), each reached
through a TCP proxy of ours so that the link can be cut.  One counter container
(:data:`tests.helpers.counter.COUNTER`, 60 MB of upperdir so that the transfer takes a
moment) is migrated back and forth; each migration gets one fault, injected when a phase
is observed from outside:

- ``transfer``: the destination has received a few MB of the rootfs (pre-copy);
- ``frozen``: the source's freezer cgroup reports the container frozen (freeze and dump);
- ``held``: the destination's restore waits at pre-resume on its hold socket (before the
  commit, or right after it);
- ``random``: at a random instant in the first seconds.

Faults: SIGKILL of the source's or the destination's service (restarted at once: a new
incarnation on the same endpoint), the control link cut for a few seconds (the proxy
drops every connection and refuses new ones), SIGKILL of the ``jaula migrate`` CLI.  The
cluster state backend is the files one, so there is no etcd to stop here.

After each fault the two-outcome rule is checked: once the nodes settle, the container
runs on exactly one node (``lost``: none; ``doubled``: two; ``stuck``: still migrating
somewhere, or the CLI never returned), its counter continued without a gap or a repeat
(``broken``), and nothing is left (``leaks``: incoming session dirs, hold sockets, CRIU
processes under the cluster's directory, a copy or mount of the container on the node it
left).  A post-copy lost because its source's service died in the post-copy window is
``window``, apart from ``lost`` (documented: :data:`NOT_BAD`).  A fault whose phase was never seen before the
migration ended is ``missed`` (counted, not injected).  The ledger is printed per phase,
fault and strategy, and written as JSON with ``--out``.

Run: ``python -m tests.chaos.campaign --faults 200 [--strategies cold,postcopy]
[--seed N] [--out FILE]`` as root (the exit code is 1 when anything was lost, doubled,
stuck, broken or leaked).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers.counter import assert_continuous, ticks, wait_ticks
from tests.helpers.faults import big_container, migrate_async
from tests.helpers.nodes import Cluster2, make_cluster

PHASES = ("transfer", "frozen", "held", "random")
FAULTS = ("kill-source", "kill-destination", "cut-link", "kill-cli")
OUTCOMES = ("lost", "doubled", "stuck", "broken", "leaks", "window", "missed")
#: outcomes that are not failures: a fault whose phase was never seen (``missed``), and a
#: post-copy lost to its source's service dying between the commit and the last page
#: (``window``): the source's CRIU serves the pages and dies with the service, and the
#: destination then kills the container rather than run it on missing pages, as the README
#: says ("from the commit to the last page, the container needs both nodes")
NOT_BAD = ("missed", "window")
NAME = "chaos"
SETTLE_S = 120.0
CUT_S = 4.0


class Proxy:
    """A TCP proxy 127.0.0.1:``port`` -> 127.0.0.1:``target`` whose link can be cut."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.blocked_until = 0.0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                a, _ = self.lsock.accept()
            except OSError:
                return
            if time.monotonic() < self.blocked_until:
                a.close()
                continue
            try:
                b = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                a.close()
                continue
            with self.lock:
                self.conns += [a, b]
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pipe, args=(x, y), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self, seconds: float) -> None:
        """Drop every connection and refuse new ones for ``seconds``."""
        self.blocked_until = time.monotonic() + seconds
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.closed = True
        self.lsock.close()
        self.cut(0)


@dataclass
class Ledger:
    """Faults and outcomes per (strategy, phase, fault)."""

    rows: dict[tuple[str, str, str], Counter[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, key: tuple[str, str, str], outcome: str | None) -> None:
        c = self.rows.setdefault(key, Counter())
        c["faults"] += 1
        if outcome:
            c[outcome] += 1

    def total(self, what: str) -> int:
        return sum(c[what] for c in self.rows.values())

    @property
    def bad(self) -> int:
        return sum(self.total(o) for o in OUTCOMES if o not in NOT_BAD)

    def table(self) -> str:
        head = ("strategy", "phase", "fault", "faults", *OUTCOMES)
        lines: list[tuple[str, ...]] = [head]
        for key in sorted(self.rows):
            c = self.rows[key]
            lines.append((*key, *(str(c[k]) for k in ("faults", *OUTCOMES))))
        lines.append(("total", "", "", *(str(self.total(k)) for k in ("faults", *OUTCOMES))))
        widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": [
                {"strategy": k[0], "phase": k[1], "fault": k[2], **dict(c)}
                for k, c in sorted(self.rows.items())
            ],
            "totals": {k: self.total(k) for k in ("faults", *OUTCOMES)},
            "notes": self.notes,
        }


class Campaign:
    """The cluster, the container and one fault per migration (see the module doc)."""

    def __init__(self, work: Path, layout: Path, seed: int, log: Any = print) -> None:
        self.work = work
        self.rng = random.Random(seed)
        self.log = log
        self.cluster: Cluster2 = make_cluster(work / "cluster", layout)
        text = self.cluster.files.cluster.read_text()
        self.proxies: dict[str, Proxy] = {}
        for node, ep in self.cluster.files.endpoints.items():
            port = int(ep.rsplit(":", 1)[1])
            self.proxies[node] = Proxy(port)
            text = text.replace(f'127.0.0.1:{port}"', f'127.0.0.1:{self.proxies[node].port}"')
        self.cluster.files.cluster.write_text(text)
        self.ledger = Ledger()

    # -- life -------------------------------------------------------------------------------
    def start(self) -> None:
        for n in ("node1", "node2"):
            self.cluster.start(n)
        j = self.cluster.local("node1")
        big_container(j, NAME, mib=60)
        wait_ticks(j, NAME, 3)
        self.cid = j.container_ids()[0]

    def close(self) -> list[str]:
        problems = self.cluster.close()
        for p in self.proxies.values():
            p.close()
        return problems

    def _fresh(self) -> None:
        """After a lost or doubled container: remove every copy and start a new one on
        node1, so that the campaign goes on."""
        for n in ("node1", "node2"):
            self.cluster.local(n).run("rm", "-f", self.cid, check=False)
        j = self.cluster.local("node1")
        big_container(j, NAME, mib=60)
        wait_ticks(j, NAME, 3)
        self.cid = j.container_ids()[0]

    # -- one fault --------------------------------------------------------------------------
    def running_on(self) -> str:
        where = self.cluster.where(NAME)
        running = [n for n, s in where.items() if s == "running"]
        if len(running) != 1:
            raise RuntimeError(f"{NAME} is not on exactly one node before a fault: {where}")
        return running[0]

    def _trigger(self, phase: str, src: str, dst: str, mig: subprocess.Popen[str]) -> bool:
        """Wait for ``phase``; False when the migration ended first."""
        from migrate.hold import stale_hold_sockets
        from runtime.cgroups import FreezerState
        from runtime.container import Runtime

        if phase == "random":
            time.sleep(self.rng.uniform(0.0, 3.0))
            return mig.poll() is None
        rt_src, rt_dst = (Runtime(self.cluster.state_root(n)) for n in (src, dst))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and mig.poll() is None:
            try:
                if phase == "transfer":
                    for d in self.cluster.incoming(dst):
                        f = d / "rootfs-base.tar"
                        if f.exists() and f.stat().st_size >= 5 << 20:
                            return True
                elif phase == "frozen":
                    if rt_src.get(NAME).cgroup().freezer_state() is FreezerState.FROZEN:
                        return True
                elif phase == "held" and stale_hold_sockets(rt_dst, set()):
                    return True
            except Exception:  # noqa: BLE001, S110 - a file or cgroup that just went away
                pass
            time.sleep(0.005)
        return False

    def _inject(self, fault: str, src: str, dst: str, mig: subprocess.Popen[str]) -> None:
        if fault == "kill-source":
            self.cluster.kill(src)
            self.cluster.start(src)
        elif fault == "kill-destination":
            self.cluster.kill(dst)
            self.cluster.start(dst)
        elif fault == "cut-link":
            self.proxies[dst].cut(CUT_S)
        elif fault == "kill-cli":
            mig.send_signal(signal.SIGKILL)

    def _settle(self) -> dict[str, str]:
        deadline = time.monotonic() + SETTLE_S
        while True:
            where = self.cluster.where(NAME)
            st = list(where.values())
            if (st.count("running") == 1 and "migrating" not in st) or time.monotonic() > deadline:
                return where
            time.sleep(0.5)

    def _leaks(self, on: str) -> list[str]:
        """What is left of sessions once settled on node ``on`` (waits up to 30 s for it
        to go): session dirs, hold sockets, CRIU processes, and on the other node a copy
        of the container that is not the record of its departure (``migrated``), or a
        mount of its rootfs."""
        from migrate.hold import stale_hold_sockets
        from runtime.container import Runtime
        from tests.helpers.leaks import mounts_under

        root = str(self.cluster.files.root)
        deadline = time.monotonic() + 30
        while True:
            left = []
            for n in ("node1", "node2"):
                cdir = self.cluster.state_root(n) / "containers" / self.cid
                if n != on and cdir.exists():
                    status = self.cluster.where(NAME).get(n)
                    if status != "migrated":
                        left.append(f"{n}: a copy of the container is left ({status})")
                    left += [f"{n}: mount {m}" for m in mounts_under(cdir)]
                left += [f"{n}: session dir {d.name}" for d in self.cluster.incoming(n)]
                for s in self.cluster.scratch(n):
                    if s.is_dir():
                        left += [f"{n}: {d.name}" for d in s.glob("outgoing-*")]
                left += [
                    f"{n}: hold socket {p.name}"
                    for p in stale_hold_sockets(Runtime(self.cluster.state_root(n)), set())
                ]
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if cmd and cmd[0].endswith(b"criu") and any(root.encode() in a for a in cmd):
                    left.append(f"criu process {pid}: {b' '.join(cmd)[:120]!r}")
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.5)

    def one(self, strategy: str, phase: str, fault: str) -> str | None:
        """One migration with one fault; returns the bad outcome, or None."""
        src = self.running_on()
        dst = "node2" if src == "node1" else "node1"
        before = ticks(self.cluster.local(src), NAME)
        mig = migrate_async(self.cluster, NAME, dst, "--from", src, "--strategy", strategy)
        try:
            hit = self._trigger(phase, src, dst, mig)
            if hit:
                self._inject(fault, src, dst, mig)
            try:
                mig.communicate(timeout=SETTLE_S + 60)
            except subprocess.TimeoutExpired:
                mig.kill()
                mig.communicate()
                self.ledger.notes.append(f"{strategy}/{phase}/{fault}: the CLI hung")
                return "stuck"
        finally:
            if mig.poll() is None:
                mig.kill()
                mig.wait()
        for n in ("node1", "node2"):  # whatever died by itself comes back too
            p = self.cluster.procs.get(n)
            if p is None or p.poll() is not None:
                self.cluster.procs.pop(n, None)
                self.cluster.start(n)
        where = self._settle()
        running = [n for n, s in where.items() if s == "running"]
        detail = f"{strategy}/{phase}/{fault} {src}->{dst}: {where}"
        if not running:
            window = (
                strategy == "postcopy"
                and fault == "kill-source"
                and where.get(src) == "migrated"  # committed: the memory was on src
            )
            self.ledger.notes.append(f"{'window' if window else 'lost'}: {detail}")
            self._fresh()
            return "window" if window else "lost"
        if len(running) > 1:
            self.ledger.notes.append(f"doubled: {detail}")
            self._fresh()
            return "doubled"
        if "migrating" in where.values():
            self.ledger.notes.append(f"stuck: {detail}")
            return "stuck"
        j = self.cluster.local(running[0])
        try:
            last = ticks(j, NAME)[-1]
            wait_ticks(j, NAME, last + 3)
            t = ticks(j, NAME)
            assert_continuous(t)
            assert t[-1] > (before[-1] if before else 0)
        except (AssertionError, IndexError) as e:
            self.ledger.notes.append(f"broken: {detail}: {str(e)[:200]}")
            return "broken"
        if left := self._leaks(running[0]):
            self.ledger.notes.append(f"leaks: {detail}: {left[:3]}")
            return "leaks"
        return None if hit else "missed"

    def run(self, faults: int, strategies: list[str]) -> Ledger:
        plan = list(itertools.product(strategies, PHASES, FAULTS))
        self.rng.shuffle(plan)
        for i in range(faults):
            key = plan[i % len(plan)]
            t0 = time.monotonic()
            outcome = self.one(*key)
            self.ledger.add(key, outcome)
            self.log(f"fault {i + 1}/{faults} {'/'.join(key)}: {outcome or 'ok'} "
                     f"({time.monotonic() - t0:.1f} s)")  # fmt: skip
        return self.ledger


def campaign(
    work: Path, layout: Path, faults: int, strategies: list[str], seed: int = 0, log: Any = print
) -> Ledger:
    """Run ``faults`` faults (see the module doc) in ``work``; returns the ledger, with the
    final cleanup's problems (leaked mounts, cgroups, session files) counted as leaks."""
    c = Campaign(work, layout, seed, log)
    try:
        c.start()
        c.run(faults, strategies)
    finally:
        problems = c.close()
        if problems:
            c.ledger.rows.setdefault(("all", "cleanup", "end"), Counter())["leaks"] += len(problems)
            c.ledger.notes += problems
    return c.ledger


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", type=int, default=200, help="faults to inject (default 200)")
    p.add_argument("--strategies", default="cold,postcopy", help="comma-separated")
    p.add_argument("--seed", type=int, default=int(time.time()), help="shuffles the plan")
    p.add_argument("--out", type=Path, help="write the ledger as JSON here")
    p.add_argument("--logs", type=Path, help="copy the node services' logs into this directory")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("chaos: needs root (containers, CRIU, node services)", file=sys.stderr)
        return 2
    from tests.helpers.images import build_busybox_image, tools_missing

    if (why := tools_missing()) is not None:
        print(f"chaos: cannot build the busybox image: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="jaula-chaos-") as tmp:
        work = Path(tmp)
        layout = build_busybox_image(work / "busybox")
        try:
            ledger = campaign(work, layout, a.faults, a.strategies.split(","), a.seed)
        finally:
            if a.logs:
                a.logs.mkdir(parents=True, exist_ok=True)
                for f in (work / "cluster").glob("node*.log"):
                    shutil.copyfile(f, a.logs / f.name)
    print(f"seed {a.seed}\n{ledger.table()}")
    for note in ledger.notes:
        print(f"  {note}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"seed": a.seed, **ledger.to_json()}, indent=1))
    return 1 if ledger.bad else 0


if __name__ == "__main__":
    sys.exit(main())
