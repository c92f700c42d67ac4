"""Small helpers of the migration benchmark harness (:mod:`benchmarks.harness`): commands with
their wall time, CPU and memory of processes from /proc, polling, cleanup of mounts and
cgroups the harness made."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from runtime.syscalls import _stat_fields

CLK_TCK = os.sysconf("SC_CLK_TCK")


class RunError(Exception):
    """One run (or a system's set-up) failed; the message says where and why."""


def tail(s: str, n: int = 600) -> str:
    s = s.strip()
    return s if len(s) <= n else "..." + s[-n:]


def one_line(s: str, n: int = 200) -> str:
    s = " ".join(s.split()).replace("|", "/")
    return s if len(s) <= n else s[: n - 3] + "..."


def wait_child(proc: subprocess.Popen[str] | subprocess.Popen[bytes], timeout_s: float) -> int:
    """Wait for ``proc``; on a timeout kill it; on Ctrl-C (which the child, in our process
    group, got too) give it up to 30 s to stop by itself before killing it, then re-raise."""
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    except KeyboardInterrupt:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def run_cmd(
    argv: Sequence[str],
    timeout_s: float = 600,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[int, str, str, float]:
    """Run ``argv``; return its exit code, stdout, stderr and wall time."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            text=True,
            env=env,
            cwd=cwd,
        )
        rc = wait_child(proc, timeout_s)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return rc, out.read(), err.read(), wall


def check_cmd(
    what: str, argv: Sequence[str], timeout_s: float = 600, env: dict[str, str] | None = None
) -> str:
    """Run ``argv``; its stdout, or :class:`RunError` naming ``what`` with its stderr."""
    rc, out, err, _ = run_cmd(argv, timeout_s, env)
    if rc != 0:
        raise RunError(f"{what} failed ({rc}): {tail(err or out)}")
    return out


def wait_for(pred: Callable[[], str | None], timeout_s: float, what: str) -> str:
    """Poll ``pred`` (a truthy string when done) for ``timeout_s`` (runtime.poll); raises
    RunError naming ``what`` on a time-out."""
    from runtime.poll import wait_for as poll

    got = poll(pred, timeout_s, 0.02)
    if not got:
        raise RunError(f"timed out after {timeout_s:.0f} s waiting for {what}")
    return got


def lines_with(text: str, needle: str) -> list[str]:
    """Every line holding ``needle``, from ``needle`` on (log prefixes dropped)."""
    return [ln[ln.index(needle) :].strip() for ln in text.splitlines() if needle in ln]


def children_cpu_s() -> float:
    """User + system CPU seconds of every child (and their descendants) waited for so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime + cutime + cstime of ``pid`` (itself and its children waited for), in
    seconds, or None when it is gone."""
    f = _stat_fields(pid)
    if f is None:
        return None
    return sum(int(x) for x in f[11:15]) / CLK_TCK


def proc_status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` field (VmRSS, VmHWM, ...) of /proc/PID/status, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM of ``pid`` to its current RSS (``5`` into /proc/PID/clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def dir_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if not os.path.islink(p):
                total += st.st_size
    return total


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == prefix or mp.startswith(prefix + "/"):
                found.append(mp)
    return found


def unmount_under(path: Path) -> list[str]:
    """Lazily unmount what is mounted under ``path`` (deepest first); return what remains."""
    for mp in sorted(mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
    return mounts_under(path)


def cgroup_mounts() -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 and v2)."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] in ("cgroup", "cgroup2"):
                out.append(Path(parts[1]))
    return out


def remove_cgroup(rel: str) -> list[str]:
    """Remove the cgroup ``rel`` (relative, one the harness made) in every hierarchy, killing
    the tasks still in it and in its children first; return the problems."""
    problems = []
    seen: set[Path] = set()
    for m in cgroup_mounts():
        d = m / rel.strip("/")
        if not d.is_dir() or d.resolve() in seen:
            continue
        seen.add(d.resolve())
        problems += remove_cgroup_dir(d)
    return problems


def remove_cgroup_dir(d: Path) -> list[str]:
    """Kill the tasks of the cgroup directory ``d`` (one a benchmark made) and of its
    children, then remove them, deepest first; return the problems."""
    problems = []
    if d.is_dir():
        for sub in sorted((x for x in d.rglob("*") if x.is_dir()), reverse=True) + [d]:
            for _ in range(50):
                try:
                    pids = [int(x) for x in (sub / "cgroup.procs").read_text().split()]
                except OSError:
                    pids = []
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
            for attempt in range(50):  # EBUSY while a killed task is not yet reaped
                try:
                    sub.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if attempt == 49:
                        problems.append(f"cannot remove cgroup {sub}: {e.strerror}")
                    time.sleep(0.1)
    return problems
