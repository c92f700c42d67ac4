"""The node migration service: one per node, ``jaula node serve --config FILE``.

It binds a ROUTER socket (CURVE, ZAP allowlist: :mod:`migrate.transport`) and serves:
- operators (and the balancer): ping, ps, inspect, logs, exec, stop, rm, migrate, metrics
  (:mod:`migrate.metrics`: sampled from its first request on);
- peer nodes: migration sessions (this node as destination) and outcome queries.

Requests run as concurrent tasks; the messages of one incoming session are handled in order
by that session's own task.  A malformed or unknown message gets an ``error`` reply; the
service never crashes on input.  Who a peer is comes from its authenticated key only.

On start the service opens the cluster state (``[state]`` of the cluster file) and
reconciles what a crash may have left (:meth:`NodeService.recover`):
- outgoing containers still marked ``migrating``: if the store names the destination as
  the owner, the commit happened (the service died between the compare-and-swap and its
  record): they are ``migrated`` and a copy left running here is killed; else CRIU resumed
  them when the service died before the commit, so they are ``running`` again;
- incoming containers whose restore was held at pre-resume: the source's durable record
  decides (``outcome``), never a timeout alone; the rest of an unfinished incoming session
  is removed.
Then it registers its membership and reconciles its containers' ownership with the store
(:mod:`migrate.membership`), renews the lease while it serves, and gives it up on a clean
stop.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from migrate.cluster_state import ClusterState, ClusterStateError, StateUnavailable
from migrate.config import ClientConfig, Cluster, NodeConfig, PeerKind
from migrate.destination import DestinationSession
from migrate.errors import MigrationError, NodeConfigError, PeerUnavailable, ProtocolError
from migrate.hold import HoldServer, given_decision, hold_socket_path, stale_hold_sockets
from migrate.membership import Membership, NodeOwnership, open_node_state, write_node_file
from migrate.net_leases import ClusterLeases
from migrate.protocol import (
    HEARTBEAT_S,
    NODE_MESSAGES,
    OPERATOR_REQUESTS,
    STATE_CHANGING,
    MessageType,
    decode,
    encode,
    error,
    request_id,
)
from migrate.report import MigrationReport
from migrate.scratch import discard_session_dir, lazy_daemon, scratch_dirs
from migrate.source import SourceSession
from migrate.transport import Client, Incoming, Server
from runtime.container import Container, Runtime
from runtime.errors import JaulaError
from runtime.logs import read_log
from runtime.poll import await_for
from runtime.state import ContainerStatus
from runtime.store import CRIU_LOGS_DIR, LOG

if TYPE_CHECKING:
    from migrate.metrics import MetricsSampler
    from migrate.prometheus import NodeExporter

log = structlog.get_logger(__name__)
S = ContainerStatus

M = MessageType
#: seconds a state-changing request's id is remembered: the same id from the same peer
#: within it is a replay, refused (issue 15); at most REPLAY_MAX ids are kept
REPLAY_WINDOW_S = 600.0
REPLAY_MAX = 100_000
#: an operator request's handler: (requester, message, reply fields) -> the reply's frames
Handler = Callable[[Incoming, dict[str, Any], dict[str, Any]], Awaitable[list[bytes]]]


def container_summary(c: Container) -> dict[str, Any]:
    """What ``ps`` shows of a container, JSON-able."""
    return {
        "id": c.id,
        "name": c.name,
        "image": c.config.image_ref,
        "status": c.status.value,
        "pid": c.state.pid,
        "created": c.config.created_at,
        "command": " ".join(c.config.args),
        "exit_code": c.state.exit_code,
        "migrated_to": c.state.migrated_to or "",
    }


class NodeService:
    """One node's service.

    Args:
        cfg / cluster: this node's configuration and the cluster it belongs to.
        peer_timeout_s: how long a peer may stay silent in a session before it is aborted.
    """

    def __init__(self, cfg: NodeConfig, cluster: Cluster, peer_timeout_s: float = 20.0) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.peer_timeout_s = peer_timeout_s
        self.rt = Runtime(cfg.state_root, cgroup_parent=cfg.cgroup_parent)
        self.rt.store.ensure()
        # each node keeps the logs of its failed CRIU actions under its own state root (the
        # restorer, in the container's monitor, learns the place from the environment)
        os.environ["JAULA_CRIU_LOG_DIR"] = str(self.rt.root / CRIU_LOGS_DIR)
        self.client_cfg = ClientConfig.from_node(cfg)
        self.incoming: dict[str, tuple[DestinationSession, asyncio.Queue[Any]]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.server: Server | None = None
        #: this run of the service: a client that sees another one in ``pong`` knows the
        #: service restarted, and that what it asked the old one will never be answered
        self.incarnation = secrets.token_hex(8)
        #: (peer, request id) -> when it arrived (loop time), for the replay window
        self.seen_ids: dict[tuple[str, str], float] = {}
        self.sampler: MetricsSampler | None = None  # started by the first metrics request
        #: the cluster state, opened by :meth:`serve` (None before)
        self.state: ClusterState | None = None
        #: the outgoing sessions running now (their own record decides their outcome)
        self.outgoing: dict[str, SourceSession] = {}
        self.exporter: NodeExporter | None = None  # with metrics_port (migrate.prometheus)

    # -- life -------------------------------------------------------------------------------
    async def serve(self, started: asyncio.Event | None = None) -> None:
        """Lock the state root, bind, recover, then serve until cancelled.

        Raises NodeConfigError when another service already serves this state root (two
        would both act on its containers)."""
        lock = self._lock_state_root()
        try:
            try:
                self.state = await asyncio.to_thread(open_node_state, self.cfg, self.cluster)
            except StateUnavailable as e:
                raise NodeConfigError(
                    f"node {self.cfg.name} cannot open the cluster state ({e}): it reconciles "
                    "its containers with it before it serves; start the store (or fix [state] "
                    "in the cluster file) and start the node again"
                ) from e
            self.rt.admission = NodeOwnership(self.state, self.cfg.name)
            self.rt.leases = ClusterLeases(self.state)  # IP leases cluster-wide (issue 12)
            if self.cfg.metrics_port is not None:
                from migrate.prometheus import NodeExporter

                self.exporter = NodeExporter(self.cfg.name)
                self.exporter.serve(
                    self.cfg.metrics_port, self.cfg.metrics_host, lambda: self._sampler().report()
                )
            await self._serve(started)
        finally:
            if self.exporter is not None:
                self.exporter.close()
            os.close(lock)

    def _lock_state_root(self) -> int:
        path = self.rt.root / "node.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise NodeConfigError(
                f"another node service (pid {holder}) already serves the "
                f"state root {self.rt.root}: one service per state root; "
                "stop it first, or give this node its own state_root"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    async def _serve(self, started: asyncio.Event | None) -> None:
        assert self.state is not None
        membership = Membership(self.rt, self.state, self.cfg.name, self.cluster.state.ttl_s)
        self.server = await Server.start(self.cfg, self.cluster)
        keeper: asyncio.Task[None] | None = None
        try:
            await self.recover()
            await asyncio.to_thread(membership.join)
            if self.cfg.source is not None:
                write_node_file(self.rt.root, self.cfg.name, self.cfg.source)
            keeper = asyncio.create_task(membership.keep())
            log.info("node.serving", node=self.cfg.name, listen=self.cfg.listen)
            if started is not None:
                started.set()
            while True:
                inc = await self.server.recv()
                try:
                    await self._dispatch(inc)
                except Exception as e:  # noqa: BLE001 - one bad message never stops the node
                    log.error("node.dispatch_failed", peer=inc.peer.name, error=str(e))
        finally:
            if keeper is not None:
                keeper.cancel()
            for t in list(self.tasks):
                t.cancel()
            await self.server.close()
            await asyncio.to_thread(membership.leave)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def reply(self, inc: Incoming, frames: list[bytes]) -> None:
        assert self.server is not None
        try:
            await self.server.send(inc.routing_id, frames)
        except Exception as e:  # noqa: BLE001 - the peer went away: nothing to tell it
            log.info("node.reply_dropped", peer=inc.peer.name, error=str(e))

    async def connect(self, node: str) -> Client:
        """A client to another node of the cluster, with this node's key."""
        return await Client.for_peer(self.client_cfg, self.cluster, node)

    # -- dispatch ---------------------------------------------------------------------------
    async def _dispatch(self, inc: Incoming) -> None:
        """Route one message: operator requests run as tasks of their own; a node's offer
        starts a session; a session's messages go to its queue, in order; outcome queries
        are answered from the durable records.  Who may send what comes from the sender's
        authenticated key (:data:`migrate.protocol.NODE_MESSAGES`)."""
        try:
            msg, payload = decode(inc.frames)
        except ProtocolError as e:
            log.warning("node.bad_message", peer=inc.peer.name, error=str(e))
            rid = request_id(inc.frames)
            await self.reply(inc, error("bad_message", str(e), **({"id": rid} if rid else {})))
            return
        mtype = M(msg["type"])
        if mtype in OPERATOR_REQUESTS and self._replayed(inc, msg):
            await self.reply(
                inc,
                error(
                    "replay",
                    f"{mtype}.id: {msg['id']!r} was already used by {inc.peer.name} in the "
                    f"last {REPLAY_WINDOW_S:.0f} s: a resent request is refused; send a new id",
                    id=msg["id"],
                ),
            )
        elif mtype in OPERATOR_REQUESTS:
            self._spawn(self._request(inc, msg, msg.get("id")))
        elif mtype in NODE_MESSAGES and inc.peer.kind is not PeerKind.NODE:
            await self.reply(
                inc,
                error("forbidden", f"{mtype} is for nodes, and {inc.peer.name} is an operator"),
            )
        elif mtype is M.OFFER:
            await self._offer(inc, msg)
        elif mtype is M.OUTCOME:
            await self.reply(inc, self._outcome_reply(msg["session"]))
        elif mtype in NODE_MESSAGES:
            entry = self.incoming.get(msg["session"])
            if entry is None:
                await self.reply(
                    inc,
                    error(
                        "unknown_session", f"no session {msg['session']}", session=msg["session"]
                    ),
                )
                return
            entry[1].put_nowait((msg, payload))
        else:
            await self.reply(
                inc,
                error("unexpected", f"{mtype} is not a request", session=msg.get("session", "")),
            )

    def _replayed(self, inc: Incoming, msg: dict[str, Any]) -> bool:
        """Whether ``msg`` is a state-changing request whose id this peer already used
        within REPLAY_WINDOW_S (else its id is remembered).  The protocol requires such
        requests to carry a unique string id (:data:`migrate.protocol.STATE_CHANGING`)."""
        if msg["type"] not in STATE_CHANGING:
            return False
        now = asyncio.get_running_loop().time()
        key = (inc.peer.name, msg["id"])
        when = self.seen_ids.get(key)
        if when is not None and now - when < REPLAY_WINDOW_S:
            return True
        if len(self.seen_ids) >= REPLAY_MAX:  # drop the expired, then the oldest
            for k in [k for k, t in self.seen_ids.items() if now - t >= REPLAY_WINDOW_S]:
                del self.seen_ids[k]
            while len(self.seen_ids) >= REPLAY_MAX:
                del self.seen_ids[next(iter(self.seen_ids))]
        self.seen_ids[key] = now
        return False

    async def _request(self, inc: Incoming, msg: dict[str, Any], rid: Any) -> None:
        extra = {"id": rid} if rid is not None else {}
        try:
            frames = await self._handle(inc, msg, extra)
        except JaulaError as e:
            frames = encode("error", code=type(e).__name__, message=str(e), **extra)
        except Exception as e:
            log.exception("node.request_failed", type=msg["type"])
            frames = encode("error", code="internal", message=f"{type(e).__name__}: {e}", **extra)
        await self.reply(inc, frames)

    async def _handle(
        self, inc: Incoming, msg: dict[str, Any], extra: dict[str, Any]
    ) -> list[bytes]:
        """Answer one operator request (the table below: one handler per request)."""
        handlers: dict[MessageType, Handler] = {
            M.PING: self._ping,
            M.PS: self._ps,
            M.INSPECT: self._inspect,
            M.LOGS: self._logs,
            M.EXEC: self._exec,
            M.STOP: self._stop,
            M.RM: self._rm,
            M.MIGRATE: self._migrate_request,
            M.METRICS: self._metrics,
        }
        handler = handlers.get(M(msg["type"]))
        if handler is None:
            raise ProtocolError(f"unhandled request {msg['type']}")
        return await handler(inc, msg, extra)

    async def _ping(self, inc: Incoming, msg: dict[str, Any], extra: dict[str, Any]) -> list[bytes]:
        running = [c for c in self.rt.list() if c.status is S.RUNNING]
        return encode(
            "pong",
            node=self.cfg.name,
            containers=len(running),
            load=_load(),
            incarnation=self.incarnation,
            **extra,
        )

    async def _metrics(
        self, inc: Incoming, msg: dict[str, Any], extra: dict[str, Any]
    ) -> list[bytes]:
        return encode("node_metrics", **await self._sampler().report(), **extra)

    def _sampler(self) -> MetricsSampler:
        """The metrics sampler, started by its first user (a request, a scrape)."""
        if self.sampler is None:
            from migrate.metrics import MetricsSampler

            self.sampler = MetricsSampler(self.rt, self.cfg.name)
            t = self.sampler.start()  # cancelled with the service's other tasks
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)
        return self.sampler

    async def _ps(self, inc: Incoming, msg: dict[str, Any], extra: dict[str, Any]) -> list[bytes]:
        items = [container_summary(c) for c in self.rt.list(all=msg.get("all", False))]
        return encode("containers", items=items, node=self.cfg.name, **extra)

    async def _inspect(
        self, inc: Incoming, msg: dict[str, Any], extra: dict[str, Any]
    ) -> list[bytes]:
        info = await asyncio.to_thread(lambda: self.rt.get(msg["container"]).inspect())
        return encode("inspected", info=info, **extra)

    async def _logs(self, inc: Incoming, msg: dict[str, Any], extra: dict[str, Any]) -> list[bytes]:
        c = self.rt.get(msg["container"])
        recs = list(read_log(c.dir / LOG))
        if msg.get("tail"):
            recs = recs[-msg["tail"] :]
        data = b"".join(r.data for r in recs)[-(32 << 20) :]
        return encode("logs", container=c.name, data=data, **extra)

    async def _stop(self, inc: Incoming, msg: dict[str, Any], extra: dict[str, Any]) -> list[bytes]:
        c = self.rt.get(msg["container"])
        await asyncio.to_thread(c.stop, float(msg.get("timeout_s", 10.0)))
        return encode("ok", **extra)

    async def _rm(self, inc: Incoming, msg: dict[str, Any], extra: dict[str, Any]) -> list[bytes]:
        c = self.rt.get(msg["container"])
        await asyncio.to_thread(c.delete, bool(msg.get("force", False)))
        return encode("ok", **extra)

    async def _migrate_request(
        self, inc: Incoming, msg: dict[str, Any], extra: dict[str, Any]
    ) -> list[bytes]:
        report = await self.migrate(
            msg["container"], msg["destination"], msg.get("strategy", "cold"), inc, extra
        )
        return encode("migrated", report=report.to_json(), **extra)

    async def _exec(self, inc: Incoming, msg: dict[str, Any], extra: dict[str, Any]) -> list[bytes]:
        """Run the command through the CLI (it forks and enters the namespaces; a service
        with threads must not), output captured, at most 60 s."""
        self.rt.get(msg["container"])
        env_args = [a for kv in msg.get("env", []) for a in ("-e", str(kv))]
        cmd = [
            sys.executable,
            "-m",
            "migrate.cli",
            "--state-root",
            str(self.rt.root),
            "exec",
            *env_args,
            msg["container"],
            *msg["args"],  # strings without NUL (the protocol checked them)
        ]
        p = await asyncio.to_thread(
            subprocess.run,
            cmd,
            capture_output=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        return encode(
            "exec_result",
            exit_code=p.returncode,
            stdout=p.stdout[-(16 << 20) :],
            stderr=p.stderr[-(1 << 20) :],
            **extra,
        )

    # -- migration, as the source ---------------------------------------------------------------
    async def migrate(
        self,
        ref: str,
        destination: str,
        strategy: str = "cold",
        requester: Incoming | None = None,
        extra: dict[str, Any] | None = None,
    ) -> MigrationReport:
        """Migrate ``ref`` from this node to ``destination``; progress goes to the requester."""
        if destination not in self.cluster.nodes:
            raise MigrationError(
                f"unknown node {destination!r}: the cluster has "
                f"{', '.join(sorted(self.cluster.nodes))}"
            )
        loop = asyncio.get_running_loop()
        last: dict[str, float] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if requester is None:
                return
            now = loop.time()
            if done and total and done < total and now - last.get(phase, 0) < 0.1:
                return
            last[phase] = now
            frames = encode(
                "progress",
                phase=phase,
                done_bytes=int(done),
                total_bytes=int(total),
                **(extra or {}),
            )
            loop.create_task(self.reply(requester, frames))

        session = SourceSession(
            self.rt,
            ref,
            destination,
            self.cfg.name,
            self.connect,
            strategy,
            self.peer_timeout_s,
            progress,
            state=self.state,
        )
        beat = (
            None
            if requester is None
            else asyncio.create_task(self._heartbeat(requester, session, extra or {}))
        )
        self.outgoing[session.session] = session
        try:
            return await self._run_observed(session, strategy)
        finally:
            self.outgoing.pop(session.session, None)
            if beat is not None:
                beat.cancel()

    async def _run_observed(self, session: SourceSession, strategy: str) -> MigrationReport:
        """Run the session; with ``metrics_port``, count it and observe its figures."""
        if self.exporter is None:
            return await session.run()
        try:
            rep = await session.run()
        except BaseException:
            self.exporter.observe_migration(strategy, ok=False)
            raise
        self.exporter.observe_migration(strategy, True, rep.downtime_s, rep.total_s, rep.bytes_sent)
        return rep

    async def _heartbeat(
        self, requester: Incoming, session: SourceSession, extra: dict[str, Any]
    ) -> None:
        """Tell the requester every HEARTBEAT_S that this service (``incarnation``) still
        works on its migration, and in which phase: a client that stops hearing it learns
        within seconds that the service is gone, rather than waiting for a reply that the
        next incarnation will never send."""
        while True:
            link = getattr(session, "link", None)
            phase = link.phase.value if link is not None else "preflight"
            frames = encode(
                "progress", phase=phase, heartbeat=True, incarnation=self.incarnation, **extra
            )
            await self.reply(requester, frames)
            await asyncio.sleep(HEARTBEAT_S)

    def _outcome_reply(self, session: str) -> list[bytes]:
        """The reply to an ``outcome`` query: ``outcome_is``, or an ``undecided`` error
        while ``session`` runs here and has not reached its verdict (its compare-and-swap
        may still be in flight, for example while etcd elects a new leader).  Answering
        "not committed" then would let the destination discard its held copy just before
        the swap names it the owner: no copy at all.  The destination stays held and asks
        again (:meth:`ask_outcome` returns None)."""
        running = self.outgoing.get(session)
        if running is None:
            committed = self._committed(session)
        elif running.verdict.done():
            committed = running.verdict.result()
        else:
            return error("undecided", f"session {session} has not passed or failed its commit")
        return encode("outcome_is", session=session, committed=committed)

    def _committed(self, session: str) -> bool:
        """Whether outgoing ``session`` passed its commit point: the record says
        ``migrated``, or (the service died between the store's compare-and-swap and that
        record, or the record could not be written) the store names the destination.  A
        session still running answers from its record alone: its compare-and-swap may have
        timed out, and be applied by the store after it rolled back."""
        for c in self.rt.list(all=True):
            m = c.state.migration
            if m is None or m.session != session:
                continue
            if c.status is S.MIGRATED:
                return True
            if (
                c.status is S.MIGRATING
                and not c.state.incoming
                and session not in self.outgoing
                and self._owned_by(c.id, m.peer)
            ):
                return True
        return False

    def _owned_by(self, container_id: str, node: str) -> bool:
        """Whether the store says ``node`` owns ``container_id`` (False when it cannot say)."""
        if self.state is None:
            return False
        try:
            owner = self.state.owner(container_id)
        except ClusterStateError as e:
            log.warning("node.owner_unknown", id=container_id[:12], error=str(e))
            return False
        return owner is not None and owner.node == node

    # -- incoming sessions ------------------------------------------------------------------------
    async def _offer(self, inc: Incoming, msg: dict[str, Any]) -> None:
        sid = msg["session"]
        if sid in self.incoming:
            await self.reply(inc, error("duplicate_session", f"session {sid} exists", session=sid))
            return

        async def send(frames: list[bytes]) -> None:
            await self.reply(inc, frames)

        q: asyncio.Queue[Any] = asyncio.Queue()
        try:
            ds = DestinationSession(
                self.rt,
                send,
                msg,
                inc.peer.name,
                queue=q,
                listen=self.cfg.listen,
                max_message_bytes=self.cfg.max_message_bytes,
                node_name=self.cfg.name,
                state=self.state,
            )
        except JaulaError as e:  # e.g. a scratch dir someone else made: refuse, say why
            await self.reply(inc, error(type(e).__name__, str(e), session=sid))
            return
        self.incoming[sid] = (ds, q)
        self._spawn(self._run_incoming(ds, q))

    async def _run_incoming(self, ds: DestinationSession, q: asyncio.Queue[Any]) -> None:
        try:
            await ds.run(self.peer_timeout_s, self.ask_outcome)
        finally:
            self.incoming.pop(ds.session, None)

    async def ask_outcome(self, source: str, session: str) -> bool | None:
        """The source's durable answer for ``session``, or None if it cannot be reached."""
        try:
            client = await self.connect(source)
        except (MigrationError, JaulaError):
            return None
        try:
            await client.send(encode("outcome", session=session))
            msg, _ = decode(await client.recv(timeout_s=5.0))
            return bool(msg.get("committed")) if msg["type"] == "outcome_is" else None
        except (PeerUnavailable, ProtocolError):
            return None
        finally:
            client.close()

    # -- recovery ---------------------------------------------------------------------------
    async def recover(self) -> None:
        """Reconcile what a crash of this service may have left (see the module doc)."""
        for c in self.rt.list(all=True):
            if c.status is S.MIGRATED:
                await asyncio.to_thread(self._kill_migrated_copy, c)
                continue
            if c.status is not S.MIGRATING:
                continue
            if not c.state.incoming and c.state.migration is not None:
                peer = c.state.migration.peer
                if await asyncio.to_thread(self._owned_by, c.id, peer):
                    # committed in the store, not yet in the record: the store decides
                    with c.locked():
                        c.state.status = S.MIGRATED
                        c.state.migrated_to = peer
                        c.save()
                    await asyncio.to_thread(self._kill_migrated_copy, c)
                    log.warning("recover.outgoing_committed", id=c.id[:12], to=peer)
                    continue
            if not c.state.incoming:  # outgoing, never committed
                c.refresh()
                alive = c.state.pid and os.path.exists(f"/proc/{c.state.pid}")
                with c.locked():
                    c.state.status = S.RUNNING if alive else S.STOPPED
                    c.state.migration = None
                    c.save()
                try:
                    c.cgroup().thaw()
                except JaulaError:
                    pass
                log.warning("recover.outgoing", id=c.id[:12], status=c.state.status.value)
                continue
            assert c.state.migration is not None  # incoming: it has its record
            came_from, session = c.state.migration.peer, c.state.migration.session
            hold = hold_socket_path(self.rt, session)
            if c.armed_monitor_waiting():  # the session died before the restore began
                await asyncio.to_thread(c.delete, True)
                log.warning("recover.incoming_removed", id=c.id[:12], armed=True)
            elif c.monitor_alive():
                self._spawn(self._recover_held(c, came_from, session, hold))
            else:
                await asyncio.to_thread(self._remove_incoming, c)
                log.warning("recover.incoming_removed", id=c.id[:12])
        sessions = {
            c.state.migration.session
            for c in self.rt.list(all=True)
            if c.status is S.MIGRATING and c.state.migration is not None
        }
        active = {f"incoming-{sid}" for sid in sessions}
        for sock in stale_hold_sockets(self.rt, sessions):
            sock.unlink(missing_ok=True)
        for scratch in scratch_dirs(self.rt):
            if scratch.is_dir():
                for d in scratch.iterdir():
                    if d.name not in active:
                        self._discard_session_dir(d)

    def _session_dirs(self, session: str) -> list[Path]:
        """The staging dirs incoming ``session`` may have (one per scratch place)."""
        return [s / f"incoming-{session}" for s in scratch_dirs(self.rt)]

    def _discard_session_dir(self, d: Path) -> None:
        """Remove an abandoned session dir and end the lazy-pages daemon it records (it
        outlives the service that started it: left alone it ran forever, found by
        ``make chaos``)."""
        if not d.is_dir():
            return
        pid = discard_session_dir(d)
        if pid is not None:
            log.warning("recover.lazy_daemon_ended", dir=d.name, pid=pid)

    def _remove_incoming(self, c: Container) -> None:
        """Remove an incoming copy that will not run here: its processes, cgroup, rootfs
        mount and directory (``rm -f``; a bare rmtree left the overlay mounted and the
        directory behind, and the next migration of that container here was refused as
        "already exists": found by ``make chaos``).  A failure is logged, never dropped."""
        try:
            c.delete(True)
        except JaulaError as e:
            log.error("recover.incoming_cleanup", id=c.id[:12], error=str(e))

    def _kill_migrated_copy(self, c: Container) -> None:
        """A container recorded ``migrated`` whose tasks still run here: this service died
        between writing that record and telling CRIU so, and CRIU let the frozen copy go
        on, while the destination, reading the record, resumed its own.  The record
        decides: kill this copy (the cgroup's ``destroy`` kills what is left) and drop its
        root mount."""
        try:
            left = c.cgroup().pids()
        except JaulaError:
            return
        if not left:
            return
        log.error(
            "recover.migrated_copy_killed",
            id=c.id[:12],
            name=c.name,
            migrated_to=c.state.migrated_to,
            pids=left,
        )
        from runtime.rootfs.overlay import unmount

        steps: tuple[Callable[[], None], ...] = (c.cgroup().destroy, lambda: unmount(c.rootfs))
        for step in steps:
            try:
                step()
            except JaulaError as e:
                log.error("recover.migrated_copy_cleanup", id=c.id[:12], error=str(e))

    async def _recover_held(self, c: Container, source: str, session: str, hold: Path) -> None:
        """A restore held at pre-resume when this service died: ask the source, answer the
        held restorer on its socket, until decided."""
        given = next(
            (g for d in self._session_dirs(session) if (g := given_decision(d)) is not None),
            None,
        )
        committed: bool
        if given is not None:
            # the previous incarnation answered the restorer and died before it recorded
            # the result: the restorer asks no more, so its decision is the outcome
            committed = given
            hold.unlink(missing_ok=True)  # the dead incarnation's socket
        else:
            while (answer := await self.ask_outcome(source, session)) is None:
                await asyncio.sleep(2.0)
            committed = answer
            server = HoldServer(hold)
            await server.start()
            server.decide(committed)
            try:
                await server.answered.wait()  # the restorer reconnects every 0.5 s until answered
            finally:
                server.close()
        if committed:
            # The service that waited for the monitor's report is gone: record the restored
            # init (the monitor's child) ourselves.
            from runtime import syscalls as sc

            mon = c.state.monitor_pid
            init = await await_for(lambda: _restored_init(mon), 10.0) if mon else None
            if init:
                with c.locked():
                    c.state.status = S.RUNNING
                    c.state.pid = init
                    c.state.pid_start_time = sc.proc_start_time(init)
                    c.save()
            else:
                log.error("recover.restored_init_unknown", id=c.id[:12], monitor=mon)
            await self._follow_postcopy(c, source, session)
        else:
            c.wait_monitor(10.0)
            c.refresh()
            if c.status is S.MIGRATING:
                await asyncio.to_thread(self._remove_incoming, c)
            for d in self._session_dirs(session):
                await asyncio.to_thread(self._discard_session_dir, d)
        log.warning("recover.incoming_decided", id=c.id[:12], committed=committed)

    async def _follow_postcopy(self, c: Container, source: str, session: str) -> None:
        """A held post-copy copy resumed by recovery: its lazy-pages daemon (recorded in
        the session dir) is still bringing the memory.  Record it in the container's state
        (a dump meanwhile is refused), wait until it exits, then clear the record and
        remove the session dir.  No daemon: cold, or it already ended."""
        from runtime.state import PostcopyRecord
        from runtime.syscalls import is_alive

        found = next((f for d in self._session_dirs(session) if (f := lazy_daemon(d))), None)
        if found is not None:
            pid, start = found
            with c.locked():
                c.refresh()
                c.state.postcopy = PostcopyRecord(session, source, pid, start)
                c.save()
            log.warning("recover.postcopy_followed", id=c.id[:12], daemon_pid=pid)
            await await_for(lambda: not is_alive(pid, start), None, max_interval_s=0.5)
            with c.locked():
                c.refresh()
                c.state.postcopy = None
                c.save()
        for d in self._session_dirs(session):
            await asyncio.to_thread(self._discard_session_dir, d)


def _restored_init(monitor: int) -> int | None:
    """The restored init among the monitor's children: the one that is not CRIU.  Right
    after the resume the monitor's ``criu swrk`` may still run beside it (it is the older
    child, listed first): taking the first child recorded CRIU's pid, which soon exited,
    and the resumed container read as ``stopped`` (a committed migration lost)."""
    try:
        kids = Path(f"/proc/{monitor}/task/{monitor}/children").read_text().split()
    except OSError:
        return None
    for k in kids:
        try:
            if Path(os.readlink(f"/proc/{k}/exe")).name != "criu":
                return int(k)
        except OSError:
            continue
    return None


def _load() -> dict[str, Any]:
    la = os.getloadavg()
    mem = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, v = line.split(":", 1)
            mem[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return {
        "loadavg1": la[0],
        "cpus": os.cpu_count() or 1,
        "mem_available_bytes": mem.get("MemAvailable", 0),
        "mem_total_bytes": mem.get("MemTotal", 0),
    }


async def serve(cfg: NodeConfig, cluster: Cluster) -> None:
    """Run a node service until cancelled (``jaula node serve``)."""
    await NodeService(cfg, cluster).serve()
