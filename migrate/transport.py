"""ZeroMQ transport between node services, peers and operators: CURVE always, peers known
by their authenticated key.  The only module that imports :mod:`zmq` (besides
:mod:`migrate.keys`, which reads certificate files with :mod:`zmq.auth`).

Shape (zguide chapter 3, "Advanced Request-Reply Patterns"; chapter 5, "Ironhouse")::

    operator CLI / balancer / other node            node service
    Client: DEALER, CURVE client ----tcp----> Server: ROUTER, CURVE server, ZAP domain "jaula"
            (knows the server's public key)            |  handshake: libzmq asks the ZAP
                                                       v  handler (inproc://zeromq.zap.01)
                                           _ZapHandler (pyzmq Authenticator, driven from the
                                           event loop) -> _AllowList.callback(key): 200
                                           (User-Id = z85 key) only for keys in the cluster
                                           file, else 400 + log ``transport.refused``

Frames are opaque bytes here; :mod:`migrate.protocol` gives them meaning (versioned msgpack).
A request from a client arrives at :meth:`Server.recv` as ``Incoming(routing_id, peer,
frames)``; the server answers with :meth:`Server.send` (``routing_id``, frames).

Security (ZMTP 3.0 CURVE, ZeroMQ RFC 26 "CurveZMQ"; ZAP, RFC 27 "ZAP"):

- The handshake proves the client holds the secret half of its public key and that the
  server holds the secret half of the key the client expected; everything afterwards is
  encrypted and authenticated per message.
- Who the peer is comes from libzmq's per-message ``User-Id`` property (``zmq_msg_gets``),
  which libzmq fills from the ZAP reply; pyzmq's authenticator sets it to the Z85 of the
  client's public key (``Authenticator.curve_user_id``; checked by the tests).  It is never
  taken from a frame the peer sends.
- RFC 27: *if no ZAP handler is bound, the server accepts every CURVE client*.  The handler is
  therefore started before the socket binds and stopped only after the socket is closed, and
  :meth:`Server.recv` still drops (and logs) any message whose User-Id is missing or not in the
  cluster, so a missing handler or a key removed with :meth:`Server.update_cluster` fails
  closed.  (libzmq's ``ZMQ_ZAP_ENFORCE_DOMAIN`` would do this too, but is a draft option.)
- ZAP runs only at the handshake: a connection stays up after its key leaves the cluster, but
  its messages are then dropped by :meth:`Server.recv`.
- Routing ids are chosen by the peer's side (ZMTP ``ROUTING_ID``) and are only addresses: a
  session must check ``incoming.peer`` on every message, never trust a routing id alone.

Bounds: ``max_message_bytes`` bounds the payload of each frame; a peer sending a larger
frame is disconnected by libzmq (its DEALER reconnects; that message is lost) and nobody else
notices.  libzmq applies ``MAXMSGSIZE`` to the frame *on the wire*, which under CURVE is the
encrypted MESSAGE command, :data:`CURVE_MESSAGE_OVERHEAD_BYTES` longer than the payload
(measured with libzmq 4.3.5: a 65503-byte frame passes MAXMSGSIZE 65536, 65504 does not), so
the option is set to ``max_message_bytes`` plus that overhead.  libzmq does not bound the
number of frames of a multipart message, so :meth:`Server.recv` drops messages with more than
``max_frames`` frames after they arrive.
High-water marks (``SNDHWM``/``RCVHWM``, :data:`HWM_MESSAGES`) count whole messages; bulk data
moves as credit-based chunks (zguide chapter 7, "Credit-Based Flow Control"), so they are
not reached in normal operation.  Heartbeats (ZMTP 3.1 PING/PONG, :data:`HEARTBEAT_IVL_MS`,
:data:`HEARTBEAT_TIMEOUT_MS`) close a connection to a peer that stopped answering.

Resources: each :class:`Server` and each :class:`Client` owns its own ZeroMQ context (the
ZAP endpoint is per context, so two node services can live in one process); ``close()``
destroys it with linger 0.  Frames are sent copied: pyzmq's zero-copy sends (``copy=False``,
frames over 64 KiB) start a process-wide garbage-collector thread with a context of its own,
for one memcpy saved per chunk.

Why not :class:`zmq.auth.asyncio.AsyncioAuthenticator`: its ``stop()`` closes the ZAP socket
while the poll it is waiting in still has the socket's fd registered with the event loop (the
task is cancelled, not awaited).  A socket created right after, before the loop runs again,
can reuse that fd number; the late clean-up then unregisters the new one.  Seen here: a
Server started right after another was closed in the same loop never had its ZAP requests
answered, so every handshake stalled.  :class:`_ZapHandler` drives the same pyzmq
:class:`~zmq.auth.Authenticator` (its ZAP logic and ``configure_curve_callback``) with a
reader it removes synchronously before closing the socket.

pyzmq documentation: https://pyzmq.readthedocs.io/ (``zmq.asyncio``, ``zmq.auth``,
``Frame.get``); libzmq: zmq_setsockopt(3), zmq_socket_monitor(3), zmq_msg_gets(3).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, cast

import structlog
import zmq
import zmq.asyncio
from zmq.auth import Authenticator
from zmq.utils.monitor import parse_monitor_message

from migrate import keys
from migrate.config import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ClientConfig,
    Cluster,
    NodeConfig,
    Peer,
    check_node_in_cluster,
)
from migrate.errors import KeyRefused, NodeConfigError, PeerUnavailable

log = structlog.get_logger(__name__)

ZAP_DOMAIN = "jaula"
"""ZAP domain of every node service socket (RFC 27); the authenticator serves only it."""
HEARTBEAT_IVL_MS = 1000
"""Send a ZMTP PING after this long without traffic."""
HEARTBEAT_TIMEOUT_MS = 3000
"""Close the connection when no traffic arrives this long after a PING."""
HANDSHAKE_IVL_MS = 5000
#: seconds between looks at the socket monitor while a client waits for an answer: a key
#: the node refused (ZAP status 400) ends the wait then, not at its timeout
REFUSAL_CHECK_S = 0.25
"""Close a connection whose CURVE handshake (and ZAP answer) takes longer than this."""
HWM_MESSAGES = 1000
"""Send and receive high-water marks, in messages, per connection."""
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 2000
"""A client retries a lost connection after 100 ms, backing off to 2 s."""
MAX_FRAMES = 64
"""Default bound on the frames of one message accepted by :meth:`Server.recv`."""
SEND_TIMEOUT_S = 10.0
"""Default time a send may wait for room under the high-water mark."""
REFUSAL_LOG_INTERVAL_S = 60.0
"""Log a refused key at most once per this interval (a refused client may keep retrying)."""
CURVE_MESSAGE_OVERHEAD_BYTES = 33
"""Bytes CURVE adds to each frame on the wire: command name (1 + 7 "MESSAGE"), short nonce
(8), flags (1), Poly1305 MAC (16) (RFC 26, MESSAGE command)."""


def _common_options(sock: zmq.Socket[Any], max_message_bytes: int) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes + CURVE_MESSAGE_OVERHEAD_BYTES)
    sock.setsockopt(zmq.SNDHWM, HWM_MESSAGES)
    sock.setsockopt(zmq.RCVHWM, HWM_MESSAGES)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)


@dataclass(frozen=True)
class Incoming:
    """One message received by a :class:`Server`.

    Attributes:
        routing_id: the connection's ROUTER address; pass it to :meth:`Server.send` to reply.
        peer: the cluster entry of the key that authenticated this connection.
        frames: the message's frames (at least one), opaque bytes.
        address: the peer's IP address as libzmq saw it (``Peer-Address``), for logs only.
    """

    routing_id: bytes
    peer: Peer
    frames: list[bytes]
    address: str | None = None


class _AllowList:
    """ZAP credentials provider (pyzmq ``configure_curve_callback``): a key is allowed when
    the cluster lists it.  Refusals are logged (``transport.refused``), rate-limited per key."""

    def __init__(self, cluster: Cluster, endpoint: str) -> None:
        self.cluster = cluster
        self.endpoint = endpoint
        self._logged: dict[bytes, tuple[float, int]] = {}  # key -> (last log time, suppressed)

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the authenticator with the ZAP domain and the client's Z85 key."""
        peer = self.cluster.by_key(key) if domain == ZAP_DOMAIN else None
        if peer is not None:
            log.debug(
                "transport.accepted",
                peer=peer.name,
                kind=str(peer.kind),
                key=key.decode("ascii", "replace"),
                endpoint=self.endpoint,
            )
            return True
        now = time.monotonic()
        last, suppressed = self._logged.get(key, (-REFUSAL_LOG_INTERVAL_S, 0))
        if now - last >= REFUSAL_LOG_INTERVAL_S:
            if len(self._logged) >= 1024:
                self._logged.clear()
            self._logged[key] = (now, 0)
            log.warning(
                "transport.refused",
                key=key.decode("ascii", "replace"),
                domain=domain,
                endpoint=self.endpoint,
                suppressed=suppressed,
                reason="public key not in the cluster file",
            )
        else:
            self._logged[key] = (last, suppressed + 1)
        return False


class _ZapHandler:
    """The ZAP handler of one context (RFC 27): pyzmq's :class:`~zmq.auth.Authenticator`
    answering requests from a task of the running loop.

    ``inproc://zeromq.zap.01`` is bound at construction, so create it before the socket it
    guards binds.  The ZAP socket's ZMQ_FD is edge-triggered: the task reads every queued
    request (``EVENTS`` & POLLIN) before waiting for the fd again.
    """

    def __init__(self, ctx: zmq.asyncio.Context, allow: _AllowList) -> None:
        self.auth = Authenticator(ctx, log=logging.getLogger("zmq.auth"))
        self.auth.start()  # a blocking-API REP socket, only used with NOBLOCK below
        try:
            self.auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=allow)
            self._loop = asyncio.get_running_loop()
            self._fd = cast(int, self.auth.zap_socket.getsockopt(zmq.FD))
            self._readable = asyncio.Event()
            self._loop.add_reader(self._fd, self._readable.set)
        except BaseException:
            self.auth.stop()
            raise
        self._task = asyncio.create_task(self._serve(), name="jaula-zap-handler")

    async def _serve(self) -> None:
        sock = self.auth.zap_socket
        while True:
            self._readable.clear()
            while cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                request = sock.recv_multipart(zmq.NOBLOCK)
                try:
                    await self.auth.handle_zap_message(request)
                except Exception as e:  # noqa: BLE001 - one bad request never stops ZAP
                    log.error("transport.zap_failed", error=repr(e))
                    # answer 500 (RFC 27: refused) so that the REP socket may receive again;
                    # EFSM means the reply was already sent
                    if len(request) > 1:
                        try:
                            sock.send_multipart(
                                [b"1.0", request[1], b"500", b"Internal error", b"", b""]
                            )
                        except zmq.ZMQError:
                            pass
            await self._readable.wait()

    async def stop(self) -> None:
        """Unregister the fd, end the task, then close the ZAP socket (in that order)."""
        self._loop.remove_reader(self._fd)
        self._task.cancel()
        try:
            await asyncio.wait([self._task])  # never raises the task's CancelledError
        finally:  # even if we are cancelled meanwhile: the task only ever waits on an Event
            self.auth.stop()


class Server:
    """A node service's ROUTER socket: CURVE server, clients allowed by the cluster file.

    Create with :meth:`start`; close with :meth:`close` (or ``async with``).  One task
    should call :meth:`recv`; any task may call :meth:`send`.
    """

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        sock: zmq.asyncio.Socket,
        zap: _ZapHandler,
        allow: _AllowList,
        cfg: NodeConfig,
        max_frames: int,
    ) -> None:
        self._ctx = ctx
        self._socket = sock
        self._zap = zap
        self._allow = allow
        self._cfg = cfg
        self._max_frames = max_frames
        self._closed = False
        self.endpoint: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        """The endpoint actually bound (``tcp://127.0.0.1:7001``)."""

    @classmethod
    async def start(
        cls, cfg: NodeConfig, cluster: Cluster, *, max_frames: int = MAX_FRAMES
    ) -> Server:
        """Start the ZAP authenticator, then bind a CURVE ROUTER socket on ``cfg.listen``.

        The node's own key comes from ``cfg.secret_key`` and must be the one the cluster
        file lists for ``cfg.name`` (otherwise no peer could ever authenticate us).

        Raises:
            NodeConfigError: unreadable key, the node missing from the cluster or listed
                with another key, or the endpoint cannot be bound (naming ``listen``).
        """
        try:
            public, secret = keys.load_secret(cfg.secret_key)
        except NodeConfigError as e:
            raise NodeConfigError(
                f"{cfg.source}: secret_key: {e}", path=str(cfg.source), key="secret_key"
            ) from e
        check_node_in_cluster(cfg, cluster, public)
        ctx = zmq.asyncio.Context()
        zap: _ZapHandler | None = None
        sock: zmq.asyncio.Socket | None = None
        try:
            allow = _AllowList(cluster, cfg.listen)
            zap = _ZapHandler(ctx, allow)  # before bind: without a ZAP handler any key passes
            sock = ctx.socket(zmq.ROUTER)
            _common_options(sock, cfg.max_message_bytes)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown routing id: error, not a drop
            sock.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            try:
                sock.bind(cfg.listen)
            except zmq.ZMQError as e:
                raise NodeConfigError(
                    f"{cfg.source}: listen: cannot bind {cfg.listen}: {e.strerror} (is another "
                    "node service using it? choose a free port or address)",
                    path=str(cfg.source),
                    key="listen",
                ) from e
        except BaseException:
            if sock is not None:
                sock.close(linger=0)
            if zap is not None:
                await zap.stop()
            ctx.destroy(linger=0)
            raise
        server = cls(ctx, sock, zap, allow, cfg, max_frames)
        log.info(
            "transport.listening",
            node=cfg.name,
            endpoint=server.endpoint,
            nodes=len(cluster.nodes),
            operators=len(cluster.operators),
        )
        return server

    @property
    def cluster(self) -> Cluster:
        """The allowlist in force."""
        return self._allow.cluster

    def update_cluster(self, cluster: Cluster) -> None:
        """Replace the allowlist: new handshakes and every later message are checked against
        ``cluster`` (live connections of removed keys stay up, but their messages are dropped).
        """
        self._allow.cluster = cluster

    async def recv(self) -> Incoming:
        """Wait for the next message from an authenticated peer.

        Messages without a known authenticated key, without a body, or with more than
        ``max_frames`` frames are dropped and logged (``transport.dropped``); recv goes on
        waiting.  Cancel the awaiting task to stop.
        """
        while True:
            msg = await self._socket.recv_multipart(copy=False)
            # User-Id: set by libzmq from the ZAP reply, for every frame of the connection
            try:
                user_id: str | None = str(msg[-1].get("User-Id"))
            except zmq.ZMQError:
                user_id = None
            try:
                address: str | None = str(msg[-1].get("Peer-Address"))
            except zmq.ZMQError:
                address = None
            peer = self._allow.cluster.by_key(user_id) if user_id else None
            reason = None
            if peer is None:
                reason = "no authenticated key from the cluster on this connection"
            elif len(msg) < 2:
                reason = "empty message"
            elif len(msg) - 1 > self._max_frames:
                reason = f"{len(msg) - 1} frames (at most {self._max_frames})"
            if reason is not None or peer is None:
                log.warning(
                    "transport.dropped",
                    endpoint=self.endpoint,
                    reason=reason,
                    key=user_id,
                    address=address,
                )
                continue
            return Incoming(msg[0].bytes, peer, [f.bytes for f in msg[1:]], address)

    async def send(
        self, routing_id: bytes, frames: list[bytes], *, timeout_s: float = SEND_TIMEOUT_S
    ) -> None:
        """Send ``frames`` to the connection ``routing_id`` (from :class:`Incoming`).

        Raises:
            PeerUnavailable: that connection is gone (ROUTER_MANDATORY: EHOSTUNREACH), or its
                queue stayed full for ``timeout_s`` seconds.
        """
        if not frames:
            raise ValueError("a message needs at least one frame")
        try:
            await asyncio.wait_for(self._socket.send_multipart([routing_id, *frames]), timeout_s)
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                raise PeerUnavailable(
                    f"{self.endpoint}: the peer connection "
                    f"{routing_id.hex()} is gone; it must connect again"
                ) from e
            raise PeerUnavailable(
                f"{self.endpoint}: send to {routing_id.hex()} failed: {e.strerror}"
            ) from e
        except TimeoutError as e:
            raise PeerUnavailable(
                f"{self.endpoint}: the peer connection {routing_id.hex()} "
                f"did not take a message for {timeout_s} s"
            ) from e

    async def close(self) -> None:
        """Close the socket, then stop the authenticator, then destroy the context.

        In that order: a bound CURVE socket without a ZAP handler would accept any key.
        Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        self._socket.close(linger=0)
        try:
            await self._zap.stop()
        finally:
            self._ctx.destroy(linger=0)
        log.info("transport.closed", node=self._cfg.name, endpoint=self.endpoint)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


_MONITOR_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class Client:
    """A DEALER connected to one node service with CURVE; what we know of the link comes from
    the socket monitor and turns a timeout into an error that says why.

    Create with :meth:`connect` or :meth:`for_peer`; :meth:`close` (or ``async with``).
    One task at a time should call :meth:`recv`.
    """

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        sock: zmq.asyncio.Socket,
        monitor: zmq.Socket[Any],
        endpoint: str,
        server_public_key: bytes,
        own_public: bytes,
        name: str | None,
    ) -> None:
        self._ctx = ctx
        self._socket = sock
        self._monitor = monitor
        self.endpoint = endpoint
        """The node service endpoint."""
        self.name = name
        """The node's name in the cluster, when known (for messages)."""
        self._server_key = server_public_key
        self._own_public = own_public
        self._closed = False
        self._authenticated = False  # a handshake succeeded and was not lost since
        self._tcp_up = False  # a TCP connection came up since the last retry
        self._problem: str | None = None
        self._key_refused = False  # the node's ZAP handler said 400: it will not change

    @classmethod
    async def connect(
        cls,
        endpoint: str,
        server_public_key: bytes,
        own_public: bytes,
        own_secret: bytes,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        name: str | None = None,
    ) -> Client:
        """Connect (in the background, as ZeroMQ does) to the node service at ``endpoint``.

        Keys are 40 Z85 bytes.  Messages sent before the connection is up are queued.

        Raises:
            NodeConfigError: a key is not 40 Z85 characters or the endpoint is invalid.
        """
        for what, key in (
            ("server public key", server_public_key),
            ("own public key", own_public),
            ("own secret key", own_secret),
        ):
            if not keys.is_z85_key(key):
                raise NodeConfigError(f"{what} for {endpoint} is not 40 Z85 characters")
        ctx = zmq.asyncio.Context()
        try:
            sock = ctx.socket(zmq.DEALER)
            _common_options(sock, max_message_bytes)
            sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
            sock.setsockopt(zmq.CURVE_SERVERKEY, server_public_key)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, own_public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, own_secret)
            # the monitor before connect, so that no event is missed; a plain (blocking-API)
            # socket, read only with NOBLOCK by _drain_monitor
            monitor_addr = f"inproc://jaula-client-monitor-{id(sock):x}"
            sock.monitor(monitor_addr, _MONITOR_EVENTS)
            monitor: zmq.Socket[Any] = zmq.Socket(ctx, zmq.PAIR)
            monitor.setsockopt(zmq.LINGER, 0)
            monitor.connect(monitor_addr)
            try:
                sock.connect(endpoint)
            except zmq.ZMQError as e:
                raise NodeConfigError(f"cannot connect to {endpoint!r}: {e.strerror}") from e
        except BaseException:
            ctx.destroy(linger=0)
            raise
        return cls(ctx, sock, monitor, endpoint, server_public_key, own_public, name)

    @classmethod
    async def for_peer(cls, client_cfg: ClientConfig, cluster: Cluster, node_name: str) -> Client:
        """Connect to the node ``node_name`` of ``cluster`` with ``client_cfg``'s keypair.

        Raises:
            NodeConfigError: no such node in the cluster (the message lists the known ones).
        """
        node = cluster.node(node_name)
        assert node.endpoint is not None  # nodes always have one (load_cluster checks)
        return await cls.connect(
            node.endpoint,
            node.public_key,
            client_cfg.public_key,
            client_cfg.secret_key,
            max_message_bytes=client_cfg.max_message_bytes,
            name=node.name,
        )

    def _who(self) -> str:
        return f"node {self.name} at {self.endpoint}" if self.name else self.endpoint

    def _drain_monitor(self) -> None:
        """Read the socket monitor's pending events and update what we know of the link."""
        while True:
            try:
                frames = self._monitor.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            ev = parse_monitor_message(frames)
            event, value = ev["event"], ev["value"]
            if event == zmq.EVENT_CONNECTED:
                self._tcp_up = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._authenticated, self._problem = True, None
            elif event == zmq.EVENT_DISCONNECTED:
                if self._authenticated and self._problem is None:
                    self._problem = "the connection was lost"
                self._authenticated = False
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH and value == 400:
                self._key_refused = True
                self._problem = (
                    f"it refused our key (ZAP status 400): list our public "
                    f"key {self._own_public.decode()} in that node's cluster file"
                )
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._problem = (
                    f"its authentication failed (ZAP status {value}, RFC 27: 300 "
                    "temporary, 500 internal error): see that node's log"
                )
            elif event in (
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
            ):
                self._problem = (
                    f"the CURVE handshake failed: the server key we used "
                    f"({self._server_key.decode()}) is probably not that node's "
                    "public key; check its public_key in the cluster file"
                )
            elif event == zmq.EVENT_CONNECT_RETRIED:
                if not self._tcp_up:
                    self._problem = (
                        "cannot connect (refused or unreachable): is its node "
                        "service running and listening there?"
                    )
                self._tcp_up = False

    def _unavailable(self, what: str) -> PeerUnavailable:
        self._drain_monitor()
        if self._problem is not None:
            why = self._problem
        elif self._authenticated:
            why = "connected and authenticated, but it did not answer"
        else:
            why = "no connection was established yet"
        return PeerUnavailable(f"{self._who()}: {what}: {why}")

    async def send(self, frames: list[bytes], *, timeout_s: float = SEND_TIMEOUT_S) -> None:
        """Queue ``frames`` as one message to the node.

        Raises:
            PeerUnavailable: the send queue stayed full for ``timeout_s`` seconds.
        """
        if not frames:
            raise ValueError("a message needs at least one frame")
        self._drain_monitor()
        try:
            await asyncio.wait_for(self._socket.send_multipart(frames), timeout_s)
        except TimeoutError as e:
            raise self._unavailable(f"could not queue a message for {timeout_s} s") from e

    async def recv(self, timeout_s: float) -> list[bytes]:
        """Wait at most ``timeout_s`` seconds for the next message from the node.

        Raises:
            PeerUnavailable: nothing arrived in time; the message names the endpoint and what
                the socket monitor saw (key refused, wrong server key, cannot connect, ...).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            self._drain_monitor()
            if self._key_refused:  # a refusal of our key is final: say so now, not at the end
                raise KeyRefused(str(self._unavailable("refused")))
            left = deadline - time.monotonic()
            slice_ms = max(0, int(min(left, REFUSAL_CHECK_S) * 1000))
            if await self._socket.poll(timeout=slice_ms):  # POLLIN
                return list(await self._socket.recv_multipart())
            if time.monotonic() >= deadline:
                raise self._unavailable(f"no answer within {timeout_s} s")

    def close(self) -> None:
        """Close the socket and its monitor with linger 0 (unsent messages are dropped) and
        destroy the context.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=0)
        self._ctx.destroy(linger=0)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# -- bulk data channel --------------------------------------------------------------------------


class DataReceiver:
    """The destination's end of a session's bulk data channel: a plain (not CURVE) PULL
    socket bound on an ephemeral port of the node's listen host.

    Bulk data is sealed by the session itself (AES-256-GCM with a key sent over the CURVE
    channel, :mod:`migrate.sealing`): CURVE (xsalsa20-poly1305 in libzmq's I/O thread) moved
    about 340 MB/s here, AES-GCM with AES-NI several GB/s.  Anyone may connect to the port;
    nothing they send passes the seal check."""

    def __init__(self, ctx: zmq.asyncio.Context, sock: zmq.asyncio.Socket, endpoint: str) -> None:
        self._ctx = ctx
        self._sock = sock
        self.endpoint = endpoint

    @classmethod
    def bind(cls, listen: str, max_message_bytes: int) -> DataReceiver:
        """Bind on the host of ``listen`` (``tcp://HOST:PORT``), port chosen by the kernel.
        Raises NodeConfigError for a non-TCP listen endpoint."""
        if not listen.startswith("tcp://"):
            raise NodeConfigError(
                f"a bulk data channel needs a tcp:// listen endpoint, not {listen}"
            )
        host = listen[len("tcp://") :].rsplit(":", 1)[0]
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, HWM_MESSAGES)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes + 4096)
        port = sock.bind_to_random_port(f"tcp://{host}")
        return cls(ctx, sock, f"tcp://{host}:{port}")

    async def recv(self) -> list[bytes]:
        """The next message's frames."""
        msg = await self._sock.recv_multipart(copy=False)
        return [f.bytes for f in msg]

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()


class DataSender:
    """The source's end of a bulk data channel (a plain PUSH socket); see DataReceiver."""

    def __init__(self, ctx: zmq.asyncio.Context, sock: zmq.asyncio.Socket) -> None:
        self._ctx = ctx
        self._sock = sock

    @classmethod
    def connect(cls, endpoint: str) -> DataSender:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, HWM_MESSAGES)
        sock.connect(endpoint)
        return cls(ctx, sock)

    async def send(self, frames: list[bytes], timeout_s: float = SEND_TIMEOUT_S) -> None:
        """Queue one message.  Raises PeerUnavailable when it cannot be queued in time."""
        try:
            await asyncio.wait_for(self._sock.send_multipart(frames), timeout_s)
        except TimeoutError as e:
            raise PeerUnavailable(f"the bulk data channel is stuck for {timeout_s} s") from e

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()
