"""The source half of a migration session: :class:`SourceSession` runs on the node that has
the container.  Message sequence and the commit point: :mod:`migrate.protocol` (its phase
tables) and DESIGN.md "The migration handoff".

The phases, in the order of :data:`migrate.protocol.SOURCE_PLAN`, one method each:

    preflight  local checks (CRIU, undumpable objects), then the destination's (offer/accept)
    precopy    image layers the destination lacks, and the upperdir, sent while it runs
    freeze     the freezer cgroup, until every task is frozen
    dump       CRIU dump, its memory pages streamed as it goes to a ``criu page-server``
               on the destination (TLS); CRIU holds the frozen tasks (post-dump)
    transfer   the other CRIU images (the small ones packed into one tar, migrate.image_pack)
               and what changed in the upperdir since the pre-copy
    restore    the destination restores and holds its tasks before they resume (pre-resume)
    commit     the owner key moves to the destination (a compare-and-swap in the cluster
               state at the revision read at preflight), then the source records
               "migrated -> destination" durably; its copy dies
    resume     the destination lets its tasks run
    postcopy   (``postcopy`` only) the rest of the pages, served by the source's CRIU
    cleanup    the source drops its images and rootfs

Strategy ``postcopy`` (CRIU lazy pages) changes ``preflight`` (the destination also checks
userfaultfd and listens for one TCP connection, which the source opens and authenticates
with a token from the CURVE accept: :mod:`migrate.lazy_conn`), ``dump`` (``--lazy-pages``:
private memory stays in CRIU's page pipes, only the rest goes in the images), and what
follows the resume.  Between the commit and the last page the container's memory is split
between the two nodes: if either is lost then, the container is lost (the destination kills
its copy rather than let it run on missing pages).  ``cold`` has no such window.

Ownership (the cluster state, :mod:`migrate.cluster_state`): the preflight reads the
container's owner key, which must name this node (an unowned one is claimed), and refuses,
before anything freezes, when the store cannot answer.  The commit's compare-and-swap is the
point of no return: if it fails (another writer came first, or the store cannot answer) the
migration rolls back as any failure before the commit does, so the container is never live
on two nodes, nor on none.

A failure in any phase before ``commit`` rolls back: the post-dump notification is answered
"failure" (CRIU resumes the tasks), the freezer is thawed, the destination told to abort,
and :class:`MigrationAborted` names the phase.  From ``commit`` on, nothing rolls back.

Downtime is measured on the source from the freeze to the arrival of ``resumed``: an upper
bound of the time the tasks did not run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
import shutil
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from migrate import criu, image_pack, lazy_conn, netmove, portability, rootfs_diff
from migrate.addresses import endpoint_host
from migrate.bundle import cpu_flags
from migrate.checkpoint import DumpPlan, preflight, process_tree, tasks_of
from migrate.deadlines import SCALE_ENV, FrozenLimits
from migrate.errors import (
    MigrationAborted,
    MigrationError,
    PeerUnavailable,
    PreflightError,
    ProtocolError,
    TransferError,
)
from migrate.link import SourceLink
from migrate.portability import sysv_shm_segments
from migrate.protocol import HEARTBEAT_S, RESTORING_BEATS, SOURCE_PLAN, SourcePhase, Strategy
from migrate.report import MigrationReport
from migrate.scratch import disk_usage_bytes, remove_scratch, scratch_dir
from runtime.container import Runtime
from runtime.errors import JaulaError
from runtime.restart import load_policy
from runtime.state import ContainerStatus, MigrationDirection, MigrationRecord
from runtime.store import LOG, ROOTFS_DIRS

if TYPE_CHECKING:
    from migrate.cluster_state import ClusterState

log = structlog.get_logger(__name__)

#: ``restoring`` beats missed (HEARTBEAT_S each) before a frozen source gives up on a
#: destination that beats (at least its peer timeout): ten, so that a loaded destination
#: whose event loop stalls a few seconds is not taken for a dead one
BEATS_MISSED = 10
S = ContainerStatus
SP = SourcePhase

#: what this node's sessions can do beyond the protocol's first version, offered by the
#: source (``offer.features``): ``restore_steps``, the destination's restore per step in
#: ``ready``.  An older destination refuses the offer (unknown field) before anything
#: freezes; an older source offers none and gets none.
FEATURES = ("restore_steps",)

ProgressFn = Callable[[str, int, int], None]


def parse_strategy(name: str) -> Strategy:
    """The :class:`Strategy` called ``name``.  Raises PreflightError naming the ones there
    are."""
    try:
        return Strategy(name)
    except ValueError:
        raise PreflightError(
            f"unknown strategy {name!r}: this node does {', '.join(s.value for s in Strategy)}"
        ) from None


async def _best_effort(aw: Awaitable[Any]) -> None:
    try:
        await aw
    except Exception:  # noqa: BLE001, S110 - a courtesy to a peer that may be gone
        pass


class SourceSession:
    """Migrate one container from this node to ``destination`` (a node of the cluster).

    Args:
        rt: this node's runtime; ref: the container; node_name: this node's name.
        connect: coroutine returning a connected transport Client for a node name.
        strategy: ``cold`` or ``postcopy`` (:class:`Strategy`).
        peer_timeout_s: how long the destination may stay silent before we abort.
        progress: called with (phase, done_bytes, total_bytes).
        state: the cluster state (:class:`migrate.cluster_state.ClusterState`) or None for
            none (the local record alone decides).

    Raises PreflightError for an unknown strategy or a destination that is this node.
    """

    def __init__(
        self,
        rt: Runtime,
        ref: str,
        destination: str,
        node_name: str,
        connect: Callable[[str], Awaitable[Any]],
        strategy: str = "cold",
        peer_timeout_s: float = 20.0,
        progress: ProgressFn | None = None,
        state: Any = None,
    ) -> None:
        self.strategy = parse_strategy(strategy)
        self.state = state
        #: the owner key's revision read at preflight: the commit's compare-and-swap expects it
        self.owner_revision = 0
        if destination == node_name:
            raise PreflightError(f"container is already on {node_name}: pick another node")
        self.rt = rt
        self.ref = ref
        self.destination = destination
        self.node_name = node_name
        self.connect = connect
        self.peer_timeout_s = peer_timeout_s
        self.progress = progress or (lambda *_: None)
        self.session = secrets.token_hex(8)
        # what the phases hand on to each other
        self.missing_layers: list[str] = []
        self.restoring_beats = False  #: the destination sends ``restoring`` (its accept)
        self.page_server: tuple[str, int] | None = None
        self.ps_tls: Any = None  # certs.TlsFiles of the page connection
        self.ps_sock: socket.socket | None = None  # post-copy: the page connection
        self.before: Any = None  # rootfs_diff snapshot of the upperdir at the pre-copy
        self.dump_task: asyncio.Future[Any] | None = None
        self.post_dump = asyncio.Event()
        #: the answer to CRIU's post-dump: True commits (CRIU kills our copy), False rolls
        #: back (CRIU resumes it); set once, read by CRIU's notify thread
        self.verdict: concurrent.futures.Future[bool] = concurrent.futures.Future()
        self.t_freeze = 0.0
        #: kills the dump's CRIU from the event loop (a frozen step past its limit)
        self.criu = criu.CriuHandle()
        self.limits = FrozenLimits.from_env()
        self.memory_bytes = 0

    @property
    def committed(self) -> bool:
        """Whether the commit point was passed: the durable record says migrated and CRIU
        was told to kill our copy.  Before it, any failure rolls back."""
        return self.verdict.done() and self.verdict.result()

    @property
    def images(self) -> Path:
        return self.work / "criu"

    # -- the run --------------------------------------------------------------------------
    async def run(self) -> MigrationReport:
        """Do the migration.  Returns the report once the source is cleaned up.

        Raises PreflightError (nothing touched), MigrationAborted (rolled back: the container
        runs here again, ``phase`` says where it failed), ContainerError (busy, not
        running)."""
        t0 = time.monotonic()
        c = self.rt.get(self.ref)
        self.c = c
        self.rep = MigrationReport(
            self.session, c.id, c.name, self.node_name, self.destination, self.strategy.value
        )
        with c.locked(blocking=False):
            preflight(c)
            client = await self.connect(self.destination)
            self.link = SourceLink(client, self.session, self.peer_timeout_s)
            self.link.start()
            self.memory_bytes = int(c.cgroup().stats().memory_bytes)
            self.estimate = self.memory_bytes + int(disk_usage_bytes(c.upperdir))
            self.work = scratch_dir(self.rt, self.estimate) / f"outgoing-{self.session}"
            self.work.mkdir(parents=True)
            try:
                await self._drive()
            finally:
                await self.link.close()
                client.close()
                if self.ps_sock is not None:
                    self.ps_sock.close()  # CRIU has its own copy while it serves
                remove_scratch(self.work)
        rep = self.rep
        rep.total_s = round(time.monotonic() - t0, 6)
        rep.bytes_sent = self.link.sender.bytes_sent + rep.page_server_bytes
        rep.files = self.link.sender.files
        log.info("migration.done", **{k: v for k, v in rep.to_json().items() if k != "phases_s"})
        return rep

    async def _drive(self) -> None:
        """Run the plan's phases in order, timing each; roll back on a failure before the
        commit point."""
        steps: dict[SourcePhase, Callable[[], Awaitable[None]]] = {
            SP.PREFLIGHT: self._preflight,
            SP.PRECOPY: self._precopy,
            SP.FREEZE: self._freeze,
            SP.DUMP: self._dump,
            SP.TRANSFER: self._transfer,
            SP.RESTORE: self._restore,
            SP.COMMIT: self._commit,
            SP.RESUME: self._resume,
            SP.POSTCOPY: self._postcopy,
            SP.CLEANUP: self._cleanup,
        }
        mark = time.monotonic()
        for phase in SOURCE_PLAN[self.strategy]:
            self.link.phase = phase
            try:
                await steps[phase]()
            except BaseException as e:
                if self.committed:
                    raise
                await self._roll_back(str(e), phase)
                if phase is SP.PREFLIGHT or not isinstance(e, MigrationError | JaulaError):
                    raise
                raise MigrationAborted(
                    f"{e}; the container keeps running on {self.node_name}", phase.value
                ) from e
            now = time.monotonic()
            self.rep.phases_s[phase.value] = round(now - mark, 6)
            if phase is SP.POSTCOPY:
                self.rep.postcopy_s = self.rep.phases_s[phase.value]
            mark = now
            self.progress(phase.value, 0, 0)
        self.link.phase = SP.DONE

    # -- phases ---------------------------------------------------------------------------
    async def _preflight(self) -> None:
        """Offer the container; the destination checks and prepares, then accepts (with
        its page server or post-copy connection) or refuses.  On acceptance the container
        is ``migrating`` here."""
        from migrate import certs
        from runtime.image.transfer import image_record

        c, link = self.c, self.link
        await self._check_owner()
        crb = await asyncio.to_thread(criu.build)
        if missing := crb.missing(self.strategy.value):
            raise PreflightError(
                f"this node's CRIU ({crb.binary}, {crb.gitid or 'stock'}) lacks the patch "
                f"{', '.join(missing)} that {self.strategy.value} needs "
                f"(scripts/criu-patches/README): run `make setup` on {self.node_name}; "
                f"nothing was frozen, {c.name} keeps running here"
            )
        ps_cert, cert, key = await asyncio.to_thread(certs.make_identity, self.work, "source")
        pids = sorted(set(tasks_of(c)) | set(process_tree(c.state.pid)))
        needs = await asyncio.to_thread(portability.node_needs, c.config, c.state.pid, pids)
        await link.send(
            "offer",
            container=c.config.to_json(),
            image=image_record(self.rt.images, c.config.image_id),
            criu_version=list(crb.version),
            criu_patches=sorted(crb.patches),
            cpu_flags=list(cpu_flags()),
            estimate_bytes=self.estimate,
            strategy=self.strategy.value,
            source_node=self.node_name,
            bulk=["aes-256-gcm"],
            page_server=["tls"],
            ps_cert=ps_cert,
            features=list(FEATURES),
            needs=needs.to_json(),
            restart=load_policy(c.dir).to_json(),
        )
        try:
            accept = await link.expect("accept")
        except PeerUnavailable as e:
            raise PreflightError(
                f"{self.destination} did not answer the migration offer ({e}): "
                f"is its service running? (`jaula node ls`); nothing was "
                f"frozen, {c.name} keeps running on {self.node_name}"
            ) from e
        self.missing_layers = [str(x) for x in accept["missing_layers"]]
        self.restoring_beats = RESTORING_BEATS in (accept.get("features") or [])
        if accept.get("data_endpoint") and accept.get("data_key"):
            link.sender.open_data_channel(accept["data_endpoint"], accept["data_key"])
        ps = accept.get("page_server")
        if ps:
            port, address, peer = ps.get("port"), ps.get("address"), ps.get("cert")
            if not (
                isinstance(port, int)
                and 0 < port < 65536
                and isinstance(address, str)
                and len(address) < 256
            ):
                raise ProtocolError(f"the destination offered a bad page server: {ps!r:.200}")
            try:
                cacert = certs.trust_peer(self.work, peer)
            except ValueError as e:
                raise ProtocolError(f"the destination's page server: {e}") from e
            if address in ("", "*", "0.0.0.0", "::"):
                address = endpoint_host(getattr(link.client, "endpoint", ""))
            self.page_server = (address, port)
            self.ps_tls = certs.TlsFiles(cacert, cert, key)
        if self.strategy is Strategy.POSTCOPY:
            await self._open_page_connection(ps)
        elif (
            self.page_server is not None
            and criu.SYSV_SHM_PATCH not in crb.patches
            and await asyncio.to_thread(sysv_shm_segments, c.state.pid) > 0
        ):
            raise PreflightError(
                f"{c.name} holds SysV shared memory, which this node's CRIU cannot send "
                f"to a page server over TLS without patch {criu.SYSV_SHM_PATCH}: run "
                f"`make setup` on {self.node_name}; nothing was frozen, {c.name} keeps "
                "running here"
            )
        c.state.status = S.MIGRATING
        c.state.migration = MigrationRecord(
            self.session, MigrationDirection.OUTGOING, self.destination
        )
        c.save()

    async def _check_owner(self) -> None:
        """The store must name this node as the owner (an unowned container, from before
        the store, is claimed now); remember the revision for the commit.  PreflightError
        when another node owns it or the store cannot answer: nothing was frozen."""
        from migrate.cluster_state import ClusterStateError, OwnershipConflict

        if self.state is None:
            return
        c = self.c
        try:
            owner = await asyncio.to_thread(self.state.owner, c.id)
            if owner is None:
                owner = await asyncio.to_thread(self.state.claim, c.id, self.node_name)
        except OwnershipConflict as e:
            raise PreflightError(
                f"{c.name} is owned by node {e.owner} in the cluster state, not "
                f"{self.node_name}: nothing was frozen"
            ) from e
        except ClusterStateError as e:
            raise PreflightError(
                f"the cluster state is unavailable ({e}): a migration needs it for its "
                f"commit point; nothing was frozen, {c.name} keeps running on {self.node_name}"
            ) from e
        if owner.node != self.node_name:
            raise PreflightError(
                f"{c.name} is owned by node {owner.node} in the cluster state, not "
                f"{self.node_name}: nothing was frozen"
            )
        self.owner_revision = owner.revision

    async def _open_page_connection(self, ps: dict[str, Any] | None) -> None:
        """Post-copy: connect to the destination's listener and authenticate with the
        token of its accept.  Raises ProtocolError (no connection offered), PreflightError
        (it cannot be reached)."""
        token = ps.get("token") if ps else None
        if (
            not isinstance(token, bytes)
            or len(token) != lazy_conn.LAZY_TOKEN_BYTES
            or self.page_server is None
        ):
            raise ProtocolError(
                f"{self.destination} accepted a post-copy without a page connection for it"
            )
        try:
            self.ps_sock = await asyncio.to_thread(lazy_conn.connect, *self.page_server, token)
        except OSError as e:
            raise PreflightError(
                f"cannot open the post-copy page connection to {self.destination} at "
                f"{self.page_server[0]}:{self.page_server[1]} ({e.strerror or e}): is that "
                f"port reachable from {self.node_name}? nothing was frozen"
            ) from e

    async def _precopy(self) -> None:
        """Layers the destination lacks, then the upperdir, while the container runs; wait
        until all of it arrived whole (a broken pre-copy is refused before any freeze)."""
        from runtime.image.transfer import export_layer

        c, sender = self.c, self.link.sender
        for layer in self.missing_layers:
            tar = self.work / f"layer-{layer}.tar"
            await asyncio.to_thread(export_layer, self.rt.images, layer, tar)
            await sender.send_file(tar, f"layers/{layer}.tar", "layer")
            tar.unlink()
        self.before = await asyncio.to_thread(rootfs_diff.snapshot, c.upperdir)
        base = self.work / "rootfs-base.tar"
        await asyncio.to_thread(rootfs_diff.write, c.upperdir, base, True)
        total = base.stat().st_size
        await sender.send_file(
            base,
            "rootfs-base.tar",
            "rootfs",
            lambda n: self.progress("precopy", sender.bytes_sent, total),
        )
        await sender.wait_files_ok()

    async def _freeze(self) -> None:
        """Freeze the cgroup ourselves: CRIU polls the freezer every 100 ms, we poll from
        1 ms (it then finds the cgroup FROZEN at once).  The downtime starts here.  Within
        the freeze limit (CgroupError past it, the cgroup thawed again).  Not when a task
        is stopped (:func:`migrate.checkpoint.stopped_tasks`): CRIU then freezes by ptrace
        in the dump."""
        plan = DumpPlan.of(self.c)
        await asyncio.to_thread(netmove.lock_source, self.c)  # bridged: its port goes down
        self.t_freeze = time.monotonic()
        self.plan = await asyncio.to_thread(
            plan.freeze, self.c, self.limits.freeze_s(self.memory_bytes)
        )

    async def _dump(self) -> None:
        """CRIU dumps the frozen tasks (the pages to the page server, or kept for the lazy
        transfer) and holds them at post-dump, answered by :attr:`verdict`."""
        loop = asyncio.get_running_loop()

        def on_notify(n: criu.Notify) -> bool:
            if n.script == "post-dump":
                # held: the dump's limit is over; the phases that follow have their own,
                # and the roll back ends CRIU if it does not resume the tasks in time
                self.criu.disarm()
                loop.call_soon_threadsafe(self.post_dump.set)
                return self.verdict.result()
            return True

        lazy = self.ps_sock is not None
        opts = self.plan.options(
            self.images,
            page_server=None if lazy else self.page_server,
            tls=self.ps_tls,
            lazy_pages=lazy,
            ps_socket=self.ps_sock.fileno() if self.ps_sock else None,
        )
        limit = self.limits.dump_s(self.memory_bytes) - (time.monotonic() - self.t_freeze)
        self.criu.arm(
            max(limit, 0.0),
            f"the dump did not finish within {self.limits.dump_s(self.memory_bytes):.0f} s of "
            f"the freeze ({self.memory_bytes >> 20} MiB of memory; ${SCALE_ENV} scales the "
            "limit): its CRIU was killed",
        )
        self.dump_task = asyncio.ensure_future(
            asyncio.to_thread(criu.dump, opts, on_notify, self.criu)
        )
        waiter = asyncio.ensure_future(self.post_dump.wait())
        # the pages go to the page server, not through this channel: tell the destination
        # we are alive, or it gives up on a dump longer than its idle limit
        alive = asyncio.ensure_future(self._keepalive())
        try:
            await asyncio.wait({self.dump_task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            alive.cancel()
        if not self.post_dump.is_set():
            waiter.cancel()
            self.dump_task.result()  # raises CriuError: the tasks were never held
            raise MigrationError("CRIU finished the dump without holding the tasks")
        # CRIU 4.2 restores an expired, unread periodic timerfd disarmed (CRIU issue 3162):
        # re-arm those in the images before they travel.
        await asyncio.to_thread(criu.rearm_expired_timerfds, self.images)

    async def _keepalive(self) -> None:
        """Send ``dumping`` every third of the peer timeout until cancelled."""
        while True:
            await asyncio.sleep(self.peer_timeout_s / 3)
            try:
                await self.link.send("dumping")
            except Exception:  # noqa: BLE001 - the dump's own end tells what happened
                # (also a closed socket: Python 3.11's wait_for can swallow the cancel
                # that ends this task, which then runs on after the link closed)
                return

    async def _transfer(self) -> None:
        """The CRIU images and the upperdir's changes, each checked on arrival, within the
        transfer limit (the link's peer timeout bounds each wait for the destination; this
        bounds the whole, a destination that acknowledges too slowly included).  Raises
        TransferError past it."""
        limit = self.limits.transfer_s(self.estimate)
        try:
            await asyncio.wait_for(self._send_images(), limit)
        except TimeoutError:
            raise TransferError(
                f"the images did not reach {self.destination} within {limit:.0f} s "
                f"({self.estimate >> 20} MiB of container; ${SCALE_ENV} scales the limit)"
            ) from None

    async def _send_images(self) -> None:
        c, sender, work = self.c, self.link.sender, self.work
        delta = work / "rootfs-delta.tar"
        self.deleted, changed = await asyncio.to_thread(
            rootfs_diff.write_delta, c.upperdir, self.before, delta
        )
        small, large = image_pack.split(sorted(p for p in self.images.iterdir() if p.is_file()))
        packed = work / "criu-images.tar"  # one file's round of messages, not twenty
        await asyncio.to_thread(image_pack.pack, small, packed)
        ctr_log = c.dir / LOG
        # nothing changed since the pre-copy (the usual case): no file, no tar to run
        extra = [(delta, "rootfs-delta.tar", "rootfs")] if changed else []
        if ctr_log.exists():  # the container's output so far travels with it
            extra.append((ctr_log, LOG, "log"))
        todo = [
            (packed, "criu-images.tar", "criu-pack"),
            *((p, f"criu/{p.name}", "criu") for p in large),
            *extra,
        ]
        total = sum(p.stat().st_size for p, _, _ in todo)
        sent0 = sender.bytes_sent
        for p, name, kind in todo:
            await sender.send_file(
                p, name, kind, lambda n: self.progress("transfer", sender.bytes_sent - sent0, total)
            )
        await sender.wait_files_ok()

    async def _restore(self) -> None:
        """The destination restores and holds its tasks at pre-resume, then says ready;
        within the restore limit, which it is told (``dump.restore_limit_s``)."""
        restore_s = round(self.limits.restore_s(self.memory_bytes), 3)
        await self.link.send(
            "restore",
            stdio=self.plan.stdio,
            volumes=list(self.plan.volumes),
            deleted=self.deleted,
            netns="external" if self.plan.netns else "",
            dump={
                "freeze_to_post_dump_s": self.rep.phases_s.get("dump", 0.0),
                "restore_limit_s": restore_s,
            },
        )
        # the destination gives up at that limit and says so: wait a little longer
        ready = await self.link.expect(
            "ready",
            timeout_s=restore_s + self.peer_timeout_s,
            silent_s=self._restoring_silence_s(),
        )
        self.rep.restore_steps_s = {
            str(k): float(v)
            for k, v in dict(ready.get("steps_s") or {}).items()
            if isinstance(v, int | float)
        }

    async def _commit(self) -> None:
        """The point of no return: the owner key moves to the destination (compare-and-swap
        at the preflight's revision), the durable record is written, then CRIU kills our
        frozen copy (it can never run again).

        Raises MigrationError (rolled back by the caller: the copy here resumes, the
        destination discards its own) when the compare-and-swap fails or the store cannot
        answer.  Once the swap succeeded the store has decided: the verdict is given even
        if the local record cannot be written (the outcome query then asks the store)."""
        if self.state is None:
            self._record_migrated()
            self.verdict.set_result(True)
        else:
            await self._transfer_ownership(self.state)
        # bridged: the source's port, down since the freeze, goes (and its FDB entry)
        await asyncio.to_thread(netmove.remove_source_port, self.c)

    async def _transfer_ownership(self, state: ClusterState) -> None:
        """The compare-and-swap of the owner key, then the record; the verdict is given
        once the swap succeeded.  Raises MigrationError when the swap fails."""
        from migrate.cluster_state import ClusterStateError

        try:
            new = await asyncio.to_thread(
                state.transfer,
                self.c.id,
                self.node_name,
                self.destination,
                self.owner_revision,
            )
        except ClusterStateError as e:
            raise MigrationError(
                f"the commit's ownership move to {self.destination} failed ({e})"
            ) from e
        self.rep.owner_revision = new.revision
        try:
            self._record_migrated()
        finally:
            self.verdict.set_result(True)

    def _restoring_silence_s(self) -> float | None:
        """Seconds without a ``restoring`` beat after which the destination is taken for
        dead while it restores or resumes; None: it does not beat (older service)."""
        if not self.restoring_beats:
            return None
        return max(self.peer_timeout_s, BEATS_MISSED * HEARTBEAT_S)

    def _record_migrated(self) -> None:
        c = self.c
        c.state.status = S.MIGRATED
        c.state.migrated_to = self.destination
        c.state.migration = MigrationRecord(
            self.session, MigrationDirection.OUTGOING, self.destination, time.time()
        )
        c.save()

    async def _resume(self) -> None:
        """Tell the destination to resume (it decides from our record if this is lost),
        while CRIU kills our frozen copy (seconds for a large one: not worth waiting for)."""
        try:
            await self.link.send("resume")
            await self.link.expect(
                "resumed",
                timeout_s=max(60.0, self.peer_timeout_s),
                silent_s=self._restoring_silence_s(),
            )
            self.rep.resume_confirmed = True
        except MigrationError as e:
            log.warning("migration.resume_unconfirmed", session=self.session, error=str(e))
        self.rep.downtime_s = round(time.monotonic() - self.t_freeze, 6)

    async def _finish_dump(self) -> None:
        """Wait for our CRIU to end (post-copy: once it has served every page)."""
        assert self.dump_task is not None
        try:
            await self.dump_task
        except Exception as e:  # noqa: BLE001 - after the commit: the cleanup kills what is left
            log.error("migration.source_dump_finish", session=self.session, error=str(e))
            if self.ps_sock is not None:
                self.rep.postcopy_error = (
                    f"the memory pages did not all reach {self.destination} "
                    f"({e}); it stops the container rather than run it "
                    "with pages missing"
                )

    async def _postcopy(self) -> None:
        """The rest of the pages go to the destination as it faults them in; this phase's
        time (the time to the last page) is the report's ``postcopy_s``."""
        await self._finish_dump()

    async def _cleanup(self) -> None:
        """The tasks are dead: drop the cgroup, mount and rootfs, keep the record that says
        where the container went."""
        if self.dump_task is not None and not self.dump_task.done():
            await self._finish_dump()
        if self.ps_sock is not None:
            self.rep.page_server_bytes = await asyncio.to_thread(criu.lazy_pages_bytes, self.images)
        elif self.page_server:
            stats = await asyncio.to_thread(criu.dump_stats, self.images)
            self.rep.page_server_bytes = int(stats.get("pages_written", 0)) * 4096
        await asyncio.to_thread(self._cleanup_source)

    # -- roll back ------------------------------------------------------------------------
    async def _roll_back(self, reason: str, phase: SourcePhase) -> None:
        """Before the commit: CRIU resumes the tasks (post-dump answered "failure"), the
        freezer is thawed, the destination discards what it has."""
        self.link.phase = SP.ROLLED_BACK
        if not self.verdict.done():
            self.verdict.set_result(False)
        if self.dump_task is not None:
            await self._end_dump()
        await _best_effort(self.link.send("abort", reason=reason[:4000]))
        c = self.c
        if phase is not SP.PREFLIGHT or c.status is S.MIGRATING:
            try:
                c.cgroup().thaw()
            except JaulaError as e:
                log.error("migration.rollback.thaw", error=str(e))
            await asyncio.to_thread(netmove.unlock_source, c)
            c.refresh()
            if c.status is S.MIGRATING:
                c.state.status = S.RUNNING
                c.state.migration = None
                c.save()
        log.warning("migration.aborted", session=self.session, phase=phase.value, reason=reason)

    async def _end_dump(self) -> None:
        """Roll back: wait for CRIU to resume the tasks (post-dump answered "failure") and
        end, within the resume limit; past it, kill it (the kernel then lets go of the
        tasks it seized) and wait for its call to return."""
        assert self.dump_task is not None
        limit = self.limits.resume_s(self.memory_bytes)
        done, _ = await asyncio.wait({self.dump_task}, timeout=limit)
        if not done:
            log.error("migration.rollback.criu_stuck", session=self.session, limit_s=limit)
            self.criu.kill(f"CRIU did not resume the tasks within {limit:.0f} s")
            await asyncio.wait({self.dump_task}, timeout=limit)
        if self.dump_task.done() and not self.dump_task.cancelled():
            self.dump_task.exception()  # expected: post-dump answered "failure", or killed

    def _cleanup_source(self) -> None:
        c = self.c
        c.wait_monitor(10.0)
        errors = []
        try:
            c.cgroup().destroy()
        except JaulaError as e:
            errors.append(str(e))
        from runtime.rootfs.overlay import unmount

        try:
            unmount(c.rootfs)
        except JaulaError as e:
            errors.append(str(e))
        for d in ROOTFS_DIRS:
            shutil.rmtree(c.dir / d, ignore_errors=True)
        if errors:
            log.error("migration.cleanup", errors=errors)
