"""The workloads the migration benchmark moves, their OCI images, and how a run checks them.

Images (built once per harness run with the builders of :mod:`tests.helpers.images`, as OCI
layouts and oci-archives):

* ``memory``: busybox, Debian's python3.11 and ``/opt/workloads/memhog.py``;
* ``redis``: the same plus Debian's redis-server and redis-cli, so that the container runs
  Redis *and* memhog's heartbeat;
* ``idle``: busybox.

Workloads and what a run checks before and after the migration:

* ``memory N``: ``memhog.py N --dirty-pct P --heartbeat /tmp/hb --maxgap`` (N MiB touched, P %
  of the pages re-dirtied every 100 ms, a heartbeat thread beating every millisecond).
  Before: SIGUSR1 -> ``VERIFY OK <counter>`` (memory and checksum as expected), then SIGUSR2
  -> ``RESET`` (the longest heartbeat gap is forgotten).  After: SIGUSR1 -> ``VERIFY OK
  <counter'> maxgap_ms=G maxgap_at=T`` with counter' > counter (it went on ticking); G is the
  downtime the workload saw, T (wall clock) when it ended.
* ``redis K``: ``redis-server`` on a unix socket (no TCP: runc restores into an empty network
  namespace) filled with K keys of 100 bytes (``DEBUG POPULATE``), beside ``memhog.py 1`` as
  pid 1 for the heartbeat.  Before and after: DBSIZE, ``DEBUG DIGEST`` and the server's
  ``run_id`` (the same process, not a restarted one) must be equal; memhog as above.
* ``idle``: a busybox shell sleeping in a loop, counting its rounds; SIGUSR1 -> ``ALIVE <n>``.
  After: n' > n.  It has no heartbeat: its gap is not measured.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from benchmarks.util import RunError, lines_with, wait_for
from tests.helpers.images import (
    ENV,
    LIBGCC_S,
    PYTHON,
    PYTHON_ENV,
    PYTHON_STDLIB,
    REDIS_CLI,
    REDIS_SERVER,
    WORKLOADS,
    _build_rootfs_image,
    _install_python,
    _install_redis,
    build_busybox_image,
    oci_archive,
    ref_name,
    tools_missing,
)

MEMHOG = "/opt/workloads/memhog.py"
MEMHOG_SRC = WORKLOADS / "memhog.py"
REDIS_SOCK = "/tmp/redis.sock"
REDIS_VALUE_BYTES = 100
IDLE_SCRIPT = (
    'n=0; trap "echo ALIVE \\$n" USR1; trap "exit 0" TERM; while :; do n=$((n+1)); sleep 1; done'
)
_VERIFY = re.compile(r"VERIFY (OK|FAIL) (\d+)(?:.* maxgap_ms=([\d.]+) maxgap_at=([\d.]+))?")


@dataclass(frozen=True)
class Image:
    """One workload image: its OCI layout, the same as an oci-archive, and its name."""

    kind: str
    layout: Path
    archive: Path
    name: str


def images_missing(kinds: set[str]) -> str | None:
    """Why the images of ``kinds`` cannot be built here, or None."""
    reason = tools_missing()
    if reason is not None:
        return reason
    needs: list[tuple[Path, str]] = []
    if kinds & {"memory", "redis"}:
        needs += [
            (PYTHON, "apt-get install python3.11-minimal"),
            (PYTHON_STDLIB / "os.py", "apt-get install libpython3.11-stdlib"),
            (LIBGCC_S, "apt-get install libgcc-s1"),
            (MEMHOG_SRC, "tests/workloads/memhog.py is missing"),
        ]
    if "redis" in kinds:
        needs += [
            (REDIS_SERVER, "apt-get install redis-server"),
            (REDIS_CLI, "apt-get install redis-tools"),
        ]
    for path, hint in needs:
        if not path.exists():
            return f"{path} is missing ({hint})"
    return None


def _populate(rootfs: Path, redis: bool) -> None:
    """Debian's python3.11 and its stdlib, memhog, and (``redis``) redis-server/cli."""
    _install_python(rootfs)
    dest = rootfs / MEMHOG.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(MEMHOG_SRC, dest)
    os.chmod(dest, 0o755)
    if redis:
        _install_redis(rootfs)


def build_images(work: Path, kinds: set[str]) -> dict[str, Image]:
    """Build the images of ``kinds`` (memory, redis, idle) under ``work``: one layer each,
    busybox with every applet, plus Debian's python3.11 and memhog (memory, redis) and
    redis-server and redis-cli (redis); just busybox (idle).  (Not the test suite's memory
    image: that one also carries ``../shared/cases``, which a clone elsewhere lacks.)"""
    out = {}
    for kind in sorted(kinds):
        d = work / f"img-{kind}"
        name = f"jaula-bench-{kind}:latest"
        if kind == "idle":
            layout = build_busybox_image(d, name)
        else:
            populate = functools.partial(_populate, redis=kind == "redis")
            layout = _build_rootfs_image(
                d, name, populate, PYTHON_ENV, ["python3", MEMHOG, "64"], "/tmp"
            )
        assert ref_name(layout) == name
        out[kind] = Image(kind, layout, oci_archive(layout, d / "oci-archive.tar"), name)
    return out


class Probe(Protocol):
    """A container where it runs now, as a system gives it to a workload's checks."""

    def log(self) -> str: ...

    def signal(self, sig: int) -> None: ...

    def exec(self, argv: list[str], timeout_s: float = 300) -> str: ...


@dataclass
class Checked:
    """What a workload's checks saw before and after a migration."""

    counter_before: int | None = None
    counter_after: int | None = None
    gap_s: float | None = None
    gap_at: float | None = None
    verify: str | None = None
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Workload:
    """``kind`` memory (``size`` MiB), redis (``size`` keys) or idle."""

    kind: str
    size: int = 0
    dirty_pct: float = 1.0

    @property
    def label(self) -> str:
        if self.kind == "memory":
            return f"memhog {self.size} MiB, {self.dirty_pct:g} % dirty/100 ms"
        if self.kind == "redis":
            return f"redis {self.size:,} keys x {REDIS_VALUE_BYTES} B"
        return "idle shell"

    @property
    def key(self) -> str:
        return f"{self.kind}-{self.size}" if self.kind != "idle" else "idle"

    @property
    def heartbeat(self) -> bool:
        return self.kind != "idle"

    @property
    def image(self) -> str:
        return self.kind

    def argv(self) -> list[str]:
        if self.kind == "memory":
            return [
                "python3",
                MEMHOG,
                str(self.size),
                "--dirty-pct",
                f"{self.dirty_pct:g}",
                "--heartbeat",
                "/tmp/hb",
                "--maxgap",
            ]
        if self.kind == "redis":
            return [
                "sh",
                "-c",
                (
                    f'redis-server --port 0 --unixsocket {REDIS_SOCK} --save "" '
                    "--appendonly no --enable-debug-command yes & "
                    f"exec python3 {MEMHOG} 1 --heartbeat /tmp/hb --maxgap"
                ),
            ]
        return ["sh", "-c", IDLE_SCRIPT]

    def env(self) -> list[str]:
        return list(ENV) if self.kind == "idle" else list(PYTHON_ENV)

    def timeout_s(self) -> float:
        """Generous time to touch or verify the memory, or fill Redis, on a slow machine."""
        if self.kind == "memory":
            return 60 + self.size * 0.1
        if self.kind == "redis":
            return 60 + self.size / 5000
        return 30

    # -- checks ---------------------------------------------------------------------------

    def wait_ready(self, p: Probe) -> None:
        """Wait until it runs (memhog's READY; Redis answers PING) and fill Redis."""
        if self.kind == "idle":
            return
        wait_for(
            lambda: "READY" if lines_with(p.log(), "READY") else None, self.timeout_s(), "READY"
        )
        if self.kind == "redis":

            def pong() -> str | None:
                try:
                    return "ok" if p.exec(self._cli("PING"), 30).strip() == "PONG" else None
                except RunError:
                    return None

            wait_for(pong, 60, "redis PING")
            p.exec(
                self._cli("DEBUG", "POPULATE", str(self.size), "key", str(REDIS_VALUE_BYTES)),
                self.timeout_s(),
            )

    def before(self, p: Probe) -> Checked:
        """The checks right before the migration: memory verified, counter read, gap reset."""
        c = Checked()
        if self.kind == "idle":
            c.counter_before = self._alive(p)
            return c
        line = self._verify(p)
        c.counter_before = int(line[2])
        if self.kind == "redis":
            c.extra = self._redis_state(p)
        n = len(lines_with(p.log(), "RESET"))
        p.signal(signal.SIGUSR2)
        wait_for(
            lambda: "reset" if len(lines_with(p.log(), "RESET")) > n else None,
            30,
            "RESET after SIGUSR2",
        )
        time.sleep(0.2)  # a few hundred heartbeats at the normal pace
        return c

    def after(self, p: Probe, c: Checked) -> Checked:
        """The checks after the migration, on the destination; raises RunError on a failure."""
        if self.kind == "idle":
            c.counter_after = self._alive(p)
            if c.counter_after <= (c.counter_before or 0):
                raise RunError(
                    f"the shell's counter did not go on: {c.counter_before} before, "
                    f"{c.counter_after} after"
                )
            return c
        m = self._verify(p)
        c.verify = m[0]
        c.counter_after = int(m[2])
        if m[3] is None:
            raise RunError(f"no heartbeat gap in {m[0]!r}")
        c.gap_s, c.gap_at = float(m[3]) / 1000, float(m[4])
        if c.counter_after <= (c.counter_before or 0):
            raise RunError(
                f"memhog's counter did not go on: {c.counter_before} before, "
                f"{c.counter_after} after"
            )
        if self.kind == "redis":
            now = self._redis_state(p)
            if now != c.extra:
                raise RunError(f"redis changed: before {c.extra}, after {now}")
        return c

    def _cli(self, *args: str) -> list[str]:
        return ["redis-cli", "-s", REDIS_SOCK, *args]

    def _redis_state(self, p: Probe) -> dict[str, object]:
        dbsize = int(p.exec(self._cli("DBSIZE")).strip())
        if dbsize != self.size:
            raise RunError(f"redis holds {dbsize} keys, not {self.size}")
        info = p.exec(self._cli("INFO", "server"))
        run_id = next(
            (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("run_id:")),
            "",
        )
        digest = p.exec(self._cli("DEBUG", "DIGEST")).strip()
        return {"dbsize": dbsize, "digest": digest, "run_id": run_id}

    def _verify(self, p: Probe) -> re.Match[str]:
        n = len(lines_with(p.log(), "VERIFY"))
        p.signal(signal.SIGUSR1)
        wait_for(
            lambda: "v" if len(lines_with(p.log(), "VERIFY")) > n else None,
            self.timeout_s(),
            "VERIFY after SIGUSR1",
        )
        line = lines_with(p.log(), "VERIFY")[n]
        m = _VERIFY.match(line)
        if m is None or m[1] != "OK":
            raise RunError(f"memory check failed: {line}")
        return m

    def _alive(self, p: Probe) -> int:
        n = len(lines_with(p.log(), "ALIVE"))
        p.signal(signal.SIGUSR1)
        wait_for(
            lambda: "a" if len(lines_with(p.log(), "ALIVE")) > n else None,
            30,
            "ALIVE after SIGUSR1",
        )
        return int(lines_with(p.log(), "ALIVE")[n].split()[1])
