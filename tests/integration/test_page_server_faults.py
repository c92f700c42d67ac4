"""Faults of the destination's ``criu page-server`` during a migration, with two real node
services on 127.0.0.1 and real CRIU.

At offer time node2's service starts a ``criu page-server`` (TLS, pinned to the source's
per-session certificate) working in the session's staging dir; the source's CRIU dump
streams the container's memory pages to it.  Each test breaks that stream for real and then
checks the invariant of the handshake (DESIGN.md, "The migration handoff"): the migration
fails with a clear error, the container runs on node1 only and its counter goes on without
a gap or a repeat, nothing is left on node2 (no container dir, no staging dir, no page-server
process) and node1's session dir is removed.

- the page server is SIGKILLed while pages arrive;
- a stranger's TLS client (its own self-signed certificate) reaches the port before the
  source's CRIU: the page server refuses it and exits, having written nothing, and the dump
  then cannot connect;
- node2's service is SIGKILLed while its page server receives: the page server dies with it
  (``setpriv --pdeathsig KILL``).

The page server is found in /proc: a ``criu page-server`` whose command line names node2's
scratch dir and whose parent is node2's service (the process this test started), so only
processes our code started are killed.  A thread watches it while ``jaula migrate`` runs."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.counter import COUNTER, assert_continuous, ticks, wait_ticks
from tests.helpers.jaula import JAULA, REPO, Jaula
from tests.helpers.nodes import Cluster2, make_cluster
from tests.helpers.page_server import (
    PageServerProc,
    forged_pages,
    listening,
    page_images,
    page_server_procs,
    proc_state,
    send_tls,
)
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]

#: the memory workload's anonymous memory: enough for CRIU to stream pages for a while
MEMHOG_MIB = 256
MEM_IMAGE = "jaula-mem:latest"
WAIT_S = 60.0


# -- fixtures ---------------------------------------------------------------------------------


def _page_servers_left(c: Cluster2) -> list[str]:
    """Page servers still running in either node's scratch dirs: killed (our nodes started
    them: the dirs are named after their state roots) and reported."""
    problems = []
    for node in c.files.nodes:
        for ps in page_server_procs(c.scratch(node)):
            problems.append(f"{node}: page server left: pid {ps.pid} {' '.join(ps.argv)}")
            try:
                os.kill(ps.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return problems


@pytest.fixture
def nodes(
    tmp_path: Path, busybox_image_layout: Path, memory_image_layout: Path
) -> Iterator[Cluster2]:
    """node1 and node2 serving, with busybox and the memory workload image on both.
    Finalizer: both stopped, every container removed, leaks (mounts, cgroups, session files,
    hold sockets, page servers) fail the test."""
    c = make_cluster(tmp_path / "cluster", busybox_image_layout)
    try:
        for node in ("node1", "node2"):
            c.local(node).run(
                "image", "import", str(memory_image_layout), "--name", MEM_IMAGE, timeout=300
            )
        c.start("node1")
        c.start("node2")
        yield c
    finally:
        problems = c.close()
        problems += _page_servers_left(c)
        assert not problems, "\n".join(problems)


class Watcher:
    """``fn(stop)`` run on a thread; its return value or exception comes back through
    :meth:`result`.  ``stop`` is set when the test ends, whatever happened."""

    def __init__(self, fn: Callable[[threading.Event], dict[str, Any]]) -> None:
        self.stop = threading.Event()
        self._out: dict[str, Any] = {}
        self._err: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[threading.Event], dict[str, Any]]) -> None:
        try:
            self._out = fn(self.stop)
        except BaseException as e:  # noqa: BLE001 - handed to the test by result()
            self._err = e

    def result(self, timeout_s: float = WAIT_S) -> dict[str, Any]:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the watcher thread did not finish"
        if self._err is not None:
            raise self._err
        return self._out

    def close(self) -> None:
        self.stop.set()
        self._thread.join(WAIT_S)


class Background:
    """What a test runs beside ``jaula migrate``: watcher threads, and the CLI itself."""

    def __init__(self) -> None:
        self.watchers: list[Watcher] = []
        self.procs: list[subprocess.Popen[str]] = []

    def watch(self, fn: Callable[[threading.Event], dict[str, Any]]) -> Watcher:
        w = Watcher(fn)
        self.watchers.append(w)
        return w

    def migrate(self, c: Cluster2, name: str, dest: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [*JAULA, "--client-config", str(c.files.clients["alice"]), "migrate", name, dest],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        self.procs.append(p)
        return p


@pytest.fixture
def bg() -> Iterator[Background]:
    """Finalizer: every watcher stopped and joined; a ``jaula migrate`` still running (the
    test failed early) is given time to end, since node1's service would carry the migration
    on without it, then killed (it is this test's child)."""
    b = Background()
    try:
        yield b
    finally:
        for w in b.watchers:
            w.close()
        for p in b.procs:
            try:
                p.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate(timeout=WAIT_S)


# -- helpers ----------------------------------------------------------------------------------


def wait_for(
    what: str,
    cond: Callable[[], Any],
    stop: threading.Event | None = None,
    timeout_s: float = WAIT_S,
    every_s: float = 0.001,
) -> Any:
    """Poll ``cond`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            raise AssertionError(f"stopped while waiting for {what}")
        v = cond()
        if v:
            return v
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}")


def _pages_bytes(images: Path) -> int:
    total = 0
    for name in page_images(images):
        if name.startswith("pages-"):
            try:
                total += (images / name).stat().st_size
            except FileNotFoundError:
                pass
    return total


def _the_page_server(c: Cluster2, node: str, stop: threading.Event) -> PageServerProc:
    """The page server ``node``'s service started for the (one) incoming session."""
    svc = c.procs[node].pid
    scratch = c.scratch(node)
    found: list[PageServerProc] = wait_for(
        f"{node}'s page server", lambda: page_server_procs(scratch, parent=svc), stop
    )
    assert len(found) == 1, found
    ps = found[0]
    assert ps.work_dir.name.startswith("incoming-"), ps.argv
    return ps


def _receiving(ps: PageServerProc) -> bool:
    """Its log shows the dump's connection and pages have arrived."""
    return "Accepted connection" in ps.log() and _pages_bytes(ps.images_dir) > 0


def _session_dirs(c: Cluster2, node: str) -> list[Path]:
    return [d for s in c.scratch(node) if s.is_dir() for d in s.iterdir()]


def _memory_counter(j: Jaula, name: str) -> None:
    """The counter, beside a process holding MEMHOG_MIB MiB of distinct dirty pages."""
    j.run(
        "run",
        "-d",
        "--name",
        name,
        MEM_IMAGE,
        "sh",
        "-c",
        f"python3 /opt/workloads/memhog.py {MEMHOG_MIB} & " + COUNTER,
    )
    wait_for("the memory workload", lambda: "READY" in j.out("logs", name), every_s=0.1)
    wait_ticks(j, name, 5)


def _big_counter(j: Jaula, name: str, mib: int = 200) -> None:
    """The counter after writing a large upperdir file: the pre-copy takes a while."""
    j.run(
        "run",
        "-d",
        "--name",
        name,
        "busybox",
        "sh",
        "-c",
        f"head -c {mib}000000 /dev/urandom > /big; " + COUNTER,
    )
    wait_ticks(j, name, 3, timeout=120)


def _continues_on(c: Cluster2, name: str, node: str) -> None:
    j = c.local(node)
    c.assert_only_on(name, node)
    n = ticks(j, name)[-1]
    wait_ticks(j, name, n + 5, timeout=30)
    assert_continuous(ticks(j, name))


def _failed_safely(c: Cluster2, mig: subprocess.Popen[str]) -> str:
    """The CLI's error: a rolled-back migration (exit 125, the container kept on node1)."""
    out, err = mig.communicate(timeout=300)
    assert mig.returncode == 125, (
        f"migrate exited {mig.returncode}:\n{out}\n{err}\n"
        f"node1: {c.log('node1')}\nnode2: {c.log('node2')}"
    )
    assert "keeps running on node1" in err, err
    return err


def _names_the_cause(err: str) -> None:
    """The error names the part that failed: CRIU (its dump) or the page server."""
    low = err.lower()
    assert "criu" in low or "page server" in low or "page-server" in low, err


def _nothing_left_on_node2(c: Cluster2, ps: PageServerProc) -> None:
    """No container dir (it was MIGRATING), no staging dir, no page server; node2 is told
    to abort by the source and may finish its cleanup just after the CLI returned."""

    def clean() -> bool:
        return not (
            c.local("node2").container_ids()
            or c.incoming("node2")
            or page_server_procs(c.scratch("node2"))
        )

    wait_for("node2 to discard the session", clean, timeout_s=30, every_s=0.1)
    assert not ps.alive()
    assert not ps.work_dir.exists()


def _nothing_left_on_node1(c: Cluster2) -> None:
    """The source's session dir is removed, and its tmpfs parent with it (it was the only
    session)."""
    left = _session_dirs(c, "node1")
    assert left == [], f"node1 kept session files: {left}"
    shm = [s for s in c.scratch("node1") if s.is_relative_to("/dev/shm") and s.exists()]
    assert shm == [], f"node1's scratch dir is left: {shm}"


# -- the tests --------------------------------------------------------------------------------


def test_page_server_killed_while_pages_arrive(nodes: Cluster2, bg: Background) -> None:
    c = nodes
    _memory_counter(c.local("node1"), "pk")

    def kill_it(stop: threading.Event) -> dict[str, Any]:
        ps = _the_page_server(c, "node2", stop)
        wait_for("pages arriving at the page server", lambda: _receiving(ps), stop)
        alive = ps.alive()  # not done yet: the dump is still streaming
        received = _pages_bytes(ps.images_dir)
        os.kill(ps.pid, signal.SIGKILL)
        return {"ps": ps, "alive": alive, "received": received}

    w = bg.watch(kill_it)
    mig = bg.migrate(c, "pk", "node2")
    err = _failed_safely(c, mig)
    got = w.result()
    ps: PageServerProc = got["ps"]
    assert got["alive"] and got["received"] > 0, got
    _names_the_cause(err)
    _continues_on(c, "pk", "node1")
    _nothing_left_on_node2(c, ps)
    _nothing_left_on_node1(c)


def test_stranger_first_on_the_page_server_port(
    nodes: Cluster2, bg: Background, tmp_path: Path
) -> None:
    """The stranger knows the destination's certificate (it is not secret) and shows its
    own, self-signed as the source's is: the handshake fails the pin, the page server exits
    without writing anything, and the source's dump, later, finds no page server."""
    from migrate import certs

    c = nodes
    _big_counter(c.local("node1"), "st")
    stranger_dir = tmp_path / "stranger"
    stranger_dir.mkdir()
    _, cert, key = certs.make_identity(stranger_dir, "source")

    def stranger(stop: threading.Event) -> dict[str, Any]:
        ps = _the_page_server(c, "node2", stop)
        dest_cert = ps.work_dir / "destination-cert.pem"
        wait_for("the page server to listen", lambda: listening(ps.port), stop)
        answer = send_tls(
            ps.port,
            forged_pages(),
            cert,
            key,
            dest_cert if dest_cert.exists() else None,
            timeout_s=30,
        )
        wait_for("the page server to exit", lambda: not ps.alive(), stop)
        # right after it exited: had the source's dump begun (it makes its images dir)?
        outgoing = [d for d in _session_dirs(c, "node1") if d.name.startswith("outgoing-")]
        won = bool(outgoing) and not any((d / "criu").exists() for d in outgoing)
        try:
            written = sorted(p.name for p in ps.images_dir.iterdir())
        except FileNotFoundError:
            written = None  # the staging dir is gone already
        return {
            "ps": ps,
            "answer": answer,
            "won": won,
            "written": written,
            "log": ps.log(),
            "state": proc_state(ps.pid),
        }

    w = bg.watch(stranger)
    mig = bg.migrate(c, "st", "node2")
    got = w.result(timeout_s=2 * WAIT_S)
    if not got["won"]:
        _out, err = mig.communicate(timeout=300)
        pytest.skip(
            "the source's dump started before the stranger was refused; cannot show "
            f"this fault here (migrate exited {mig.returncode}: {err.strip()[-300:]})"
        )
    err = _failed_safely(c, mig)
    ps: PageServerProc = got["ps"]
    assert got["answer"] == b"", "the stranger was answered"
    assert "Accepted connection" in got["log"]
    assert "Invalid certificate" in got["log"] or "NOT trusted" in got["log"], got["log"]
    assert got["written"] == [], f"the page server wrote {got['written']}"
    _names_the_cause(err)
    assert "Can't connect to server" in err, err  # the cause, not only its aftermath
    _continues_on(c, "st", "node1")
    _nothing_left_on_node2(c, ps)
    _nothing_left_on_node1(c)


def test_node_service_killed_takes_its_page_server_along(nodes: Cluster2, bg: Background) -> None:
    c = nodes
    _memory_counter(c.local("node1"), "nk")

    def kill_node2(stop: threading.Event) -> dict[str, Any]:
        ps = _the_page_server(c, "node2", stop)
        wait_for("pages arriving at the page server", lambda: _receiving(ps), stop)
        alive = ps.alive()
        c.kill("node2")  # SIGKILL to the service this test started
        # PR_SET_PDEATHSIG: the kernel kills the page server with its parent
        wait_for(
            "the page server to die with node2's service",
            lambda: not ps.alive(),
            stop,
            timeout_s=20,
            every_s=0.01,
        )
        return {"ps": ps, "alive": alive}

    w = bg.watch(kill_node2)
    mig = bg.migrate(c, "nk", "node2")
    err = _failed_safely(c, mig)
    got = w.result()
    ps: PageServerProc = got["ps"]
    assert got["alive"], "the page server had finished before node2 was killed"
    assert "node2" not in c.procs
    _names_the_cause(err)
    _continues_on(c, "nk", "node1")
    _nothing_left_on_node1(c)
    c.start("node2")  # its recovery removes what the dead session left
    _nothing_left_on_node2(c, ps)
