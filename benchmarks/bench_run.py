"""How long ``jaula run`` takes until the container's process runs, and the monitor's memory.

Method: ``jaula run -d`` returns only once the container init has called execve (its error
pipe is close-on-exec), so the wall time of the command is the time until the container's
process runs.  Measured for the CLI (a new Python process each time, as an operator types
it) and for the library call ``Runtime.run`` (what a node service pays), next to a baseline
in the same run: ``chroot ROOTFS true`` on the same unpacked rootfs, with no isolation.
Prints medians with min-max and the ratio to the baseline, then the RSS of each container's
monitor (VmRSS in /proc/PID/status).

Usage: ``.venv/bin/python -m benchmarks.bench_run [-n 10]`` (root).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.progress import Progress

from runtime.container import RunOptions, Runtime
from runtime.logconfig import configure_logging
from tests.helpers.images import build_busybox_image

JAULA = [sys.executable, "-m", "migrate.cli"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=10, help="runs (default 10)")
    a = ap.parse_args(argv)
    configure_logging("warning")  # Runtime.run is called in-process: its logs as the CLI's
    with tempfile.TemporaryDirectory(prefix="jaula-bench-run.") as tmp:
        work = Path(tmp)
        root = work / "state"
        jaula = [*JAULA, "--state-root", str(root)]
        layout = build_busybox_image(work / "img")
        subprocess.run(
            [*jaula, "image", "import", str(layout), "--name", "bb"],
            check=True,
            capture_output=True,
        )
        rootfs = work / "chroot"
        subprocess.run(
            ["cp", "-a", str(next((root / "layers").glob("*/diff"))), str(rootfs)], check=True
        )
        rt = Runtime(root)
        cli_s: list[float] = []
        jaula_s: list[float] = []
        chroot_s: list[float] = []
        rss_kib: list[int] = []
        ids: list[str] = []
        try:
            with Progress(transient=True) as progress:
                task = progress.add_task("jaula run vs chroot", total=a.n)
                for _ in range(a.n):
                    t0 = time.perf_counter()
                    cid = subprocess.run(
                        [*jaula, "run", "-d", "bb", "sleep", "1000"],
                        check=True,
                        capture_output=True,
                        text=True,
                    ).stdout.strip()
                    cli_s.append(time.perf_counter() - t0)
                    ids.append(cid)
                    t0 = time.perf_counter()
                    ids.append(rt.run(RunOptions(image="bb", command=("sleep", "1000"))).id)
                    jaula_s.append(time.perf_counter() - t0)
                    info = json.loads(
                        subprocess.run(
                            [*jaula, "inspect", cid], check=True, capture_output=True, text=True
                        ).stdout
                    )[0]
                    with open(f"/proc/{info['State']['MonitorPid']}/status") as f:
                        rss_kib.append(
                            int(next(ln for ln in f if ln.startswith("VmRSS:")).split()[1])
                        )
                    t0 = time.perf_counter()
                    subprocess.run(["chroot", str(rootfs), "true"], check=True)
                    chroot_s.append(time.perf_counter() - t0)
                    progress.advance(task)
        finally:
            for cid in ids:
                subprocess.run([*jaula, "rm", "-f", cid], capture_output=True, check=False)

    def row(what: str, xs: list[float]) -> str:
        m = statistics.median(xs)
        return (
            f"| {what} | {m * 1000:.0f} ms | {min(xs) * 1000:.0f}-{max(xs) * 1000:.0f} ms | "
            f"{m / statistics.median(chroot_s):.1f}x |"
        )

    print(f"runs: {a.n}\n| what | median | min-max | ratio to chroot |\n|---|---|---|---|")
    print(row("`jaula run -d` (CLI) until the init has exec'd", cli_s))
    print(row("`Runtime.run` (library) until the init has exec'd", jaula_s))
    print(row("baseline: `chroot ROOTFS true`", chroot_s))
    print(
        f"| monitor RSS per container | {statistics.median(rss_kib) / 1024:.1f} MiB | "
        f"{min(rss_kib) / 1024:.1f}-{max(rss_kib) / 1024:.1f} MiB | |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
