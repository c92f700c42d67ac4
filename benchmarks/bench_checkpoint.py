"""Checkpoint and restore of a memory workload: jaula next to runc, same workload, same run.

Method: for each size N (MiB of touched memory), R rounds, each round one jaula cycle then
one runc cycle (interleaved, so drift hits both).  A cycle starts
``python3 /opt/workloads/memhog.py N --dirty-pct 0`` (``tests/workloads/memhog.py``, in
the memory image of ``tests.helpers.images``) in a container, waits for its ``READY``,
then times, as an operator types them (each command after a ``sync``, so the writeback of
the previous cycle's images does not land in its timing):

* jaula: ``jaula checkpoint --json NAME`` (dump; the container's tasks are gone afterwards,
  it is ``checkpointed``), then ``jaula restore NAME`` (local).  Bundle: bytes of the regular
  files in the checkpoint dir (CRIU images, upperdir tar, manifest, dump.log).  Frozen:
  ``frozen_s`` of the JSON report.
* runc (:mod:`benchmarks.runc` says how it is configured here): ``runc checkpoint
  --image-path DIR`` then ``runc restore -d --image-path DIR``, on an OCI bundle from
  ``runc spec`` whose rootfs is the same image unpacked by ``umoci unpack``.  Bundle: the
  image dir (CRIU's log and stats go to a separate work dir).  runc reports no frozen time,
  so its "frozen" is CRIU's own (``stats-dump``: freezing_time + frozen_time).

After the restore the workload gets SIGUSR1 and must print ``VERIFY OK`` (every page and
the checksum as before the dump); a cycle that does not, or whose command fails, is a
failure: listed with its error, left out of the figures.  Each table row is the median
with [min-max] over the good cycles; the last row is the ratio of the medians jaula/runc.
Below each table, CRIU's own figures for both (stats-dump freezing+frozen, stats-restore
restore_time) show how much of each command is CRIU.

Every cycle is a JSON line in ``results/bench-checkpoint-<date>/runs.jsonl`` (with
``meta.json`` and ``table.md`` beside it).  Everything made (containers of both runtimes,
the state root, images, bundles, cgroups) is removed at the end, on failure and on Ctrl-C.

Usage: ``.venv/bin/python -m benchmarks.bench_checkpoint [--sizes 16,256,1024] [--runs 5]``
(root, CRIU, runc, umoci).
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
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.progress import Progress

from benchmarks import runc as runc_mod
from benchmarks.runc import Runc, RuncContainer, RuncError, wait_child
from benchmarks.util import RunError, remove_cgroup_dir, wait_for
from tests.helpers.images import PYTHON_ENV, build_memory_image, ref_name, workload_tools_missing

REPO = Path(__file__).resolve().parents[1]
JAULA = [sys.executable, "-m", "migrate.cli"]
IMAGE = "jaula-bench-mem"
CWD = "/tmp"
MB = 1e6


def memhog_argv(mib: int) -> list[str]:
    return ["python3", "/opt/workloads/memhog.py", str(mib), "--dirty-pct", "0"]


def ready_timeout_s(mib: int) -> float:
    """Generous time for memhog to touch (or verify) ``mib`` MiB on a slow machine."""
    return 60 + mib * 0.25


@dataclass
class Cycle:
    """One checkpoint/restore cycle of one system (a JSON line)."""

    system: str
    size_mib: int
    run: int
    ok: bool = False
    error: str | None = None
    dump_s: float | None = None
    restore_s: float | None = None
    bundle_bytes: int | None = None
    frozen_s: float | None = None
    criu_frozen_s: float | None = None
    criu_restore_s: float | None = None
    pages_written: int | None = None
    verify: str | None = None
    detail: dict[str, object] | None = None
    loadavg_1m: float = field(default_factory=lambda: os.getloadavg()[0])


# --- helpers ----------------------------------------------------------------------------


def dir_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if not os.path.islink(os.path.join(dirpath, name)):
                total += st.st_size
    return total


def criu_stats(path: Path) -> dict[str, int] | None:
    """The entry of a CRIU ``stats-dump``/``stats-restore`` file, or ``None``."""
    from migrate.criu import read_stats

    return read_stats(path) or None


def line_with(text: str, needle: str) -> str | None:
    for ln in text.splitlines():
        if needle in ln:
            return ln[ln.index(needle) :].strip()
    return None


def run_cmd(argv: list[str], timeout_s: float = 600) -> tuple[int, str, str, float]:
    """Run ``argv``; return its exit code, stdout, stderr and wall time."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, text=True)
        rc = wait_child(proc, timeout_s)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return rc, out.read(), err.read(), wall


def _tail(s: str, n: int = 600) -> str:
    s = s.strip()
    return s if len(s) <= n else "..." + s[-n:]


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp.startswith(prefix) or mp == prefix[:-1]:
                found.append(mp)
    return found


def cgroup_mounts() -> list[Path]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] in ("cgroup", "cgroup2"):
                out.append(Path(parts[1]))
    return out


# --- jaula ------------------------------------------------------------------------------


class JaulaSide:
    """jaula with its own state root under ``work``."""

    system = "jaula"

    def __init__(self, work: Path, layout: Path) -> None:
        self.root = work / "jaula-state"
        self.cli = [*JAULA, "--state-root", str(self.root)]
        self.names: dict[str, str | None] = {}  # name -> id
        rc, _out, err, _ = run_cmd([*self.cli, "image", "import", str(layout), "--name", IMAGE])
        if rc != 0:
            raise RunError(f"jaula image import failed ({rc}): {_tail(err)}")

    def _inspect(self, name: str) -> dict[str, object]:
        rc, out, err, _ = run_cmd([*self.cli, "inspect", name], 60)
        if rc != 0:
            raise RunError(f"jaula inspect {name} failed ({rc}): {_tail(err)}")
        (info,) = json.loads(out)
        return dict(info)

    def cycle(self, mib: int, run: int, tag: str) -> Cycle:
        cy = Cycle(self.system, mib, run)
        name = f"jb-{mib}-{run}-{tag}"
        self.names[name] = None
        try:
            rc, out, err, _ = run_cmd(
                [*self.cli, "run", "-d", "--name", name, IMAGE, *memhog_argv(mib)], 120
            )
            if rc != 0:
                raise RunError(f"jaula run failed ({rc}): {_tail(err)}")
            self.names[name] = out.strip()
            info = self._inspect(name)
            log = Path(str(info["LogPath"]))

            def ready() -> str | None:
                return line_with(log.read_text(errors="replace"), "READY")

            wait_for(ready, ready_timeout_s(mib), "READY")
            os.sync()
            rc, out, err, cy.dump_s = run_cmd([*self.cli, "checkpoint", "--json", name])
            if rc != 0:
                raise RunError(f"jaula checkpoint failed ({rc}): {_tail(err)}")
            report = json.loads(out)
            cy.frozen_s = float(report["frozen_s"])
            state = self._inspect(name)["State"]
            if not isinstance(state, dict):
                raise RunError(f"jaula inspect {name}: no State")
            if state.get("Status") != "checkpointed" or state.get("Pid"):
                raise RunError(
                    f"after checkpoint the container is {state.get('Status')} "
                    f"(pid {state.get('Pid')}), not checkpointed and gone"
                )
            bundle = Path(report["bundle"])
            cy.bundle_bytes = dir_bytes(bundle)
            dump = criu_stats(bundle / "criu" / "stats-dump")
            if dump:
                cy.criu_frozen_s = (dump["freezing_time"] + dump["frozen_time"]) / 1e6
                cy.pages_written = dump["pages_written"]
            cy.detail = {k: report[k] for k in ("dump_s", "rootfs_s", "total_s", "bundle_bytes")}
            os.sync()
            rc, _out, err, cy.restore_s = run_cmd([*self.cli, "restore", name])
            if rc != 0:
                raise RunError(f"jaula restore failed ({rc}): {_tail(err)}")
            rst = criu_stats(log.parent / "stats-restore")
            if rst:
                cy.criu_restore_s = rst["restore_time"] / 1e6
            rc, _out, err, _ = run_cmd([*self.cli, "kill", "-s", "USR1", name], 60)
            if rc != 0:
                raise RunError(f"jaula kill -s USR1 failed ({rc}): {_tail(err)}")

            def verified() -> str | None:
                return line_with(log.read_text(errors="replace"), "VERIFY")

            cy.verify = wait_for(verified, ready_timeout_s(mib), "VERIFY after restore")
            if not cy.verify.startswith("VERIFY OK"):
                raise RunError(f"after restore: {cy.verify}")
            cy.ok = True
        except (RunError, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
            cy.error = str(e)
        finally:
            self.remove(name)
        return cy

    def remove(self, name: str) -> str | None:
        rc, _out, err, _ = run_cmd([*self.cli, "rm", "-f", name], 120)
        if rc == 0:
            self.names.pop(name, None)
            return None
        return f"jaula rm -f {name} failed ({rc}): {_tail(err, 300)}"

    def cleanup(self) -> list[str]:
        problems = []
        ids = {n: i for n, i in self.names.items()}
        for name in list(self.names):
            p = self.remove(name)
            if p and "no such container" not in p.lower():
                problems.append(p)
        # What a failed rm could leave: the containers' cgroups (named by their ids).
        for cid in filter(None, ids.values()):
            for m in cgroup_mounts():
                d = m / "jaula" / cid
                if d.is_dir():
                    problems += remove_cgroup_dir(d)
        return problems


# --- runc -------------------------------------------------------------------------------


class RuncSide:
    """runc on the same image, unpacked by umoci, one bundle (config.json) per container."""

    system = "runc"

    def __init__(self, work: Path, layout: Path) -> None:
        if shutil.which(runc_mod.RUNC) is None:
            raise RunError(f"{runc_mod.RUNC} is not installed (apt-get install runc)")
        self.work = work / "runc"
        self.work.mkdir()
        self.runc = Runc(self.work)
        self.rootfs: Path | None = None
        unpacked = self.work / "unpacked"
        rc, _out, err, _ = run_cmd(
            ["umoci", "unpack", "--image", f"{layout}:{ref_name(layout)}", str(unpacked)], 300
        )
        if rc != 0:
            raise RunError(f"umoci unpack failed ({rc}): {_tail(err)}")
        self.rootfs = unpacked / "rootfs"

    def cycle(self, mib: int, run: int, tag: str) -> Cycle:
        cy = Cycle(self.system, mib, run)
        assert self.rootfs is not None
        ctr = f"jb-{mib}-{run}-{tag}"
        base = self.work / ctr
        base.mkdir()
        images, dump_wd, restore_wd = base / "images", base / "dump", base / "restore"
        c: RuncContainer | None = None
        try:
            bundle = self.runc.make_bundle(
                base / ctr, self.rootfs, memhog_argv(mib), list(PYTHON_ENV), CWD
            )
            c = self.runc.run(ctr, bundle, base / "run.out", base / "run.err")
            cc = c
            wait_for(lambda: line_with(cc.output(), "READY"), ready_timeout_s(mib), "READY")
            os.sync()
            t0 = time.perf_counter()
            self.runc.checkpoint(c, images, dump_wd)
            cy.dump_s = time.perf_counter() - t0
            if not c.wait_output_closed(30) or self.runc.exists(ctr):
                raise RunError("after runc checkpoint the container still runs")
            cy.bundle_bytes = dir_bytes(images)
            dump = criu_stats(dump_wd / "stats-dump")
            if dump:
                cy.criu_frozen_s = (dump["freezing_time"] + dump["frozen_time"]) / 1e6
                cy.frozen_s = cy.criu_frozen_s
                cy.pages_written = dump["pages_written"]
            os.sync()
            t0 = time.perf_counter()
            r = self.runc.restore(c, images, restore_wd, base / "restore.out", base / "restore.err")
            cy.restore_s = time.perf_counter() - t0
            rst = criu_stats(restore_wd / "stats-restore")
            if rst:
                cy.criu_restore_s = rst["restore_time"] / 1e6
            os.kill(r.pid, signal.SIGUSR1)
            cy.verify = wait_for(
                lambda: line_with(r.output(), "VERIFY"),
                ready_timeout_s(mib),
                "VERIFY after restore",
            )
            if not cy.verify.startswith("VERIFY OK"):
                raise RunError(f"after restore: {cy.verify}")
            cy.ok = True
        except (RunError, RuncError, OSError, ValueError, subprocess.TimeoutExpired) as e:
            cy.error = str(e).strip()
        finally:
            self.runc.delete(ctr)
            shutil.rmtree(base, ignore_errors=True)
        return cy

    def cleanup(self) -> list[str]:
        return self.runc.cleanup()


# --- report -----------------------------------------------------------------------------


def _stat(xs: list[float], scale: float = 1.0, fmt: str = ".3f") -> str:
    if not xs:
        return "-"
    v = [x / scale for x in xs]
    return f"{statistics.median(v):{fmt}} [{min(v):{fmt}}-{max(v):{fmt}}]"


def _values(cycles: list[Cycle], attr: str) -> list[float]:
    return [float(getattr(c, attr)) for c in cycles if c.ok and getattr(c, attr) is not None]


COLUMNS = (
    ("dump_s", 1.0, ".3f"),
    ("restore_s", 1.0, ".3f"),
    ("bundle_bytes", MB, ".1f"),
    ("frozen_s", 1.0, ".3f"),
)


def table(mib: int, cycles: list[Cycle], systems: list[str], setup_errors: dict[str, str]) -> str:
    lines = [
        f"### {mib} MiB touched (memhog, 0 % dirty)",
        "",
        "| system | dump s | restore s | bundle MB | frozen s |",
        "|---|---|---|---|---|",
    ]
    by = {s: [c for c in cycles if c.system == s] for s in systems}
    for s in systems:
        if s in setup_errors:
            lines.append(f"| {s} | cannot run: {_one_line(setup_errors[s])} | | | |")
            continue
        good = [c for c in by[s] if c.ok]
        label = s if len(good) == len(by[s]) else f"{s} ({len(good)}/{len(by[s])} ok)"
        if not good:
            first = next((c.error for c in by[s] if c.error), "no run")
            lines.append(f"| {label} | failed: {_one_line(first or '')} | | | |")
            continue
        cells = [_stat(_values(good, a), sc, f) for a, sc, f in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if len(systems) == 2 and all(any(c.ok for c in by[s]) for s in systems):
        ratios = []
        for a, _sc, _f in COLUMNS:
            j, r = _values(by["jaula"], a), _values(by["runc"], a)
            ratios.append(
                f"{statistics.median(j) / statistics.median(r):.2f}x"
                if j and r and statistics.median(r) > 0
                else "-"
            )
        lines.append("| jaula/runc (medians) | " + " | ".join(ratios) + " |")
    crit = []
    for s in systems:
        fz, rs = _values(by[s], "criu_frozen_s"), _values(by[s], "criu_restore_s")
        if fz or rs:
            crit.append(f"{s} {_stat(fz)} / {_stat(rs)}")
    if crit:
        lines += [
            "",
            "CRIU's own figures, frozen (stats-dump freezing+frozen) / restore "
            "(stats-restore restore_time), s: " + "; ".join(crit) + ".",
        ]
    fails = [c for s in systems for c in by[s] if not c.ok]
    if fails:
        lines += ["", "Failures:"]
        lines += [f"- {c.system} run {c.run}: {_one_line(c.error or '?', 400)}" for c in fails]
    return "\n".join(lines)


def _one_line(s: str, n: int = 200) -> str:
    s = " ".join(s.split()).replace("|", "/")
    return s if len(s) <= n else s[: n - 3] + "..."


def results_dir() -> Path:
    base = REPO / "results" / f"bench-checkpoint-{dt.date.today().isoformat()}"
    d, k = base, 1
    while (d / "runs.jsonl").exists():
        k += 1
        d = base.with_name(f"{base.name}.{k}")
    d.mkdir(parents=True, exist_ok=True)
    return d


def versions() -> dict[str, str]:
    def first(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
            return (p.stdout or p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    return {
        "kernel": platform.release(),
        "criu": first(["criu", "--version"]).replace("Version:", "CRIU"),
        "runc": Runc.version(),
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
    }


# --- main -------------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sizes",
        default="16,256,1024",
        help="MiB of touched memory, comma-separated (default 16,256,1024)",
    )
    ap.add_argument("--runs", type=int, default=5, help="cycles per system and size (default 5)")
    a = ap.parse_args(argv)
    try:
        sizes = [int(x) for x in a.sizes.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--sizes takes integers: {a.sizes!r}")
    if not sizes or min(sizes) <= 0 or a.runs <= 0:
        ap.error("sizes and --runs must be positive")
    if os.geteuid() != 0:
        print("bench_checkpoint needs root", file=sys.stderr)
        return 2
    reason = workload_tools_missing("memory")
    if reason is not None:
        print(f"cannot build the memory image: {reason}", file=sys.stderr)
        return 2

    out_dir = results_dir()
    meta = {
        "sizes_mib": sizes,
        "runs": a.runs,
        "started": dt.datetime.now().isoformat(),
        **versions(),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    signal.signal(signal.SIGTERM, _interrupt)
    tag = secrets.token_hex(3)
    work = Path(tempfile.mkdtemp(prefix="jaula-bench-ckpt."))
    sides: list[JaulaSide | RuncSide] = []
    setup_errors: dict[str, str] = {}
    cycles: list[Cycle] = []
    interrupted = False
    console = Console(stderr=True)
    try:
        layout = build_memory_image(work / "img")
        for system, cls in (("jaula", JaulaSide), ("runc", RuncSide)):
            try:
                sides.append(cls(work, layout))
            except (RunError, RuncError, OSError) as e:
                setup_errors[system] = str(e)
                print(f"{system} cannot run here: {e}", file=sys.stderr)
        with (
            open(out_dir / "runs.jsonl", "a") as jl,
            Progress(console=console, transient=True, disable=not console.is_terminal) as progress,
        ):
            task = progress.add_task("checkpoint/restore", total=len(sizes) * a.runs * 2)
            for mib in sizes:
                for run in range(1, a.runs + 1):
                    for system, err in setup_errors.items():  # cannot run: its error
                        cy = Cycle(system, mib, run, error=f"cannot run: {err}")
                        jl.write(json.dumps(asdict(cy)) + "\n")
                    for side in sides:
                        progress.update(
                            task, description=f"{side.system} {mib} MiB run {run}/{a.runs}"
                        )
                        cy = side.cycle(mib, run, tag)
                        cycles.append(cy)
                        jl.write(json.dumps(asdict(cy)) + "\n")
                        jl.flush()
                        if not cy.ok:
                            console.print(
                                f"[red]{cy.system} {mib} MiB run {run} failed:[/] "
                                f"{_one_line(cy.error or '?', 300)}"
                            )
                        progress.advance(task)
                    progress.advance(task, 2 - len(sides))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: cleaning up", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        problems = []
        for side in sides:
            problems += side.cleanup()
        left = mounts_under(work)
        for mp in sorted(left, key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
        if mounts_under(work):
            problems.append(f"mounts remain under {work}; it was not removed")
        else:
            shutil.rmtree(work, ignore_errors=True)
        for p in problems:
            print(f"cleanup: {p}", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    systems = ["jaula", "runc"]
    head = (
        f"runs per system and size: {a.runs} (interleaved jaula, runc); median "
        f"[min-max] over the good runs; MB = 10^6 bytes; {meta['criu']}, {meta['runc']}, "
        f"kernel {meta['kernel']}"
    )
    if interrupted:
        head += f"\n\n**Interrupted** after {len(cycles)} cycles: partial figures."
    parts = [head]
    for mib in sizes:
        parts.append(table(mib, [c for c in cycles if c.size_mib == mib], systems, setup_errors))
    text = "\n\n".join(parts)
    print(text)
    (out_dir / "table.md").write_text(text + "\n")
    print(f"\nruns: {out_dir / 'runs.jsonl'}", file=sys.stderr)
    if interrupted:
        return 130
    return 0 if cycles and all(c.ok for c in cycles) and not setup_errors else 1


if __name__ == "__main__":
    sys.exit(main())
