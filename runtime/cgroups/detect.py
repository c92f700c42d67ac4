"""Tell how the host mounts cgroups, from ``/proc/self/mountinfo``.

The filesystem type column of mountinfo carries the same fact as the statfs(2) magic that runc
checks (``cgroup2`` is CGROUP2_SUPER_MAGIC 0x63677270, ``cgroup`` is CGROUP_SUPER_MAGIC
0x27e0eb), and it can be faked in a unit test by pointing ``mountinfo`` at a file.

mountinfo line (Documentation/filesystems/proc.rst, "3.5 /proc/<pid>/mountinfo")::

    36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    (1)(2)(3)   (4)   (5)      (6)      (7)   (8) (9)   (10)         (11)

(5) is the mount point (octal escapes for space, tab, newline, backslash), (9) the
filesystem type, (11) the super block options: for a v1 cgroup mount these name the
controllers (``rw,cpu,cpuacct``) or a named hierarchy (``rw,name=systemd``).

Modes (Documentation/admin-guide/cgroup-v2.rst, "Mounting"; systemd calls them the same):

- UNIFIED: ``root`` itself is a cgroup2 mount;
- HYBRID: v1 controllers are mounted below ``root`` and a cgroup2 is mounted at
  ``root/unified`` (usually with no controllers: they are all bound to v1);
- LEGACY: only v1 controllers below ``root``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runtime.cgroups import CgroupMode
from runtime.errors import CgroupError

MOUNTINFO = Path("/proc/self/mountinfo")

#: v1 controller names the kernel knows (Documentation/admin-guide/cgroup-v1/*.rst); a
#: super option of a ``cgroup`` mount that is one of these names a bound controller.
KNOWN_V1_CONTROLLERS = frozenset(
    {
        "blkio",
        "cpu",
        "cpuacct",
        "cpuset",
        "devices",
        "freezer",
        "hugetlb",
        "memory",
        "misc",
        "net_cls",
        "net_prio",
        "perf_event",
        "pids",
        "rdma",
    }
)


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo, the fields jaula needs."""

    mount_point: Path
    fs_type: str
    super_options: tuple[str, ...]

    @property
    def v1_controllers(self) -> frozenset[str]:
        """Controllers bound to this v1 hierarchy (empty for a named one like name=systemd)."""
        if self.fs_type != "cgroup":
            return frozenset()
        return frozenset(opt for opt in self.super_options if opt in KNOWN_V1_CONTROLLERS)


def _unescape(field: str) -> str:
    r"""Undo the kernel's octal escaping of ``\``, space, tab and newline in mountinfo."""
    if "\\" not in field:
        return field
    out = []
    i = 0
    while i < len(field):
        digits = field[i + 1 : i + 4]
        if field[i] == "\\" and len(digits) == 3 and digits.isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse mountinfo text; malformed lines are skipped."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 4:
            continue
        entries.append(
            MountEntry(
                mount_point=Path(_unescape(fields[4])),
                fs_type=fields[sep + 1],
                super_options=tuple(fields[sep + 3].split(",")),
            )
        )
    return entries


def read_mounts(mountinfo: Path = MOUNTINFO) -> dict[Path, MountEntry]:
    """Mount point -> the entry visible there (the last one mounted on top wins)."""
    try:
        text = mountinfo.read_text()
    except OSError as err:
        raise CgroupError(
            f"cannot read {mountinfo}: {err.strerror}", path=str(mountinfo), errno=err.errno
        ) from err
    return {entry.mount_point: entry for entry in parse_mountinfo(text)}


def detect_mode(root: Path = Path("/sys/fs/cgroup"), *, mountinfo: Path = MOUNTINFO) -> CgroupMode:
    """Tell how cgroups are mounted under ``root``.

    Args:
        root: where the cgroup hierarchies are mounted.
        mountinfo: the mountinfo file to read; unit tests pass a fake one describing a
            tmp_path root.

    Raises:
        CgroupError: when neither a cgroup2 nor any v1 controller is mounted at or below root.
    """
    mounts = read_mounts(mountinfo)
    at_root = mounts.get(root)
    if at_root is not None and at_root.fs_type == "cgroup2":
        return CgroupMode.UNIFIED
    v1 = [e for e in mounts.values() if e.mount_point.parent == root and e.v1_controllers]
    if v1:
        unified = mounts.get(root / "unified")
        if unified is not None and unified.fs_type == "cgroup2":
            return CgroupMode.HYBRID
        return CgroupMode.LEGACY
    raise CgroupError(
        f"no cgroup hierarchy is mounted at {root}: expected a cgroup2 mount there or v1 "
        f"controllers mounted below it (see {mountinfo})",
        path=str(root),
    )
