"""Issue 15, item 5, against a real node service: hostile requests from a valid operator
key get a one-line error that names the field and answers the request's id (never an
``internal`` error carrying a raw exception), and a state-changing request resent with the
same id is refused as a replay."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest

from tests.helpers.counter import COUNTER, wait_ticks
from tests.helpers.nodes import Cluster2
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


def _talk(nodes: Cluster2, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from migrate.config import load_client_config, load_cluster
    from migrate.protocol import decode
    from migrate.transport import Client

    async def run() -> list[dict[str, Any]]:
        cfg = load_client_config(nodes.files.clients["alice"])
        client = await Client.for_peer(cfg, load_cluster(cfg.cluster), "node1")
        replies = []
        try:
            for m in messages:
                await client.send([msgpack.packb({"v": 1, **m}, use_bin_type=True)])
                replies.append(decode(await client.recv(timeout_s=30))[0])
        finally:
            client.close()
        return replies

    return asyncio.run(run())


def test_hostile_requests_get_a_field_error_and_replays_are_refused(nodes: Cluster2) -> None:
    n1 = nodes.local("node1")
    n1.run("run", "-d", "--name", "v", "busybox", "sh", "-c", COUNTER)
    wait_ticks(n1, "v", 2)
    base = {"type": "exec", "container": "v"}
    replies = _talk(
        nodes,
        [
            {**base, "id": "hostile-request-0001", "args": ["echo", "a\0b"]},
            {**base, "id": "hostile-request-0002", "args": [1, {}, None]},
            {**base, "id": "hostile-request-0003", "args": ["true"], "env": [None]},
            {"type": "logs", "id": 4, "container": "v", "tail": -1},
            {"type": "logs", "id": 5, "container": "v", "tail": 2**63 - 1},
            {"type": "ping", "id": 6, "v": 1.0},
            {**base, "id": "replayed-request-01", "args": ["cat", "/tmp/count"]},
            {**base, "id": "replayed-request-01", "args": ["cat", "/tmp/count"]},
        ],
    )
    fields = ["exec.args", "exec.args", "exec.env", "logs.tail", "logs.tail", "version"]
    for r, field in zip(replies[:6], fields, strict=True):
        assert r["type"] == "error" and r["code"] == "bad_message", r
        assert field in r["message"] and "\n" not in r["message"], r
    assert [r.get("id") for r in replies[:5]] == [
        "hostile-request-0001",
        "hostile-request-0002",
        "hostile-request-0003",
        4,
        5,
    ]
    first, again = replies[6:]
    assert first["type"] == "exec_result" and first["exit_code"] == 0
    assert again["type"] == "error" and again["code"] == "replay", again
    assert "exec.id" in again["message"]
    # the CLI's own requests (a fresh id each) still work, twice over
    for _ in range(2):
        assert int(nodes.op("--node", "node1", "exec", "v", "cat", "/tmp/count").stdout) > 0
