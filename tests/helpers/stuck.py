"""What the stuck-step tests (issue 11, A and B) share: a container holding a stopped
task, and looks at tasks, capabilities, the freezer and CRIU's children."""

from __future__ import annotations

import os
from pathlib import Path

from tests.helpers.containers import inspect
from tests.helpers.counter import COUNTER
from tests.helpers.jaula import Jaula

STOPPED_CHILD = "sleep 1000 & kill -STOP $!; " + COUNTER


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            kids += map(int, Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
        except FileNotFoundError:  # a thread that ended between listdir and read
            continue
    return kids


def state_of(pid: int) -> str:
    """The task's state letter from /proc/PID/stat (proc(5)); "gone" once it has ended and
    been reaped, which the counter's short-lived ``sleep`` children do all the time."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def task_states(pid: int) -> dict[int, str]:
    """State letter of each child of PID that still exists when read."""
    states = {k: state_of(k) for k in children(pid)}
    return {k: s for k, s in states.items() if s != "gone"}


def caps_of(pid: int) -> dict[str, str]:
    return {
        k: v.strip()
        for k, _, v in (
            ln.partition(":") for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        if k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
    }


def freezer_state(j: Jaula, ref: str) -> str:
    cid = inspect(j, ref)["Id"]
    from runtime.container import default_cgroup_parent

    found = list(Path("/sys/fs/cgroup").glob(f"freezer/{default_cgroup_parent(j.root)}/{cid}"))
    if found:
        return (found[0] / "freezer.state").read_text().strip()
    v2 = list(Path("/sys/fs/cgroup").glob(f"{default_cgroup_parent(j.root)}/{cid}"))
    return "FROZEN" if v2 and (v2[0] / "cgroup.freeze").read_text().strip() == "1" else "THAWED"


def criu_children(pid: int) -> list[int]:
    return [k for k in children(pid) if Path(f"/proc/{k}/comm").read_text().strip() == "criu"]


def unrestorable_bit() -> int | None:
    """A capability this host's root has in neither its permitted nor its bounding set
    (CAP_SYS_RESOURCE on these VMs): no restore can give a task that in its inheritable
    set, so CRIU's restorer fails on it for real."""
    from runtime.syscalls import cap_last_cap

    st = caps_of(os.getpid())
    have = int(st["CapPrm"], 16) | int(st["CapBnd"], 16)
    return next((b for b in range(cap_last_cap() + 1) if not have >> b & 1), None)


def poison_child_creds(images_dir: Path, bit: int) -> None:
    """Give the second task of a dump an inheritable capability no restore can grant."""
    from pycriu import images

    path = images_dir / "core-2.img"
    with open(path, "rb") as f:
        img = images.load(f)
    creds = img["entries"][0]["thread_core"]["creds"]
    creds["cap_inh"][bit // 32] |= 1 << (bit % 32)
    with open(path, "wb") as f:
        images.dump(img, f)
