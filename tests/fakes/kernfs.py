"""A fake cgroupfs in a plain directory, for the cgroup drivers' unit tests (no root needed).

:class:`FakeKernfs` lays out plain files and directories the way the kernel does (v1: one
mount dir per hierarchy; v2: one tree whose children get controller files from the parent's
``cgroup.subtree_control``) and replaces the three kernel-facing primitives of
:mod:`runtime.cgroups.fs` to emulate what kernfs does on mkdir, rmdir and write: control files
appear on mkdir, rmdir refuses a cgroup with tasks or children (EBUSY), writes are checked
like the kernel checks them (memsw >= limit, only available controllers in subtree_control)
and have their side effects (freezer state, ``cgroup.events``, ``cgroup.kill``).  Every write
is logged, so the tests can assert which files a driver writes, in what order, with what value.

Pids used here are above the kernel's largest pid_max (2**22), and ``os.kill`` is replaced, so
no real process can ever be signalled.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest

from runtime.cgroups import fs

FAKE_PID = 2**22 + 101  # above any pid_max: never a real process
UNLIMITED_V1 = "9223372036854771712"  # what v1 memory limits read when unlimited (page rounded)

V1_FILES: dict[str, dict[str, str]] = {
    "": {"cgroup.procs": "", "tasks": "", "notify_on_release": "0"},
    "memory": {
        "memory.limit_in_bytes": UNLIMITED_V1,
        "memory.memsw.limit_in_bytes": UNLIMITED_V1,
        "memory.usage_in_bytes": "0",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0",
    },
    "cpu": {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "-1", "cpu.shares": "1024"},
    "cpuacct": {"cpuacct.usage": "0"},
    "pids": {"pids.max": "max", "pids.current": "0"},
    "freezer": {"freezer.state": "THAWED"},
    "blkio": {
        **{
            f"blkio.throttle.{rw}_{unit}_device": ""
            for rw in ("read", "write")
            for unit in ("bps", "iops")
        },
        "blkio.bfq.weight": "100",
    },
}

V2_FILES: dict[str, dict[str, str]] = {
    "": {
        "cgroup.controllers": "",
        "cgroup.subtree_control": "",
        "cgroup.procs": "",
        "cgroup.threads": "",
        "cgroup.events": "populated 0\nfrozen 0",
        "cgroup.freeze": "0",
        "cgroup.kill": "",
        "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0",
    },
    "memory": {
        "memory.max": "max",
        "memory.swap.max": "max",
        "memory.current": "0",
        "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0",
    },
    "cpu": {"cpu.max": "max 100000", "cpu.weight": "100"},
    "pids": {"pids.max": "max", "pids.current": "0"},
    "io": {"io.max": "", "io.stat": "", "io.bfq.weight": "default 100"},
}


class FakeKernfs:
    """A fake cgroupfs under ``root`` (see the module docstring)."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.writes: list[tuple[str, str]] = []  #: (path relative to root, value) in order
        self.fail: dict[str, int] = {}  #: file name -> errno every write to it fails with
        self.stuck_freezing = False  #: freezing never completes
        self.unkillable: set[int] = set()  #: pids that survive SIGKILL
        self.signals: list[tuple[int, int]] = []
        self.v2_hierarchies: set[Path] = set()
        monkeypatch.setattr(fs, "_write_raw", self._write)
        monkeypatch.setattr(fs, "_mkdir_raw", self._mkdir)
        monkeypatch.setattr(fs, "_rmdir_raw", self._rmdir)
        monkeypatch.setattr(os, "kill", self._kill)

    # --- building ---

    @staticmethod
    def _populate(path: Path, files: dict[str, str]) -> None:
        for name, content in files.items():
            (path / name).write_text(content)

    def v1(self, *mount_dirs: str, symlinks: bool = False) -> Path:
        """Mount v1 hierarchies named like their controllers ("cpu,cpuacct" co-mounts)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for name in mount_dirs:
            mount = self.root / name
            mount.mkdir()
            self._populate(mount, V1_FILES[""])
            (mount / "cgroup.sane_behavior").write_text("0")
            if symlinks and "," in name:
                for controller in name.split(","):
                    (self.root / controller).symlink_to(name)
        return self.root

    def v2(self, controllers: str = "cpu io memory pids", at: str = "") -> Path:
        """A cgroup2 mount at root/at whose root offers ``controllers``."""
        mount = self.root / at if at else self.root
        mount.mkdir(parents=True, exist_ok=True)
        self._populate(
            mount,
            {
                "cgroup.controllers": controllers,
                "cgroup.subtree_control": "",
                "cgroup.procs": "",
                "cgroup.threads": "",
                "cpu.stat": "usage_usec 0",
            },
        )
        self.v2_hierarchies.add(mount)
        return mount

    def _v2_mount(self, path: Path) -> Path | None:
        for mount in self.v2_hierarchies:
            if path == mount or mount in path.parents:
                return mount
        return None

    # --- kernfs emulation ---

    def _mkdir(self, path: Path) -> None:
        os.mkdir(path)
        if self._v2_mount(path) is not None:
            enabled = (path.parent / "cgroup.subtree_control").read_text().split()
            self._populate(path, V2_FILES[""])
            (path / "cgroup.controllers").write_text(" ".join(enabled))
            for controller in enabled:
                self._populate(path, V2_FILES.get(controller, {}))
            return
        mount = path.relative_to(self.root).parts[0]
        self._populate(path, V1_FILES[""])
        for controller in mount.split(","):
            self._populate(path, V1_FILES.get(controller, {}))

    def _rmdir(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        if any(p.is_dir() for p in path.iterdir()) or (path / "cgroup.procs").read_text().split():
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        if not (path / "cgroup.procs").exists():
            os.rmdir(path)  # a plain dir: fails with ENOTEMPTY as a real one would
            return
        for file in path.iterdir():
            file.unlink()
        os.rmdir(path)

    def _write(self, path: Path, data: bytes) -> None:
        value = data.decode()
        self.writes.append((str(path.relative_to(self.root)), value))
        if path.name in self.fail:
            code = self.fail[path.name]
            raise OSError(code, os.strerror(code), str(path))
        if not path.is_file():  # no O_CREAT: ENOENT for a missing file, EISDIR for a dir
            fd = os.open(path, os.O_WRONLY)
            os.close(fd)
        handler = getattr(self, "_on_" + path.name.replace(".", "_"), None)
        if handler is not None:
            handler(path, value)
        else:
            path.write_text(value)

    def _on_cgroup_procs(self, path: Path, value: str) -> None:
        pid = int(value)
        mount = self._v2_mount(path) or self.root / path.relative_to(self.root).parts[0]
        for procs in mount.rglob("cgroup.procs"):
            self._remove_pid(procs, pid)
        path.write_text(path.read_text() + f"{pid}\n")
        if (path.parent / "cgroup.events").exists():
            self._set_events(path.parent, populated=1)

    @staticmethod
    def _remove_pid(procs: Path, pid: int) -> None:
        lines = [line for line in procs.read_text().split() if line != str(pid)]
        procs.write_text("".join(f"{line}\n" for line in lines))

    def _limit(self, value: str) -> int:
        number = int(value)
        return int(UNLIMITED_V1) if number == -1 else number

    def _on_memory_limit_in_bytes(self, path: Path, value: str) -> None:
        memsw = path.parent / "memory.memsw.limit_in_bytes"
        if memsw.exists() and self._limit(value) > int(memsw.read_text()):
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        path.write_text(str(self._limit(value)))

    def _on_memory_memsw_limit_in_bytes(self, path: Path, value: str) -> None:
        if self._limit(value) < int((path.parent / "memory.limit_in_bytes").read_text()):
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        path.write_text(str(self._limit(value)))

    def _on_freezer_state(self, path: Path, value: str) -> None:
        stuck = value == "FROZEN" and self.stuck_freezing
        path.write_text("FREEZING" if stuck else value)

    def _on_cgroup_subtree_control(self, path: Path, value: str) -> None:
        enabled = path.read_text().split()
        available = (path.parent / "cgroup.controllers").read_text().split()
        for token in value.split():
            name = token[1:]
            if name not in available:
                raise OSError(errno.ENOENT, "No such file or directory", str(path))
            if token.startswith("+") and name not in enabled:
                enabled.append(name)
            elif token.startswith("-") and name in enabled:
                enabled.remove(name)
        path.write_text(" ".join(enabled))

    @staticmethod
    def _set_events(cgroup: Path, **values: int) -> None:
        events = fs.read_keyed(cgroup / "cgroup.events")
        events.update(values)
        (cgroup / "cgroup.events").write_text("\n".join(f"{k} {v}" for k, v in events.items()))

    def _on_cgroup_freeze(self, path: Path, value: str) -> None:
        path.write_text(value)
        frozen = 1 if value == "1" and not self.stuck_freezing else 0
        self._set_events(path.parent, frozen=frozen)

    def _on_cgroup_kill(self, path: Path, value: str) -> None:
        for procs in path.parent.rglob("cgroup.procs"):
            for pid in procs.read_text().split():
                self._kill(int(pid), signal.SIGKILL)

    def _kill(self, pid: int, sig: int) -> None:
        assert pid > 2**22, f"the fake must never signal a real pid ({pid})"
        self.signals.append((pid, sig))
        if sig != signal.SIGKILL or pid in self.unkillable:
            return
        for procs in self.root.rglob("cgroup.procs"):
            self._remove_pid(procs, pid)
        for events in self.root.rglob("cgroup.events"):
            if not (events.parent / "cgroup.procs").read_text().split():
                self._set_events(events.parent, populated=0)

    def written(self, prefix: str = "") -> list[tuple[str, str]]:
        """Writes to files under ``prefix`` (relative to root)."""
        return [(p, v) for p, v in self.writes if p.startswith(prefix)]
