"""The per-container monitor: parent of the container init, keeper of its logs and exit status.

Started by :meth:`runtime.container.Runtime.run` as ``python -m runtime.monitor DIR SYNC_FD``,
detached (its own session, reparented away from the CLI), so it outlives the CLI.  It:

1. becomes a child subreaper, opens the stdout/stderr pipes and ``unshare(CLONE_NEWPID)``;
2. forks the init (:func:`runtime.init_process.run_init`), puts it in the cgroup, releases it;
3. reports ``ok PID STARTTIME`` or ``error MESSAGE`` on ``SYNC_FD`` and closes it;
4. copies the pipes into ``ctr.log`` until the init exits (pidfd), in the CRI log format
   (``RFC3339NANO STREAM F|P TEXT``; ``P`` marks a partial line), the format Podman's
   ``k8s-file`` driver writes;
5. writes ``exit.json`` (exit code, 128+signal when killed, OOM flag);
6. when the restart policy says so (:mod:`runtime.restart`), waits the backoff and starts
   the init again in a new pid namespace (same rootfs and upperdir, same cgroup), recording
   it in ``init.json``, back to 4;
7. unmounts the rootfs and exits.

The container never writes into the state root: it only holds the write ends of the pipes.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from runtime import events, tty
from runtime import syscalls as sc
from runtime.cgroups import CgroupManager, create_manager
from runtime.errors import ContainerError
from runtime.init_process import run_init
from runtime.logconfig import configure_logging
from runtime.poll import wait_for
from runtime.process import fail_to_parent
from runtime.restart import (
    RESET_AFTER_S,
    InitRecord,
    RestartPolicy,
    backoff_s,
    load_policy,
    save_init,
)
from runtime.rootfs.overlay import unmount
from runtime.spec import ContainerConfig
from runtime.state import ExitRecord, atomic_write_json
from runtime.store import ARMED_MARK, CONFIG, EXIT, GO_FIFO, LOG, NETNS, STOP_MARK, TTY_MARK
from runtime.userns import make_userns

_PARTIAL_FLUSH = 16 * 1024


def _ts() -> str:
    now = time.time_ns()
    return (
        datetime.fromtimestamp(now // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        + f".{now % 1_000_000_000:09d}Z"
    )


class LogWriter:
    """Turns raw pipe bytes into CRI-format log lines in one append-only file."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.partial: dict[str, bytes] = {"stdout": b"", "stderr": b""}

    def feed(self, stream: str, data: bytes) -> None:
        buf = self.partial[stream] + data
        lines = buf.split(b"\n")
        out = [f"{_ts()} {stream} F ".encode() + line + b"\n" for line in lines[:-1]]
        rest = lines[-1]
        if len(rest) >= _PARTIAL_FLUSH:
            out.append(f"{_ts()} {stream} P ".encode() + rest + b"\n")
            rest = b""
        self.partial[stream] = rest
        if out:
            os.write(self.fd, b"".join(out))

    def flush(self) -> None:
        for stream, rest in self.partial.items():
            if rest:
                os.write(self.fd, f"{_ts()} {stream} P ".encode() + rest + b"\n")
                self.partial[stream] = b""


def _report(sync_fd: int, message: str) -> None:
    try:
        os.write(sync_fd, message.encode())
    except OSError:
        pass
    finally:
        os.close(sync_fd)


def main(argv: list[str]) -> int:
    """Entry point: ``argv = [container_dir, sync_fd]`` to start the container, or
    ``[container_dir, sync_fd, "--restore-with", "MODULE:FUNCTION", ARG]`` to bring it back
    from a checkpoint (see :func:`_restore`)."""
    configure_logging("warning")  # quiet, as the CLI by default (runtime.logconfig)
    cdir = Path(argv[0])
    sync_fd = int(argv[1])
    if len(argv) in (5, 6) and argv[2] == "--restore-with":
        return _restore(cdir, sync_fd, argv[3], argv[4], armed=argv[5:] == ["--armed"])
    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    sc.set_process_name("jaula-monitor")
    sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
    cfg = ContainerConfig.from_json(json.loads((cdir / CONFIG).read_text()))
    cgroup = create_manager(cfg.id, parent=cfg.cgroup_parent)
    log = LogWriter(cdir / LOG)

    term: _Terminal | None = None
    if (cdir / TTY_MARK).exists():
        master, slave = os.openpty()
        term = _Terminal(master, slave, tty.listen(cdir), tty.Backlog())
    if not cfg.in_userns:  # else the pid namespace is made inside the user one (_spawn)
        sc.unshare(sc.CLONE_NEWPID)
    netns_fd = _keep_netns(cdir, cfg)
    try:
        pid, out_r, err_r = _spawn(cfg, cdir, cgroup, sync_fd, term)
    except _StartFailed as e:
        _report(sync_fd, f"error {e}")
        return 1
    _report(sync_fd, f"ok {pid} {sc.proc_start_time(pid)}")
    _event(cdir, cfg, "start")  # here, so that it comes before its "died"
    status = _pump_any(pid, log, out_r, err_r, term)
    status = _restart_loop(cdir, cfg, cgroup, log, status, term, netns_fd)
    return _finish(cdir, cgroup, pid, status)


def _keep_netns(cdir: Path, cfg: ContainerConfig) -> int | None:
    """An fd of a bridged container's net namespace, opened while its pin (``cdir/netns``)
    is still there, when its restart policy may start the init again: the runtime removes
    the pin once the init runs, so that the namespace and its veth die with the last task;
    this fd keeps them for the next init instead (its same ``eth0``, address and MAC, as a
    restarted Podman container keeps its network), and goes with this monitor.  None
    otherwise, or when there is no pin to open."""
    if cfg.network != "bridge" or load_policy(cdir) == RestartPolicy():
        return None
    try:
        return os.open(cdir / NETNS, os.O_RDONLY | os.O_CLOEXEC)  # the inits see no fd
    except OSError:
        return None


@dataclass(frozen=True)
class _Terminal:
    """The pty of a ``-t`` container (:mod:`runtime.tty`): kept for its whole life."""

    master: int
    slave: int
    server: socket.socket
    backlog: tty.Backlog


def _pump_any(pid: int, log: LogWriter, out_r: int, err_r: int, term: _Terminal | None) -> int:
    if term is None:
        return _pump(pid, log, out_r, err_r)
    status = tty.pump(pid, log, term.master, term.server, term.backlog)
    log.flush()
    _reap_others()
    return status


class _StartFailed(Exception):
    """The init could not be started (the message says why)."""


def _spawn(
    cfg: ContainerConfig,
    cdir: Path,
    cgroup: CgroupManager,
    sync_fd: int | None,
    term: _Terminal | None = None,
    netns: str | None = None,
) -> tuple[int, int, int]:
    """Fork the init into a fresh pid namespace (the caller unshared it), put it in the
    cgroup and release it; a bridged init joins ``netns`` (a path; default its pin
    ``cdir/netns``).  Returns (pid, stdout read end, stderr read end; -1 and -1 with
    a terminal, whose slave side is then the init's stdio).  Raises _StartFailed with the
    init's or the cgroup's reason (the init is reaped then)."""
    if term is not None:
        out_r, out_w = os.open("/dev/null", os.O_RDONLY), os.dup(term.slave)
        err_r, err_w = os.open("/dev/null", os.O_RDONLY), os.dup(term.slave)
    else:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
    start_r, start_w = os.pipe2(os.O_CLOEXEC)
    fail_r, fail_w = os.pipe2(os.O_CLOEXEC)
    userns_fd = -1
    if cfg.in_userns:
        try:
            userns_fd = make_userns(cfg.uid_map, cfg.gid_map)
        except ContainerError as e:
            for fd in (out_r, out_w, err_r, err_w, start_r, start_w, fail_r, fail_w):
                os.close(fd)
            raise _StartFailed(str(e)) from e
    rootfs = str(cdir / "merged")
    pid_r, pid_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        if sync_fd is not None:
            os.close(sync_fd)
        for fd in (out_r, err_r, start_w, fail_r, pid_r):
            os.close(fd)
        if userns_fd >= 0:
            # the state root is 0700 root's: the init, root of its user namespace only,
            # can walk no path through it; it reaches its rootfs through its cwd, which
            # unshare(CLONE_NEWNS) moves to the new namespace's copy of the mount
            os.chdir(rootfs)
            rootfs = "/proc/self/cwd"
            _enter_userns(userns_fd, pid_w, fail_w)  # returns in the init only
        os.close(pid_w)
        if cfg.network == "bridge" and netns is None:
            netns = str(cdir / NETNS)
        run_init(
            cfg,
            rootfs,
            start_r,
            fail_w,
            out_w,
            err_w,
            netns,
            tty_fd=None if term is None else out_w,
        )
    for fd in (out_w, err_w, start_r, fail_w, pid_w):
        os.close(fd)
    if userns_fd >= 0:
        os.close(userns_fd)
        helper, pid = pid, int(os.read(pid_r, 32) or b"0")
        os.waitpid(helper, 0)  # the init is the monitor's child now (subreaper)
    os.close(pid_r)
    if pid == 0:
        failure = os.read(fail_r, 4096)
        for fd in (out_r, err_r, start_w, fail_r):
            os.close(fd)
        raise _StartFailed(failure.decode(errors="replace") or "the init was not forked")
    try:
        cgroup.add_process(pid)
    except Exception as e:  # reported to the CLI, then the init is killed
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for fd in (out_r, err_r, start_w, fail_r):
            os.close(fd)
        raise _StartFailed(f"cannot put the init in its cgroup: {e}") from e
    os.write(start_w, b"g")
    os.close(start_w)
    failure = b""
    while chunk := os.read(fail_r, 4096):
        failure += chunk
    os.close(fail_r)
    if failure:
        os.waitpid(pid, 0)
        os.close(out_r)
        os.close(err_r)
        raise _StartFailed(failure.decode(errors="replace"))
    if term is not None:
        os.close(out_r)
        os.close(err_r)
        return pid, -1, -1
    return pid, out_r, err_r


def _enter_userns(userns_fd: int, pid_w: int, fail_w: int) -> None:
    """In the monitor's forked helper: join the container's user namespace, make the pid
    namespace inside it (so that the init, pid 1 there, may mount its /proc) and fork the
    init.  Returns in the init; the helper writes the init's host pid on ``pid_w`` and
    exits, and the init is reparented to the monitor (a child subreaper)."""
    try:
        sc.setns(userns_fd, sc.CLONE_NEWUSER)
        os.close(userns_fd)
        # setns keeps the host ids, unmapped in there: become its root (kept capabilities)
        os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        sc.unshare(sc.CLONE_NEWPID)
        init = os.fork()
    except BaseException as e:  # noqa: BLE001 - the monitor reads the reason
        fail_to_parent(fail_w, f"enter the user namespace: {e}", 127)
    if init == 0:
        return
    os.write(pid_w, str(init).encode())
    os._exit(0)


def _restart_loop(
    cdir: Path,
    cfg: ContainerConfig,
    cgroup: CgroupManager,
    log: LogWriter,
    status: int,
    term: _Terminal | None = None,
    netns_fd: int | None = None,
) -> int:
    """Carry out the container's restart policy (:mod:`runtime.restart`) after its init
    exited with wait status ``status``: start it again, after the backoff, as long as the
    policy says so and nobody asked for a stop.  Each exit is recorded in ``exit.json`` and
    each new init in ``init.json``.  A bridged container's new init joins ``netns_fd``
    (:func:`_keep_netns`).  Returns the wait status of the last init."""
    policy = load_policy(cdir)
    restarts = 0
    started = time.monotonic()
    while True:
        code = _exit_code(status)
        _event(cdir, cfg, "died", exitCode=code)
        if not policy.should_restart(code, restarts) or (cdir / STOP_MARK).exists():
            return status
        _record_exit(cdir, cgroup, status)
        if time.monotonic() - started >= RESET_AFTER_S:
            restarts_backoff = 0
        else:
            restarts_backoff = restarts
        if wait_for(lambda: (cdir / STOP_MARK).exists(), backoff_s(restarts_backoff), 0.05):
            return status
        # a fresh pid namespace: the last one died with its init.  Back into our own
        # first (a second unshare needs pid_for_children == the active one: EINVAL else)
        if not cfg.in_userns:
            own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            try:
                sc.setns(own, sc.CLONE_NEWPID)
            finally:
                os.close(own)
            sc.unshare(sc.CLONE_NEWPID)
        try:
            netns = None if netns_fd is None else f"/proc/self/fd/{netns_fd}"
            pid, out_r, err_r = _spawn(cfg, cdir, cgroup, None, term, netns)
        except _StartFailed as e:
            print(f"monitor: restart failed: {e}", file=sys.stderr)
            return status
        restarts += 1
        started = time.monotonic()
        _event(cdir, cfg, "restart", restartCount=restarts)
        (cdir / EXIT).unlink(missing_ok=True)
        save_init(cdir, InitRecord(pid, sc.proc_start_time(pid), time.time(), restarts))
        status = _pump_any(pid, log, out_r, err_r, term)


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _event(cdir: Path, cfg: ContainerConfig, status: str, **attributes: object) -> None:
    """Record an event in the state root's log (``cdir`` is ``<root>/containers/<id>``)."""
    events.record(cdir.parent.parent, status, cfg.id, cfg.name, cfg.image_ref, **attributes)


def _record_exit(cdir: Path, cgroup: CgroupManager, status: int) -> None:
    code = os.waitstatus_to_exitcode(status)
    sig = -code if code < 0 else 0
    try:
        oom = cgroup.oom_killed()
    except Exception:  # noqa: BLE001 - the OOM flag is best effort
        oom = False
    record = ExitRecord(
        exit_code=128 + sig if sig else code, signal=sig, finished_at=time.time(), oom_killed=oom
    )
    atomic_write_json(cdir / EXIT, record.__dict__)


def _finish(cdir: Path, cgroup: CgroupManager, pid: int, status: int) -> int:
    """Record the init's exit in ``exit.json``, remove its published ports' rules (nobody
    answers behind them now; ``start`` puts them back) and unmount the rootfs."""
    _record_exit(cdir, cgroup, status)
    cfg = ContainerConfig.from_json(json.loads((cdir / CONFIG).read_text()))
    if cfg.ports:
        from runtime.network import ports

        with contextlib.suppress(OSError):  # children in our own pid ns: the init's is dead
            fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            try:
                sc.setns(fd, sc.CLONE_NEWPID)
            finally:
                os.close(fd)
        for err in ports.unpublish(ports.node_tag(cdir.parents[1]), cfg.id):
            print(f"monitor: {err}", file=sys.stderr)
    try:
        unmount(cdir / "merged")
    except Exception as e:  # noqa: BLE001 - rm retries; say it in the monitor log
        print(f"monitor: {e}", file=sys.stderr)
    return 0


def _restore(cdir: Path, sync_fd: int, hook_name: str, arg: str, armed: bool = False) -> int:
    """Restore mode: the monitor itself calls the restorer named ``MODULE:FUNCTION`` as
    ``fn(cdir, stdout_w, stderr_w, arg) -> pid``, so that the restored init becomes this
    process's child (CRIU's ``rst_sibling``) and is reaped here like a started one.  The
    runtime does not import the restorer: it lives in a higher layer (``migrate``).

    With a terminal (the file ``tty`` in ``cdir``, looked at once told to go) this monitor
    makes a fresh pty and ``stdout_w`` and ``stderr_w`` are two descriptors of its slave, which the
    restorer gives the restored tasks in place of the old one (:mod:`runtime.tty`); else
    they are the write ends of new stdout/stderr pipes.

    ``armed``: start, import the restorer (and call its module's ``warm_up()`` if it has
    one), make the file ``armed`` in ``cdir``, then wait for ``go`` (or anything else: give up)
    on the FIFO ``go.fifo`` before restoring; this takes the interpreter's start-up out of a
    migration's downtime (:meth:`runtime.container.Runtime.arm`)."""
    import importlib

    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    sc.set_process_name("jaula-monitor")
    sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
    out_r = err_r = out_w = err_w = -1
    term: _Terminal | None = None
    try:
        module, _, func = hook_name.partition(":")
        mod = importlib.import_module(module)
        restorer = getattr(mod, func)
        if armed:
            if callable(warm_up := getattr(mod, "warm_up", None)):
                warm_up()  # the restorer's own preparation, out of the downtime
            (cdir / ARMED_MARK).touch()  # ready: Runtime.wait_armed
            with open(cdir / GO_FIFO, "rb") as fifo:
                word = fifo.readline().strip()
            (cdir / GO_FIFO).unlink(missing_ok=True)
            (cdir / ARMED_MARK).unlink(missing_ok=True)
            if word != b"go":
                raise RuntimeError(f"restore called off ({word.decode(errors='replace')})")
        cfg = ContainerConfig.from_json(json.loads((cdir / CONFIG).read_text()))
        cgroup = create_manager(cfg.id, parent=cfg.cgroup_parent)
        log = LogWriter(cdir / LOG)
        if (cdir / TTY_MARK).exists():
            master, slave = os.openpty()
            term = _Terminal(master, slave, tty.listen(cdir), tty.Backlog())
            out_w, err_w = os.dup(slave), os.dup(slave)
        else:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
        netns_fd = _keep_netns(cdir, cfg)  # before the restorer takes the pin away
        pid = int(restorer(cdir, out_w, err_w, arg))
    except Exception as e:  # noqa: BLE001 - reported to the caller, which rolls back
        _report(sync_fd, f"error {e}")
        return 1
    finally:
        for fd in (out_w, err_w):
            if fd >= 0:
                os.close(fd)
    _report(sync_fd, f"ok {pid} {sc.proc_start_time(pid)}")
    status = _pump_any(pid, log, out_r, err_r, term)
    # the restart policy holds for a restored container too (a fresh start of its command)
    status = _restart_loop(cdir, cfg, cgroup, log, status, term, netns_fd)
    return _finish(cdir, cgroup, pid, status)


def _pump(pid: int, log: LogWriter, out_r: int, err_r: int) -> int:
    """Copy the pipes into the log until the init exits; return its wait status."""
    pidfd = os.pidfd_open(pid)
    sel = selectors.DefaultSelector()
    sel.register(out_r, selectors.EVENT_READ, "stdout")
    sel.register(err_r, selectors.EVENT_READ, "stderr")
    sel.register(pidfd, selectors.EVENT_READ, None)
    status: int | None = None
    open_streams = 2
    deadline: float | None = None
    while open_streams:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        events = sel.select(timeout)
        if not events and deadline is not None:
            break  # writers still open after the init died (e.g. leaked): stop waiting
        for key, _ in events:
            if key.data is None:
                _, status = os.waitpid(pid, 0)
                sel.unregister(pidfd)
                os.close(pidfd)
                deadline = time.monotonic() + 2.0
                continue
            data = os.read(key.fd, 65536)
            if data:
                log.feed(key.data, data)
            else:
                sel.unregister(key.fd)
                os.close(key.fd)
                open_streams -= 1
    if status is None:
        _, status = os.waitpid(pid, 0)
        os.close(pidfd)
    log.flush()
    _reap_others()
    return status


def _reap_others() -> None:
    """Reap anything else that was reparented to us (we are a subreaper)."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
