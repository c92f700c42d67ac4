"""The two halves of a migration session: :class:`SourceSession` runs on the node that has
the container, :class:`DestinationSession` on the node that receives it.  Message sequence
and the commit point: see :mod:`migrate.protocol` and DESIGN.md "The migration handoff".

Strategy ``cold`` (stop-and-copy), in phases::

    preflight  local checks (CRIU, undumpable objects), then the destination's (offer/accept)
    precopy    image layers the destination lacks, and the upperdir, sent while it runs
    freeze     the freezer cgroup, until every task is frozen
    dump       CRIU dump, its memory pages streamed as it goes
               to a ``criu page-server`` on the destination (TLS); CRIU holds the frozen
               tasks (post-dump)
    transfer   the other CRIU images (the small ones packed into one tar, migrate.image_pack)
               and what changed in the upperdir since the pre-copy
    restore    the destination restores and holds its tasks before they resume (pre-resume)
    commit     the source records "migrated -> destination" durably; its copy dies
    resume     the destination lets its tasks run
    cleanup    the source drops its images and rootfs

Strategy ``postcopy`` (CRIU lazy pages) changes ``dump``, ``transfer`` and what follows
the resume::

    preflight  as cold; the destination also checks userfaultfd (CRIU's lazy_pages
               feature) and listens for one TCP connection, which the source opens and
               authenticates with a token from the (CURVE) accept
    dump       CRIU dump --lazy-pages: private memory stays in CRIU's page pipes on the
               source, only the rest (and the stack and rseq pages) goes in the images
    transfer   the images, as cold: a few hundred KiB whatever the memory size
    restore    ``criu lazy-pages`` on the destination takes the restored tasks'
               userfaultfds; the restore holds at pre-resume without any page
    commit     as cold: CRIU kills the source's tasks, then serves their pages over that
               connection (TLS, the session's pinned certificates)
    resume     the tasks run on the destination, faulting pages in as they touch them
    postcopy   the rest of the pages, in the background: the time to the last page
    cleanup    as cold

Between the commit and the last page the container's memory is split between the two
nodes: if either is lost then, the container is lost (the destination kills its copy
rather than let it run on missing pages).  ``cold`` has no such window.

Downtime is measured on the source from the dump request (the freeze starts within
milliseconds) to the arrival of ``resumed``: an upper bound of the time the tasks did not
run.  The offer carries the strategy so the destination can refuse one it cannot do.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from migrate import criu, image_pack, rootfs_diff
from migrate.bundle import cpu_flags
from migrate.checkpoint import (
    _stdio_keys,
    dump_externals,
    external_netns,
    freezer_path,
    network_lock,
    preflight,
)
from migrate.errors import (
    MigrationAborted,
    MigrationError,
    PeerUnavailable,
    PreflightError,
    ProtocolError,
    TransferError,
)
from migrate.protocol import CHUNK_BYTES, decode, encode
from runtime.container import Container, Runtime
from runtime.errors import ContainerNotFound, JaulaError
from runtime.spec import ContainerConfig
from runtime.state import ContainerStatus, State, atomic_write_json
from runtime.syscalls import is_alive as sc_alive
from runtime.syscalls import proc_start_time

log = structlog.get_logger(__name__)
S = ContainerStatus

STRATEGIES = ("cold", "postcopy")
#: what this node's sessions can do beyond the protocol's first version, offered by the
#: source (``offer.features``): ``restore_steps``, the destination's restore per step in
#: ``ready``.  An older destination refuses the offer (unknown field) before anything
#: freezes; an older source offers none and gets none.
FEATURES = ("restore_steps",)
#: TCP_USER_TIMEOUT and keepalive of the post-copy page connection, both ends (seconds):
#: a peer gone silent fails the transfer instead of leaving a post-copy waiting
LAZY_CONN_TIMEOUT_S = 30
#: bytes of the token that the source sends first on its post-copy page connection
LAZY_TOKEN_BYTES = 32
#: where the CRIU images of a migration live for the seconds they exist: memory (tmpfs)
#: when it has room, so that a large dump is not also written back to disk
SCRATCH_TMPFS = Path("/dev/shm")


def scratch_dir(rt: Runtime, need_bytes: int) -> Path:
    """A directory for a session's transient files: under /dev/shm when it has room for
    ``need_bytes`` (plus a quarter), else under the state root's ``tmp``.  One per state
    root, since several nodes can share a host."""
    tag = _root_tag(rt)
    try:
        st = os.statvfs(SCRATCH_TMPFS)
        if st.f_bavail * st.f_frsize > need_bytes * 5 // 4:
            d = SCRATCH_TMPFS / f"jaula-{tag}"
            d.mkdir(mode=0o700, exist_ok=True)
            _check_private_dir(d)
            return d
    except OSError:
        pass
    return rt.root / "tmp"


def _check_private_dir(d: Path) -> None:
    """/dev/shm is writable by everyone: a directory of that name made by someone else
    (before us, after a reboot) would let them swap the images root restores, or the
    session's certificates.  Ours must be a real directory, ours, closed to others.

    Raises PreflightError naming it."""
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PreflightError(
            f"{d} is not a private directory of this user (owner uid "
            f"{st.st_uid}, mode {stat.filemode(st.st_mode)}): someone else "
            "made it; remove it, then migrate again"
        )


def _remove_scratch(d: Path) -> None:
    """Remove a session's directory, and its tmpfs parent when nothing else is in it."""
    shutil.rmtree(d, ignore_errors=True)
    if d.parent.parent == SCRATCH_TMPFS:
        try:
            d.parent.rmdir()
        except OSError:
            pass  # another session of this node is using it


def scratch_dirs(rt: Runtime) -> list[Path]:
    """Every place :func:`scratch_dir` may have used for ``rt`` (for recovery)."""
    return [SCRATCH_TMPFS / f"jaula-{_root_tag(rt)}", rt.root / "tmp"]


WINDOW_CHUNKS = 16
ProgressFn = Callable[[str, int, int], None]


@dataclass
class MigrationReport:
    """What a migration did.  Times in seconds, sizes in bytes.

    Attributes:
        phases_s: seconds per phase (preflight, precopy, freeze, dump, transfer, restore,
            commit, resume, cleanup).
        downtime_s: from the freeze on the source to the tasks resumed on the destination.
        total_s: from the request to the source cleaned up.
        bytes_sent: payload bytes streamed to the destination (files and memory pages).
        page_server_bytes: of which memory pages sent by CRIU to the destination's page
            server (0 when the destination had none and the pages went as files); for
            ``postcopy``, the pages served after the resume.
        postcopy_s: ``postcopy`` only: seconds from the resume to the last page served
            (``phases_s["postcopy"]``), the time the container ran with memory still on
            the source.
        postcopy_error: ``postcopy`` only: why the transfer of the pages failed after the
            commit (the destination then killed the container), else empty.
        restore_steps_s: the destination's ``restore`` phase in seconds per step:
            ``pages`` (the page server's last writes), ``prepare`` (checks, upperdir delta,
            image record), ``lazy_daemon`` (post-copy), ``criu_restore`` (the monitor's
            CRIU restore up to ``pre-resume``).
        resume_confirmed: the destination confirmed the tasks run (else the destination
            resumes them on its own after asking for the outcome).
    """

    session: str
    container_id: str
    name: str
    source: str
    destination: str
    strategy: str
    phases_s: dict[str, float] = field(default_factory=dict)
    downtime_s: float = 0.0
    total_s: float = 0.0
    bytes_sent: int = 0
    page_server_bytes: int = 0
    files: int = 0
    resume_confirmed: bool = False
    postcopy_s: float = 0.0
    postcopy_error: str = ""
    restore_steps_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Link:
    """The source's side of one session's messages: a reader task demultiplexing replies,
    the credit window, and send helpers."""

    def __init__(self, client: Any, session: str, peer_timeout_s: float) -> None:
        self.client = client
        self.session = session
        self.timeout = peer_timeout_s
        self.inbox: dict[str, asyncio.Queue[dict[str, Any]]] = defaultdict(asyncio.Queue)
        self.credits = WINDOW_CHUNKS
        self.credit_event = asyncio.Event()
        self.failure: MigrationError | None = None
        self.failed = asyncio.Event()
        self.last_heard = time.monotonic()
        self.bytes_sent = 0
        self.files = 0
        self._reader: asyncio.Task[None] | None = None
        self.data: Any = None  # DataSender of the bulk channel, when the destination has one
        self.data_key = b""

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read())

    def open_data_channel(self, endpoint: str, key: bytes) -> None:
        from migrate.transport import DataSender

        self.data = DataSender.connect(endpoint)
        self.data_key = key

    async def close(self) -> None:
        if self.data is not None:
            self.data.close()
            self.data = None
        if self._reader:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):  # noqa: BLE001, S110 - closing
                pass

    async def _read(self) -> None:
        while True:
            try:
                frames = await self.client.recv(timeout_s=1.0)
            except PeerUnavailable:
                continue
            try:
                msg, _ = decode(frames)
            except ProtocolError as e:
                self._fail(ProtocolError(f"the destination sent a bad message: {e}"))
                continue
            if msg.get("session") != self.session:
                continue
            self.last_heard = time.monotonic()
            if msg["type"] == "credit":
                self.credits += msg["n"]
                self.credit_event.set()
            elif msg["type"] == "error":
                self._fail(TransferError(f"the destination refused: {msg['message']}"))
            else:
                self.inbox[msg["type"]].put_nowait(msg)

    def _fail(self, err: MigrationError) -> None:
        if self.failure is None:
            self.failure = err
        self.failed.set()
        self.credit_event.set()

    async def send(self, mtype: str, payload: bytes | None = None, **fields: Any) -> None:
        await self.client.send(encode(mtype, payload, session=self.session, **fields))

    async def expect(self, mtype: str, timeout_s: float | None = None) -> dict[str, Any]:
        """The next ``mtype`` message; raises the session's failure, or PeerUnavailable
        when the destination said nothing for ``timeout_s`` (default: the peer timeout)."""
        limit = timeout_s if timeout_s is not None else self.timeout
        get = asyncio.ensure_future(self.inbox[mtype].get())
        fail = asyncio.ensure_future(self.failed.wait())
        try:
            done, _ = await asyncio.wait(
                {get, fail}, timeout=limit, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for t in (get, fail):
                if not t.done():
                    t.cancel()
        if get in done:
            return get.result()
        if self.failure:
            raise self.failure
        raise PeerUnavailable(f"the destination did not answer {mtype} within {limit:.0f} s")

    async def _take_credit(self) -> None:
        while self.credits <= 0:
            if self.failure:
                raise self.failure
            self.credit_event.clear()
            try:
                await asyncio.wait_for(self.credit_event.wait(), self.timeout)
            except TimeoutError:
                raise PeerUnavailable(
                    f"the destination stopped acknowledging data for {self.timeout:.0f} s"
                ) from None
        if self.failure:
            raise self.failure
        self.credits -= 1

    async def send_file(
        self, path: Path, name: str, kind: str, progress: Callable[[int], None] | None = None
    ) -> int:
        """Stream one file in chunks under the credit window; returns its size in bytes."""
        fid = self.files
        self.files += 1
        await self.send("file_begin", file=fid, name=name, kind=kind)
        h = hashlib.sha256()
        off = 0
        seq = 0
        with open(path, "rb") as f:  # noqa: ASYNC230 - chunk-sized reads, from memory
            while data := f.read(CHUNK_BYTES):
                await self._take_credit()
                # hashlib and AES-GCM let go of the GIL: on a worker, while the loop goes on
                if self.data is not None:
                    sealed = await asyncio.to_thread(
                        _hash_and_seal, h, self.data_key, self.session, fid, seq, off, data
                    )
                    await self.data.send(
                        encode("chunk", sealed, session=self.session, file=fid, offset=off, seq=seq)
                    )
                else:
                    await asyncio.to_thread(h.update, data)
                    await self.send("chunk", data, file=fid, offset=off)
                seq += 1
                off += len(data)
                self.bytes_sent += len(data)
                if progress:
                    progress(len(data))
        await self.send("file_end", file=fid, size=off, sha256=h.hexdigest())
        return off

    async def wait_files_ok(self) -> None:
        for _ in range(self.files - self._acked):
            await self.expect("file_ok")
            self._acked += 1

    _acked = 0


def _resolve(host: str) -> str:
    """An IP address of ``host``, IPv4 first (ZeroMQ binds a host name's IPv4 address).
    Raises OSError (socket.gaierror) when it has none."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    infos.sort(key=lambda i: i[0] != socket.AF_INET)
    return str(infos[0][4][0])


async def _best_effort(aw: Any) -> None:
    try:
        await aw
    except Exception:  # noqa: BLE001, S110 - a courtesy to a peer that may be gone
        pass


def _endpoint_host(endpoint: str) -> str:
    """``HOST`` of ``tcp://HOST:PORT`` (brackets of an IPv6 address removed)."""
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
    return host.strip("[]")


def _hash_and_seal(
    h: Any, key: bytes, session: str, file: int, seq: int, offset: int, data: bytes
) -> bytes:
    from migrate.sealing import seal_chunk

    h.update(data)
    return seal_chunk(key, session, file, seq, offset, data)


class SourceSession:
    """Migrate one container from this node to ``destination`` (a node of the cluster).

    Args:
        rt: this node's runtime; ref: the container; node_name: this node's name.
        connect: coroutine returning a connected transport Client for a node name.
        peer_timeout_s: how long the destination may stay silent before we abort.
        progress: called with (phase, done_bytes, total_bytes).
    """

    def __init__(
        self,
        rt: Runtime,
        ref: str,
        destination: str,
        node_name: str,
        connect: Callable[[str], Any],
        strategy: str = "cold",
        peer_timeout_s: float = 20.0,
        progress: ProgressFn | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise PreflightError(
                f"unknown strategy {strategy!r}: this node does {', '.join(STRATEGIES)}"
            )
        if destination == node_name:
            raise PreflightError(f"container is already on {node_name}: pick another node")
        self.rt = rt
        self.ref = ref
        self.destination = destination
        self.node_name = node_name
        self.connect = connect
        self.strategy = strategy
        self.peer_timeout_s = peer_timeout_s
        self.progress = progress or (lambda *_: None)
        self.session = secrets.token_hex(8)

    async def run(self) -> MigrationReport:
        """Do the migration.  Returns the report once the source is cleaned up.

        Raises PreflightError (nothing touched), MigrationAborted (rolled back: the container
        runs here again), ContainerError (busy, not running)."""
        t0 = time.monotonic()
        c = self.rt.get(self.ref)
        rep = MigrationReport(
            self.session, c.id, c.name, self.node_name, self.destination, self.strategy
        )
        mark = t0

        def phase(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            rep.phases_s[name] = round(now - mark, 6)
            mark = now
            self.progress(name, 0, 0)

        with c.locked(blocking=False):
            preflight(c)
            client = await self.connect(self.destination)
            link = _Link(client, self.session, self.peer_timeout_s)
            link.start()
            est = int(c.cgroup().stats().memory_bytes + _du(c.upperdir))
            work = scratch_dir(self.rt, est) / f"outgoing-{self.session}"
            work.mkdir(parents=True)
            try:
                try:
                    await self._offer(c, link, work, est)
                except MigrationError as e:  # the destination may have prepared: release it
                    await _best_effort(link.send("abort", reason=str(e)[:4000]))
                    raise
                phase("preflight")
                c.state.status = S.MIGRATING
                c.save()
                await self._run_locked(c, link, work, rep, phase)
            finally:
                await link.close()
                client.close()
                ps_sock = getattr(self, "ps_sock", None)
                if ps_sock is not None:
                    ps_sock.close()  # CRIU has its own copy while it serves
                _remove_scratch(work)
        rep.total_s = round(time.monotonic() - t0, 6)
        rep.bytes_sent = link.bytes_sent + rep.page_server_bytes
        rep.files = link.files
        log.info("migration.done", **{k: v for k, v in rep.to_json().items() if k != "phases_s"})
        return rep

    async def _offer(self, c: Container, link: _Link, work: Path, estimate: int) -> None:
        from migrate import certs
        from runtime.image.transfer import image_record

        ps_cert, cert, key = await asyncio.to_thread(certs.make_identity, work, "source")
        await link.send(
            "offer",
            container=c.config.to_json(),
            image=image_record(self.rt.images, c.config.image_id),
            criu_version=list(criu.version()),
            cpu_flags=list(cpu_flags()),
            estimate_bytes=estimate,
            strategy=self.strategy,
            source_node=self.node_name,
            bulk=["aes-256-gcm"],
            page_server=["tls"],
            ps_cert=ps_cert,
            features=list(FEATURES),
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
        self.ps_sock: socket.socket | None = None
        if accept.get("data_endpoint") and accept.get("data_key"):
            link.open_data_channel(accept["data_endpoint"], accept["data_key"])
        self.page_server: tuple[str, int] | None = None
        self.ps_tls: certs.TlsFiles | None = None
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
                cacert = certs.trust_peer(work, peer)
            except ValueError as e:
                raise ProtocolError(f"the destination's page server: {e}") from e
            if address in ("", "*", "0.0.0.0", "::"):
                address = _endpoint_host(getattr(link.client, "endpoint", ""))
            self.page_server = (address, port)
            self.ps_tls = certs.TlsFiles(cacert, cert, key)
        if self.strategy == "postcopy":
            token = ps.get("token") if ps else None
            if (
                not isinstance(token, bytes)
                or len(token) != LAZY_TOKEN_BYTES
                or self.page_server is None
            ):
                raise ProtocolError(
                    f"{self.destination} accepted a post-copy without a page connection for it"
                )
            try:
                self.ps_sock = await asyncio.to_thread(_connect_lazy, *self.page_server, token)
            except OSError as e:
                raise PreflightError(
                    f"cannot open the post-copy page connection to {self.destination} at "
                    f"{self.page_server[0]}:{self.page_server[1]} ({e.strerror or e}): is that "
                    f"port reachable from {self.node_name}? nothing was frozen"
                ) from e

    async def _run_locked(
        self,
        c: Container,
        link: _Link,
        work: Path,
        rep: MigrationReport,
        phase: Callable[[str], None],
    ) -> None:
        from runtime.image.transfer import export_layer

        committed = False
        decision = threading.Event()
        verdict = [False]
        dump_task: asyncio.Future[Any] | None = None
        t_freeze = 0.0
        try:
            # -- precopy: layers the destination lacks, then the upperdir while it runs
            for layer in self.missing_layers:
                tar = work / f"layer-{layer}.tar"
                await asyncio.to_thread(export_layer, self.rt.images, layer, tar)
                await link.send_file(tar, f"layers/{layer}.tar", "layer")
                tar.unlink()
            before = await asyncio.to_thread(rootfs_diff.snapshot, c.upperdir)
            base = work / "rootfs-base.tar"
            await asyncio.to_thread(rootfs_diff.write, c.upperdir, base, True)
            total = base.stat().st_size
            await link.send_file(
                base,
                "rootfs-base.tar",
                "rootfs",
                lambda n: self.progress("precopy", link.bytes_sent, total),
            )
            # everything sent so far arrived whole (and the upperdir is in place there)
            # before anything freezes: a broken pre-copy is refused while the tasks run
            await link.wait_files_ok()
            phase("precopy")

            # -- dump: CRIU freezes and dumps, then holds the tasks at post-dump
            loop = asyncio.get_running_loop()
            post_dump = asyncio.Event()
            images = work / "criu"
            stdio = _stdio_keys(c)
            netns = external_netns(c)

            def on_notify(n: criu.Notify) -> bool:
                if n.script == "post-dump":
                    loop.call_soon_threadsafe(post_dump.set)
                    decision.wait()
                    return verdict[0]
                return True

            t_freeze = time.monotonic()
            # Freeze first ourselves: CRIU polls the freezer every 100 ms, we poll from 1 ms
            # (it then finds the cgroup FROZEN at once).  The downtime starts here.
            await asyncio.to_thread(c.cgroup().freeze)
            phase("freeze")
            volumes = [
                {"key": f"vol{i}", "destination": m.destination, "source": m.source}
                for i, m in enumerate(c.config.mounts)
            ]
            lazy = self.ps_sock is not None
            dump_task = asyncio.ensure_future(
                asyncio.to_thread(
                    criu.dump,
                    criu.DumpOptions(
                        pid=c.state.pid,
                        images_dir=images,
                        freeze_cgroup=freezer_path(c),
                        network_lock=network_lock(c.config),
                        external=dump_externals(volumes, netns),
                        page_server=None if lazy else self.page_server,
                        tls=self.ps_tls,
                        lazy_pages=lazy,
                        ps_socket=self.ps_sock.fileno() if self.ps_sock else None,
                    ),
                    on_notify,
                )
            )
            waiter = asyncio.ensure_future(post_dump.wait())
            # the pages go to the page server, not through this channel: tell the
            # destination we are alive, or it gives up on a dump longer than its idle limit
            alive = asyncio.ensure_future(self._keepalive(link))
            try:
                await asyncio.wait({dump_task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                alive.cancel()
            if not post_dump.is_set():
                waiter.cancel()
                dump_task.result()  # raises CriuError: the tasks were never held
                raise MigrationError("CRIU finished the dump without holding the tasks")
            phase("dump")

            # CRIU 4.2 restores an expired, unread periodic timerfd disarmed (CRIU issue
            # 3162): re-arm those in the images before they travel.
            await asyncio.to_thread(criu.rearm_expired_timerfds, images)

            # -- transfer: CRIU images and the upperdir's changes
            delta = work / "rootfs-delta.tar"
            deleted, changed = await asyncio.to_thread(
                rootfs_diff.write_delta, c.upperdir, before, delta
            )
            small, large = image_pack.split(sorted(p for p in images.iterdir() if p.is_file()))
            packed = work / "criu-images.tar"  # one file's round of messages, not twenty
            await asyncio.to_thread(image_pack.pack, small, packed)
            ctr_log = c.dir / "ctr.log"
            # nothing changed since the pre-copy (the usual case): no file, no tar to run
            extra = [(delta, "rootfs-delta.tar", "rootfs")] if changed else []
            if ctr_log.exists():  # the container's output so far travels with it
                extra.append((ctr_log, "ctr.log", "log"))
            todo = [
                (packed, "criu-images.tar", "criu-pack"),
                *((p, f"criu/{p.name}", "criu") for p in large),
                *extra,
            ]
            total = sum(p.stat().st_size for p, _, _ in todo)
            sent0 = link.bytes_sent
            for p, name, kind in todo:
                await link.send_file(
                    p,
                    name,
                    kind,
                    lambda n: self.progress("transfer", link.bytes_sent - sent0, total),
                )
            await link.wait_files_ok()
            phase("transfer")

            # -- restore on the destination, held before resuming
            await link.send(
                "restore",
                stdio=stdio,
                volumes=volumes,
                deleted=deleted,
                netns="external" if netns else "",
                dump={"freeze_to_post_dump_s": rep.phases_s.get("dump", 0.0)},
            )
            ready = await link.expect("ready", timeout_s=max(120.0, self.peer_timeout_s))
            rep.restore_steps_s = {
                str(k): float(v)
                for k, v in dict(ready.get("steps_s") or {}).items()
                if isinstance(v, int | float)
            }
            phase("restore")

            # -- commit point: durable record, then our copy dies
            c.state.status = S.MIGRATED
            c.state.migrated_to = self.destination
            c.state.extra = {**c.state.extra, "session": self.session, "migrated_at": time.time()}
            c.save()
            committed = True
            verdict[0] = True
            decision.set()  # CRIU kills our frozen copy: it can never run again
            phase("commit")
        except BaseException as e:
            if committed:
                raise
            verdict[0] = False
            decision.set()
            if dump_task is not None:
                try:
                    await dump_task
                except Exception:  # noqa: BLE001, S110 - expected: post-dump answered "failure"
                    pass
            await self._roll_back(c, link, str(e))
            where = next(
                (
                    p
                    for p in ("preflight", "precopy", "freeze", "dump", "transfer", "restore")
                    if p not in rep.phases_s
                ),
                "restore",
            )
            if isinstance(e, MigrationError | JaulaError):
                raise MigrationAborted(
                    f"{e}; the container keeps running on {self.node_name}", where
                ) from e
            raise
        # -- resume on the destination (it decides from our record if this is lost), while
        # CRIU kills our frozen copy (seconds for a large one: not worth waiting for first)
        try:
            await link.send("resume")
            await link.expect("resumed", timeout_s=max(60.0, self.peer_timeout_s))
            rep.resume_confirmed = True
        except MigrationError as e:
            log.warning("migration.resume_unconfirmed", session=self.session, error=str(e))
        rep.downtime_s = round(time.monotonic() - t_freeze, 6)
        phase("resume")
        try:
            # post-copy: CRIU serves the pages until the destination has them all
            await dump_task
        except Exception as e:  # noqa: BLE001 - after the commit: the cleanup kills what is left
            log.error("migration.source_dump_finish", session=self.session, error=str(e))
            if self.ps_sock is not None:
                rep.postcopy_error = (
                    f"the memory pages did not all reach {self.destination} "
                    f"({e}); it stops the container rather than run it "
                    "with pages missing"
                )
        if self.ps_sock is not None:
            phase("postcopy")
            rep.postcopy_s = rep.phases_s["postcopy"]
        if self.ps_sock is not None:
            rep.page_server_bytes = await asyncio.to_thread(criu.lazy_pages_bytes, work / "criu")
        elif self.page_server:
            stats = await asyncio.to_thread(criu.dump_stats, work / "criu")
            rep.page_server_bytes = int(stats.get("pages_written", 0)) * 4096
        await asyncio.to_thread(self._cleanup_source, c)
        phase("cleanup")

    async def _keepalive(self, link: _Link) -> None:
        """Send ``dumping`` every third of the peer timeout until cancelled."""
        while True:
            await asyncio.sleep(self.peer_timeout_s / 3)
            try:
                await link.send("dumping")
            except MigrationError:
                return  # the dump's own end tells what happened

    async def _roll_back(self, c: Container, link: _Link, reason: str) -> None:
        try:
            await link.send("abort", reason=reason[:4000])
        except Exception:  # noqa: BLE001, S110 - best effort: the destination times out too
            pass
        try:
            c.cgroup().thaw()
        except JaulaError as e:
            log.error("migration.rollback.thaw", error=str(e))
        c.refresh()
        if c.status is S.MIGRATING:
            c.state.status = S.RUNNING
            c.save()
        log.warning("migration.aborted", session=self.session, reason=reason)

    def _cleanup_source(self, c: Container) -> None:
        """After the commit: the tasks are dead; drop the cgroup, mount and rootfs, keep the
        record that says where the container went."""
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
        for d in ("upper", "work", "merged", "checkpoint"):
            shutil.rmtree(c.dir / d, ignore_errors=True)
        if errors:
            log.error("migration.cleanup", errors=errors)


async def accept_with_token(
    lsock: socket.socket, token: bytes, session: str = "", first_bytes_timeout_s: float = 5.0
) -> socket.socket:
    """Accept connections on the listening, non-blocking ``lsock`` until one sends
    ``token`` first; return it (blocking, the token read) and close ``lsock``.  Each
    connection is checked on its own, so a stranger on the port of a post-copy can neither
    take the source's place nor hold up its connection; one that sends something else is
    closed and logged at once, one that sends nothing after ``first_bytes_timeout_s``."""
    loop = asyncio.get_running_loop()
    winner: asyncio.Future[socket.socket] = loop.create_future()
    checks: set[asyncio.Task[None]] = set()

    async def check(conn: socket.socket, peer: Any) -> None:
        kept = False
        try:
            got = b""
            async with asyncio.timeout(first_bytes_timeout_s):
                while len(got) < len(token):
                    more = await loop.sock_recv(conn, len(token) - len(got))
                    if not more:
                        break
                    got += more
            if len(got) == len(token) and secrets.compare_digest(got, token) and not winner.done():
                winner.set_result(conn)
                kept = True
        except (TimeoutError, OSError):
            pass
        finally:
            if not kept:
                log.warning("migration.lazy.stranger", session=session, peer=str(peer))
                conn.close()

    async def accept() -> None:
        while True:
            conn, peer = await loop.sock_accept(lsock)
            task = asyncio.ensure_future(check(conn, peer))
            checks.add(task)
            task.add_done_callback(checks.discard)

    acceptor = asyncio.ensure_future(accept())
    try:
        conn = await winner
        conn.setblocking(True)
        return conn
    finally:
        acceptor.cancel()
        for task in list(checks):
            task.cancel()
        lsock.close()


def _set_conn_timeouts(sock: socket.socket) -> None:
    """TCP_USER_TIMEOUT and keepalive (:data:`LAZY_CONN_TIMEOUT_S`) on a post-copy page
    connection: the side that waits for pages notices a peer that vanished."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, LAZY_CONN_TIMEOUT_S * 1000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, LAZY_CONN_TIMEOUT_S // 5))


def _connect_lazy(address: str, port: int, token: bytes) -> socket.socket:
    """Open the post-copy page connection to the destination and authenticate it with
    ``token`` (its listener drops any connection that does not start with it).  The
    socket gets 30 s send and receive limits and TCP_USER_TIMEOUT, as CRIU's own
    page-server client (patch 0005): a destination gone silent fails the transfer rather
    than hold the source's CRIU forever.  Raises OSError."""
    sock = socket.create_connection((address, port), timeout=10.0)
    try:
        sock.sendall(token)
        sock.settimeout(None)
        tmo = struct.pack("ll", LAZY_CONN_TIMEOUT_S, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tmo)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tmo)
        _set_conn_timeouts(sock)
    except OSError:
        sock.close()
        raise
    return sock


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


# ------------------------------------------------------------------------------------------
# destination

#: where held restores talk to their node service (short: unix socket paths are limited to
#: 107 bytes, and state roots can be long)
HOLD_DIR = Path("/run/jaula")


def hold_socket_path(rt: Runtime, session: str) -> Path:
    """The unix socket on which a held restore of ``session`` on ``rt``'s node waits for its
    decision (named after the node's state root too: nodes may share a host)."""
    HOLD_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    return HOLD_DIR / f"hold-{_root_tag(rt)}-{session}.sock"


def stale_hold_sockets(rt: Runtime, active: set[str]) -> list[Path]:
    """This node's hold sockets whose session is not in ``active`` (left by a crash)."""
    if not HOLD_DIR.is_dir():
        return []
    prefix = f"hold-{_root_tag(rt)}-"
    return [
        p
        for p in HOLD_DIR.glob(prefix + "*.sock")
        if p.name[len(prefix) : -len(".sock")] not in active
    ]


def _root_tag(rt: Runtime) -> str:
    import hashlib as _h

    return _h.sha1(str(rt.root.resolve()).encode()).hexdigest()[:10]


def from_root(writer: asyncio.StreamWriter) -> bool:
    """Whether the peer of a unix socket connection runs as root (SO_PEERCRED)."""
    import socket
    import struct

    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == 0


_NAME_RE = re.compile(
    r"^(criu/[A-Za-z0-9_.\-]{1,200}|layers/[0-9a-f]{64}\.tar|"
    r"criu-images\.tar|rootfs-base\.tar|rootfs-delta\.tar|ctr\.log)$"
)


def _unseal_write_hash(
    fd: int, h: Any, data: bytes, key: bytes, session: str, m: dict[str, Any]
) -> int:
    if "seq" in m:
        from migrate.sealing import open_chunk

        data = open_chunk(key, session, m["file"], m["seq"], m["offset"], data)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    h.update(data)
    return len(data)


@dataclass
class _IncomingFile:
    fd: int
    name: str
    kind: str
    size: int = 0
    h: Any = field(default_factory=hashlib.sha256)
    pending_end: dict[str, Any] | None = None


class DestinationSession:
    """The receiving half of one migration: staging files, restore held at pre-resume,
    resume on the source's word.

    Args:
        rt: this node's runtime; send: coroutine sending frames back to the source;
        offer: the decoded ``offer``; source: the source node's authenticated name.
    """

    def __init__(
        self,
        rt: Runtime,
        send: Callable[[list[bytes]], Any],
        offer: dict[str, Any],
        source: str,
        queue: asyncio.Queue[Any] | None = None,
        listen: str = "",
        max_message_bytes: int = 8 << 20,
    ) -> None:
        self.rt = rt
        self._send = send
        self.offer = offer
        self.source = source
        self.session: str = offer["session"]
        self.staging = (
            scratch_dir(rt, int(offer.get("estimate_bytes", 0))) / f"incoming-{self.session}"
        )
        self.files: dict[int, _IncomingFile] = {}
        self.cfg: ContainerConfig | None = None
        self.revive_task: asyncio.Future[Any] | None = None
        self.held = asyncio.Event()
        self.hold_decision: asyncio.Future[bool] = asyncio.get_event_loop().create_future()
        self.hold_server: asyncio.AbstractServer | None = None
        self.armed: Any = None
        self.cdir: Path | None = None
        self.finished = False
        self.t_resume = 0.0
        self.queue = queue
        self.listen = listen
        self.max_message_bytes = max_message_bytes
        self.data: Any = None  # DataReceiver of the bulk channel
        self.data_key = b""
        self._data_reader: asyncio.Task[None] | None = None
        self.early: dict[int, list[tuple[dict[str, Any], bytes]]] = {}
        self.page_server: criu.PageServer | None = None
        self.postcopy = offer.get("strategy", "cold") == "postcopy"
        self.lazy_conn: asyncio.Future[socket.socket] | None = None  # the source's, checked
        self.lazy_tls: Any = None  # certs.TlsFiles of the post-copy connection
        self.lazy_daemon: criu.LazyPagesDaemon | None = None

    async def send(self, mtype: str, **fields: Any) -> None:
        await self._send(encode(mtype, session=self.session, **fields))

    # -- offer ------------------------------------------------------------------------------
    async def on_offer(self) -> None:
        """Preflight here, before the source freezes anything; answer accept or error."""
        from migrate.bundle import Manifest
        from migrate.restore import check_compatible

        o = self.offer
        if o.get("strategy", "cold") not in STRATEGIES:
            raise PreflightError(f"this node cannot do strategy {o.get('strategy')!r}")
        cfg = ContainerConfig.from_json(o["container"])
        check_compatible(
            Manifest(
                container=o["container"],
                image=o["image"],
                criu_version=tuple(o["criu_version"]),  # type: ignore[arg-type]
                cpu_flags=tuple(o.get("cpu_flags", ())),
            )
        )
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
        need = int(o.get("estimate_bytes", 0) * 2.2) + (64 << 20)
        if free < need:
            raise PreflightError(
                f"not enough disk under {self.rt.root}: {free >> 20} MiB free, "
                f"about {need >> 20} MiB needed"
            )
        missing = [la for la in o["image"].get("layers", []) if not self.rt.images.has_layer(la)]
        self.cfg = ContainerConfig.from_json(
            {**cfg.to_json(), "cgroup_parent": self.rt.cgroup_parent}
        )
        (self.staging / "criu").mkdir(parents=True)
        (self.staging / "layers").mkdir()
        await asyncio.to_thread(self._make_container_dir, self.cfg)
        bulk = {}
        if (
            "aes-256-gcm" in o.get("bulk", [])
            and self.listen.startswith("tcp://")
            and self.queue is not None
        ):
            from migrate.sealing import new_key
            from migrate.transport import DataReceiver

            self.data = DataReceiver.bind(self.listen, self.max_message_bytes)
            self.data_key = new_key()
            self._data_reader = asyncio.ensure_future(self._read_data())
            bulk = {"data_endpoint": self.data.endpoint, "data_key": self.data_key}
        # Start the monitor now, waiting, and accept once it is ready: its start-up is then
        # not part of the downtime, even when the container is small and the host busy.
        from migrate.restore import RESTORER

        arg = json.dumps(
            {
                "bundle": str(self.staging),
                "hold": str(self.hold_path),
                "params": str(self.staging / "restore.json"),
            }
        )
        self.armed = await asyncio.to_thread(self.rt.arm, self.cfg.id, RESTORER, arg)
        ps = await self._listen_lazy() if self.postcopy else self._start_page_server()
        await asyncio.to_thread(self.rt.wait_armed, self.armed)
        await self.send("accept", missing_layers=missing, **bulk, **ps)

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
        host = _endpoint_host(self.listen)
        try:
            # `criu page-server --address` takes an IP address, not a host name
            address = "0.0.0.0" if host == "*" else _resolve(host)
            tls, pem = certs.session_tls(self.staging, "destination", o["ps_cert"])
            self.page_server = criu.PageServer(self.staging / "criu", address, tls, self.staging)
        except (ValueError, JaulaError, OSError) as e:  # socket.gaierror is an OSError
            log.warning("migration.page_server.unavailable", session=self.session, error=str(e))
            return {}
        # the address it is bound to (a wildcard: the source uses the host it reached us on)
        return {
            "page_server": {
                "address": host if host == "*" else address,
                "port": self.page_server.port,
                "cert": pem,
            }
        }

    async def _listen_lazy(self) -> dict[str, Any]:
        """Post-copy: listen for the source's page connection; returns the ``accept``
        fields that describe it.  The connection is kept when its first bytes are the token
        sent here over CURVE; any other is dropped and the wait goes on, so a stranger on
        the port changes nothing.

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
        host = _endpoint_host(self.listen)
        address = "0.0.0.0" if host == "*" else _resolve(host)
        self.lazy_tls, pem = certs.session_tls(self.staging, "destination", o["ps_cert"])
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        lsock = socket.socket(family, socket.SOCK_STREAM)
        try:
            lsock.bind((address, 0))
            lsock.listen(8)
            lsock.setblocking(False)
        except OSError:
            lsock.close()
            raise
        token = secrets.token_bytes(LAZY_TOKEN_BYTES)
        self.lazy_conn = asyncio.ensure_future(accept_with_token(lsock, token, self.session))
        return {
            "page_server": {
                "address": host if host == "*" else address,
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

    @property
    def hold_path(self) -> Path:
        return hold_socket_path(self.rt, self.session)

    # -- files ------------------------------------------------------------------------------
    async def on_file_begin(self, m: dict[str, Any]) -> None:
        name = m["name"]
        if not _NAME_RE.match(name) or m["file"] in self.files:
            raise ProtocolError(f"unexpected file {name!r} (#{m['file']}) in the session")
        fd = os.open(
            self.staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        self.files[m["file"]] = _IncomingFile(fd, name, m["kind"])
        for cm, data in self.early.pop(m["file"], []):
            await self.on_chunk(cm, data)

    async def on_chunk(self, m: dict[str, Any], data: bytes) -> None:
        f = self.files.get(m["file"])
        if f is None and "seq" in m and m["file"] >= 0:
            # the bulk channel overtook file_begin on the control channel: keep it for then
            self.early.setdefault(m["file"], []).append((m, data))
            return
        if f is None or f.fd < 0 or m["offset"] != f.size:
            raise ProtocolError(
                f"chunk at offset {m['offset']} of file #{m['file']} is out of order"
            )
        if "seq" in m and not self.data_key:
            raise ProtocolError("a sealed chunk in a session without a bulk channel")
        if "seq" not in m and self.data_key:
            raise ProtocolError("an unsealed chunk in a session with a bulk channel")
        await self.send("credit", n=1)  # the write below is ours: the window moves on
        try:
            n = await asyncio.to_thread(
                _unseal_write_hash, f.fd, f.h, data, self.data_key, self.session, m
            )
        except OSError as e:
            raise TransferError(f"cannot write {f.name} here: {e.strerror}") from e
        f.size += n
        if f.pending_end is not None:  # file_end came first, on the other channel
            await self.on_file_end(f.pending_end)

    async def on_file_end(self, m: dict[str, Any]) -> None:
        f = self.files.get(m["file"])
        if f is None or f.fd < 0:
            raise ProtocolError(f"file_end for unknown file #{m['file']}")
        if f.size < m["size"] and self.data is not None:
            f.pending_end = m  # chunks still on their way on the bulk channel
            return
        f.pending_end = None
        os.close(f.fd)
        f.fd = -1
        if f.size != m["size"] or f.h.hexdigest() != m["sha256"]:
            raise TransferError(
                f"{f.name} arrived corrupt: {f.size} bytes with sha256 "
                f"{f.h.hexdigest()[:16]}..., the source sent {m['size']} bytes "
                f"with {m['sha256'][:16]}..."
            )
        if f.name == "rootfs-base.tar" and self.cdir is not None:
            # Unpack the pre-copied upperdir now, while the source still runs: only the
            # delta is left for the downtime.
            await asyncio.to_thread(rootfs_diff.extract, self.staging / f.name, self.cdir / "upper")
            os.unlink(self.staging / f.name)
        if f.name == "criu-images.tar":  # the small CRIU images, packed (migrate.image_pack)
            await asyncio.to_thread(
                image_pack.unpack, self.staging / f.name, self.staging / "criu", f.size
            )
            os.unlink(self.staging / f.name)
        if f.kind == "layer":
            from runtime.image.transfer import import_layer

            layer = f.name.split("/")[1].removesuffix(".tar")
            await asyncio.to_thread(import_layer, self.rt.images, layer, self.staging / f.name)
            os.unlink(self.staging / f.name)
        await self.send("file_ok", file=m["file"])

    # -- restore, held ------------------------------------------------------------------------
    async def on_restore(self, m: dict[str, Any]) -> None:
        from runtime.image.transfer import register_image

        assert self.cfg is not None and self.armed is not None
        if any(f.fd >= 0 for f in self.files.values()):
            raise ProtocolError("restore before every file was complete")
        from migrate.bundle import Bundle
        from migrate.restore import check_pipes

        t0 = mark = time.monotonic()
        steps: dict[str, float] = {}

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
        atomic_write_json(
            self.staging / "restore.json",
            {
                "stdio": m["stdio"],
                "volumes": m["volumes"],
                "netns": m.get("netns", ""),
                "lazy": self.postcopy,
            },
        )
        step("prepare")
        if self.postcopy:
            await self._start_lazy_daemon()
            step("lazy_daemon")
        self.hold_server = await asyncio.start_unix_server(self._on_hold, path=str(self.hold_path))
        from migrate.restore import RESTORER

        armed, self.armed = self.armed, None
        self.revive_task = asyncio.ensure_future(
            asyncio.to_thread(self.rt.revive, self.cfg.id, RESTORER, "", armed)
        )
        held = asyncio.ensure_future(self.held.wait())
        await asyncio.wait({self.revive_task, held}, return_when=asyncio.FIRST_COMPLETED)
        if not self.held.is_set():
            held.cancel()
            self.revive_task.result()  # raises the restore's error; on_abort cleans up
            raise MigrationError("the restore finished without being held")
        step("criu_restore")
        if self.lazy_daemon is not None and self.lazy_daemon.proc.poll() is not None:
            raise MigrationError(
                f"the lazy-pages daemon exited before the commit (see {self.lazy_daemon.log_path})"
            )
        extra = {"steps_s": steps} if "restore_steps" in self.offer.get("features", []) else {}
        await self.send("ready", restore_s=round(time.monotonic() - t0, 6), **extra)

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
            _set_conn_timeouts(conn)
            self.lazy_daemon = await asyncio.to_thread(
                criu.LazyPagesDaemon, self.staging / "criu", self.cdir, conn.fileno(), self.lazy_tls
            )
        finally:
            conn.close()  # the daemon has its own copy

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
                if c.state.pid and sc_alive(c.state.pid, c.state.pid_start_time):
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
                    c.state.extra = {
                        **c.state.extra,
                        "postcopy": {
                            "session": self.session,
                            "from": self.source,
                            "daemon_pid": pid,
                            "daemon_start": proc_start_time(pid),
                        },
                    }
                else:
                    c.state.extra = {k: v for k, v in c.state.extra.items() if k != "postcopy"}
                c.save()
        except (JaulaError, OSError) as e:
            log.warning("migration.postcopy.mark", session=self.session, error=str(e))

    def _make_container_dir(self, cfg: ContainerConfig) -> Path:
        store = self.rt.store
        with store.lock():
            cdir = store.containers_dir / cfg.id
            if cdir.exists():  # an old record of this container having left this node
                shutil.rmtree(cdir)
            cdir = store.create_dir(cfg.id)
            atomic_write_json(cdir / "config.json", cfg.to_json())
            atomic_write_json(
                cdir / "state.json",
                State(
                    status=S.MIGRATING, extra={"session": self.session, "from": self.source}
                ).to_json(),
            )
        self.cdir = cdir
        return cdir

    def _fill_container(self, m: dict[str, Any]) -> Path:
        cdir = self.cdir
        assert cdir is not None and (cdir / "upper").is_dir(), "the pre-copy never arrived"
        rootfs_diff.apply_deleted(cdir / "upper", [str(p) for p in m["deleted"]])
        if (self.staging / "rootfs-delta.tar").exists():  # absent: nothing changed
            rootfs_diff.extract_over(self.staging / "rootfs-delta.tar", cdir / "upper")
        if (self.staging / "ctr.log").exists():
            shutil.move(self.staging / "ctr.log", cdir / "ctr.log")  # maybe across filesystems
        return cdir

    async def _on_hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not from_root(writer):
                return
            line = await reader.readline()
            if not line.startswith(b"held"):
                return
            self.held.set()
            ok = await self.hold_decision
            writer.write(b"resume\n" if ok else b"abort\n")
            await writer.drain()
        finally:
            writer.close()

    async def on_resume(self) -> None:
        if not self.held.is_set() or self.revive_task is None:
            raise ProtocolError("resume before the restore was held")
        t0 = time.monotonic()
        if self.lazy_daemon is not None and self.lazy_daemon.proc.poll() is not None:
            # committed on the source, but the pages cannot come: never run on zero-fill
            log.error(
                "migration.postcopy.daemon_gone",
                session=self.session,
                log=str(self.lazy_daemon.log_path),
            )
            self.hold_decision.set_result(False)
            with contextlib.suppress(Exception):
                await self.revive_task
            raise MigrationError(
                f"the lazy-pages daemon on this node died before the "
                f"resume: the container's memory cannot arrive, so it was "
                f"not resumed (see {self.lazy_daemon.log_path})"
            )
        self.hold_decision.set_result(True)
        await self.revive_task
        await self.send("resumed", resume_s=round(time.monotonic() - t0, 6))
        if self.lazy_daemon is not None:
            # (after the answer: the source measures the downtime up to it)
            await asyncio.to_thread(self._mark_postcopy, True)
            await self._await_postcopy()
        await self.finish()  # after the answer: removing a large staging dir takes a while

    async def on_abort(self, reason: str) -> None:
        """Discard the held copy (or whatever arrived): the source keeps the container."""
        log.warning("migration.incoming.aborted", session=self.session, reason=reason)
        if not self.hold_decision.done():
            self.hold_decision.set_result(False)
        if self.revive_task is not None:
            try:
                await self.revive_task
            except Exception:  # noqa: BLE001, S110 - expected: the restore was refused
                pass
        if self.armed is not None:
            armed, self.armed = self.armed, None
            await asyncio.to_thread(self.rt.disarm, armed)
        if self.cdir is not None:
            try:
                c = Container(self.rt, self.cdir.name)
                if c.status is S.MIGRATING:
                    await asyncio.to_thread(shutil.rmtree, self.cdir, True)
            except (FileNotFoundError, ContainerNotFound, JaulaError):
                pass
        await self.finish()

    async def finish(self) -> None:
        self.finished = True
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
        for f in self.files.values():
            if f.fd >= 0:
                os.close(f.fd)
                f.fd = -1
        if self.hold_server is not None:
            self.hold_server.close()
            self.hold_path.unlink(missing_ok=True)
        await asyncio.to_thread(_remove_scratch, self.staging)
