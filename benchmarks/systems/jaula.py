"""jaula: ``jaula migrate`` between two node services on 127.0.0.1.

Set-up (once per harness run): keys, cluster file and node configs from
:func:`migrate.cluster_init.init_cluster` (``jaula cluster init``: free ports on 127.0.0.1,
cgroup parents ``jaula-bench-<tag>-nodeN``, operator ``alice``), two ``jaula node serve`` processes in their own sessions, each
workload image imported on both nodes (so no run pays for layers the destination lacks: a
one-time cost).  A run starts the container on node1 with the local CLI (``jaula
--state-root``), then times ``jaula --client-config alice migrate NAME node2 --from node1
--strategy S --json``; one :class:`JaulaSystem` per strategy that ``jaula migrate --help``
lists.

Figures: downtime = the report's ``downtime_s`` (freeze on the source until it hears
``resumed``); total = wall time of the ``jaula migrate`` command (the report's own
``total_s`` is kept in the details); wire = ``bytes_sent``.  CPU: source = node1 service's
utime+stime plus its waited-for children (CRIU dump) as deltas from /proc/PID/stat;
destination = the same for node2 plus everything the container's new monitor used (it is
started for the migration and runs CRIU's restore as its child); the CLI's own CPU is
``cpu_client_s``.  Peak RSS: VmHWM of the two services (reset before each migration through
/proc/PID/clear_refs) and of the new monitor.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from benchmarks.systems import Moved, System
from benchmarks.util import (
    RunError,
    check_cmd,
    children_cpu_s,
    proc_cpu_s,
    proc_status_kib,
    remove_cgroup,
    reset_peak_rss,
    run_cmd,
    tail,
    unmount_under,
)
from benchmarks.workloads import Image, Probe, Workload
from migrate.cluster_init import ClusterDir, init_cluster, plan_endpoints
from migrate.errors import NodeConfigError

REPO = Path(__file__).resolve().parents[2]
JAULA = [sys.executable, "-m", "migrate.cli"]
NODES = ("node1", "node2")


def strategies() -> list[str]:
    """The strategies ``jaula migrate --help`` offers (``--strategy {a,b}``)."""
    p = subprocess.run(
        [*JAULA, "migrate", "--help"], capture_output=True, text=True, cwd=REPO, check=False
    )
    m = re.search(r"--strategy \{([^}]*)\}", p.stdout)
    if p.returncode != 0 or m is None:
        raise RunError(
            f"jaula migrate --help lists no strategies ({p.returncode}): "
            f"{tail(p.stderr or p.stdout, 300)}"
        )
    return [s.strip() for s in m[1].split(",") if s.strip()]


class JaulaCluster:
    """The two node services and their files under ``work``; shared by every strategy."""

    def __init__(self, work: Path, tag: str) -> None:
        self.work = work
        self.tag = tag
        self.files: ClusterDir | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.seen_ids: set[str] = set()
        self.ready = False
        self.error: str | None = None

    def cgroup_parent(self, node: str) -> str:
        return f"jaula-bench-{self.tag}-{node}"

    def state_root(self, node: str) -> Path:
        assert self.files is not None
        return self.files.nodes[node].state_root

    def local(self, node: str) -> list[str]:
        return [*JAULA, "--state-root", str(self.state_root(node))]

    def op(self) -> list[str]:
        assert self.files is not None
        return [*JAULA, "--client-config", str(self.files.operators["alice"].client_config)]

    def node_log(self, node: str) -> str:
        f = self.work / f"{node}.log"
        return tail(f.read_text(errors="replace"), 1500) if f.exists() else ""

    def setup(self, images: dict[str, Image]) -> None:
        if self.ready:
            return
        if self.error:
            raise RunError(self.error)
        try:
            self.work.mkdir(parents=True, exist_ok=True)
            try:
                self.files = init_cluster(
                    self.work / "cluster",
                    plan_endpoints(NODES, "127.0.0.1", 0),
                    ("alice",),
                    cgroup_parent=self.cgroup_parent("{node}"),
                )
            except NodeConfigError as e:
                raise RunError(f"jaula cluster init: {e}") from e
            for node in NODES:
                self._start(node)
            for img in images.values():
                for node in NODES:
                    check_cmd(
                        f"jaula image import on {node}",
                        [*self.local(node), "image", "import", str(img.layout), "--name", img.name],
                        300,
                    )
            self.ready = True
        except RunError as e:
            self.error = str(e)
            raise

    def _start(self, node: str) -> None:
        assert self.files is not None
        with open(self.work / f"{node}.log", "ab") as log:
            p = subprocess.Popen(
                [
                    *JAULA,
                    "--log-level",
                    "info",
                    "node",
                    "serve",
                    "--config",
                    str(self.files.nodes[node].config),
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                start_new_session=True,
            )
        self.procs[node] = p
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rc, _o, _e, _w = run_cmd([*self.op(), "--node", node, "ps"], 30)
            if rc == 0:
                return
            if p.poll() is not None:
                raise RunError(
                    f"jaula node serve ({node}) exited {p.returncode}: {self.node_log(node)}"
                )
            time.sleep(0.2)
        raise RunError(f"jaula node serve ({node}) did not answer in 30 s: {self.node_log(node)}")

    def inspect(self, node: str, name: str) -> dict[str, object]:
        out = check_cmd(f"jaula inspect {name} on {node}", [*self.local(node), "inspect", name], 60)
        (info,) = json.loads(out)
        self.seen_ids.add(str(info["Id"]))
        return dict(info)

    def close(self) -> list[str]:
        problems: list[str] = []
        for node, p in list(self.procs.items()):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    problems.append(f"jaula node serve ({node}) ignored SIGTERM: killed")
                    p.kill()
                    p.wait()
            del self.procs[node]
        if self.files is None:
            return problems
        for node in NODES:
            d = self.state_root(node) / "containers"
            ids = sorted(x.name for x in d.iterdir()) if d.is_dir() else []
            self.seen_ids.update(ids)
            for cid in ids:
                rc, _o, err, _w = run_cmd([*self.local(node), "rm", "-f", cid], 120)
                if rc != 0:
                    problems.append(f"jaula rm -f {cid[:12]} on {node}: {tail(err, 300)}")
        left = unmount_under(self.files.root)
        problems += [f"mount left: {m}" for m in left]
        for cid in self.seen_ids:
            for parent in ("jaula", *map(self.cgroup_parent, NODES)):
                problems += remove_cgroup(f"{parent}/{cid}")
        for node in NODES:
            problems += remove_cgroup(self.cgroup_parent(node))
            for d in self.scratch_dirs(node):  # the sessions' files in /dev/shm
                shutil.rmtree(d, ignore_errors=True)
        return problems

    def scratch_dirs(self, node: str) -> list[Path]:
        """The node's session scratch dirs outside its state root (jaula puts a migration's
        files in /dev/shm when it has room), as ``migrate.scratch`` names them."""
        try:
            from migrate.scratch import scratch_dirs
        except ImportError:
            return []
        root = self.state_root(node)
        return [
            d
            for d in scratch_dirs(SimpleNamespace(root=root))  # type: ignore[arg-type]
            if not d.resolve().is_relative_to(root.resolve())
        ]


class JaulaProbe:
    """The container ``name`` on ``node``, through the local CLI and /proc."""

    def __init__(self, cluster: JaulaCluster, node: str, name: str) -> None:
        self.c = cluster
        self.node = node
        self.name = name
        info = cluster.inspect(node, name)
        state = info["State"]
        assert isinstance(state, dict)
        if state.get("Status") != "running" or not state.get("Pid"):
            raise RunError(f"{name} on {node} is {state.get('Status')}, not running")
        self.pid = int(state["Pid"])
        self.monitor_pid = int(state.get("MonitorPid") or 0)
        self.log_path = Path(str(info["LogPath"]))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def exec(self, argv: list[str], timeout_s: float = 300) -> str:
        return check_cmd(
            f"jaula exec {self.name} {argv[0]}",
            [*self.c.local(self.node), "exec", self.name, *argv],
            timeout_s,
        )


class JaulaSystem(System):
    """``jaula migrate --strategy STRATEGY`` from node1 to node2 of a :class:`JaulaCluster`."""

    name = "jaula"

    def __init__(self, cluster: JaulaCluster, strategy: str) -> None:
        self.cluster = cluster
        self.strategy = strategy
        self.images: dict[str, Image] = {}
        self.where: dict[str, JaulaProbe] = {}

    def version(self) -> str:
        rc, out, _e, _w = run_cmd(["git", "-C", str(REPO), "describe", "--always", "--dirty"], 30)
        return f"jaula {out.strip()}" if rc == 0 else "jaula"

    def setup(self, images: dict[str, Image]) -> None:
        self.images = images
        self.cluster.setup(images)

    def start(self, wl: Workload, name: str) -> object:
        check_cmd(
            "jaula run",
            [
                *self.cluster.local("node1"),
                "run",
                "-d",
                "--name",
                name,
                self.images[wl.image].name,
                *wl.argv(),
            ],
            120,
        )
        self.where[name] = JaulaProbe(self.cluster, "node1", name)
        return name

    def probe(self, ctr: object) -> Probe:
        return self.where[str(ctr)]

    def migrate(self, ctr: object) -> Moved:
        c = self.cluster
        name = str(ctr)
        pids = {n: p.pid for n, p in c.procs.items()}
        cpu0 = {n: proc_cpu_s(pid) or 0.0 for n, pid in pids.items()}
        for pid in pids.values():
            reset_peak_rss(pid)
        ch0 = children_cpu_s()
        w0 = time.time()
        rc, out, err, wall = run_cmd(
            [
                *c.op(),
                "migrate",
                name,
                "node2",
                "--from",
                "node1",
                "--strategy",
                self.strategy,
                "--json",
            ],
            1200,
        )
        w1 = time.time()
        ch1 = children_cpu_s()
        cpu1 = {n: proc_cpu_s(pid) or 0.0 for n, pid in pids.items()}
        if rc != 0:
            raise RunError(
                f"jaula migrate failed ({rc}): {tail(err or out)}\n"
                f"node1: {c.node_log('node1')[-600:]}\n"
                f"node2: {c.node_log('node2')[-600:]}"
            )
        rep = json.loads(out)
        src_state = c.inspect("node1", name)["State"]
        assert isinstance(src_state, dict)
        if src_state.get("Status") != "migrated":
            raise RunError(f"after the migration {name} is {src_state.get('Status')} on node1")
        dest = JaulaProbe(c, "node2", name)
        self.where[name] = dest
        mon_cpu = proc_cpu_s(dest.monitor_pid) if dest.monitor_pid else None
        mon_hwm = proc_status_kib(dest.monitor_pid, "VmHWM") if dest.monitor_pid else None
        hwm = [proc_status_kib(pid, "VmHWM") for pid in pids.values()]
        return Moved(
            downtime_s=float(rep["downtime_s"]),
            total_s=wall,
            wire_bytes=int(rep["bytes_sent"]),
            cpu_src_s=cpu1["node1"] - cpu0["node1"],
            cpu_dst_s=cpu1["node2"] - cpu0["node2"] + (mon_cpu or 0.0),
            window=(w0, w1),
            cpu_client_s=ch1 - ch0,
            rss_peak_mib=max((h for h in hwm if h), default=0) / 1024,
            monitor_rss_mib=mon_hwm / 1024 if mon_hwm else None,
            detail={
                "report_total_s": rep.get("total_s"),
                "phases_s": rep.get("phases_s"),
                "files": rep.get("files"),
                "resume_confirmed": rep.get("resume_confirmed"),
                "node_rss_peak_mib": {n: (h or 0) / 1024 for n, h in zip(pids, hwm, strict=True)},
                "monitor_cpu_s": mon_cpu,
            },
        )

    def remove(self, ctr: object) -> list[str]:
        name = str(ctr)
        problems = []
        for node in ("node2", "node1"):
            rc, _o, err, _w = run_cmd([*self.cluster.local(node), "rm", "-f", name], 120)
            if rc != 0 and "no such container" not in err.lower():
                problems.append(f"jaula rm -f {name} on {node}: {tail(err, 300)}")
        self.where.pop(name, None)
        return problems

    def cleanup(self) -> list[str]:
        return self.cluster.close()
