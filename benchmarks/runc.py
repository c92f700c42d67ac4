"""runc as a baseline for the benchmarks: bundles, detached containers, checkpoint and restore.

What works on this machine (Debian 12's runc 1.1.5, CRIU 4.2.1 in ``/usr/local/sbin``,
hybrid cgroups, root without CAP_SYS_RESOURCE), and why each choice:

* **CRIU**: runc runs ``criu swrk`` from ``--criu PATH`` (a global flag; default ``criu`` on
  PATH), so :class:`Runc` passes the CRIU it finds explicitly.
* **Config**: ``runc spec`` (own pid, mount, ipc, uts and network namespaces; lo up) with
  ``terminal: false``, the workload's argv, env and cwd, ``root`` = an unpacked rootfs
  (writable: runc bind-mounts the directory onto itself), ``cgroupsPath`` =
  ``/<parent>/<container id>`` under a parent cgroup owned by this :class:`Runc`.  The spec's
  RLIMIT_NOFILE (1024:1024) works here since it only lowers the limit, but a value above the
  current hard limit would fail without CAP_SYS_RESOURCE, so the config carries the current
  limits instead.
* **stdio**: ``runc run -d`` without a terminal passes its own stdin/stdout/stderr through
  to the container.  They must be **pipes**: a regular file outside the container's mount
  namespace makes the dump fail (``Can't lookup mount=... for fd=1 path=...``).  ``runc
  checkpoint`` records the pipes' ids (``descriptors.json``) and ``runc restore`` hands its
  own stdio to CRIU as ``inherit_fd`` for them, so the restore gets fresh pipes too.  A
  thread per pipe copies what the container writes into a file.
* **cgroups**: the default ``--manage-cgroups-mode soft`` works on hybrid v1: the restored
  tasks land back in the container's ``cgroupsPath`` (runc recreates it).  ``runc delete``
  removes the container's cgroup but not the parent, which :meth:`Runc.cleanup` removes.
* **network**: runc always passes CLONE_NEWNET in CRIU's ``empty_ns`` ("runc doesn't manage
  network devices"): the net namespace is not dumped, and after a restore it is a new, empty
  one with ``lo`` down.
* CRIU's ``rlimit: Can't setup RLIMIT_NOFILE for self`` in dump.log and restore.log is
  harmless here.

Everything lives under one work directory and one parent cgroup; :meth:`Runc.cleanup`
deletes every container of its ``--root`` (killing what runs), then removes the parent
cgroup in every hierarchy, killing any task still in it (only tasks in cgroups it made).
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from benchmarks.util import remove_cgroup_dir, wait_child

RUNC = "runc"
CRIU_FALLBACK = Path("/usr/local/sbin/criu")


class RuncError(RuntimeError):
    """A runc command failed; the message holds runc's stderr and CRIU's error lines."""


def criu_log_errors(log: Path, limit: int = 6) -> str:
    """The last ``limit`` ``Error`` lines of a CRIU log, without the harmless rlimit one."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errs = [ln for ln in lines if "Error" in ln and "RLIMIT_NOFILE" not in ln]
    return "\n".join(errs[-limit:])


def _drain(fd: int, out: Path) -> None:
    with open(out, "ab", buffering=0) as f:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            f.write(chunk)
    os.close(fd)


@dataclass
class RuncContainer:
    """A container started (or restored) by :class:`Runc`.

    ``pid`` is the host pid of its init; ``stdout``/``stderr`` are the files its output is
    copied into (appended to across run and restore)."""

    id: str
    bundle: Path
    pid: int
    stdout: Path
    stderr: Path
    threads: list[threading.Thread] = field(default_factory=list, repr=False)

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") if self.stdout.exists() else ""

    def wait_output_closed(self, timeout_s: float) -> bool:
        """Wait until nothing holds the stdout/stderr pipes any more (the tasks are gone)."""
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)


class Runc:
    """runc with its own ``--root`` and parent cgroup under ``workdir``.

    Use as a context manager, or call :meth:`cleanup` in a ``finally``."""

    def __init__(self, workdir: Path, criu: str | None = None) -> None:
        self.workdir = workdir
        self.root = workdir / "runc-state"
        self.root.mkdir(parents=True, exist_ok=True)
        self.criu = criu or shutil.which("criu") or str(CRIU_FALLBACK)
        self.cgroup_parent = f"jaula-bench-runc-{os.getpid()}-{secrets.token_hex(3)}"
        self.containers: set[str] = set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # --- commands -----------------------------------------------------------------------

    def _argv(self, *args: str) -> list[str]:
        return [RUNC, "--root", str(self.root), "--criu", self.criu, *args]

    @staticmethod
    def version() -> str:
        try:
            p = subprocess.run([RUNC, "--version"], capture_output=True, text=True, check=False)
        except OSError as e:
            return f"runc: {e.strerror}"
        return p.stdout.splitlines()[0] if p.returncode == 0 and p.stdout else "runc: unknown"

    def make_bundle(
        self,
        bundle: Path,
        rootfs: Path,
        args: list[str],
        env: list[str],
        cwd: str = "/",
        hostname: str = "runc-bench",
    ) -> Path:
        """Write ``bundle/config.json`` from ``runc spec`` for ``args`` in ``rootfs``; the
        cgroup is ``/<parent>/<bundle dir name>``, so give each container its own bundle
        dir (it holds only config.json)."""
        bundle.mkdir(parents=True, exist_ok=True)
        cfg_path = bundle / "config.json"
        cfg_path.unlink(missing_ok=True)
        p = subprocess.run(
            [RUNC, "spec", "--bundle", str(bundle)], capture_output=True, text=True, check=False
        )
        if p.returncode != 0:
            raise RuncError(f"runc spec failed ({p.returncode}): {p.stderr.strip()}")
        cfg = json.loads(cfg_path.read_text())
        proc = cfg["process"]
        proc["terminal"] = False
        proc["args"] = list(args)
        proc["env"] = list(env)
        proc["cwd"] = cwd
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        proc["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": soft, "hard": hard}]
        cfg["root"] = {"path": str(rootfs.resolve()), "readonly": False}
        cfg["hostname"] = hostname
        cfg["linux"]["cgroupsPath"] = f"/{self.cgroup_parent}/{bundle.name}"
        cfg_path.write_text(json.dumps(cfg, indent=1))
        return bundle

    def _spawn(
        self,
        what: str,
        argv: list[str],
        ctr_id: str,
        bundle: Path,
        pid_file: Path,
        stdout: Path,
        stderr: Path,
        timeout_s: float,
    ) -> RuncContainer:
        """Run a ``runc run -d``/``restore -d`` command with pipes as its stdio."""
        pid_file.unlink(missing_ok=True)
        r0, w0 = os.pipe()
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        os.close(w0)  # the container's stdin: a pipe nobody writes to
        runc_log = self.workdir / f"runc-{ctr_id}.log"
        runc_log.unlink(missing_ok=True)
        self.containers.add(ctr_id)
        try:
            proc = subprocess.Popen(
                [*argv[:1], "--log", str(runc_log), *argv[1:]], stdin=r0, stdout=w1, stderr=w2
            )
        finally:
            for fd in (r0, w1, w2):
                os.close(fd)
        threads = [
            threading.Thread(target=_drain, args=(fd, out), daemon=True)
            for fd, out in ((r1, stdout), (r2, stderr))
        ]
        for t in threads:
            t.start()
        rc = wait_child(proc, timeout_s)
        if rc != 0 or not pid_file.exists():
            msg = runc_log.read_text(errors="replace").strip() if runc_log.exists() else ""
            raise RuncError(f"runc {what} {ctr_id} failed ({rc}): {msg[-800:]}")
        pid = int(pid_file.read_text().strip())
        return RuncContainer(ctr_id, bundle, pid, stdout, stderr, threads)

    def run(
        self, ctr_id: str, bundle: Path, stdout: Path, stderr: Path, timeout_s: float = 60
    ) -> RuncContainer:
        """``runc run -d``: start the container; return once its init runs."""
        pid_file = self.workdir / f"{ctr_id}.pid"
        argv = self._argv("run", "-d", "--pid-file", str(pid_file), "--bundle", str(bundle), ctr_id)
        return self._spawn("run", argv, ctr_id, bundle, pid_file, stdout, stderr, timeout_s)

    def checkpoint(
        self,
        c: RuncContainer,
        image_dir: Path,
        work_dir: Path,
        timeout_s: float = 600,
        extra: tuple[str, ...] = (),
    ) -> None:
        """``runc checkpoint``: dump the container into ``image_dir`` (CRIU's log and stats
        in ``work_dir``); the container is gone afterwards unless ``--leave-running`` is in
        ``extra``."""
        argv = self._argv(
            "checkpoint", "--image-path", str(image_dir), "--work-path", str(work_dir), *extra, c.id
        )
        err_file = work_dir.parent / f"{work_dir.name}.runc-stderr"
        with open(err_file, "w+") as err_f:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err_f, stderr=err_f)
            rc = wait_child(proc, timeout_s)
            err_f.seek(0)
            err = err_f.read()
        if rc != 0:
            raise RuncError(
                f"runc checkpoint {c.id} failed ({rc}): {err.strip()[-600:]}\n"
                f"{criu_log_errors(work_dir / 'dump.log')}"
            )

    def restore(
        self,
        c: RuncContainer,
        image_dir: Path,
        work_dir: Path,
        stdout: Path,
        stderr: Path,
        timeout_s: float = 600,
    ) -> RuncContainer:
        """``runc restore -d``: bring the container back from ``image_dir``; return it with
        its new host pid, its output copied into ``stdout``/``stderr``."""
        pid_file = self.workdir / f"{c.id}.pid"
        argv = self._argv(
            "restore",
            "-d",
            "--pid-file",
            str(pid_file),
            "--image-path",
            str(image_dir),
            "--work-path",
            str(work_dir),
            "--bundle",
            str(c.bundle),
            c.id,
        )
        try:
            return self._spawn("restore", argv, c.id, c.bundle, pid_file, stdout, stderr, timeout_s)
        except RuncError as e:
            raise RuncError(f"{e}\n{criu_log_errors(work_dir / 'restore.log')}") from None

    def exists(self, ctr_id: str) -> bool:
        p = subprocess.run(self._argv("state", ctr_id), capture_output=True, check=False)
        return p.returncode == 0

    def delete(self, ctr_id: str) -> None:
        """``runc delete -f`` (kills it if it runs); silent if it does not exist."""
        subprocess.run(
            self._argv("delete", "-f", ctr_id), capture_output=True, check=False, timeout=60
        )
        self.containers.discard(ctr_id)

    # --- cleanup ------------------------------------------------------------------------

    def cgroup_dirs(self) -> list[Path]:
        """The parent cgroup in every mounted hierarchy where it exists."""
        seen: set[Path] = set()
        dirs = []
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[2] in ("cgroup", "cgroup2"):
                    d = Path(parts[1]) / self.cgroup_parent
                    real = d.resolve()
                    if real not in seen and d.is_dir():
                        seen.add(real)
                        dirs.append(d)
        return dirs

    def cleanup(self) -> list[str]:
        """Delete every container of this root and the parent cgroup; return the problems
        (empty when everything is gone)."""
        problems: list[str] = []
        ids = set(self.containers)
        p = subprocess.run(self._argv("list", "-q"), capture_output=True, text=True, check=False)
        ids.update(p.stdout.split())
        for ctr_id in sorted(ids):
            try:
                self.delete(ctr_id)
            except subprocess.TimeoutExpired:
                problems.append(f"runc delete -f {ctr_id} timed out")
        for d in self.cgroup_dirs():
            problems += remove_cgroup_dir(d)
        return problems
