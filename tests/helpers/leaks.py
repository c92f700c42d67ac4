"""What a test or a session left behind on the host, and the cleanup that finds it.

Only this process's own things count: mounts below a given directory, cgroups of the
containers the fixtures created, monitors and CRIU processes whose command line names a path
below the session's temp dir.  Other runs on the machine are none of its business.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.helpers.jaula import Jaula

#: the cgroup parent of the default state root (per-root parents start with it)
CGROUP_PARENT = "jaula"
#: ids of every container the fixtures found and removed (for the session's leak check)
CREATED_IDS: set[str] = set()


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace."""
    p = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    # p + "/": the other shard's /tmp/pytest-of-root/pytest-70 is not below pytest-7
    return [m for m in points if m == p or m.startswith(p + "/")]


def cgroup_dirs(container_id: str, root: Path | None = None) -> list[Path]:
    """Directories of this container under any mounted hierarchy: in the cgroup parent of
    state root ``root`` only, or under any jaula parent (two roots may hold one id)."""
    from runtime.container import default_cgroup_parent

    parent = default_cgroup_parent(root) if root is not None else f"{CGROUP_PARENT}*"
    return [d for d in Path("/sys/fs/cgroup").glob(f"*/{parent}/{container_id}")] + list(
        Path("/sys/fs/cgroup").glob(f"{parent}/{container_id}")
    )


def cleanup_root(root: Path) -> list[str]:
    """Remove every container under state root ``root`` (``rm -f``), then the root; return
    what leaked (failed removals, mounts, cgroups), after removing those too."""
    problems: list[str] = []
    j = Jaula(root)
    ids = j.container_ids()
    CREATED_IDS.update(ids)
    for cid in ids:
        p = j.run("rm", "-f", cid, check=False)
        if p.returncode != 0:
            problems.append(f"rm -f {cid[:12]} failed: {p.stderr.strip()}")
    for m in mounts_under(root):
        problems.append(f"leaked mount {m}")
        subprocess.run(["umount", "-l", m], check=False)
    for cid in ids:
        for d in cgroup_dirs(cid, root):
            problems.append(f"leaked cgroup {d}")
            try:
                d.rmdir()
            except OSError:
                pass
    shutil.rmtree(root, ignore_errors=True)
    return problems


def session_leaks(basetemp: Path) -> dict[str, list[str]]:
    """What this test session left behind: mounts below its temp dir ``basetemp``, cgroups
    of the containers in :data:`CREATED_IDS`, monitors or CRIU processes working below its
    temp dir.  Keys ``mounts``, ``cgroups``, ``processes``, present only when not empty."""
    base = os.path.realpath(basetemp)
    mounts = sorted(m for m in mounts_under(Path(base)))
    cgroups = sorted(str(d) for cid in CREATED_IDS for d in cgroup_dirs(cid))
    procs = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            comm = (d / "comm").read_text().strip()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (d / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if comm in ("jaula-monitor", "criu") and state != "Z" and base + "/" in cmdline:
            procs.append(f"{d.name} {comm}")
    found = {"mounts": mounts, "cgroups": cgroups, "processes": procs}
    return {k: v for k, v in found.items() if v}
