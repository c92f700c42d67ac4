"""The report of a migration benchmark run: a Markdown summary (medians with [min-max] and
the ratio to runc) and a plot of downtime against memory size (matplotlib, PNG).

Both read the run records (the dicts of ``runs.jsonl``) and the run's metadata; they can be
made again from a results folder: ``python -m benchmarks.report results/<date>``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Rec = dict[str, Any]
AGREE_S = 0.005  # jaula's downtime and the heartbeat gap "agree" within this
MB = 1e6

# (record key, header, scale, format)
COLUMNS: list[tuple[str, str, float, str]] = [
    ("downtime_s", "downtime (own) s", 1.0, "{:.3f}"),
    ("gap_s", "heartbeat gap s", 1.0, "{:.3f}"),
    ("total_s", "total s", 1.0, "{:.2f}"),
    ("wire_bytes", "wire MB", 1 / MB, "{:.1f}"),
    ("cpu_src_s", "CPU src s", 1.0, "{:.2f}"),
    ("cpu_dst_s", "CPU dst s", 1.0, "{:.2f}"),
    ("rss_peak_mib", "jaula peak RSS MiB", 1.0, "{:.0f}"),
]


def _vals(recs: Sequence[Rec], key: str) -> list[float]:
    out = []
    for r in recs:
        if key == "gap_s" and r.get("gap_in_window") is False:
            continue  # the longest gap was not the migration's: see the notes
        v = r.get(key)
        if isinstance(v, int | float):
            out.append(float(v))
    return out


def _cell(xs: list[float], scale: float, fmt: str, ref: list[float] | None) -> str:
    if not xs:
        return "-"
    m = statistics.median(xs)
    s = fmt.format(m * scale)
    if len(xs) > 1:
        s += f" [{fmt.format(min(xs) * scale)}-{fmt.format(max(xs) * scale)}]"
    if ref:
        r = statistics.median(ref)
        if r > 0:
            s += f" ({m / r:.2f}x)"
    return s


def systems_in(recs: Sequence[Rec]) -> list[str]:
    """System keys in the order they first appear."""
    seen: list[str] = []
    for r in recs:
        if r["system"] not in seen:
            seen.append(r["system"])
    return seen


def workloads_in(recs: Sequence[Rec]) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for r in recs:
        k = (r["workload"], r["label"])
        if k not in seen:
            seen.append(k)
    return seen


def one_line(s: str, n: int = 300) -> str:
    s = " ".join(str(s).split()).replace("|", "/")
    return s if len(s) <= n else s[: n - 3] + "..."


def agreement(recs: Sequence[Rec]) -> list[str]:
    """Notes on jaula's own downtime against the heartbeat gap, per jaula strategy."""
    notes = []
    for system in systems_in(recs):
        if not system.startswith("jaula"):
            continue
        mine = [
            r
            for r in recs
            if r["system"] == system
            and r["ok"]
            and isinstance(r.get("gap_s"), float)
            and r.get("gap_in_window") is not False
        ]
        if not mine:
            continue
        diffs = [r["downtime_s"] - r["gap_s"] for r in mine]
        resume = [
            float((r.get("detail") or {}).get("phases_s", {}).get("resume", 0.0)) for r in mine
        ]
        head = (
            f"{system}: its own downtime minus the workload's longest heartbeat gap, over "
            f"{len(diffs)} runs: median {statistics.median(diffs) * 1000:+.1f} ms "
            f"[{min(diffs) * 1000:+.1f} .. {max(diffs) * 1000:+.1f}]"
        )
        if max(abs(d) for d in diffs) <= AGREE_S:
            notes.append(head + f": they agree within {AGREE_S * 1000:.0f} ms.")
            continue
        why = []
        if max(diffs) > AGREE_S:
            rest = [d - r for d, r in zip(diffs, resume, strict=True)]
            why.append(
                "jaula's figure is an upper bound by construction: its clock starts on the "
                "source when it asks the freezer to freeze the cgroup and stops when the "
                "source *receives* `resumed`; the destination sends `resumed` after the tasks "
                "run again, once CRIU's restore call has returned in the container's monitor "
                "and the container is recorded as running.  That tail is the report's "
                "`resume` phase (`resume` sent to `resumed` received): median "
                f"{statistics.median(resume) * 1000:.1f} ms [{min(resume) * 1000:.1f} .. "
                f"{max(resume) * 1000:.1f}] in these runs; the difference minus that phase is "
                f"{statistics.median(rest) * 1000:+.1f} ms [{min(rest) * 1000:+.1f} .. "
                f"{max(rest) * 1000:+.1f}], the heartbeat's own resolution and jitter around "
                "the freeze (a beat every ~1 ms, later when the 2 CPUs are busy)"
            )
        if min(diffs) < -AGREE_S:
            why.append(
                "where the difference is negative the workload stalled outside jaula's "
                "window (a stall before the freeze or after the resume, e.g. faulting its "
                "memory back in, or the machine busy with other work)"
            )
        notes.append(
            head + f": more than {AGREE_S * 1000:.0f} ms apart. Why: " + "; ".join(why) + "."
        )
    out = [r for r in recs if r["ok"] and r.get("gap_in_window") is False]
    if out:
        notes.append(
            f"{len(out)} run(s) had their longest heartbeat gap outside the migration "
            "window (a stall of the workload, not the migration's); their gap is left "
            "out of the figures: "
            + ", ".join(f"{r['system']} {r['workload']} run {r['run']}" for r in out)
            + "."
        )
    return notes


def table(recs: Sequence[Rec], setup_errors: dict[str, str]) -> str:
    systems = systems_in(recs)
    lines = [
        "| system | ok | " + " | ".join(h for _k, h, _s, _f in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    good = {s: [r for r in recs if r["system"] == s and r["ok"]] for s in systems}
    ref = good.get("runc", [])
    for s in systems:
        allr = [r for r in recs if r["system"] == s]
        if s in setup_errors:
            lines.append(
                f"| {s} | cannot run here: {one_line(setup_errors[s], 200)} |" + " |" * len(COLUMNS)
            )
            continue
        cells = [
            _cell(_vals(good[s], k), sc, f, _vals(ref, k) if s != "runc" else None)
            for k, _h, sc, f in COLUMNS
        ]
        lines.append(f"| {s} | {len(good[s])}/{len(allr)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def short_label(workload: str) -> str:
    """``memory-256`` -> ``memhog 256 MiB``, ``redis-100000`` -> ``Redis 100,000 keys``."""
    kind, _, size = workload.partition("-")
    if kind == "memory":
        return f"memhog {size} MiB"
    if kind == "redis":
        return f"Redis {int(size):,} keys"
    return "idle shell" if kind == "idle" else workload


def merged_table(recs: Sequence[Rec], setup_errors: dict[str, str]) -> str:
    """Every workload in one table (a workload column), for the README."""
    cols = [c for c in COLUMNS if c[0] != "rss_peak_mib"]
    lines = [
        "| workload | system | ok | "
        + " | ".join(h for _k, h, _s, _f in cols)
        + " | jaula peak RSS MiB |",
        "|---|---|---|" + "---|" * (len(cols) + 1),
    ]
    for wl, _long in workloads_in(recs):
        label = short_label(wl)
        mine = [r for r in recs if r["workload"] == wl]
        ref = [r for r in mine if r["system"] == "runc" and r["ok"]]
        for s in systems_in(mine):
            allr = [r for r in mine if r["system"] == s]
            good = [r for r in allr if r["ok"]]
            if s in setup_errors:
                lines.append(f"| {label} | {s} | cannot run here |" + " |" * (len(cols) + 1))
                continue
            cells = [
                _cell(_vals(good, k), sc, f, _vals(ref, k) if s != "runc" else None)
                for k, _h, sc, f in cols
            ]
            rss = _vals(good, "rss_peak_mib")
            rss_cell = f"{statistics.median(rss):.0f}" if rss else "-"
            lines.append(
                f"| {label} | {s} | {len(good)}/{len(allr)} | "
                + " | ".join(cells)
                + f" | {rss_cell} |"
            )
    return "\n".join(lines)


def copy_limit_rows(recs: Sequence[Rec], meta: dict[str, Any]) -> list[str]:
    cl = meta.get("copy_limit") or {}
    rate = cl.get("bytes_per_s")
    if not rate:
        return [f"Copy limit: not measured ({cl.get('error', 'skipped')})."]
    lines = [
        (
            f"Copy limit of this machine, measured in the same run: 1 GiB copied through tmpfs "
            f"(`dd bs=1M` from one /dev/shm file to another) in {cl['best_s']:.3f} s, best of "
            f"{len(cl['runs_s'])} (median {statistics.median(cl['runs_s']):.3f} s): "
            f"{rate / 1e9:.2f} GB/s.  Below, the time to copy each memory size once at that "
            "rate against the median total migration time:"
        ),
        "",
        "| memory | copy once | "
        + " | ".join(f"{s} total (x copy)" for s in systems_in(recs))
        + " |",
        "|---|---|" + "---|" * len(systems_in(recs)),
    ]
    sizes = sorted({r["mem_mib"] for r in recs if r.get("mem_mib")})
    for mib in sizes:
        copy_s = mib * 2**20 / rate
        cells = []
        for s in systems_in(recs):
            xs = [
                r["total_s"]
                for r in recs
                if r["system"] == s and r["ok"] and r.get("mem_mib") == mib
            ]
            cells.append(
                f"{statistics.median(xs):.2f} s ({statistics.median(xs) / copy_s:.0f}x)"
                if xs
                else "-"
            )
        lines.append(f"| {mib} MiB | {copy_s:.3f} s | " + " | ".join(cells) + " |")
    return lines


METHOD = """\
How it was measured: every system moves the same workload on the same machine in the same
run, interleaved (one run of each system in turn, then the next round), each run a fresh
container.  The memory workload is `tests/workloads/memhog.py` (N MiB touched, a fraction
re-dirtied every 100 ms, a checksum of every page verified on SIGUSR1, a tick counter); its
heartbeat thread beats every millisecond and keeps the longest wall-clock gap between two
beats, reset (SIGUSR2) right before the migration and read with the verification after it:
that gap is the downtime the workload saw.  The Redis workload runs redis-server (filled with
`DEBUG POPULATE`) beside memhog's heartbeat; DBSIZE, `DEBUG DIGEST` and `run_id` must be the
same after the move.  A run counts only if the memory verified (and Redis' data matched)
after the move and the counter went on; otherwise it is listed as a failure.  jaula: `jaula
migrate --strategy S --json` between two `jaula node serve` on 127.0.0.1 (CURVE over
loopback, images already on both nodes); its downtime is its own report (freeze to
`resumed`); total is the command's wall time.  runc: `runc checkpoint` + `cp -a` of the
image dir + `runc restore -d`; Podman: `podman container checkpoint --export` + `cp` +
`podman container restore --import` into a second store; neither reports a downtime, so
theirs is checkpoint start to restore end (an upper bound).  Wire: jaula's bytes sent,
runc's image dir, Podman's archive.  CPU: jaula's node services (and the container's new
monitor on the destination) from /proc/PID/stat; runc and Podman from getrusage of the
commands the harness ran (plus the restoring conmon).  Peak RSS: VmHWM of jaula's node
services, reset before each migration.  `sync` before each migration.  Each cell: median
[min-max] over the good runs, and (Nx) the ratio of medians to runc."""


def summary(recs: Sequence[Rec], meta: dict[str, Any]) -> str:
    setup_errors: dict[str, str] = meta.get("setup_errors", {})
    head = [
        f"# Migration benchmark, {meta.get('date', '?')}",
        "",
        (
            f"{meta.get('mode', '?')} run: {meta.get('runs', '?')} run(s) per system and "
            f"workload, interleaved ({', '.join(systems_in(recs))}); "
            f"{meta.get('machine', '')}; {'; '.join(meta.get('versions', []))}; "
            f"load average {meta.get('loadavg_start', '?')} at the start, "
            f"{meta.get('loadavg_end', '?')} at the end."
        ),
        "",
    ]
    if meta.get("interrupted"):
        head += ["**Interrupted**: partial figures.", ""]
    for note in meta.get("notes", []):
        head += [note, ""]
    body: list[str] = []
    for wl, label in workloads_in(recs):
        mine = [r for r in recs if r["workload"] == wl]
        body += [f"## {label}", "", table(mine, setup_errors), ""]
    body += copy_limit_rows(recs, meta) + [""]
    notes = agreement(recs)
    if notes:
        body += ["Heartbeat gap against jaula's own downtime:", ""]
        body += [f"- {n}" for n in notes] + [""]
    fails = [r for r in recs if not r["ok"] and r["system"] not in setup_errors]
    if fails:
        body += ["Failures (not in the figures):", ""]
        body += [
            f"- {r['system']} {r['workload']} run {r['run']}: {one_line(r['error'] or '?')}"
            for r in fails
        ] + [""]
    for s, e in setup_errors.items():
        body += [f"- {s} cannot run here: {one_line(e, 600)}"]
    if setup_errors:
        body.append("")
    body += [METHOD, ""]
    return "\n".join(head + body)


def plot(recs: Sequence[Rec], meta: dict[str, Any], out: Path) -> Path | None:
    """downtime.png: the heartbeat gap (solid) and each system's own downtime (dashed)
    against memory size, one line per system and strategy; and the total migration time
    with the copy limit.  None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem = [r for r in recs if r["ok"] and r.get("mem_mib")]
    if not mem:
        return None
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    fixed = {"runc": "tab:orange", "podman": "tab:green"}
    jaula_colors = iter(["tab:blue", "tab:purple", "tab:cyan", "tab:brown", "tab:pink"])

    def series(s: str, key: str) -> tuple[list[int], list[float], list[list[float]]]:
        xs: list[int] = []
        med: list[float] = []
        err: list[list[float]] = [[], []]
        for mib in sorted({r["mem_mib"] for r in mem}):
            v = _vals([r for r in mem if r["system"] == s and r["mem_mib"] == mib], key)
            if v:
                m = statistics.median(v)
                xs.append(mib)
                med.append(m)
                err[0].append(m - min(v))
                err[1].append(max(v) - m)
        return xs, med, err

    for s in systems_in(mem):
        c = fixed.get(s) or next(jaula_colors, "tab:gray")
        for ax, key, style, label in (
            (ax1, "gap_s", "-o", f"{s}: heartbeat gap"),
            (ax1, "downtime_s", "--", f"{s}: own figure"),
            (ax2, "total_s", "-o", s),
        ):
            xs, med, err = series(s, key)
            if xs:
                ax.errorbar(
                    xs,
                    med,
                    yerr=err,
                    fmt=style,
                    color=c,
                    label=label,
                    capsize=3,
                    alpha=1.0 if style != "--" else 0.6,
                )
    rate = (meta.get("copy_limit") or {}).get("bytes_per_s")
    sizes = sorted({r["mem_mib"] for r in mem})
    if rate:
        ax2.plot(
            sizes,
            [m * 2**20 / rate for m in sizes],
            ":k",
            label=f"copy limit ({rate / 1e9:.1f} GB/s)",
        )
    for ax, title in (
        (ax1, "downtime (workload's longest heartbeat gap)"),
        (ax2, "total migration time"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("memhog memory, MiB")
        ax.set_ylabel("seconds")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"jaula, runc, Podman: live migration on one host, {meta.get('date', '')} "
        f"(median, min-max bars)",
        fontsize=10,
    )
    fig.tight_layout()
    path = out / "downtime.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load(folder: Path) -> tuple[list[Rec], dict[str, Any]]:
    recs = [json.loads(ln) for ln in (folder / "runs.jsonl").read_text().splitlines() if ln.strip()]
    meta = json.loads((folder / "meta.json").read_text())
    return recs, meta


def write(folder: Path, recs: Sequence[Rec], meta: dict[str, Any]) -> str:
    """Write summary.md and downtime.png into ``folder``; return the summary."""
    text = summary(recs, meta)
    (folder / "summary.md").write_text(text)
    try:
        plot(recs, meta, folder)
    except ImportError as e:
        print(f"no plot: {e} (make bench installs matplotlib)", file=sys.stderr)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Write summary.md and downtime.png again from a "
        "results folder of benchmarks.harness"
    )
    ap.add_argument("folder", type=Path)
    ap.add_argument(
        "--readme",
        action="store_true",
        help="print one table of every workload (for README.md), write nothing",
    )
    a = ap.parse_args(argv)
    recs, meta = load(a.folder)
    if a.readme:
        print(merged_table(recs, meta.get("setup_errors", {})))
        print()
        print("\n".join(copy_limit_rows(recs, meta)))
        for n in agreement(recs):
            print(f"\n- {n}")
        return 0
    print(write(a.folder, recs, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
