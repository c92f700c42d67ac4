"""runc: ``runc checkpoint``, a copy of the image dir, ``runc restore``.

How runc runs here (Debian 12's runc 1.1.5 with our CRIU, hybrid cgroups, root without
CAP_SYS_RESOURCE) is :mod:`benchmarks.runc`, whose :class:`~benchmarks.runc.Runc` this
module uses: ``--criu`` names the CRIU found; ``runc spec`` with the workload's argv, env and
cwd, the current RLIMIT_NOFILE, the rootfs writable, ``cgroupsPath`` under a parent cgroup of
its own; stdio are pipes drained into files; ``runc restore`` hands its own stdio to CRIU as
``inherit_fd`` for them.

A run: the image unpacked once by umoci, copied (``cp -a``) into a rootfs of its own per
container; ``runc run -d``.  The migration, timed as an operator types it: ``runc checkpoint
--image-path SRC`` (the container's tasks are gone afterwards), ``cp -a SRC DST`` (DST in
another directory, as to another node: it is on the same disk), ``runc restore -d
--image-path DST`` (same rootfs path: one host), then the source images are removed.
Downtime (runc reports none): checkpoint start to restore end.  Wire: bytes of SRC.  CPU,
from ``getrusage(RUSAGE_CHILDREN)`` deltas: source = runc checkpoint (with its CRIU) + cp;
destination = runc restore (with its CRIU).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from benchmarks.runc import RUNC, Runc, RuncContainer, RuncError
from benchmarks.systems import Moved, System
from benchmarks.util import RunError, check_cmd, children_cpu_s, dir_bytes, remove_cgroup
from benchmarks.workloads import Image, Probe, Workload
from tests.helpers.images import ref_name

T = TypeVar("T")


def _runc(f: Callable[[], T]) -> T:
    """Call ``f``; a :class:`RuncError` becomes a :class:`RunError` (a failed run)."""
    try:
        return f()
    except RuncError as e:
        raise RunError(str(e)) from None


class RuncProbe:
    def __init__(self, runc: Runc, c: RuncContainer) -> None:
        self.runc = runc
        self.c = c

    def log(self) -> str:
        return self.c.output()

    def signal(self, sig: int) -> None:
        os.kill(self.c.pid, sig)

    def exec(self, argv: list[str], timeout_s: float = 300) -> str:
        return check_cmd(
            f"runc exec {argv[0]}", self.runc._argv("exec", self.c.id, *argv), timeout_s
        )


class RuncSystem(System):
    name = "runc"

    def __init__(self, work: Path) -> None:
        self.work = work
        self.runc: Runc | None = None
        self.rootfs: dict[str, Path] = {}
        self.ctrs: dict[str, RuncContainer] = {}

    def version(self) -> str:
        return Runc.version()

    def setup(self, images: dict[str, Image]) -> None:
        if shutil.which(RUNC) is None:
            raise RunError("runc is not installed (apt-get install runc)")
        self.work.mkdir(parents=True, exist_ok=True)
        self.runc = Runc(self.work)
        for kind, img in images.items():
            dest = self.work / f"unpacked-{kind}"
            check_cmd(
                "umoci unpack",
                ["umoci", "unpack", "--image", f"{img.layout}:{ref_name(img.layout)}", str(dest)],
                300,
            )
            self.rootfs[kind] = dest / "rootfs"

    def _base(self, name: str) -> Path:
        return self.work / name

    def start(self, wl: Workload, name: str) -> object:
        assert self.runc is not None
        base = self._base(name)
        base.mkdir()
        rootfs = base / "rootfs"
        check_cmd("cp -a rootfs", ["cp", "-a", str(self.rootfs[wl.image]), str(rootfs)], 300)
        runc = self.runc
        bundle = _runc(lambda: runc.make_bundle(base / name, rootfs, wl.argv(), wl.env(), "/tmp"))
        self.ctrs[name] = _runc(lambda: runc.run(name, bundle, base / "run.out", base / "run.err"))
        return name

    def probe(self, ctr: object) -> Probe:
        assert self.runc is not None
        return RuncProbe(self.runc, self.ctrs[str(ctr)])

    def migrate(self, ctr: object) -> Moved:
        assert self.runc is not None
        name = str(ctr)
        c = self.ctrs[name]
        base = self._base(name)
        src, dst = base / "src" / "images", base / "dst" / "images"
        src.parent.mkdir()
        dst.parent.mkdir()
        ch0 = children_cpu_s()
        w0 = time.time()
        t0 = time.perf_counter()
        runc = self.runc
        _runc(lambda: runc.checkpoint(c, src, base / "src" / "work", timeout_s=1200))
        if not c.wait_output_closed(30) or runc.exists(name):
            raise RunError("after runc checkpoint the container still runs")
        wire = dir_bytes(src)
        check_cmd("cp -a (the checkpoint images)", ["cp", "-a", str(src), str(dst)], 1200)
        ch1 = children_cpu_s()
        r = _runc(
            lambda: runc.restore(
                c,
                dst,
                base / "dst" / "work",
                base / "restore.out",
                base / "restore.err",
                timeout_s=1200,
            )
        )
        t_restored = time.perf_counter()
        ch2 = children_cpu_s()
        self.ctrs[name] = r
        shutil.rmtree(src)
        t1 = time.perf_counter()
        return Moved(
            downtime_s=t_restored - t0,
            total_s=t1 - t0,
            wire_bytes=wire,
            cpu_src_s=ch1 - ch0,
            cpu_dst_s=ch2 - ch1,
            window=(w0, time.time()),
        )

    def remove(self, ctr: object) -> list[str]:
        name = str(ctr)
        problems: list[str] = []
        if self.runc is not None:
            self.runc.delete(name)
            # Twice an empty cgroup of a deleted (restored) container was found left in five
            # v1 hierarchies after a run, cause not found: remove what is left (ours only).
            problems += remove_cgroup(f"{self.runc.cgroup_parent}/{name}")
        self.ctrs.pop(name, None)
        shutil.rmtree(self._base(name), ignore_errors=True)
        return problems

    def cleanup(self) -> list[str]:
        if self.runc is None:
            return []
        return self.runc.cleanup() + remove_cgroup(self.runc.cgroup_parent)
