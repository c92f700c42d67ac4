"""The ZeroMQ transport on 127.0.0.1 with real CURVE keys: who may talk to a node service,
how the server knows who is talking, and what happens to oversized or hostile messages.

Each test runs one coroutine under ``asyncio.run`` with a deadline; servers and clients are
registered on an AsyncExitStack so they close even when the test fails, and
``zmq_leak_check`` fails a test that leaves a ZeroMQ context behind.  No wait is longer than
a few seconds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zmq
import zmq.asyncio
from structlog.testing import capture_logs

from migrate.config import Cluster, NodeConfig, PeerKind, load_cluster
from migrate.errors import NodeConfigError, PeerUnavailable
from migrate.transport import Client, Incoming, Server
from tests.integration.cluster_setup import ClusterFiles, write_cluster

pytestmark = pytest.mark.usefixtures("zmq_leak_check")

T = TypeVar("T")


def run(scenario: Callable[[AsyncExitStack], Awaitable[T]], deadline_s: float = 15.0) -> T:
    """Run ``scenario(stack)`` in a fresh event loop; close what it registered on ``stack``."""

    async def main() -> T:
        async with AsyncExitStack() as stack:
            return await asyncio.wait_for(scenario(stack), deadline_s)

    return asyncio.run(main())


async def serve(stack: AsyncExitStack, cfg: NodeConfig, cluster: Cluster) -> Server:
    server = await Server.start(cfg, cluster)
    stack.push_async_callback(server.close)
    return server


async def connect(
    stack: AsyncExitStack, files: ClusterFiles, who: str, node: str = "node1"
) -> Client:
    """A client with ``who``'s keys (alice or a node) connected to ``node``."""
    client = await Client.for_peer(files.client_config(who), files.load_cluster(), node)
    stack.callback(client.close)
    return client


async def raw_client(
    stack: AsyncExitStack,
    endpoint: str,
    server_key: bytes | None,
    keypair: tuple[bytes, bytes] | None,
    routing_id: bytes | None = None,
) -> zmq.asyncio.Socket:
    """A hand-built DEALER (for what :class:`Client` would never do)."""
    ctx = zmq.asyncio.Context()
    stack.callback(ctx.destroy, 0)
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if routing_id is not None:
        sock.routing_id = routing_id
    if server_key is not None and keypair is not None:
        sock.curve_serverkey = server_key
        sock.curve_publickey, sock.curve_secretkey = keypair
    sock.connect(endpoint)
    return sock


async def recv_or_none(server: Server, timeout_s: float) -> Incoming | None:
    try:
        return await asyncio.wait_for(server.recv(), timeout_s)
    except TimeoutError:
        return None


def test_node_and_server_exchange_messages_both_ways(cluster_files: ClusterFiles) -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        server = await serve(
            stack, cluster_files.node_config("node1"), cluster_files.load_cluster()
        )
        assert server.endpoint == cluster_files.endpoints["node1"]
        client = await connect(stack, cluster_files, "node2")
        for i in range(3):
            await client.send([b"ping", str(i).encode(), b"", bytes(range(256))])
            got = await asyncio.wait_for(server.recv(), 3)
            assert got.frames == [b"ping", str(i).encode(), b"", bytes(range(256))]
            assert (got.peer.name, got.peer.kind) == ("node2", "node")
            assert got.peer.endpoint == cluster_files.endpoints["node2"]
            assert got.address == "127.0.0.1"
            await server.send(got.routing_id, [b"pong", str(i).encode()])
            assert await client.recv(timeout_s=3) == [b"pong", str(i).encode()]

    run(scenario)


def test_operator_is_known_as_an_operator(cluster_files: ClusterFiles) -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        server = await serve(
            stack, cluster_files.node_config("node1"), cluster_files.load_cluster()
        )
        alice = await connect(stack, cluster_files, "alice")
        node2 = await connect(stack, cluster_files, "node2")
        await alice.send([b"from alice"])
        await node2.send([b"from node2"])
        got = {}
        for _ in range(2):
            m = await asyncio.wait_for(server.recv(), 3)
            got[m.frames[0]] = m
        assert got[b"from alice"].peer.name == "alice"
        assert got[b"from alice"].peer.kind is PeerKind.OPERATOR
        assert got[b"from alice"].peer.endpoint is None
        assert got[b"from node2"].peer.kind is PeerKind.NODE
        assert got[b"from alice"].routing_id != got[b"from node2"].routing_id
        # each reply goes to the connection it is addressed to
        await server.send(got[b"from node2"].routing_id, [b"to node2"])
        await server.send(got[b"from alice"].routing_id, [b"to alice"])
        assert await alice.recv(3) == [b"to alice"]
        assert await node2.recv(3) == [b"to node2"]

    run(scenario)


def test_unknown_key_is_refused_and_logged(cluster_files: ClusterFiles, tmp_path: Path) -> None:
    from migrate import keys

    intruder_pub, intruder_sec = keys.load_secret(keys.generate(tmp_path / "x", "mallory")[1])

    async def scenario(stack: AsyncExitStack) -> None:
        server = await serve(
            stack, cluster_files.node_config("node1"), cluster_files.load_cluster()
        )
        mallory = await Client.connect(
            cluster_files.endpoints["node1"],
            cluster_files.public_key("node1"),
            intruder_pub,
            intruder_sec,
        )
        stack.callback(mallory.close)
        await mallory.send([b"restore this as root, please"])
        assert await recv_or_none(server, 1.0) is None
        with pytest.raises(PeerUnavailable) as e:
            await mallory.recv(timeout_s=0.5)
        assert cluster_files.endpoints["node1"] in str(e.value)
        assert "refused our key" in str(e.value)
        assert intruder_pub.decode() in str(e.value)
        # the server still serves the cluster
        alice = await connect(stack, cluster_files, "alice")
        await alice.send([b"hello"])
        got = await asyncio.wait_for(server.recv(), 3)
        assert (got.peer.name, got.frames) == ("alice", [b"hello"])

    with capture_logs() as logs:
        run(scenario)
    refused = [e for e in logs if e["event"] == "transport.refused"]
    assert refused, logs
    assert refused[0]["key"] == intruder_pub.decode()
    assert refused[0]["log_level"] == "warning"
    assert all(
        e["key"] != intruder_pub.decode() for e in logs if e["event"] == "transport.accepted"
    )


def test_client_with_the_wrong_server_key_cannot_talk(cluster_files: ClusterFiles) -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        server = await serve(
            stack, cluster_files.node_config("node1"), cluster_files.load_cluster()
        )
        me = cluster_files.client_config("alice")
        wrong = cluster_files.public_key("node2")  # not node1's key
        client = await Client.connect(
            cluster_files.endpoints["node1"], wrong, me.public_key, me.secret_key
        )
        stack.callback(client.close)
        await client.send([b"hello"])
        assert await recv_or_none(server, 1.0) is None
        with pytest.raises(PeerUnavailable) as e:
            await client.recv(timeout_s=0.5)
        assert "handshake failed" in str(e.value)
        assert wrong.decode() in str(e.value)

    run(scenario)


def test_plaintext_client_cannot_talk(cluster_files: ClusterFiles) -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        server = await serve(
            stack, cluster_files.node_config("node1"), cluster_files.load_cluster()
        )
        sock = await raw_client(stack, cluster_files.endpoints["node1"], None, None)
        await sock.send_multipart([b"no CURVE at all"])
        assert await recv_or_none(server, 1.0) is None

    run(scenario)


def test_peer_is_known_by_its_key_not_by_what_it_sends(cluster_files: ClusterFiles) -> None:
    from migrate import keys

    node2_keys = keys.load_secret(cluster_files.keys_dir / "node2.key_secret")

    async def scenario(stack: AsyncExitStack) -> None:
        server = await serve(
            stack, cluster_files.node_config("node1"), cluster_files.load_cluster()
        )
        # node2's key, but claiming to be alice by routing id and node1 by its frames
        sock = await raw_client(
            stack,
            cluster_files.endpoints["node1"],
            cluster_files.public_key("node1"),
            node2_keys,
            routing_id=b"alice",
        )
        alice_key = cluster_files.public_key("alice")
        await sock.send_multipart([b"node1", b"operator alice", alice_key])
        got = await asyncio.wait_for(server.recv(), 3)
        assert (got.peer.name, got.peer.kind) == ("node2", "node")
        assert got.peer.public_key == cluster_files.public_key("node2")
        assert got.frames == [b"node1", b"operator alice", alice_key]
        assert got.routing_id == b"alice"  # chosen by the peer: an address, not an identity

    run(scenario)


def test_oversized_frame_is_dropped_and_others_keep_working(tmp_path: Path) -> None:
    files = write_cluster(tmp_path, max_message_bytes=65536)

    async def scenario(stack: AsyncExitStack) -> None:
        server = await serve(stack, files.node_config("node1"), files.load_cluster())
        big = await connect(stack, files, "node2")
        alice = await connect(stack, files, "alice")
        await big.send([b"x" * 65536])  # exactly the limit: accepted
        got = await asyncio.wait_for(server.recv(), 3)
        assert (got.peer.name, len(got.frames[0])) == ("node2", 65536)
        await big.send([b"x" * 65537])
        await alice.send([b"still here"])
        got = await asyncio.wait_for(server.recv(), 3)
        assert (got.peer.name, got.frames) == ("alice", [b"still here"])
        assert await recv_or_none(server, 0.5) is None  # the oversized message never arrives
        # libzmq dropped node2's connection; its DEALER reconnects and goes on
        await big.send([b"small again"])
        got = await asyncio.wait_for(server.recv(), 3)
        assert (got.peer.name, got.frames) == ("node2", [b"small again"])
        await server.send(got.routing_id, [b"ok"])
        assert await big.recv(3) == [b"ok"]

    run(scenario)


def test_bulk_message_under_the_default_limit(cluster_files: ClusterFiles) -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        server = await serve(
            stack, cluster_files.node_config("node1"), cluster_files.load_cluster()
        )
        client = await connect(stack, cluster_files, "node2")
        chunk = bytes(range(256)) * (4 * 1024 * 4)  # 4 MiB
        await client.send([b"chunk", chunk])
        got = await asyncio.wait_for(server.recv(), 3)
        assert got.frames[1] == chunk
        await server.send(got.routing_id, [b"chunk", chunk])
        assert (await client.recv(3))[1] == chunk

    run(scenario)


def test_message_with_too_many_frames_is_dropped(cluster_files: ClusterFiles) -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        server = await Server.start(
            cluster_files.node_config("node1"), cluster_files.load_cluster(), max_frames=4
        )
        stack.push_async_callback(server.close)
        client = await connect(stack, cluster_files, "node2")
        await client.send([b"f"] * 5)
        await client.send([b"f"] * 4)
        got = await asyncio.wait_for(server.recv(), 3)
        assert got.frames == [b"f"] * 4

    with capture_logs() as logs:
        run(scenario)
    assert any(e["event"] == "transport.dropped" and "5 frames" in e["reason"] for e in logs)


def test_removed_key_is_refused_on_its_live_connection(cluster_files: ClusterFiles) -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        cluster = cluster_files.load_cluster()
        server = await serve(stack, cluster_files.node_config("node1"), cluster)
        alice = await connect(stack, cluster_files, "alice")
        await alice.send([b"before"])
        assert (await asyncio.wait_for(server.recv(), 3)).frames == [b"before"]
        server.update_cluster(Cluster(cluster.nodes, {}, cluster.source))
        await alice.send([b"after"])
        assert await recv_or_none(server, 1.0) is None

    with capture_logs() as logs:
        run(scenario)
    assert any(e["event"] == "transport.dropped" for e in logs)


def test_reply_to_a_gone_peer_raises(cluster_files: ClusterFiles) -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        server = await serve(
            stack, cluster_files.node_config("node1"), cluster_files.load_cluster()
        )
        client = await connect(stack, cluster_files, "node2")
        await client.send([b"hi"])
        got = await asyncio.wait_for(server.recv(), 3)
        client.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3
        with pytest.raises(PeerUnavailable, match="is gone"):
            while loop.time() < deadline:
                await server.send(got.routing_id, [b"late"])
                await asyncio.sleep(0.05)
        with pytest.raises(PeerUnavailable):
            await server.send(b"\x00nobody", [b"x"])

    run(scenario)


def test_two_node_services_in_one_process_call_each_other(cluster_files: ClusterFiles) -> None:
    """Each server has its own context (hence its own ZAP handler); a node calls another with
    its own keys (ClientConfig.from_node)."""

    async def scenario(stack: AsyncExitStack) -> None:
        cluster = cluster_files.load_cluster()
        servers = {
            n: await serve(stack, cluster_files.node_config(n), cluster) for n in ("node1", "node2")
        }
        for caller, callee in (("node1", "node2"), ("node2", "node1")):
            client = await connect(stack, cluster_files, caller, node=callee)
            await client.send([caller.encode()])
            got = await asyncio.wait_for(servers[callee].recv(), 3)
            assert got.peer.name == caller == got.frames[0].decode()
            await servers[callee].send(got.routing_id, [callee.encode()])
            assert await client.recv(3) == [callee.encode()]

    run(scenario)


def test_nothing_listening_says_cannot_connect(cluster_files: ClusterFiles) -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        client = await connect(stack, cluster_files, "alice", node="node2")
        await client.send([b"anyone?"])
        with pytest.raises(PeerUnavailable) as e:
            await client.recv(timeout_s=1.0)
        assert "node node2 at " + cluster_files.endpoints["node2"] in str(e.value)
        assert "cannot connect" in str(e.value)

    run(scenario)


def test_server_gone_after_connecting_is_noticed(cluster_files: ClusterFiles) -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        server = await Server.start(
            cluster_files.node_config("node1"), cluster_files.load_cluster()
        )
        try:
            client = await connect(stack, cluster_files, "alice")
            await client.send([b"hi"])
            got = await asyncio.wait_for(server.recv(), 3)
            await server.send(got.routing_id, [b"hello"])
            assert await client.recv(3) == [b"hello"]
        finally:
            await server.close()
        await server.close()  # idempotent
        await client.send([b"still there?"])
        with pytest.raises(PeerUnavailable) as e:
            await client.recv(timeout_s=1.0)
        assert "connection was lost" in str(e.value) or "cannot connect" in str(e.value)

    run(scenario)


def test_for_peer_names_the_known_nodes(cluster_files: ClusterFiles) -> None:
    async def scenario(stack: AsyncExitStack) -> Any:
        return await Client.for_peer(
            cluster_files.client_config("alice"), cluster_files.load_cluster(), "node9"
        )

    with pytest.raises(NodeConfigError, match=r"node9.*known nodes: node1, node2"):
        run(scenario)


def test_server_refuses_a_key_the_cluster_does_not_list_for_it(cluster_files: ClusterFiles) -> None:
    # node1's config pointing at node2's secret key: peers could never authenticate it
    cfg = cluster_files.node_config("node1")
    bad = NodeConfig(
        cfg.name,
        cfg.listen,
        cfg.state_root,
        cluster_files.keys_dir / "node2.key_secret",
        cfg.cluster,
        source=cfg.source,
    )

    async def scenario(stack: AsyncExitStack) -> Any:
        return await serve(stack, bad, load_cluster(cfg.cluster))

    with pytest.raises(NodeConfigError, match=r"nodes\.node1\.public_key.*does not belong"):
        run(scenario)


def test_second_server_on_the_same_endpoint_names_listen(cluster_files: ClusterFiles) -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        cfg = cluster_files.node_config("node1")
        await serve(stack, cfg, cluster_files.load_cluster())
        with pytest.raises(NodeConfigError, match=r"node1\.toml: listen: cannot bind"):
            await serve(stack, cfg, cluster_files.load_cluster())

    run(scenario)


def test_restart_in_the_same_event_loop(cluster_files: ClusterFiles) -> None:
    """A server started right after another was closed in the same loop still answers ZAP
    (pyzmq's AsyncioAuthenticator left a stale fd registration behind here)."""

    async def scenario(stack: AsyncExitStack) -> None:
        cfg, cluster = cluster_files.node_config("node1"), cluster_files.load_cluster()
        for i in range(3):
            server = await Server.start(cfg, cluster)
            try:
                client = await Client.for_peer(
                    cluster_files.client_config("alice"), cluster, "node1"
                )
                try:
                    await client.send([b"round %d" % i])
                    got = await asyncio.wait_for(server.recv(), 3)
                    await server.send(got.routing_id, got.frames)
                    assert await client.recv(3) == [b"round %d" % i]
                finally:
                    client.close()
            finally:
                await server.close()

    run(scenario)


def test_cancelled_service_loop_closes_and_frees_the_endpoint(cluster_files: ClusterFiles) -> None:
    """The node service's shape: a task loops on recv() and closes the server in ``finally``
    when cancelled; the endpoint can be bound again at once."""

    async def serve_forever(server: Server, seen: list[Incoming]) -> None:
        try:
            while True:
                seen.append(await server.recv())
        finally:
            await server.close()

    async def scenario(stack: AsyncExitStack) -> None:
        cfg, cluster = cluster_files.node_config("node1"), cluster_files.load_cluster()
        seen: list[Incoming] = []
        task = asyncio.create_task(serve_forever(await Server.start(cfg, cluster), seen))
        client = await connect(stack, cluster_files, "node2")
        await client.send([b"one"])
        for _ in range(60):
            if seen:
                break
            await asyncio.sleep(0.05)
        assert [m.frames for m in seen] == [[b"one"]]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        server = await serve(stack, cfg, cluster)
        await client.send([b"two"])  # the DEALER reconnects to the new server
        got = await asyncio.wait_for(server.recv(), 3)
        assert (got.peer.name, got.frames) == ("node2", [b"two"])

    run(scenario)


ECHO_SERVER = """
import asyncio, sys
from migrate.config import load_node
from migrate.transport import Server

async def main():
    cfg, cluster = load_node(sys.argv[1])
    server = await Server.start(cfg, cluster)
    print("READY", flush=True)
    while True:
        m = await server.recv()
        await server.send(m.routing_id, m.frames)

asyncio.run(main())
"""


@pytest.fixture
def echo_server_process(cluster_files: ClusterFiles) -> Iterator[subprocess.Popen[str]]:
    """node1 as an echo server in a child process (killed by pid at the end)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER, str(cluster_files.nodes["node1"])],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 10
        for line in proc.stdout:  # structlog writes its own lines first
            if line.strip() == "READY" or time.monotonic() > deadline:
                break
        assert proc.poll() is None, "the echo server did not start"
        yield proc
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(timeout=10)


def test_a_stopped_peer_is_noticed_by_heartbeats(
    cluster_files: ClusterFiles, echo_server_process: subprocess.Popen[str]
) -> None:
    """A peer that stops answering without closing its TCP connection (SIGSTOP) is declared
    lost after the heartbeat timeout (3 s), not only after a long TCP timeout."""

    async def scenario(stack: AsyncExitStack) -> float:
        client = await connect(stack, cluster_files, "alice")
        await client.send([b"ping"])
        assert await client.recv(5) == [b"ping"]
        os.kill(echo_server_process.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        await client.send([b"anyone?"])
        while True:
            with pytest.raises(PeerUnavailable) as e:
                await client.recv(0.5)
            if "connection was lost" in str(e.value):
                return time.monotonic() - t0
            assert "connected and authenticated, but it did not answer" in str(e.value)
            assert time.monotonic() - t0 < 6

    lost_after_s = run(scenario)
    assert 2.0 <= lost_after_s < 6


def test_a_failing_zap_check_refuses_and_zap_goes_on(
    cluster_files: ClusterFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    from migrate import transport

    real = transport._AllowList.callback
    calls: list[bytes] = []

    def flaky(self: Any, domain: str, key: bytes) -> bool:
        calls.append(key)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(self, domain, key)

    monkeypatch.setattr(transport._AllowList, "callback", flaky)

    async def scenario(stack: AsyncExitStack) -> None:
        server = await serve(
            stack, cluster_files.node_config("node1"), cluster_files.load_cluster()
        )
        alice = await connect(stack, cluster_files, "alice")
        await alice.send([b"first"])
        with pytest.raises(PeerUnavailable, match="ZAP status 500"):
            await alice.recv(1.0)
        node2 = await connect(stack, cluster_files, "node2")
        await node2.send([b"second"])
        got = await asyncio.wait_for(server.recv(), 3)
        assert (got.peer.name, got.frames) == ("node2", [b"second"])

    with capture_logs() as logs:
        run(scenario)
    assert any(e["event"] == "transport.zap_failed" and "boom" in e["error"] for e in logs)
