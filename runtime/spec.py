"""A container's configuration: what ``jaula run`` was asked for, resolved against its image.

This is a small subset of the OCI runtime spec (``config.md``: process args/env/cwd/user,
hostname, mounts, linux.resources, linux.namespaces, process.capabilities), kept as frozen
dataclasses and stored as ``config.json`` in the container's directory.  The parsers here turn
command-line values into it and raise :class:`runtime.errors.ConfigError` with a message that
names the bad value and the expected form.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from runtime.cgroups import IO_KINDS, IoLimit, Resources
from runtime.errors import CgroupError, ConfigError
from runtime.network import Attachment
from runtime.network.ports import PortMapping
from runtime.userns import IdMapping, maps_from_json, maps_json

#: Capabilities a container keeps by default: Podman's default set (containers.conf
#: ``default_capabilities``), which is runc's minus AUDIT_WRITE, MKNOD and NET_RAW.
DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
)

#: capability name -> number (linux/capability.h).
CAPABILITIES: dict[str, int] = {
    name: i
    for i, name in enumerate(
        (
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_DAC_READ_SEARCH",
            "CAP_FOWNER",
            "CAP_FSETID",
            "CAP_KILL",
            "CAP_SETGID",
            "CAP_SETUID",
            "CAP_SETPCAP",
            "CAP_LINUX_IMMUTABLE",
            "CAP_NET_BIND_SERVICE",
            "CAP_NET_BROADCAST",
            "CAP_NET_ADMIN",
            "CAP_NET_RAW",
            "CAP_IPC_LOCK",
            "CAP_IPC_OWNER",
            "CAP_SYS_MODULE",
            "CAP_SYS_RAWIO",
            "CAP_SYS_CHROOT",
            "CAP_SYS_PTRACE",
            "CAP_SYS_PACCT",
            "CAP_SYS_ADMIN",
            "CAP_SYS_BOOT",
            "CAP_SYS_NICE",
            "CAP_SYS_RESOURCE",
            "CAP_SYS_TIME",
            "CAP_SYS_TTY_CONFIG",
            "CAP_MKNOD",
            "CAP_LEASE",
            "CAP_AUDIT_WRITE",
            "CAP_AUDIT_CONTROL",
            "CAP_SETFCAP",
            "CAP_MAC_OVERRIDE",
            "CAP_MAC_ADMIN",
            "CAP_SYSLOG",
            "CAP_WAKE_ALARM",
            "CAP_BLOCK_SUSPEND",
            "CAP_AUDIT_READ",
            "CAP_PERFMON",
            "CAP_BPF",
            "CAP_CHECKPOINT_RESTORE",
        )
    )
}

#: Paths masked in /proc and /sys (runc's default spec ``linux.maskedPaths``).
MASKED_PATHS: tuple[str, ...] = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
#: Paths made read-only (runc's default spec ``linux.readonlyPaths``).
READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)


@dataclass(frozen=True)
class Mount:
    """A bind mount of a host path into the container (``-v HOST:CTR[:OPTS]``).

    ``shared``: the operator declares ``HOST`` shared storage, the same data under the same
    path on every node (NFS, a cluster file system); a migration then only checks that the
    path exists on the destination, of the same kind and file system type.  Otherwise the
    volume is local data, and a migration is refused unless the destination's ``HOST`` is the
    very same directory (migrate.portability)."""

    source: str
    destination: str
    readonly: bool = False
    shared: bool = False


@dataclass(frozen=True)
class User:
    """Numeric identity of the container's processes."""

    uid: int = 0
    gid: int = 0
    additional_gids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ContainerConfig:
    """Everything needed to (re)create a container's processes and environment.

    Attributes:
        id: 64 hex characters; name: unique per state root.
        image_id: sha256 hex of the image config; image_ref: what the user typed.
        layers: layer ids bottom -> top (see :class:`runtime.image.ImageStore`).
        args: argv of the init (entrypoint + cmd, resolved); env: ``K=V`` strings.
        cwd: working directory inside the container; user: uid/gid it runs as.
        hostname: the UTS hostname; network: ``none`` (own net namespace with lo),
            ``host``, or ``bridge`` (a veth into the node's bridge: ``attachment``).
        attachment: a bridged container's address, MAC and bridge (runtime.network).
        ports: its published ports (``-p``, :mod:`runtime.network.ports`), host ports
            resolved; they move with it.
        resources: cgroup limits; mounts: bind mounts; capabilities: names kept.
        privileged: keep every capability and mask nothing.
        stop_signal: signal number ``stop`` sends first.
        cgroup_parent: directory under each cgroup hierarchy holding the container's.
        created_at: seconds since the epoch.
        labels: ``K=V`` strings (``jaula run --label``), e.g. ``jaula.balance=false``, which
            the balancer reads to leave the container where it is.
        seccomp: ``default`` (Podman's profile), ``unconfined``, or a profile's JSON text
            (see :mod:`runtime.seccomp_filter`).
        storage_size_bytes: ``--storage-opt size=``, the quota of the writable layer
            (:mod:`runtime.quota`); None: no limit.
        userns: ``host``, ``auto`` or ``private`` (``--uidmap``), see :mod:`runtime.userns`;
            uid_map / gid_map: the container's maps (empty with ``host``).
    """

    id: str
    name: str
    image_id: str
    image_ref: str
    layers: tuple[str, ...]
    args: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str = "/"
    user: User = field(default_factory=User)
    user_spec: str = ""
    hostname: str = ""
    network: str = "none"
    attachment: Attachment | None = None
    ports: tuple[PortMapping, ...] = ()
    resources: Resources = field(default_factory=Resources)
    mounts: tuple[Mount, ...] = ()
    capabilities: tuple[str, ...] = DEFAULT_CAPABILITIES
    privileged: bool = False
    stop_signal: int = 15
    cgroup_parent: str = "jaula"
    created_at: float = 0.0
    labels: tuple[str, ...] = ()
    seccomp: str = "default"
    storage_size_bytes: int | None = None
    userns: str = "host"
    uid_map: tuple[IdMapping, ...] = ()
    gid_map: tuple[IdMapping, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["uid_map"] = maps_json(self.uid_map)
        d["gid_map"] = maps_json(self.gid_map)
        return d

    @property
    def in_userns(self) -> bool:
        """Whether the container has a user namespace of its own."""
        return bool(self.uid_map)

    def label_map(self) -> dict[str, str]:
        """``labels`` as a mapping (a later ``K=`` wins)."""
        return dict(kv.partition("=")[::2] for kv in self.labels)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ContainerConfig:
        d = dict(d)
        d["layers"] = tuple(d["layers"])
        d["args"] = tuple(d["args"])
        d["env"] = tuple(d["env"])
        u = d.get("user") or {}
        d["user"] = User(u.get("uid", 0), u.get("gid", 0), tuple(u.get("additional_gids", ())))
        d["resources"] = Resources(**(d.get("resources") or {}))
        d["mounts"] = tuple(Mount(**m) for m in d.get("mounts", ()))
        d["capabilities"] = tuple(d.get("capabilities", DEFAULT_CAPABILITIES))
        d["labels"] = tuple(d.get("labels", ()))
        att = d.get("attachment")
        d["attachment"] = Attachment.from_json(att) if att else None
        d["ports"] = tuple(PortMapping.from_json(m) for m in d.get("ports", ()))
        d["uid_map"] = maps_from_json(d.get("uid_map"))
        d["gid_map"] = maps_from_json(d.get("gid_map"))
        return cls(**d)


_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory(value: str) -> int:
    """Parse ``--memory``: bytes, or a number with k/m/g/t suffix (binary units, as Podman).

    Raises ConfigError for anything else or a limit under 6 MiB (Podman's minimum)."""
    m = _SIZE_RE.match(value.strip())
    if not m:
        raise ConfigError(f"invalid --memory {value!r}: use bytes or a size like 512m or 1g")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 6 * 1024 * 1024:
        raise ConfigError(f"invalid --memory {value!r}: the minimum is 6m")
    return n


def parse_cpus(value: str) -> int:
    """Parse ``--cpus F`` into a CFS quota in microseconds per 100 ms period."""
    try:
        f = float(value)
    except ValueError:
        raise ConfigError(f"invalid --cpus {value!r}: use a number of CPUs like 0.5 or 2") from None
    if not 0.01 <= f <= 1024:
        raise ConfigError(f"invalid --cpus {value!r}: must be between 0.01 and 1024")
    return round(f * 100_000)


def parse_device_limit(value: str, kind: str) -> IoLimit:
    """Parse ``--device-{read,write}-{bps,iops} PATH:RATE`` (``kind`` a key of
    :data:`runtime.cgroups.IO_KINDS`): RATE in bytes per second with an optional k/m/g unit
    (``1mb``, ``512k``) for ``*_bps``, a whole number of operations per second for
    ``*_iops``.  PATH must be a block device here.  Raises ConfigError."""
    flag = IO_KINDS[kind][2]
    path, sep, rate = value.rpartition(":")
    form = "PATH:RATE (e.g. /dev/sda:1mb)" if kind.endswith("bps") else "PATH:N (e.g. /dev/sda:100)"
    if not sep or not path.startswith("/") or not rate:
        raise ConfigError(f"invalid {flag} {value!r}: use {form}")
    if kind.endswith("bps"):
        m = _SIZE_RE.match(rate.strip())
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()]) if m else 0
    else:
        n = int(rate) if rate.isdigit() else 0
    if n <= 0:
        raise ConfigError(f"invalid {flag} {value!r}: the rate must be positive; use {form}")
    lim = IoLimit(path, kind, n)
    try:
        lim.device_numbers()
    except CgroupError as e:
        raise ConfigError(str(e)) from None
    return lim


def parse_blkio_weight(value: str) -> int:
    """Parse ``--blkio-weight N``: 10..1000, as Podman.  Raises ConfigError."""
    if not value.isdigit() or not 10 <= int(value) <= 1000:
        raise ConfigError(f"invalid --blkio-weight {value!r}: use a whole number from 10 to 1000")
    return int(value)


def parse_pids_limit(value: str) -> int | None:
    """Parse ``--pids-limit N``; 0 or -1 mean unlimited (as Podman)."""
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"invalid --pids-limit {value!r}: use a whole number") from None
    if n in (0, -1):
        return None
    if n < 0:
        raise ConfigError(f"invalid --pids-limit {value!r}: must be positive, or -1 for no limit")
    return n


def parse_env(items: list[str], base: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Merge ``-e K=V`` (or ``-e K`` to take the caller's value) over the image's Env."""
    import os

    env: dict[str, str] = {}
    for kv in base:
        k, _, v = kv.partition("=")
        env[k] = v
    for item in items:
        k, sep, v = item.partition("=")
        if not k or not re.match(r"^[^=\s]+$", k):
            raise ConfigError(f"invalid -e {item!r}: use NAME=VALUE")
        if not sep:
            if k not in os.environ:
                continue
            v = os.environ[k]
        env[k] = v
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return tuple(f"{k}={v}" for k, v in env.items())


def parse_labels(items: list[str]) -> tuple[str, ...]:
    """Check ``--label K=V`` items (Podman's spelling); ConfigError naming a bad one."""
    for item in items:
        k, sep, _ = item.partition("=")
        if not sep or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]*$", k):
            raise ConfigError(f"invalid --label {item!r}: use KEY=VALUE, e.g. jaula.balance=false")
    return tuple(items)


def parse_volume(value: str) -> Mount:
    """Parse ``-v HOST:CTR[:OPTS]``, OPTS comma-separated ``ro``/``rw`` and ``shared`` (see
    :class:`Mount`); both paths absolute, the host path must exist."""
    import os

    parts = value.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise ConfigError(f"invalid -v {value!r}: use HOST:CONTAINER[:ro][,shared]")
    src, dst = parts[0], parts[1]
    opts = parts[2].split(",") if len(parts) == 3 else ["rw"]
    if any(o not in ("ro", "rw", "shared") for o in opts) or {"ro", "rw"} <= set(opts):
        raise ConfigError(
            f"invalid -v {value!r}: the options are ro or rw, and shared, separated by commas"
        )
    opt = "ro" if "ro" in opts else "rw"
    if not os.path.isabs(src) or not os.path.isabs(dst):
        raise ConfigError(f"invalid -v {value!r}: both paths must be absolute")
    if not os.path.exists(src):
        raise ConfigError(f"invalid -v {value!r}: host path {src} does not exist")
    if os.path.normpath(dst) == "/":
        raise ConfigError(f"invalid -v {value!r}: cannot mount over the container's /")
    return Mount(os.path.realpath(src), os.path.normpath(dst), opt == "ro", "shared" in opts)


def parse_capabilities(
    cap_add: list[str], cap_drop: list[str], privileged: bool
) -> tuple[str, ...]:
    """Apply ``--cap-add``/``--cap-drop`` (names with or without ``CAP_``, or ``ALL``) to the
    default set; ``--privileged`` keeps every capability."""
    if privileged:
        return tuple(CAPABILITIES)

    def norm(name: str) -> str:
        n = name.upper()
        if n == "ALL":
            return n
        n = n if n.startswith("CAP_") else "CAP_" + n
        if n not in CAPABILITIES:
            raise ConfigError(f"unknown capability {name!r}: see capabilities(7) for names")
        return n

    caps = list(DEFAULT_CAPABILITIES)
    drops = {norm(c) for c in cap_drop}
    if "ALL" in drops:
        caps = []
    else:
        caps = [c for c in caps if c not in drops]
    for c in (norm(c) for c in cap_add):
        if c == "ALL":
            caps = [k for k in CAPABILITIES if k not in drops]
        elif c not in caps:
            caps.append(c)
    return tuple(caps)


def capability_mask(names: tuple[str, ...]) -> int:
    """64-bit mask with the bit of each named capability set."""
    mask = 0
    for n in names:
        mask |= 1 << CAPABILITIES[n]
    return mask


def parse_signal(value: str | int) -> int:
    """Parse a signal as a number, ``TERM`` or ``SIGTERM``."""
    import signal

    if isinstance(value, int):
        return value
    v = value.strip().upper()
    if v.isdigit():
        n = int(v)
    else:
        name = v if v.startswith("SIG") else "SIG" + v
        try:
            n = int(signal.Signals[name])
        except KeyError:
            raise ConfigError(
                f"invalid signal {value!r}: use a name like TERM or a number"
            ) from None
    if not 1 <= n <= 64:
        raise ConfigError(f"invalid signal {value!r}: must be between 1 and 64")
    return n


__all__ = [
    "CAPABILITIES",
    "DEFAULT_CAPABILITIES",
    "MASKED_PATHS",
    "READONLY_PATHS",
    "ContainerConfig",
    "Mount",
    "User",
    "capability_mask",
    "parse_blkio_weight",
    "parse_capabilities",
    "parse_cpus",
    "parse_device_limit",
    "parse_env",
    "parse_memory",
    "parse_pids_limit",
    "parse_signal",
    "parse_volume",
]
