"""Podman: ``podman container checkpoint --export`` + ``podman container restore --import``.

What it needs here (Debian 12's podman 4.3.1 with runc, hybrid cgroups, root without
CAP_SYS_RESOURCE), all given on the command line or in files under the harness's work dir,
so the system's podman store and configuration are untouched:

* two stores, "source" and "destination", each with its own ``--root``, ``--runroot`` and
  ``--tmpdir`` (as two hosts); the workload images loaded into both from oci-archives;
* ``CONTAINERS_CONF`` pointing at a containers.conf of our own: file locks under the tmpdir
  instead of the shared ``/dev/shm/libpod_lock``, the network config dir under the work
  dir, ``--cgroup-manager=cgroupfs``, events to a file; ``TMPDIR`` under the work dir.  The
  only paths outside the work dir it then makes are runc's state of each container in
  /run/runc (removed with the container) and an empty /run/containers/networks (removed at
  the end when it was not there before);
* ``--runtime runc`` (crun cannot start containers on hybrid cgroups); runc finds the CRIU
  on PATH;
* ``--network none``, ``--cgroup-parent`` a cgroup of our own (removed at the end), and
  ``--ulimit nofile=1024:1024 --ulimit nproc=4096:4096`` (Podman's defaults ask for more
  than the hard limits and root here cannot raise them).

The migration, timed as an operator types it: ``podman container checkpoint --export F``
(Podman's default compression, zstd) on the source, ``cp F`` into the destination's dir,
``podman container restore --import F`` into the destination store, then ``podman rm`` of
the exited source container and F removed.  Downtime (Podman reports none): checkpoint start
to restore end.  Wire: the size of F.  CPU: ``getrusage(RUSAGE_CHILDREN)`` deltas (podman
with the runc and CRIU it waits for; cp on the source side) plus, on the destination, the new
conmon's own and its children's CPU (/proc/PID/stat): conmon runs ``runc restore``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

from benchmarks.systems import Moved, System
from benchmarks.util import (
    RunError,
    check_cmd,
    children_cpu_s,
    proc_cpu_s,
    remove_cgroup,
    run_cmd,
    tail,
    unmount_under,
)
from benchmarks.workloads import Image, Probe, Workload

PODMAN = "podman"
# Made by podman on first use whatever its flags (netavark's run dir): removed at the end if
# it was not there before and is still empty.
RUN_DIRS = (Path("/run/containers/networks"), Path("/run/containers"))
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")


class Store:
    """One podman store (root, runroot, tmpdir) under ``d``."""

    def __init__(self, d: Path, conf: Path, netdir: Path) -> None:
        self.d = d
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf), "TMPDIR": str(d / "vartmp")}
        self.base = [
            PODMAN,
            "--root",
            str(d / "root"),
            "--runroot",
            str(d / "runroot"),
            "--tmpdir",
            str(d / "tmp"),
            "--cgroup-manager",
            "cgroupfs",
            "--network-config-dir",
            str(netdir),
            "--events-backend",
            "file",
            "--runtime",
            "runc",
        ]
        for sub in ("vartmp", "tmp", "files"):
            (d / sub).mkdir(parents=True, exist_ok=True)

    def argv(self, *args: str) -> list[str]:
        return [*self.base, *args]

    def run(self, what: str, *args: str, timeout_s: float = 600) -> str:
        return check_cmd(what, self.argv(*args), timeout_s, self.env)

    def inspect(self, name: str, fmt: str) -> str:
        return self.run(
            f"podman inspect {name}", "container", "inspect", "--format", fmt, name, timeout_s=60
        ).strip()


class PodmanProbe:
    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name
        pid, self.log_path = store.inspect(
            name, "{{.State.Pid}}|{{.HostConfig.LogConfig.Path}}"
        ).split("|", 1)
        self.pid = int(pid)
        if self.pid <= 0:
            raise RunError(f"podman: {name} does not run (pid {pid})")

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def exec(self, argv: list[str], timeout_s: float = 300) -> str:
        return self.store.run(
            f"podman exec {argv[0]}", "exec", self.name, *argv, timeout_s=timeout_s
        )


class PodmanSystem(System):
    name = "podman"

    def __init__(self, work: Path, tag: str) -> None:
        self.work = work
        self.cgroup_parent = f"jaula-bench-podman-{tag}-{secrets.token_hex(2)}"
        self.stores: dict[str, Store] = {}
        self.images: dict[str, Image] = {}
        self.where: dict[str, str] = {}  # container name -> store
        self.ids: set[str] = set()
        self.run_dirs_before = {d: d.exists() for d in RUN_DIRS}

    def version(self) -> str:
        try:
            rc, out, err, _w = run_cmd([PODMAN, "--version"], 30)
        except OSError as e:
            return f"podman: {e.strerror}"
        return out.strip() if rc == 0 else f"podman: {tail(err, 100)}"

    def setup(self, images: dict[str, Image]) -> None:
        if shutil.which(PODMAN) is None:
            raise RunError("podman is not installed (apt-get install podman)")
        self.images = images
        d = self.work
        d.mkdir(parents=True, exist_ok=True)
        netdir = d / "net"
        netdir.mkdir(exist_ok=True)
        conf = d / "containers.conf"
        conf.write_text(
            "[engine]\n"
            'lock_type = "file"\n'
            'events_logger = "file"\n'
            'cgroup_manager = "cgroupfs"\n'
            f'static_dir = "{d}/static"\n'
            f'volume_path = "{d}/volumes"\n'
            "[network]\n"
            f'network_config_dir = "{netdir}"\n'
        )
        for side in ("src", "dst"):
            self.stores[side] = Store(d / side, conf, netdir)
            for img in images.values():
                self.stores[side].run(
                    "podman load", "load", "-q", "-i", str(img.archive), timeout_s=600
                )

    def start(self, wl: Workload, name: str) -> object:
        s = self.stores["src"]
        self.where[name] = "src"
        cid = s.run(
            "podman run",
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "none",
            "--cgroup-parent",
            f"/{self.cgroup_parent}",
            *ULIMITS,
            f"localhost/{self.images[wl.image].name}",
            *wl.argv(),
            timeout_s=120,
        )
        self.ids.add(cid.strip())
        return name

    def probe(self, ctr: object) -> Probe:
        name = str(ctr)
        return PodmanProbe(self.stores[self.where[name]], name)

    def migrate(self, ctr: object) -> Moved:
        name = str(ctr)
        src, dst = self.stores["src"], self.stores["dst"]
        f_src = src.d / "files" / f"{name}.tar"
        f_dst = dst.d / "files" / f"{name}.tar"
        ch0 = children_cpu_s()
        w0 = time.time()
        t0 = time.perf_counter()
        src.run(
            "podman container checkpoint",
            "container",
            "checkpoint",
            "--export",
            str(f_src),
            name,
            timeout_s=1200,
        )
        wire = f_src.stat().st_size
        check_cmd("cp (the checkpoint archive)", ["cp", str(f_src), str(f_dst)], 1200)
        ch1 = children_cpu_s()
        dst.run(
            "podman container restore",
            "container",
            "restore",
            "--import",
            str(f_dst),
            timeout_s=1200,
        )
        t_restored = time.perf_counter()
        ch2 = children_cpu_s()
        self.where[name] = "dst"
        conmon = int(dst.inspect(name, "{{.State.ConmonPid}}") or 0)
        conmon_cpu = proc_cpu_s(conmon) if conmon > 0 else None
        ch3 = children_cpu_s()
        src.run("podman rm (source)", "rm", name, timeout_s=120)
        f_src.unlink()
        f_dst.unlink()
        t1 = time.perf_counter()
        ch4 = children_cpu_s()
        return Moved(
            downtime_s=t_restored - t0,
            total_s=t1 - t0,
            wire_bytes=wire,
            cpu_src_s=ch1 - ch0 + ch4 - ch3,
            cpu_dst_s=ch2 - ch1 + (conmon_cpu or 0.0),
            window=(w0, time.time()),
            detail={"conmon_cpu_s": conmon_cpu, "compression": "zstd (default)"},
        )

    def remove(self, ctr: object) -> list[str]:
        name = str(ctr)
        problems = []
        for side, s in self.stores.items():
            rc, _o, err, _w = run_cmd(s.argv("rm", "-f", "-t", "0", "--ignore", name), 120, s.env)
            if rc != 0:
                problems.append(f"podman rm -f {name} ({side}): {tail(err, 300)}")
        self.where.pop(name, None)
        return problems

    def cleanup(self) -> list[str]:
        problems: list[str] = []
        for side, s in self.stores.items():
            for args in (("rm", "-a", "-f", "-t", "0"), ("rmi", "-a", "-f")):
                try:
                    rc, _o, err, _w = run_cmd(s.argv(*args), 300, s.env)
                except subprocess.TimeoutExpired:
                    rc, err = 1, "timed out"
                if rc != 0:
                    problems.append(f"podman {' '.join(args)} ({side}): {tail(err, 300)}")
        # runc's state of podman's containers lives in /run/runc by container id.
        for cid in self.ids:
            if Path("/run/runc", cid).exists():
                subprocess.run(["runc", "delete", "-f", cid], capture_output=True, check=False)
        problems += remove_cgroup(self.cgroup_parent)
        left = unmount_under(self.work)
        problems += [f"mount left: {m}" for m in left]
        for d in RUN_DIRS:
            if not self.run_dirs_before[d]:
                try:
                    d.rmdir()  # only when empty
                except OSError:
                    pass
        return problems
