"""The restorer a container's monitor runs in restore mode
(``runtime.monitor --restore-with migrate.restorer:criu_restorer``): ``criu restore`` from
inside the monitor, so that the restored init is the monitor's child and is reaped by it.

Kept small on purpose: the monitor imports it before a migration's freeze (armed), and what
it imports is start-up time the restored container would otherwise wait for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from migrate import criu
from migrate.bundle import Bundle
from runtime.cgroups import CgroupMode, create_manager, detect_mode
from runtime.spec import ContainerConfig
from runtime.store import CONFIG

#: the key under which a container's net namespace is external to CRIU (see
#: migrate.checkpoint.external_netns)
NETNS_KEY = "jaula-netns"


def network_lock(cfg: ContainerConfig) -> int:
    """CRIU's network lock for this container: none is needed for a private net namespace
    with only ``lo`` (nobody outside can send it anything while it is frozen)."""
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
    manifest), or ``{"bundle": STAGING, "hold": SOCKET, "params": FILE}`` for an incoming
    migration (FILE holds ``{"stdio": {...}, "volumes": [...], "lazy": BOOL}``, written
    just before the armed monitor is told to go; ``lazy``: a post-copy restore, whose
    pages ``criu lazy-pages`` brings in), whose tasks are held at CRIU's ``pre-resume`` until the
    destination service says ``resume`` or ``abort`` on the unix socket ``hold``.  The
    restored init becomes the monitor's child (``rst_sibling``); its stdout/stderr are the
    monitor's new pipes (``inherit_fd``)."""
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
    if netns == "external":
        inherit.append((NETNS_KEY, fresh_netns()))
    sources = {mt.destination: mt.source for mt in cfg.mounts}
    external = tuple(
        f"mnt[{v['key']}]:{sources.get(v['destination'], v['source'])}" for v in volumes
    )
    hold = a.get("hold")
    root = [0]

    def on_notify(n: criu.Notify) -> bool:
        if n.script == "post-restore" and n.pid:
            root[0] = n.pid  # the restored init's host pid (CRIU sends it here)
        if n.script == "pre-resume" and hold and not _wait_for_decision(hold):
            _kill_restored(root[0], cfg)
            raise criu.StopCriu(
                "the migration was called off: the restored copy was killed before it ran"
            )
        return True

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
    )
    return res.pid


def _kill_restored(root_pid: int, cfg: ContainerConfig) -> None:
    """SIGKILL the restored tasks, held at ``pre-resume`` (stopped, traced by CRIU): the
    init of their pid namespace (which takes the namespace with it) and every task in the
    container's cgroup.  Not the cgroup's ``kill_all``: it freezes first, and a frozen
    traced task is not woken by the SIGKILL until thawed."""
    import signal

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


def _wait_for_decision(path: str) -> bool:
    """Tell the destination service the tasks are held; return its decision (True: resume).

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
                return answer == b"resume"
        except OSError:
            pass
        time.sleep(0.5)
