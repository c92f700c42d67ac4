"""Live migration, side by side: jaula (every strategy), runc and Podman, same workloads,
same machine, same run, interleaved.

Runs (``make bench``: the full set; ``make bench-quick``: about two minutes):

* workloads (:mod:`benchmarks.workloads`): memhog at 16, 256, 1024 MiB (4096 when the
  machine has the memory for a source and a destination copy), Redis with a dataset of K
  keys, an idle shell;
* systems (:mod:`benchmarks.systems`): ``jaula migrate`` between two local node services with
  each strategy ``jaula migrate --help`` lists; ``runc checkpoint`` + ``cp -a`` + ``runc
  restore``; ``podman container checkpoint --export`` + ``restore --import``.  ``make bench``
  installs runc and Podman first (``scripts/bench-setup.sh``); a system that still cannot
  run here is reported with its error, in its rows, and does not fail the run (the exit code
  is jaula's: :func:`exit_code`);
* for each workload, R rounds, each round one run of every system in turn.  A run: a fresh
  container; the workload ready; its checks before (memory verified, counter read, the
  heartbeat's longest gap reset); the migration, timed and measured; its checks after, on the
  destination (memory verified, counter went on, the longest gap read); the container
  removed.  A run whose checks fail is a failure, listed, not a figure.
* the machine's copy limit: 1 GiB copied from one tmpfs file to another (``dd bs=1M``),
  best of 3, in the same run.

Output in ``results/<date>[.N]/``: ``runs.jsonl`` (every run, written as it ends),
``meta.json``, ``summary.md`` (medians with [min-max], ratio to runc; printed at the end) and
``downtime.png`` (:mod:`benchmarks.report`).  A progress bar on a terminal.

Everything made is removed at the end, after a failure and on Ctrl-C or SIGTERM: containers
of every system, node services, state roots, the Podman stores, cgroups, tmpfs files.

Usage: ``.venv/bin/python -m benchmarks.harness [--quick] [--sizes 16,256] [--runs 5]
[--systems jaula,runc,podman] [--redis-keys 100000] [--no-idle]`` (root).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks import report
from benchmarks.systems import System
from benchmarks.systems.jaula import JaulaCluster, JaulaSystem, strategies
from benchmarks.systems.podman import PodmanSystem
from benchmarks.systems.runc import RuncSystem
from benchmarks.util import (
    RunError,
    cgroup_mounts,
    one_line,
    remove_cgroup,
    run_cmd,
    tail,
    unmount_under,
)
from benchmarks.workloads import Workload, build_images, images_missing

REPO = Path(__file__).resolve().parents[1]
FULL_SIZES = (16, 256, 1024, 4096)
QUICK_SIZES = (16, 256)
SYSTEMS = ("jaula", "runc", "podman")
GIB = 1 << 30


@dataclass
class Run:
    """One migration of one workload by one system (a line of runs.jsonl)."""

    system: str
    workload: str
    label: str
    run: int
    mem_mib: int | None = None
    ok: bool = False
    error: str | None = None
    downtime_s: float | None = None
    gap_s: float | None = None
    gap_at: float | None = None
    gap_in_window: bool | None = None
    total_s: float | None = None
    wire_bytes: int | None = None
    cpu_src_s: float | None = None
    cpu_dst_s: float | None = None
    cpu_client_s: float | None = None
    rss_peak_mib: float | None = None
    monitor_rss_mib: float | None = None
    counter_before: int | None = None
    counter_after: int | None = None
    verify: str | None = None
    window: tuple[float, float] | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    started: str = field(default_factory=lambda: dt.datetime.now().isoformat(timespec="seconds"))
    loadavg_1m: float = field(default_factory=lambda: os.getloadavg()[0])


def one_run(system: System, wl: Workload, run: int, tag: str) -> Run:
    r = Run(system.key, wl.key, wl.label, run, wl.size if wl.kind == "memory" else None)
    name = f"jb-{wl.key}-{run}-{system.name}-{tag}"
    try:
        try:
            ctr = system.start(wl, name)
            wl.wait_ready(system.probe(ctr))
            time.sleep(0.3)
            checked = wl.before(system.probe(ctr))
            os.sync()  # the writeback of earlier runs' files stays out of this one
            moved = system.migrate(ctr)
            r.downtime_s, r.total_s, r.wire_bytes = (
                moved.downtime_s,
                moved.total_s,
                moved.wire_bytes,
            )
            r.cpu_src_s, r.cpu_dst_s, r.cpu_client_s = (
                moved.cpu_src_s,
                moved.cpu_dst_s,
                moved.cpu_client_s,
            )
            r.rss_peak_mib, r.monitor_rss_mib = moved.rss_peak_mib, moved.monitor_rss_mib
            r.window, r.detail = moved.window, moved.detail
            checked = wl.after(system.probe(ctr), checked)
            r.counter_before, r.counter_after = checked.counter_before, checked.counter_after
            r.verify, r.gap_s, r.gap_at = checked.verify, checked.gap_s, checked.gap_at
            if checked.extra:
                r.detail = {**r.detail, "checked": checked.extra}
            if r.gap_at is not None:
                # the gap ends with the first beat after the resume: within the command
                r.gap_in_window = moved.window[0] <= r.gap_at <= moved.window[1] + 1.0
            r.ok = True
        finally:
            problems = system.remove(name)
            if problems:
                r.detail = {**r.detail, "cleanup": problems}
    except (
        RunError,
        OSError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        AssertionError,
        subprocess.TimeoutExpired,
    ) as e:
        r.error = f"{type(e).__name__}: {e}" if not isinstance(e, RunError) else str(e)
    return r


def copy_limit(tag: str, tries: int = 3) -> dict[str, Any]:
    """Copy 1 GiB from one /dev/shm file to another ``tries`` times with dd; the best time."""
    shm = Path("/dev/shm")
    a, b = shm / f"jaula-bench-{tag}-a", shm / f"jaula-bench-{tag}-b"
    st = os.statvfs(shm)
    if st.f_bavail * st.f_frsize < 2 * GIB + (256 << 20):
        return {"error": "less than 2.25 GiB free in /dev/shm"}
    try:
        rc, _o, err, _w = run_cmd(["dd", "if=/dev/zero", f"of={a}", "bs=1M", "count=1024"], 120)
        if rc != 0:
            return {"error": f"dd failed: {tail(err, 200)}"}
        runs = []
        for _ in range(tries):
            b.unlink(missing_ok=True)
            rc, _o, err, wall = run_cmd(["dd", f"if={a}", f"of={b}", "bs=1M"], 120)
            if rc != 0:
                return {"error": f"dd failed: {tail(err, 200)}"}
            runs.append(wall)
        best = min(runs)
        return {
            "bytes": GIB,
            "runs_s": runs,
            "best_s": best,
            "bytes_per_s": GIB / best,
            "how": "dd bs=1M from a 1 GiB /dev/shm file to another",
        }
    finally:
        a.unlink(missing_ok=True)
        b.unlink(missing_ok=True)


def mem_available_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def versions(systems: list[System]) -> list[str]:
    def first(argv: list[str]) -> str:
        try:
            _rc, out, err, _w = run_cmd(argv, 30)
        except OSError:
            return "missing"
        return ((out or err).strip().splitlines() or ["?"])[0]

    seen = []
    for s in systems:
        v = s.version()
        if v and v not in seen:
            seen.append(v)
    return [first(["criu", "--version"]).replace("Version:", "CRIU"), *seen]


def results_dir(base: Path | None) -> Path:
    root = base or REPO / "results"
    d = root / dt.date.today().isoformat()
    k = 1
    while (d / "runs.jsonl").exists():
        k += 1
        d = root / f"{dt.date.today().isoformat()}.{k}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="about two minutes: 16 and 256 MiB and the idle shell, two runs each, no Redis",
    )
    ap.add_argument(
        "--sizes",
        help="memhog MiB, comma-separated (full: 16,256,1024,4096 "
        "when memory allows; quick: 16,256)",
    )
    ap.add_argument("--runs", type=int, help="runs per system and workload (full 5, quick 2)")
    ap.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma-separated among jaula,runc,podman (default: all)",
    )
    ap.add_argument(
        "--redis-keys",
        help="Redis dataset sizes in keys, comma-separated; 0 for "
        "none (full: 100000,1000000; quick: none)",
    )
    ap.add_argument("--no-idle", action="store_true", help="leave out the idle shell")
    ap.add_argument(
        "--dirty-pct",
        type=float,
        default=1.0,
        help="percent of memhog's pages re-dirtied every 100 ms (default 1)",
    )
    ap.add_argument("--out", type=Path, help="results root (default: results/ in the repo)")
    a = ap.parse_args(argv)
    a.mode = "quick" if a.quick else "full"
    try:
        a.size_list = [
            int(x)
            for x in (a.sizes or ",".join(map(str, QUICK_SIZES if a.quick else FULL_SIZES))).split(
                ","
            )
            if x.strip()
        ]
        a.redis_list = [
            int(x)
            for x in (a.redis_keys or ("0" if a.quick else "100000,1000000")).split(",")
            if x.strip() and int(x) > 0
        ]
    except ValueError:
        ap.error("--sizes and --redis-keys take integers")
    a.runs = a.runs or (2 if a.quick else 5)
    a.system_list = [s.strip() for s in a.systems.split(",") if s.strip()]
    bad = [s for s in a.system_list if s not in SYSTEMS]
    if bad or a.runs <= 0 or not a.size_list or min(a.size_list) <= 0:
        ap.error(f"unknown systems {bad}" if bad else "sizes and --runs must be positive")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if os.geteuid() != 0:
        print("the benchmark needs root", file=sys.stderr)
        return 2
    console = Console(stderr=True, soft_wrap=True)
    notes: list[str] = []
    sizes = list(a.size_list)
    if not a.sizes and not a.quick and 4096 in sizes:
        # the source and the restored copy of 4 GiB, the dump on both sides (jaula keeps a
        # migration's files in /dev/shm, i.e. memory), and 4 GiB for everything else
        need = 5 * 4096
        if mem_available_mib() < need:
            sizes.remove(4096)
            notes.append(
                f"4096 MiB left out: {mem_available_mib()} MiB available, {need} MiB wanted."
            )
    workloads = [Workload("memory", n, a.dirty_pct) for n in sizes]
    workloads += [Workload("redis", k) for k in a.redis_list]
    if not a.no_idle:
        workloads.append(Workload("idle"))
    kinds = {w.image for w in workloads}
    reason = images_missing(kinds)
    if reason is not None:
        print(f"cannot build the workload images: {reason}", file=sys.stderr)
        return 2

    out_dir = results_dir(a.out)
    tag = secrets.token_hex(3)
    work = Path(tempfile.mkdtemp(prefix="jaula-bench."))
    meta: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "mode": a.mode,
        "runs": a.runs,
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "args": {k: v for k, v in vars(a).items() if k != "out"},
        "machine": f"{os.cpu_count()} CPUs, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GIB:.0f} GiB, "
        f"kernel {platform.release()}",
        "loadavg_start": round(os.getloadavg()[0], 2),
        "notes": notes,
        "setup_errors": {},
        "workdir": str(work),
    }
    signal.signal(signal.SIGTERM, _interrupt)
    systems: list[System] = []
    recs: list[dict[str, Any]] = []
    interrupted = False
    try:
        console.print(f"[bold]migration benchmark[/] ({a.mode}): results in {out_dir}")
        cluster = JaulaCluster(work / "jaula", tag)
        for s in a.system_list:
            if s == "jaula":
                try:
                    systems += [JaulaSystem(cluster, st) for st in strategies()]
                except RunError as e:
                    meta["setup_errors"]["jaula"] = str(e)
            elif s == "runc":
                systems.append(RuncSystem(work / "runc"))
            else:
                systems.append(PodmanSystem(work / "podman", tag))
        meta["versions"] = versions(systems)
        console.print("building the workload images, measuring the copy limit")
        images = build_images(work / "images", kinds)
        meta["copy_limit"] = copy_limit(tag)
        ready: list[System] = []
        for s in systems:
            console.print(f"setting up {s.key}")
            try:
                s.setup(images)
                ready.append(s)
            except (RunError, OSError, subprocess.TimeoutExpired) as e:
                meta["setup_errors"][s.key] = str(e)
                console.print(f"[red]{s.key} cannot run here:[/] {one_line(str(e), 400)}")
        (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        total = len(workloads) * a.runs * len(systems)
        with (
            open(out_dir / "runs.jsonl", "a") as jl,
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
                disable=not console.is_terminal,
            ) as progress,
        ):
            task = progress.add_task("migrations", total=total)
            for wl in workloads:
                for run in range(1, a.runs + 1):
                    for s in systems:
                        progress.update(
                            task, description=f"{s.key:14} {wl.label} run {run}/{a.runs}"
                        )
                        if s not in ready:
                            r = Run(
                                s.key,
                                wl.key,
                                wl.label,
                                run,
                                wl.size if wl.kind == "memory" else None,
                                error=f"cannot run here: {meta['setup_errors'][s.key]}",
                            )
                        else:
                            r = one_run(s, wl, run, tag)
                        rec = asdict(r)
                        recs.append(rec)
                        jl.write(json.dumps(rec) + "\n")
                        jl.flush()
                        if s in ready:
                            console.print(_line(r))
                        progress.advance(task)
    except KeyboardInterrupt:
        interrupted = True
        console.print("\n[red]interrupted[/]: cleaning up")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        problems: list[str] = []
        done: set[int] = set()
        for s in systems:
            key = id(s.cluster) if isinstance(s, JaulaSystem) else id(s)
            if key in done:
                continue
            done.add(key)
            try:
                problems += s.cleanup()
            except Exception as e:  # noqa: BLE001 - go on with the others
                problems.append(f"{s.key} cleanup: {type(e).__name__}: {e}")
        problems += sweep_cgroups(tag)
        time.sleep(2)  # once more: an empty runc cgroup has been seen to reappear late
        problems += sweep_cgroups(tag)
        left = unmount_under(work)
        if left:
            problems.append(f"mounts remain under {work}, not removed: {left}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        for p in problems:
            console.print(f"[yellow]cleanup:[/] {p}")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    meta["loadavg_end"] = round(os.getloadavg()[0], 2)
    meta["interrupted"] = interrupted
    meta["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    meta["cleanup_problems"] = problems
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    if recs:
        print(report.write(out_dir, recs, meta))
    console.print(f"results: {out_dir}")
    for key, why in meta["setup_errors"].items():
        console.print(f"[yellow]not measured:[/] {key}: {one_line(why, 300)}")
    if interrupted:
        return 130
    return exit_code(recs, meta["setup_errors"], a.system_list)


def exit_code(recs: list[dict[str, Any]], setup_errors: dict[str, str], asked: list[str]) -> int:
    """0 when jaula's runs all passed, else 1.

    The other systems are baselines: one that cannot run here (not installed, set-up
    failed) or whose runs fail is reported (its rows in summary.md say why) and does not fail
    the benchmark.  Without jaula among ``asked`` (``--systems runc,podman``), the runs of
    every system that could be set up must pass.
    """

    def is_jaula(key: str) -> bool:
        return key.split(" ", 1)[0] == "jaula"

    if "jaula" in asked:
        mine = [r for r in recs if is_jaula(r["system"])]
        blocked = [k for k in setup_errors if is_jaula(k)]
    else:
        mine = [r for r in recs if r["system"] not in setup_errors]
        blocked = []
    return 0 if mine and all(r["ok"] for r in mine) and not blocked else 1


def sweep_cgroups(tag: str) -> list[str]:
    """Top-level cgroups this process made that are still there after every system's
    cleanup (jaula's node parents, Podman's and runc's parents): removed, and named."""
    prefixes = (
        f"jaula-bench-{tag}-",
        f"jaula-bench-podman-{tag}-",
        f"jaula-bench-runc-{os.getpid()}-",
    )
    found = sorted(
        {
            d.name
            for m in cgroup_mounts()
            if m.is_dir()
            for d in m.iterdir()
            if d.is_dir() and d.name.startswith(prefixes)
        }
    )
    problems = []
    for name in found:
        problems += [f"left after cleanup, removed: cgroup {name}"] + remove_cgroup(name)
    return problems


def _line(r: Run) -> str:
    if not r.ok:
        return (
            f"[red]{r.system} {r.workload} run {r.run} failed:[/] {one_line(r.error or '?', 300)}"
        )
    gap = f"gap {r.gap_s:.3f} s, " if r.gap_s is not None else ""
    return (
        f"{r.system:14} {r.workload:12} run {r.run}: downtime {r.downtime_s:.3f} s, {gap}"
        f"total {r.total_s:.2f} s, {(r.wire_bytes or 0) / 1e6:.1f} MB, CPU "
        f"{r.cpu_src_s:.2f}+{r.cpu_dst_s:.2f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
