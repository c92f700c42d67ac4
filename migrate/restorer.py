"""The restorer a container's monitor runs in restore mode
(``runtime.monitor --restore-with migrate.restorer:criu_restorer``): ``criu restore`` from
inside the monitor, so that the restored init is the monitor's child and is reaped by it.

Kept small on purpose: the monitor imports it before a migration's freeze (armed), and what
it imports is start-up time the restored container would otherwise wait for.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

from migrate import criu
from migrate.bundle import Bundle
from migrate.deadlines import SCALE_ENV, FrozenLimits
from migrate.netmove import bridged, go_live
from runtime.cgroups import CgroupMode, create_manager, detect_mode
from runtime.poll import wait_for
from runtime.spec import ContainerConfig
from runtime.state import atomic_write_json
from runtime.store import CONFIG, NETNS

#: how long CRIU may take to end by itself once a restored task has started to exit (its
#: own clean-up after a failure: seconds at most)
FAILED_RESTORE_GRACE_S = 2.0
#: PF_EXITING in the flags of /proc/PID/stat (include/linux/sched.h)
_PF_EXITING = 0x4

#: the key under which a container's net namespace is external to CRIU (see
#: migrate.checkpoint.external_netns)
NETNS_KEY = "jaula-netns"


def network_lock(cfg: ContainerConfig) -> int:
    """CRIU's network lock for this container: none is needed for a private net namespace
    with only ``lo`` (nobody outside can send it anything while it is frozen)."""
    if cfg.network == "bridge":  # locked by jaula on the veth's host side (migrate.netmove)
        return criu.NET_LOCK_SKIP
    return criu.NET_LOCK_SKIP if cfg.network == "none" else criu.NET_LOCK_IPTABLES


def cgroup_roots(cfg: ContainerConfig) -> tuple[tuple[str, str], ...]:
    """``--cgroup-root`` pairs that put every controller's tasks in the container's cgroup."""
    path = f"/{cfg.cgroup_parent}/{cfg.id}"
    if detect_mode() is CgroupMode.UNIFIED:
        return (("", path),)
    return tuple((ctrl, path) for ctrl in create_manager(cfg.id, parent=cfg.cgroup_parent).paths())


def criu_restorer(cdir: Path, stdout_w: int, stderr_w: int, arg: str) -> int:
    """Run ``criu restore`` from inside the container's monitor; returns the init's host pid.

    ``arg`` is JSON: ``{"bundle": PATH}`` for a checkpoint bundle (stdio and volumes from its
    manifest), or ``{"bundle": STAGING, "hold": SOCKET, "params": FILE, "decision": FILE2}``
    (FILE2: where the decision is recorded, migrate.hold.HOLD_DECISION) for an incoming
    migration (FILE holds ``{"stdio": {...}, "volumes": [...], "lazy": BOOL}``, written
    just before the armed monitor is told to go; ``lazy``: a post-copy restore, whose
    pages ``criu lazy-pages`` brings in), whose tasks are held at CRIU's ``pre-resume`` until the
    destination service says ``resume`` or ``abort`` on the unix socket ``hold``.  The
    restored init becomes the monitor's child (``rst_sibling``); its stdout/stderr are the
    monitor's new pipes (``inherit_fd``).  A container with a terminal (``stdio["tty"]``,
    the old pty slave's CRIU key) gets the monitor's new pty slave in its place, given the
    saved settings first (:func:`apply_terminal`): ``stdout_w`` and ``stderr_w`` are two
    descriptors of that slave then, the second one for its ``/dev/tty`` (``stdio["ctty"]``)."""
    a = json.loads(arg)
    bundle = Bundle(Path(a["bundle"]))
    if "params" in a:  # armed ahead of time: the rest was written just before "go"
        a.update(json.loads(Path(a["params"]).read_text()))
    if "stdio" in a:
        stdio, volumes, netns = a["stdio"], a["volumes"], a.get("netns", "")
    else:
        m = bundle.manifest()
        stdio, volumes, netns = m.stdio, list(m.volumes), m.netns
    cfg = ContainerConfig.from_json(json.loads((cdir / CONFIG).read_text()))
    inherit: list[tuple[str, int]] = []
    out_key, err_key = stdio.get("stdout"), stdio.get("stderr")
    if out_key:
        inherit.append((out_key, stdout_w))
    if err_key and err_key != out_key:
        inherit.append((err_key, stderr_w))
    if tty_key := stdio.get("tty"):
        apply_terminal(bundle.criu_dir, stdout_w)
        inherit.append((tty_key, stdout_w))
        if ctty_key := stdio.get("ctty"):  # its /dev/tty: the same terminal, another fd
            inherit.append((ctty_key, stderr_w))  # (CRIU takes each and closes it)
    prepared = cdir / NETNS  # a bridged container's, made before the freeze
    if netns == "external":
        if bridged(cfg) and not prepared.exists():
            # a local restore of a checkpoint (no migration prepared it): make it now
            from migrate.netmove import prepare_destination
            from runtime.container import Runtime

            prepare_destination(Runtime(cdir.parents[1]), cdir, cfg)
        inherit.append((NETNS_KEY, prepared_netns(prepared) if bridged(cfg) else fresh_netns()))
    sources = {mt.destination: mt.source for mt in cfg.mounts}
    external = tuple(
        f"mnt[{v['key']}]:{sources.get(v['destination'], v['source'])}" for v in volumes
    )
    hold = a.get("hold")
    root = [0]
    handle = criu.CriuHandle()
    watching = threading.Event()  # set: the watchdog is done (held, or CRIU returned)

    def on_notify(n: criu.Notify) -> bool:
        if n.script == "post-restore" and n.pid:
            root[0] = n.pid  # the restored init's host pid (CRIU sends it here)
        if n.script == "pre-resume":
            watching.set()  # held: as long as the decision takes, never on a time limit
            if not handle.disarm():
                return False  # killed at its limit as it got here: it is ending
            if hold and not _wait_for_decision(hold, a.get("decision")):
                _kill_restored(root[0], cfg)
                raise criu.StopCriu(
                    "the migration was called off: the restored copy was killed before it ran"
                )
            if bridged(cfg):  # its port up and announced before its tasks run
                go_live(cfg, f"/proc/{root[0]}/ns/net")
        return True

    limit = a.get("limit_s")
    if not isinstance(limit, int | float) or not 0 < limit < 86400:
        limit = FrozenLimits.from_env().restore_s(_pages_bytes(bundle.criu_dir))
    watchdog = threading.Thread(
        target=_watch_restore, args=(handle, watching, float(limit)), daemon=True
    )
    if cfg.in_userns:
        _give_images_to(bundle.criu_dir, cfg)
    watchdog.start()
    try:
        res = criu.restore(
            criu.RestoreOptions(
                images_dir=bundle.criu_dir,
                root=str(cdir / "merged"),
                cg_root=cgroup_roots(cfg),
                work_dir=cdir,
                inherit_fd=tuple(inherit),
                external=external,
                network_lock=network_lock(cfg),
                lazy_pages=bool(a.get("lazy")),
                cgroup_yard=criu.host_cgroup_yard(bundle.criu_dir),
            ),
            on_notify,
            handle,
        )
    except BaseException:
        # a failed restore leaves nothing behind: CRIU is gone (it returned, or was killed:
        # the kernel let go of its tracees), the tasks it made are killed now
        kill_restored_tree(cfg, os.getpid())
        raise
    finally:
        # not joined: it may be in one of its 50 ms pauses, and the resume (the source
        # measures the downtime up to it) would wait for that; set, it kills nothing more
        watching.set()
    return res.pid


#: the saved settings of a container's terminal, in the dump's images dir (JSON of
#: runtime.tty.TerminalState; written by migrate.checkpoint.DumpPlan.options)
TERMINAL_STATE = "jaula-terminal.json"


def apply_terminal(images_dir: Path, slave: int) -> None:
    """Give the new pty ``slave`` the settings and window size saved with the dump
    (:data:`TERMINAL_STATE`), before CRIU gets it; CRIU then applies its own copy, taken
    while the tasks were frozen.  Raises ValueError when ``slave`` is not a terminal or the
    saved state is missing or malformed, OSError when the kernel refuses it."""
    from runtime import tty

    if not os.isatty(slave):
        raise ValueError("the container had a terminal, but its monitor gave the restore none")
    try:
        state = tty.TerminalState.from_json(json.loads((images_dir / TERMINAL_STATE).read_text()))
    except (OSError, ValueError) as e:
        raise ValueError(f"the saved state of the container's terminal is unusable: {e}") from e
    tty.apply(slave, state)


def _give_images_to(images_dir: Path, cfg: ContainerConfig) -> None:
    """Open a dump's images (0700/0600 root's) to the restored tasks of a container in a
    user namespace: CRIU's task 1 opens some itself (timens-0.img, tty-info.img) through
    the images directory's fd, at times before its uid map is written, when its ids are
    mapped to nothing and only the "other" bits can let it in (so a chown to the
    container's root is not enough: that failed about one restore in two).  The
    directory becomes 0711 and the files 0644; nobody else reaches them, as the state
    root above is 0700.  Only modes change: the manifest's digests hold."""
    if not cfg.in_userns:
        return
    os.chmod(images_dir, 0o711)
    for p in images_dir.iterdir():
        if p.is_file() and not p.is_symlink():
            os.chmod(p, p.stat().st_mode | 0o044)


def _pages_bytes(images_dir: Path) -> int:
    """Bytes of memory pages in a dump's images (``pages-*.img``): the size its restore
    limit scales with."""
    total = 0
    for p in images_dir.glob("pages-*.img"):
        try:
            total += p.stat().st_size
        except OSError:
            continue
    return total


def _children(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (/proc/PID/task/TID/children)."""
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        try:
            kids += map(int, Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
        except (OSError, ValueError):
            continue
    return kids


def _exiting(pid: int) -> bool:
    """Whether ``pid`` is exiting or dead (PF_EXITING, zombie) or gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return fields[0] in ("Z", "X") or bool(int(fields[6]) & _PF_EXITING)


def _watch_restore(handle: criu.CriuHandle, done: threading.Event, limit_s: float) -> None:
    """Kill the restore's CRIU when it is stuck, until ``done`` is set (held at
    ``pre-resume``, or the call returned):

    - past ``limit_s`` seconds (the restore limit, :mod:`migrate.deadlines`);
    - when a restored task, a child of this process (``rst_sibling``), has started to exit
      and CRIU has not ended :data:`FAILED_RESTORE_GRACE_S` later.  That is CRIU failing:
      on a failed restore it kills the restored init and waits for it, while the init of a
      pid namespace, exiting, waits for its children to be reaped, and a child that died
      in the restore (a segfault after "Unable to restore capabilities") is a zombie still
      traced by CRIU, which alone can reap it: both wait for ever (CRIU 4.2,
      cr-restore.c ``out_kill``).  Once CRIU dies the kernel gives the zombie back to
      the init, which reaps it and ends."""

    def dying_or_done() -> bool:
        return done.is_set() or any(
            _exiting(p) for p in _children(os.getpid()) if p != handle.pid and handle.pid
        )

    if not wait_for(dying_or_done, limit_s, 0.05):
        handle.kill(
            f"the restore was not ready within {limit_s:.0f} s (${SCALE_ENV} scales the "
            "limit): its CRIU was killed"
        )
        return
    if done.is_set():
        return
    if not wait_for(done.is_set, FAILED_RESTORE_GRACE_S, 0.05):
        handle.kill(
            "the restore failed: CRIU killed the restored tasks but did not end (it waits "
            "for a pid namespace whose dead task it still traces), so it was killed"
        )


def kill_restored_tree(cfg: ContainerConfig, parent: int, spare: tuple[int, ...] = ()) -> None:
    """SIGKILL what a restore made: the children of ``parent`` (the process that ran CRIU
    with ``rst_sibling``: the restored init is its child) but ``spare``, and every task in
    the container's cgroup.  Killing the init of the container's pid namespace takes the
    whole namespace with it once nothing traces its tasks."""
    for pid in _children(parent):
        if pid in spare:
            continue
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm not in ("criu", "setpriv"):
            _kill_restored(pid, cfg)
    _kill_restored(0, cfg)


def _kill_restored(root_pid: int, cfg: ContainerConfig) -> None:
    """SIGKILL the restored tasks, held at ``pre-resume`` (stopped, traced by CRIU): the
    init of their pid namespace (which takes the namespace with it) and every task in the
    container's cgroup.  Not the cgroup's ``kill_all``: it freezes first, and a frozen
    traced task is not woken by the SIGKILL until thawed."""
    pids = set(create_manager(cfg.id, parent=cfg.cgroup_parent).pids())
    if root_pid:
        pids.add(root_pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def warm_up() -> None:
    """What an armed monitor does before it waits for ``go``: check CRIU now (a process
    start) rather than in the downtime."""
    criu.require()


def prepared_netns(pin: Path) -> int:
    """The namespace the destination prepared (:func:`migrate.netmove.prepare_destination`)
    as an open fd; its pin is removed, so that it lives as long as the restored tasks."""
    from runtime.network import NetworkError
    from runtime.network.link import remove_netns

    try:
        fd = os.open(pin, os.O_RDONLY)
    except FileNotFoundError as e:
        raise NetworkError(f"the prepared net namespace {pin} is missing") from e
    remove_netns(pin)
    return fd


def fresh_netns() -> int:
    """A new net namespace with ``lo`` up, as an open fd; the caller stays in its own."""
    from runtime import syscalls as sc

    own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        sc.unshare(sc.CLONE_NEWNET)
        try:
            sc.link_up("lo")
            return os.open("/proc/self/ns/net", os.O_RDONLY)
        finally:
            sc.setns(own, sc.CLONE_NEWNET)
    finally:
        os.close(own)


def _wait_for_decision(path: str, record: str | None) -> bool:
    """Tell the destination service the tasks are held; return its decision (True: resume),
    written to ``record`` first when given (migrate.hold.HOLD_DECISION in the session's
    staging dir: a service that dies right after answering learns it from there, since
    this asks no more; never into a checkpoint bundle, whose files its manifest lists).

    If the service goes away, keep the tasks held and reconnect (a restarted service asks
    the source for the outcome): a held copy is never discarded on a timeout alone."""
    import socket
    import time

    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
                s.sendall(b"held\n")
                answer = s.makefile("rb").readline().strip()
            if answer in (b"resume", b"abort"):
                if record:
                    atomic_write_json(Path(record), {"decision": answer.decode()})
                return answer == b"resume"
        except OSError:
            pass
        time.sleep(0.5)
