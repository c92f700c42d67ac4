"""The destination half of a migration session: :class:`DestinationSession` runs on the
node that receives the container, one task per session, reading that session's messages
in order and checking each against :data:`migrate.protocol.DESTINATION_TABLE`.

Its phases (:class:`migrate.protocol.DestinationPhase`)::

    preflight  the offer: compatibility, disk, name and id, the container's record
               (``migrating``, incoming), the staging dir, the armed monitor, the page
               server (cold) or the post-copy listener; answered ``accept`` or ``error``
    receiving  pre-copied layers and upperdir (unpacked as they arrive, while the source
               still runs), then the CRIU images and the upperdir delta
    restoring  ``restore``: the monitor's CRIU restores and holds at pre-resume
               (:mod:`migrate.hold`), then ``ready``
    held       waits for the source's word: ``resume`` or ``abort``.  A silent source is
               asked for its durable record (``outcome``), never timed out blindly
    resuming   the tasks run; ``resumed``; post-copy: the pages arrive, and the container
               is killed at once if the lazy-pages daemon fails
    done / aborted

Any failure before ``resumed`` discards what arrived and the held copy (the source, if
alive, still has its own); the source is told why (``error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from migrate import criu, image_pack, lazy_conn, netmove, rootfs_diff
from migrate.addresses import bind_address
from migrate.deadlines import SCALE_ENV, FrozenLimits
from migrate.errors import MigrationError, PreflightError, ProtocolError
from migrate.hold import HOLD_DECISION, HoldServer, hold_socket_path
from migrate.protocol import (
    DESTINATION_TABLE,
    HEARTBEAT_S,
    RESTORING_BEATS,
    DestinationPhase,
    MessageType,
    Strategy,
    decode,
    encode,
    next_phase,
)
from migrate.restorer import FAILED_RESTORE_GRACE_S, kill_restored_tree
from migrate.scratch import record_lazy_daemon, remove_scratch, scratch_dir
from migrate.stream import FileReceiver, IncomingFile
from runtime import quota
from runtime.container import ArmedRestore, Container, Runtime
from runtime.errors import (
    CgroupError,
    ConfigError,
    ContainerError,
    ContainerExists,
    ContainerNotFound,
    JaulaError,
)
from runtime.network import link as _netlink  # noqa: F401 - pyroute2 (~0.5 s) at start-up, not in an offer
from runtime.spec import ContainerConfig
from runtime.state import (
    ContainerStatus,
    MigrationDirection,
    MigrationRecord,
    PostcopyRecord,
    State,
    atomic_write_json,
)
from runtime.store import LOG, UPPER
from runtime.syscalls import is_alive, proc_start_time

log = structlog.get_logger(__name__)
S = ContainerStatus
DP = DestinationPhase
M = MessageType

#: how long a restore may take to end once refused or failed, before it is torn down (s)
END_RESTORE_S = 15.0

#: asks the source node for the durable outcome of a session: True committed, False not,
#: None when it cannot be reached
AskOutcome = Callable[[str, str], Awaitable[bool | None]]


class DestinationSession:
    """The receiving half of one migration: staging files, restore held at pre-resume,
    resume on the source's word.

    Args:
        rt: this node's runtime; send: coroutine sending frames back to the source;
        offer: the decoded ``offer``; source: the source node's authenticated name.
        queue: where the node service puts this session's messages (and the bulk
            channel's chunks); listen: this node's endpoint (``tcp://`` for a page
            server or a post-copy listener); max_message_bytes: the bulk channel's limit.
        node_name: this node's name, in what it refuses.
        state: the cluster state (None: none): the source moves the container's owner key
            to this node at its commit; :meth:`on_resume` resumes only when the store does
            not name another owner (the fencing check).

    Raises PreflightError when its scratch directory is not private.
    """

    def __init__(
        self,
        rt: Runtime,
        send: Callable[[list[bytes]], Awaitable[None]],
        offer: dict[str, Any],
        source: str,
        queue: asyncio.Queue[Any] | None = None,
        listen: str = "",
        max_message_bytes: int = 8 << 20,
        node_name: str = "the destination",
        state: Any = None,
    ) -> None:
        self.rt = rt
        self.state = state
        self.node_name = node_name
        self._send = send
        self.offer = offer
        self.source = source
        self.session: str = offer["session"]
        self.phase = DP.PREFLIGHT
        self.staging = (
            scratch_dir(rt, int(offer.get("estimate_bytes", 0))) / f"incoming-{self.session}"
        )
        self.receiver = FileReceiver(self.staging, self.session, self.send, self._on_file)
        self.cfg: ContainerConfig | None = None
        self.cdir: Path | None = None
        self.armed: ArmedRestore | None = None
        self.reserved_ids: str | None = None  # a container id whose id range this session holds
        self.monitor: tuple[int, int | None] = (0, None)  # the restoring monitor (pid, start)
        self.revive_task: asyncio.Future[Any] | None = None
        self.hold: HoldServer | None = None
        self.queue = queue
        self.listen = listen
        self.max_message_bytes = max_message_bytes
        self.data: Any = None  # DataReceiver of the bulk channel
        self._data_reader: asyncio.Task[None] | None = None
        self.page_server: criu.PageServer | None = None
        self.postcopy = offer.get("strategy", "cold") == Strategy.POSTCOPY
        self.lazy_conn: asyncio.Future[socket.socket] | None = None  # the source's, checked
        self.lazy_tls: Any = None  # certs.TlsFiles of the post-copy connection
        self.lazy_daemon: criu.LazyPagesDaemon | None = None
        self._steps: dict[str, float] = {}  #: restore step -> s, for ``ready``
        self._restore_t0 = 0.0  #: time.monotonic() when the restore began

    @property
    def finished(self) -> bool:
        return self.phase in (DP.DONE, DP.ABORTED)

    @property
    def held(self) -> bool:
        """Whether the restored tasks are held at pre-resume, waiting for the source."""
        return self.hold is not None and self.hold.held.is_set()

    @property
    def hold_path(self) -> Path:
        return hold_socket_path(self.rt, self.session)

    async def send(self, mtype: str, **fields: Any) -> None:
        await self._send(encode(mtype, session=self.session, **fields))

    # -- the session's task ---------------------------------------------------------------
    async def run(self, idle_s: float, ask_outcome: AskOutcome) -> None:
        """Preflight, then take this session's messages in order until it is done or
        aborted.  The source may stay silent ``3 * idle_s`` before the hold (then the
        session aborts: the source, if alive, still has its copy) and ``idle_s`` while
        held (then it is asked for its durable record).  Any failure aborts and tells the
        source why."""
        assert self.queue is not None
        handlers: dict[MessageType, Callable[[dict[str, Any], Any], Awaitable[None]]] = {
            M.FILE_BEGIN: lambda m, _: self.receiver.on_file_begin(m),
            M.CHUNK: self.receiver.on_chunk,
            M.FILE_END: lambda m, _: self.receiver.on_file_end(m),
            M.DUMPING: lambda m, _: asyncio.sleep(0),  # the source is alive: nothing to do
            M.RESTORE: lambda m, _: self.on_restore(m),
            M.RESUME: lambda m, _: self.on_resume(),
            M.ABORT: lambda m, _: self._on_abort_message(m["reason"]),
        }
        try:
            await self.on_offer()
            self.phase = DP.RECEIVING
            while not self.finished:
                limit = idle_s if self.held else idle_s * 3
                try:
                    msg, payload = await asyncio.wait_for(self.queue.get(), limit)
                except TimeoutError:
                    await self._source_silent(ask_outcome)
                    continue
                target = next_phase(DESTINATION_TABLE, self.phase, msg["type"], "destination")
                await handlers[M(msg["type"])](msg, payload)
                if not self.finished:
                    self.phase = target
        except Exception as e:  # noqa: BLE001 - any failure aborts the incoming copy
            log.warning(
                "migration.incoming.failed",
                session=self.session,
                phase=self.phase.value,
                error=str(e),
            )
            try:
                await self.send("error", code=type(e).__name__, message=str(e))
            finally:
                await self.on_abort(str(e))

    async def _on_abort_message(self, reason: str) -> None:
        await self.on_abort(reason)
        await self.send("aborted")

    async def _source_silent(self, ask_outcome: AskOutcome) -> None:
        """The source said nothing for too long.  Before the hold: give up (the source, if
        alive, still has its copy).  While held: ask the source's durable record."""
        if not self.held:
            raise MigrationError(f"the source {self.source} went silent")
        # the source's record decides, not the store: a compare-and-swap that timed out on
        # the source (which then rolled back) may still be applied by etcd later
        committed = await ask_outcome(self.source, self.session)
        if committed is None:
            return  # cannot know yet: stay held and ask again later
        if committed:
            await self.on_resume()
        else:
            await self.on_abort("the source did not commit")

    # -- preflight ------------------------------------------------------------------------
    async def on_offer(self) -> None:
        """Preflight here, before the source freezes anything; answer accept, or raise
        PreflightError (answered ``error`` by :meth:`run`)."""
        from migrate.bundle import Manifest
        from migrate.restore import RESTORER, check_compatible

        o = self.offer
        if o.get("strategy", "cold") not in tuple(Strategy):
            raise PreflightError(f"this node cannot do strategy {o.get('strategy')!r}")
        self._check_patches(str(o.get("strategy", "cold")))
        cfg = ContainerConfig.from_json(o["container"])
        check_compatible(
            Manifest(
                container=o["container"],
                image=o["image"],
                criu_version=tuple(o["criu_version"]),
                cpu_flags=tuple(o.get("cpu_flags", ())),
            )
        )
        self._check_space_and_names(cfg)
        if why := await asyncio.to_thread(netmove.check_destination, self.rt, cfg):
            raise PreflightError(f"cannot take {cfg.name}'s network here: {why}")
        if cfg.storage_size_bytes:
            try:
                quota.check_supported(self.rt.root)
            except ConfigError as e:
                raise PreflightError(f"the destination cannot keep the disk quota: {e}") from None
        if cfg.in_userns and o.get("strategy", "cold") != "cold":
            raise PreflightError(
                f"{cfg.name} has a user namespace: only --strategy cold moves it (post-copy "
                "of one is untested)"
            )
        if cfg.userns == "auto":
            await asyncio.to_thread(self._reserve_ids, cfg)
        for lim in cfg.resources.io_limits:  # resolved by path here, as the cgroup will be
            try:
                lim.device_numbers()
            except CgroupError as e:
                raise PreflightError(f"the destination cannot keep an I/O limit: {e}") from None
        if "needs" in o:  # what this node must give it: volumes, ports, memory
            from migrate.portability import NodeNeeds, check_needs

            needs = NodeNeeds.from_json(o["needs"])
            await asyncio.to_thread(check_needs, needs, cfg.name, self.source, self.node_name)
        missing = [la for la in o["image"].get("layers", []) if not self.rt.images.has_layer(la)]
        self.cfg = await asyncio.to_thread(  # netlink: not from the event loop
            netmove.for_this_node,
            self.rt,
            ContainerConfig.from_json({**cfg.to_json(), "cgroup_parent": self.rt.cgroup_parent}),
        )
        (self.staging / "criu").mkdir(parents=True)
        (self.staging / "layers").mkdir()
        await asyncio.to_thread(self._adopt, self.cfg)
        bulk = self._open_bulk_channel()
        # Start the monitor now, waiting, and accept once it is ready: its start-up is then
        # not part of the downtime, even when the container is small and the host busy.
        arg = json.dumps(
            {
                "bundle": str(self.staging),
                "hold": str(self.hold_path),
                "params": str(self.staging / "restore.json"),
                "decision": str(self.staging / HOLD_DECISION),
            }
        )
        self.armed = await asyncio.to_thread(self.rt.arm, self.cfg.id, RESTORER, arg)
        ps = await self._listen_lazy() if self.postcopy else self._start_page_server()
        await asyncio.to_thread(self.rt.wait_armed, self.armed)
        assert self.cdir is not None
        await asyncio.to_thread(netmove.prepare_destination, self.rt, self.cdir, self.cfg)
        await self.send("accept", missing_layers=missing, features=[RESTORING_BEATS], **bulk, **ps)

    def _reserve_ids(self, cfg: ContainerConfig) -> None:
        """Hold the ``--userns=auto`` container's host id range here (it keeps its range
        on every node: its upperdir's files carry those ids).  Raises PreflightError
        naming the holder when another container of this node has any of it."""
        from runtime.userns import range_of

        start, size = range_of(cfg.uid_map)
        try:
            self.rt.id_ranges.reserve_exact(cfg.id, start, size)
        except ContainerError as e:
            raise PreflightError(
                f"the destination cannot give {cfg.name} its user namespace's ids: {e}"
            ) from None
        self.reserved_ids = cfg.id

    def _check_patches(self, strategy: str) -> None:
        """Raise PreflightError when this node's CRIU or the source's (``offer.criu_patches``;
        absent from an older source: taken as stock CRIU) lacks a patch the strategy needs
        (:data:`migrate.criu.REQUIRED_PATCHES`), naming it."""
        here = criu.build()
        if missing := here.missing(strategy):
            raise PreflightError(
                f"the destination's CRIU ({here.binary}, {here.gitid or 'stock'}) lacks the "
                f"patch {', '.join(missing)} that {strategy} needs "
                "(scripts/criu-patches/README): run `make setup` there, or use another strategy"
            )
        theirs = [str(x) for x in self.offer.get("criu_patches", [])]
        if missing := criu.missing_patches(strategy, theirs):
            raise PreflightError(
                f"the source's CRIU lacks the patch {', '.join(missing)} that {strategy} "
                f"needs (scripts/criu-patches/README): run `make setup` on {self.source}"
            )

    def _check_space_and_names(self, cfg: ContainerConfig) -> None:
        """Raise PreflightError when the container's id or name is taken here, or the
        state root lacks the disk the estimate asks for (2.2x, plus 64 MiB)."""
        try:
            existing = Container(self.rt, cfg.id)
        except (FileNotFoundError, JaulaError):
            existing = None
        if existing is not None and existing.status is not S.MIGRATED:
            raise PreflightError(
                f"container {cfg.id[:12]} already exists on this node ({existing.status.value})"
            )
        for cid in self.rt.store.ids():
            if cid != cfg.id and self.rt.store.name_of(cid) == cfg.name:
                raise PreflightError(f"the name {cfg.name!r} is taken on this node by {cid[:12]}")
        st = os.statvfs(self.rt.root)
        free = st.f_bavail * st.f_frsize
        need = int(self.offer.get("estimate_bytes", 0) * 2.2) + (64 << 20)
        if free < need:
            raise PreflightError(
                f"not enough disk under {self.rt.root}: {free >> 20} MiB free, "
                f"about {need >> 20} MiB needed"
            )

    def _adopt(self, cfg: ContainerConfig) -> None:
        """The container's record here: migrating, incoming from the source (a record of
        its having left this node before is replaced)."""
        record = MigrationRecord(self.session, MigrationDirection.INCOMING, self.source)
        try:
            c = self.rt.adopt(
                cfg, State(status=S.MIGRATING, migration=record), replace_departed=True
            )
        except ContainerExists as e:
            raise PreflightError(str(e)) from e
        self.cdir = c.dir
        if "restart" in self.offer:  # the --restart policy goes with the container
            from runtime.restart import RestartPolicy, save_policy

            try:
                policy = RestartPolicy.from_json(self.offer["restart"])
            except (KeyError, ValueError, TypeError) as e:
                raise ProtocolError(f"offer.restart is malformed: {e}") from None
            save_policy(c.dir, policy)

    def _open_bulk_channel(self) -> dict[str, Any]:
        """Bind the bulk data channel when the source offered sealed chunks; returns the
        ``accept`` fields that describe it, or nothing."""
        o = self.offer
        if not (
            "aes-256-gcm" in o.get("bulk", [])
            and self.listen.startswith("tcp://")
            and self.queue is not None
        ):
            return {}
        from migrate.sealing import new_key
        from migrate.transport import DataReceiver

        self.data = DataReceiver.bind(self.listen, self.max_message_bytes)
        self.receiver.data_key = new_key()
        self.receiver.bulk = True
        self._data_reader = asyncio.ensure_future(self._read_data())
        return {"data_endpoint": self.data.endpoint, "data_key": self.receiver.data_key}

    def _start_page_server(self) -> dict[str, Any]:
        """Start a ``criu page-server`` (TLS) for the dump's memory pages when the source
        offered one; returns the ``accept`` fields that describe it, or nothing (the pages
        then come as files).  Started from the service's own thread: the page server is
        killed with the thread that started it (``PR_SET_PDEATHSIG``)."""
        from migrate import certs

        o = self.offer
        if (
            "tls" not in o.get("page_server", [])
            or not o.get("ps_cert")
            or not self.listen.startswith("tcp://")
        ):
            return {}
        try:
            # `criu page-server --address` takes an IP address, not a host name
            address, told = bind_address(self.listen)
            tls, pem = certs.session_tls(self.staging, "destination", o["ps_cert"])
            self.page_server = criu.PageServer(self.staging / "criu", address, tls, self.staging)
        except (ValueError, JaulaError, OSError) as e:  # socket.gaierror is an OSError
            log.warning("migration.page_server.unavailable", session=self.session, error=str(e))
            return {}
        return {"page_server": {"address": told, "port": self.page_server.port, "cert": pem}}

    async def _listen_lazy(self) -> dict[str, Any]:
        """Post-copy: listen for the source's page connection (:mod:`migrate.lazy_conn`);
        returns the ``accept`` fields that describe it.

        Raises PreflightError when this node cannot do post-copy (no TCP endpoint, no
        userfaultfd for CRIU)."""
        from migrate import certs

        o = self.offer
        if not self.listen.startswith("tcp://"):
            raise PreflightError(
                f"post-copy needs a tcp:// listen endpoint on this node, not "
                f"{self.listen!r}: use --strategy cold"
            )
        if "tls" not in o.get("page_server", []) or not o.get("ps_cert"):
            raise PreflightError("the source offered post-copy without a TLS certificate")
        features = await asyncio.to_thread(criu.check_features, True)
        if not features.get("lazy_pages"):
            raise PreflightError(
                "CRIU cannot restore with lazy pages on this node (it needs "
                "userfaultfd: vm.unprivileged_userfaultfd or root, and "
                "CONFIG_USERFAULTFD): use --strategy cold"
            )
        address, told = bind_address(self.listen)
        self.lazy_tls, pem = certs.session_tls(self.staging, "destination", o["ps_cert"])
        lsock, token = lazy_conn.listen(address)
        self.lazy_conn = asyncio.ensure_future(
            lazy_conn.accept_with_token(lsock, token, self.session)
        )
        return {
            "page_server": {
                "address": told,
                "port": lsock.getsockname()[1],
                "cert": pem,
                "token": token,
            }
        }

    async def _read_data(self) -> None:
        """Chunks from the bulk channel join the session's queue (unsealed by on_chunk)."""
        assert self.data is not None and self.queue is not None
        while True:
            frames = await self.data.recv()
            try:
                msg, payload = decode(frames)
            except ProtocolError as e:
                log.warning("migration.data.bad_message", session=self.session, error=str(e))
                continue
            if msg["type"] != "chunk" or msg["session"] != self.session or "seq" not in msg:
                log.warning("migration.data.unexpected", session=self.session)
                continue
            self.queue.put_nowait((msg, payload))

    # -- receiving ------------------------------------------------------------------------
    async def _on_file(self, f: IncomingFile) -> None:
        """A file arrived whole: unpack what is unpacked on arrival."""
        path = self.staging / f.name
        if f.name == "rootfs-base.tar" and self.cdir is not None:
            # Unpack the pre-copied upperdir now, while the source still runs: only the
            # delta is left for the downtime.
            size = self.cfg.storage_size_bytes if self.cfg is not None else None
            await asyncio.to_thread(quota.prepare_dirs, self.cdir, size)
            await asyncio.to_thread(rootfs_diff.extract, path, self.cdir / UPPER)
            os.unlink(path)
        if f.name == "criu-images.tar":  # the small CRIU images, packed (migrate.image_pack)
            await asyncio.to_thread(image_pack.unpack, path, self.staging / "criu", f.size)
            os.unlink(path)
        if f.kind == "layer":
            from runtime.image.transfer import import_layer

            layer = f.name.split("/")[1].removesuffix(".tar")
            await asyncio.to_thread(import_layer, self.rt.images, layer, path)
            os.unlink(path)

    # -- restoring, held ------------------------------------------------------------------
    async def on_restore(self, m: dict[str, Any]) -> None:
        """Restore with the monitor's CRIU and wait until it holds the tasks at
        pre-resume, then answer ``ready`` (with the time per step when offered).

        Raises ProtocolError (files incomplete), MigrationError (the restore ended without
        holding, the lazy-pages daemon died), CriuError, BundleError."""
        self.phase = DP.RESTORING
        if self.cfg is None or self.armed is None:
            raise ProtocolError("restore before the offer was accepted")
        if not self.receiver.all_complete():
            raise ProtocolError("restore before every file was complete")
        async with self._beating():
            await self._restore_and_hold(m)
        extra = (
            {"steps_s": self._steps} if "restore_steps" in self.offer.get("features", []) else {}
        )
        await self.send("ready", restore_s=round(time.monotonic() - self._restore_t0, 6), **extra)

    @contextlib.asynccontextmanager
    async def _beating(self) -> AsyncIterator[None]:
        """Send ``restoring`` every HEARTBEAT_S while the body runs (the restore up to the
        hold, the resume up to ``resumed``), and none after it: the source, waiting for
        the answer, then knows within its peer timeout that this service died or
        restarted instead of waiting out the whole restore (or resume) limit."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(HEARTBEAT_S)
                try:
                    await self.send("restoring")
                except Exception:  # noqa: BLE001 - the body's own end tells what happened
                    return

        beats = asyncio.create_task(beat())
        try:
            yield
        finally:
            beats.cancel()
            await asyncio.gather(beats, return_exceptions=True)

    async def _restore_and_hold(self, m: dict[str, Any]) -> None:
        """The body of :meth:`on_restore`, up to the hold; sets ``_steps`` and
        ``_restore_t0``."""
        from migrate.bundle import Bundle
        from migrate.restore import RESTORER, check_pipes, mark_terminal
        from runtime.image.transfer import register_image

        assert self.cfg is not None and self.armed is not None  # checked by on_restore
        mark = self._restore_t0 = time.monotonic()
        steps: dict[str, float] = {}
        self._steps = steps

        def step(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            steps[name] = round(now - mark, 6)
            mark = now

        if self.page_server is not None:  # the dump closed its connection before post-dump
            await asyncio.to_thread(self.page_server.wait, 30.0)
            step("pages")
        check_pipes(Bundle(self.staging))  # pipe sizes this node cannot give back: refuse
        await asyncio.to_thread(register_image, self.rt.images, self.offer["image"])
        await asyncio.to_thread(self._fill_container, m)
        limit = self._restore_limit(m)
        atomic_write_json(
            self.staging / "restore.json",
            {
                "stdio": m["stdio"],
                "volumes": m["volumes"],
                "netns": m.get("netns", ""),
                "lazy": self.postcopy,
                "limit_s": limit,  # the restorer's own watchdog (migrate.restorer)
            },
        )
        assert self.cdir is not None
        mark_terminal(self.cdir, m["stdio"])  # before "go": the monitor makes its pty
        step("prepare")
        if self.postcopy:
            await self._start_lazy_daemon()
            step("lazy_daemon")
        self.hold = HoldServer(self.hold_path)
        await self.hold.start()
        armed, self.armed = self.armed, None
        self.monitor = (armed.mon_pid, armed.mon_start)
        self.revive_task = asyncio.ensure_future(
            asyncio.to_thread(self.rt.revive, self.cfg.id, RESTORER, "", armed)
        )
        held = asyncio.ensure_future(self.hold.held.wait())
        # the monitor's watchdog kills a stuck CRIU at this limit; this one is the backstop
        await asyncio.wait(
            {self.revive_task, held},
            timeout=limit + FAILED_RESTORE_GRACE_S + 1.0,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not self.held:
            held.cancel()
            if not self.revive_task.done():  # on_abort tears it down
                raise MigrationError(
                    f"the restore was not held within {limit:.0f} s: given up ({SCALE_ENV} "
                    "scales the limit)"
                )
            self.revive_task.result()  # raises the restore's error; on_abort cleans up
            raise MigrationError("the restore finished without being held")
        step("criu_restore")
        if self.lazy_daemon is not None and self.lazy_daemon.proc.poll() is not None:
            raise MigrationError(
                "the lazy-pages daemon exited before the commit (see "
                f"{self.lazy_daemon.kept_log()})"
            )

    def _restore_limit(self, m: dict[str, Any]) -> float:
        """Seconds the restore may take until held: what the source says it waits for
        (``dump.restore_limit_s``), else this node's limit for the offered size."""
        told = (m.get("dump") or {}).get("restore_limit_s")
        if isinstance(told, int | float) and 0 < told < 86400:
            return float(told)
        return FrozenLimits.from_env().restore_s(int(self.offer.get("estimate_bytes", 0)))

    def _fill_container(self, m: dict[str, Any]) -> None:
        """Apply the upperdir's delta (deletions, then the delta tar) and move the log in."""
        cdir = self.cdir
        if cdir is None or not (cdir / UPPER).is_dir():
            raise ProtocolError("restore before the pre-copied upperdir arrived")
        rootfs_diff.apply_deleted(cdir / UPPER, [str(p) for p in m["deleted"]])
        if (self.staging / "rootfs-delta.tar").exists():  # absent: nothing changed
            rootfs_diff.extract_over(self.staging / "rootfs-delta.tar", cdir / UPPER)
        if (self.staging / LOG).exists():
            shutil.move(self.staging / LOG, cdir / LOG)  # maybe across filesystems

    async def _start_lazy_daemon(self) -> None:
        """Post-copy: start ``criu lazy-pages`` on the source's page connection, before
        the restore (which hands it the userfaultfds); it outlives this service (see
        :class:`migrate.criu.LazyPagesDaemon`).  Raises MigrationError when the source never
        connected, CriuError when the daemon does not start."""
        assert self.lazy_conn is not None and self.cdir is not None
        try:
            conn = await asyncio.wait_for(asyncio.shield(self.lazy_conn), 10.0)
        except TimeoutError:
            raise MigrationError(
                f"{self.source} never opened its post-copy page connection"
            ) from None
        try:
            lazy_conn.set_conn_timeouts(conn)
            self.lazy_daemon = await asyncio.to_thread(
                criu.LazyPagesDaemon, self.staging / "criu", self.cdir, conn.fileno(), self.lazy_tls
            )
            # before the hold: a restarted service must find this very process (pid + start
            # time) to end it with a discarded copy, or to wait for it after a commit
            record_lazy_daemon(self.staging, self.lazy_daemon.proc.pid)
        finally:
            conn.close()  # the daemon has its own copy

    # -- resuming -------------------------------------------------------------------------
    async def on_resume(self) -> None:
        """The source committed: let the tasks run, answer ``resumed``; post-copy: wait
        for the last page (killing the container if its pages cannot all come).

        Raises ProtocolError (not held), MigrationError (the lazy-pages daemon died before
        the resume: the container is not resumed)."""
        if not self.held or self.revive_task is None or self.hold is None:
            raise ProtocolError("resume before the restore was held")
        async with self._beating():
            t0 = await self._fence_and_resume()
        await self.send("resumed", resume_s=round(time.monotonic() - t0, 6))
        if self.lazy_daemon is not None:
            # (after the answer: the source measures the downtime up to it)
            await asyncio.to_thread(self._mark_postcopy, True)
            await self._await_postcopy()
        await self.finish()  # after the answer: removing a large staging dir takes a while
        self.phase = DP.DONE

    async def _fence_and_resume(self) -> float:
        """The body of :meth:`on_resume` up to the running tasks; returns the
        time.monotonic() it began at."""
        assert self.revive_task is not None and self.hold is not None  # checked by on_resume
        await self._fence()
        self.phase = DP.RESUMING
        t0 = time.monotonic()
        if self.lazy_daemon is not None and self.lazy_daemon.proc.poll() not in (None, 0):
            # committed on the source, but the pages cannot come: never run on zero-fill
            # (status 0: it already has every page, which a small container's few pages
            # can reach between the source's commit and this resume)
            log.error(  # its status and log lines here: its log goes with the session
                "migration.postcopy.daemon_gone",
                session=self.session,
                status=self.lazy_daemon.proc.returncode,
                log=str(self.lazy_daemon.log_path),
                criu_log=criu.log_excerpt(self.lazy_daemon.log_path),
            )
            self.hold.decide(False)
            with contextlib.suppress(Exception):
                await self.revive_task
            raise MigrationError(
                f"the lazy-pages daemon on this node died before the "
                f"resume: the container's memory cannot arrive, so it was "
                f"not resumed (see {self.lazy_daemon.kept_log()})"
            )
        self.hold.decide(True)
        await self.revive_task
        return t0

    async def _fence(self) -> None:
        """Before the tasks run: the store must not name another owner than this node (a
        source whose commit lost the compare-and-swap must not resume us).  Another owner:
        the held copy is discarded (MigrationError).  The store silent or naming nobody:
        the source's ``resume`` comes only after its compare-and-swap succeeded, so it is
        believed (never discard on a store that cannot answer: that could leave none)."""
        from migrate.cluster_state import ClusterStateError

        if self.state is None or self.cfg is None:
            return
        try:
            owner = await asyncio.to_thread(self.state.owner, self.cfg.id)
        except ClusterStateError as e:
            log.warning("migration.fence_unknown", session=self.session, error=str(e))
            return
        if owner is not None and owner.node != self.node_name:
            raise MigrationError(
                f"the cluster state names {owner.node} (revision {owner.revision}) as the "
                f"owner of {self.cfg.id[:12]}, not {self.node_name}: the held copy is "
                "discarded"
            )
        log.info(
            "migration.fenced",
            session=self.session,
            owner=owner.node if owner else None,
            revision=owner.revision if owner else 0,
        )

    async def _await_postcopy(self) -> None:
        """Post-copy, after the resume: wait for the lazy-pages daemon to have every page.
        If it fails, the kernel fills the missing pages with zeros: kill the container at
        once (its init, without waiting for the container's lock), and say so."""
        assert self.lazy_daemon is not None and self.cfg is not None
        try:
            await asyncio.to_thread(self.lazy_daemon.wait, None)
        except JaulaError as e:
            log.error(
                "migration.postcopy.failed",
                session=self.session,
                error=str(e),
                action="killing the container: its memory is incomplete",
            )
            try:
                c = Container(self.rt, self.cfg.id)
                if c.state.pid and is_alive(c.state.pid, c.state.pid_start_time):
                    os.kill(c.state.pid, signal.SIGKILL)
            except (JaulaError, OSError) as ke:
                log.error("migration.postcopy.kill_failed", session=self.session, error=str(ke))
        finally:
            await asyncio.to_thread(self._mark_postcopy, False)

    def _mark_postcopy(self, on: bool) -> None:
        """Record in the container's state that its memory is still arriving (the
        lazy-pages daemon's pid and start time), or that it has all of it: a dump meanwhile
        would leave out the pages not yet here (:func:`migrate.checkpoint.preflight`
        refuses it)."""
        assert self.cfg is not None and self.lazy_daemon is not None
        try:
            c = Container(self.rt, self.cfg.id)
            with c.locked():
                c.refresh()
                if on:
                    pid = self.lazy_daemon.proc.pid
                    c.state.postcopy = PostcopyRecord(
                        self.session, self.source, pid, proc_start_time(pid)
                    )
                else:
                    c.state.postcopy = None
                c.save()
        except (JaulaError, OSError) as e:
            log.warning("migration.postcopy.mark", session=self.session, error=str(e))

    # -- the end --------------------------------------------------------------------------
    async def on_abort(self, reason: str) -> None:
        """Discard the held copy (or whatever arrived): the source keeps the container."""
        log.warning("migration.incoming.aborted", session=self.session, reason=reason)
        if self.hold is not None:
            self.hold.decide(False)
        if self.revive_task is not None:
            await self._end_restore()
        if self.armed is not None:
            armed, self.armed = self.armed, None
            await asyncio.to_thread(self.rt.disarm, armed)
        if self.reserved_ids is not None:
            with contextlib.suppress(JaulaError, OSError):
                await asyncio.to_thread(self.rt.id_ranges.release, self.reserved_ids)
            self.reserved_ids = None
        if self.cdir is not None:
            try:
                c = Container(self.rt, self.cdir.name)
                if c.status is S.MIGRATING:
                    await asyncio.to_thread(netmove.discard_destination, self.cdir, c.config)
                    await asyncio.to_thread(shutil.rmtree, self.cdir, True)
            except (FileNotFoundError, ContainerNotFound, JaulaError):
                pass
        await self.finish()
        self.phase = DP.ABORTED

    async def _end_restore(self) -> None:
        """Wait for the restore to end (refused at pre-resume, or failed); if it does not
        within :data:`END_RESTORE_S`, tear it down: SIGKILL the monitor (its CRIU dies with
        it, ``PR_SET_PDEATHSIG``) and every task the restore made, then wait again for
        :meth:`Runtime.revive` to undo its steps (it sees the monitor gone)."""
        assert self.revive_task is not None
        done, _ = await asyncio.wait({self.revive_task}, timeout=END_RESTORE_S)
        if not done:
            log.error("migration.incoming.restore_stuck", session=self.session)
            await asyncio.to_thread(self._kill_restore)
            done, _ = await asyncio.wait({self.revive_task}, timeout=END_RESTORE_S)
        if not done:
            log.error("migration.incoming.restore_left", session=self.session)
        elif not self.revive_task.cancelled():
            self.revive_task.exception()  # expected: the restore was refused or failed

    def _kill_restore(self) -> None:
        assert self.cfg is not None
        pid, start = self.monitor
        if pid and is_alive(pid, start):
            kill_restored_tree(self.cfg, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        kill_restored_tree(self.cfg, 0)

    async def finish(self) -> None:
        """Release everything the session holds: page server, lazy daemon and connection,
        bulk channel, open files, hold socket, staging dir."""
        if self.page_server is not None:
            self.page_server.kill()
        if self.lazy_daemon is not None:
            self.lazy_daemon.kill()
        if self.lazy_conn is not None:
            if not self.lazy_conn.done():
                self.lazy_conn.cancel()
            elif not self.lazy_conn.cancelled() and self.lazy_conn.exception() is None:
                self.lazy_conn.result().close()
        if self._data_reader is not None:
            self._data_reader.cancel()
        if self.data is not None:
            self.data.close()
            self.data = None
        self.receiver.close()
        if self.hold is not None:
            self.hold.close()
        await asyncio.to_thread(remove_scratch, self.staging)
