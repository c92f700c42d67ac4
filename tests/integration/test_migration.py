"""Live migration between two real node services on 127.0.0.1, with real CRIU, and the
faults of the migration issue: after each, the container runs on exactly one node (normally
the source), its memory state continues, and nothing stray is left on either node."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.counter import COUNTER, assert_continuous, ticks, wait_ticks
from tests.helpers.jaula import JAULA, REPO, Jaula
from tests.helpers.nodes import Cluster2, both_backends, in_process_node, make_cluster
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


@both_backends
def test_migrate_moves_the_running_container_and_back(nodes: Cluster2) -> None:
    n1, n2 = nodes.local("node1"), nodes.local("node2")
    n1.run("run", "-d", "--name", "web", "busybox", "sh", "-c", COUNTER)
    wait_ticks(n1, "web", 10)
    p = nodes.op("migrate", "web", "node2", "--json")
    rep = json.loads(p.stdout)
    assert rep["source"] == "node1" and rep["destination"] == "node2"
    assert rep["resume_confirmed"] is True
    assert 0 < rep["downtime_s"] < rep["total_s"]
    assert rep["bytes_sent"] > 0 and rep["files"] > 0
    # the memory went through the destination's page server (TLS), not as files
    assert 0 < rep["page_server_bytes"] < rep["bytes_sent"]
    for phase in (
        "preflight",
        "precopy",
        "freeze",
        "dump",
        "transfer",
        "restore",
        "commit",
        "resume",
    ):
        assert phase in rep["phases_s"]
    nodes.assert_only_on("web", "node2")
    assert nodes.where("web")["node1"] == "migrated"
    n = ticks(n2, "web")[-1]
    wait_ticks(n2, "web", n + 10)
    assert_continuous(ticks(n2, "web"))  # the log travelled too, without gap or repeat
    info = json.loads(n1.out("inspect", "web"))[0]
    assert info["State"]["MigratedTo"] == "node2"
    assert not Path(info["UpperDir"]).exists()
    # the remote commands see it where it is
    assert "web" in nodes.op("--node", "node2", "ps").stdout
    assert int(nodes.op("--node", "node2", "exec", "web", "cat", "/tmp/count").stdout) > n
    # and back, onto the node that keeps the record of its departure
    nodes.op("migrate", "web", "node1")
    nodes.assert_only_on("web", "node1")
    n = ticks(n1, "web")[-1]
    wait_ticks(n1, "web", n + 5)
    assert_continuous(ticks(n1, "web"))


def test_missing_image_layers_are_sent_first(tmp_path: Path, busybox_image_layout: Path) -> None:
    c = make_cluster(tmp_path / "cluster", busybox_image_layout, import_on=("node1",))
    try:
        c.start("node1")
        c.start("node2")
        n1, n2 = c.local("node1"), c.local("node2")
        n1.run("run", "-d", "--name", "lone", "busybox", "sh", "-c", COUNTER)
        wait_ticks(n1, "lone", 5)
        assert "busybox" not in n2.out("image", "ls")
        c.op("migrate", "lone", "node2")
        assert "busybox:latest" in n2.out("image", "ls")
        c.assert_only_on("lone", "node2")
        n = ticks(n2, "lone")[-1]
        wait_ticks(n2, "lone", n + 5)
    finally:
        problems = c.close()
        assert not problems, "\n".join(problems)


def test_unknown_key_is_refused(nodes: Cluster2, tmp_path: Path) -> None:
    from migrate import keys

    keys.generate(tmp_path / "mallory", "mallory")
    client = tmp_path / "mallory.toml"
    client.write_text(
        f'secret_key = "{tmp_path}/mallory/mallory.key_secret"\ncluster = "{nodes.files.cluster}"\n'
    )
    p = subprocess.run(
        [*JAULA, "--client-config", str(client), "--node", "node1", "ps"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert p.returncode == 125 and "node1" in p.stderr
    assert "transport.refused" in nodes.log("node1")
    assert "node1" in nodes.op("node", "ls").stdout  # still serving the others


def test_garbage_from_a_valid_key_gets_an_error_reply(nodes: Cluster2) -> None:
    import asyncio

    from migrate.config import load_client_config, load_cluster
    from migrate.protocol import decode, encode
    from migrate.transport import Client

    async def talk() -> list[dict]:
        cfg = load_client_config(nodes.files.clients["alice"])
        client = await Client.for_peer(cfg, load_cluster(cfg.cluster), "node1")
        replies = []
        try:
            for frames in (
                [b"\xc1\xff not msgpack"],
                [b"\x93\x01\x02\x03"],
                encode("ps")[:1] + [b"extra frame"],
                [__import__("msgpack").packb({"v": 9, "type": "ps"})],
                [__import__("msgpack").packb({"v": 1, "type": "rm"})],
                encode("ping"),
            ):
                await client.send(frames)
                replies.append(decode(await client.recv(timeout_s=10))[0])
        finally:
            client.close()
        return replies

    replies = asyncio.run(talk())
    assert [r["type"] for r in replies] == ["error"] * 5 + ["pong"]
    assert "version" in replies[3]["message"] and "container" in replies[4]["message"]


def test_offer_from_an_operator_key_is_forbidden(nodes: Cluster2) -> None:
    import asyncio

    from migrate.config import load_client_config, load_cluster
    from migrate.protocol import decode, encode
    from migrate.transport import Client

    async def talk() -> dict:
        cfg = load_client_config(nodes.files.clients["alice"])
        client = await Client.for_peer(cfg, load_cluster(cfg.cluster), "node2")
        try:
            await client.send(
                encode(
                    "offer",
                    session="s1",
                    container={},
                    image={},
                    criu_version=[4, 2, 1],
                    source_node="node1",
                )
            )
            return decode(await client.recv(timeout_s=10))[0]
        finally:
            client.close()

    r = asyncio.run(talk())
    assert r["type"] == "error" and r["code"] == "forbidden"


def _big_container(n1: Jaula, name: str, mib: int = 300) -> None:
    # A large upperdir makes the pre-copy last long enough to break things in the middle.
    n1.run(
        "run",
        "-d",
        "--name",
        name,
        "busybox",
        "sh",
        "-c",
        f"head -c {mib}000000 /dev/urandom > /big; " + COUNTER,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not ticks(n1, name):
        time.sleep(0.1)


def _migrate_async(nodes: Cluster2, name: str, dest: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*JAULA, "--client-config", str(nodes.files.clients["alice"]), "migrate", name, dest],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _wait_incoming(nodes: Cluster2, dest: str, min_bytes: int = 20 << 20) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for f in (p / "rootfs-base.tar" for p in nodes.incoming(dest)):
            if not f.exists():
                continue
            if f.stat().st_size >= min_bytes:
                return
        time.sleep(0.02)
    raise AssertionError("the transfer never started")


def _continues_on(nodes: Cluster2, name: str, node: str) -> None:
    j = nodes.local(node)
    nodes.assert_only_on(name, node)
    n = ticks(j, name)[-1]
    wait_ticks(j, name, n + 5)
    assert_continuous(ticks(j, name))


@both_backends
def test_destination_killed_during_transfer(nodes: Cluster2) -> None:
    n1 = nodes.local("node1")
    _big_container(n1, "big")
    mig = _migrate_async(nodes, "big", "node2")
    _wait_incoming(nodes, "node2")
    nodes.kill("node2")
    _out, err = mig.communicate(timeout=120)
    assert mig.returncode == 125 and "aborted" in err and "keeps running on node1" in err
    _continues_on(nodes, "big", "node1")
    nodes.start("node2")  # its recovery removes what the dead session left
    assert nodes.local("node2").container_ids() == []
    assert not nodes.incoming("node2")


def test_source_cli_killed_mid_migration(nodes: Cluster2) -> None:
    n1 = nodes.local("node1")
    _big_container(n1, "cli")
    mig = _migrate_async(nodes, "cli", "node2")
    _wait_incoming(nodes, "node2")
    mig.send_signal(signal.SIGKILL)
    mig.wait(timeout=10)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the node service carries on by itself
        where = nodes.where("cli")
        if where.get("node2") == "running" and where.get("node1") == "migrated":
            break
        time.sleep(0.2)
    _continues_on(nodes, "cli", "node2")


def test_destination_disk_too_small_is_refused_before_freezing(nodes: Cluster2) -> None:
    n1 = nodes.local("node1")
    _big_container(n1, "fat", mib=100)
    root2 = nodes.state_root("node2")
    nodes.kill("node2")
    import shutil

    shutil.rmtree(root2)
    root2.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(root2)], check=True)
    try:
        nodes.local("node2").run(
            "image",
            "import",
            str(
                next(Path(nodes.files.root).parent.parent.glob("busybox-image*/layout"), None)
                or _busybox_from(nodes)
            ),
            "--name",
            "busybox:latest",
        )
        nodes.start("node2")
        p = nodes.op("migrate", "fat", "node2", check=False)
        assert p.returncode == 125 and "not enough disk" in p.stderr
        _continues_on(nodes, "fat", "node1")
        assert nodes.local("node2").container_ids() == []
    finally:
        nodes.kill("node2")
        subprocess.run(["umount", "-l", str(root2)], check=False)


def _busybox_from(nodes: Cluster2) -> Path:
    from tests.helpers.images import build_busybox_image

    return build_busybox_image(nodes.files.root / "bb")


def test_missing_layer_the_source_cannot_send(tmp_path: Path, busybox_image_layout: Path) -> None:
    c = make_cluster(tmp_path / "cluster", busybox_image_layout, import_on=("node1",))
    layers = c.state_root("node1") / "layers"
    moved: list[tuple[Path, Path]] = []
    try:
        c.start("node1")
        c.start("node2")
        n1 = c.local("node1")
        n1.run("run", "-d", "--name", "nolayer", "busybox", "sh", "-c", COUNTER)
        time.sleep(0.5)
        for d in layers.iterdir():  # the running overlay keeps its own references
            if len(d.name) == 64:
                away = tmp_path / f"away-{d.name}"
                d.rename(away)
                moved.append((away, d))
        p = c.op("migrate", "nolayer", "node2", check=False)
        assert p.returncode == 125 and "layer" in p.stderr and "keeps running on node1" in p.stderr
        _continues_on(c, "nolayer", "node1")
        assert c.local("node2").container_ids() == []
    finally:
        for away, d in moved:
            away.rename(d)
        problems = c.close()
        assert not problems, "\n".join(problems)


class _Proxy:
    """A TCP proxy on 127.0.0.1 that the test can cut: the link between the nodes."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self.target = target_port
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen()
        self.port = self.lsock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self.closed:
            try:
                a, _ = self.lsock.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the node is not listening yet: drop this one, keep serving
                a.close()
                continue
            self.conns += [a, b]
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pipe, args=(x, y), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self) -> None:
        import socket

        self.closed = True
        self.lsock.close()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


def test_connection_cut_during_transfer(tmp_path: Path, busybox_image_layout: Path) -> None:
    c = make_cluster(tmp_path / "cluster", busybox_image_layout)
    port2 = int(c.files.endpoints["node2"].rsplit(":", 1)[1])
    proxy = _Proxy(port2)
    text = c.files.cluster.read_text()
    c.files.cluster.write_text(text.replace(f'127.0.0.1:{port2}"', f'127.0.0.1:{proxy.port}"'))
    try:
        c.start("node1")
        c.start("node2")
        n1 = c.local("node1")
        _big_container(n1, "cut")
        mig = _migrate_async(c, "cut", "node2")
        _wait_incoming(c, "node2")
        proxy.cut()
        _out, err = mig.communicate(timeout=120)
        assert mig.returncode == 125 and "keeps running on node1" in err
        _continues_on(c, "cut", "node1")
        deadline = time.monotonic() + 30  # node2 gives up the silent session by itself
        while time.monotonic() < deadline and (
            c.local("node2").container_ids() or c.incoming("node2")
        ):
            time.sleep(0.2)
        assert c.local("node2").container_ids() == []
        assert not c.incoming("node2")
    finally:
        proxy.cut()
        problems = c.close()
        assert not problems, "\n".join(problems)


def test_corrupted_chunk_is_detected_and_rolled_back(
    tmp_path: Path, busybox_image_layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """node1's service runs in this process so that one chunk can be corrupted after it was
    sealed (a fault that cannot be caused for real on demand): the destination's check of
    the chunk fails and the migration is rolled back."""
    from migrate import stream as sess

    real_seal = sess._hash_and_seal
    corrupted: list[int] = []

    def corrupting_seal(h, key, session, file, seq, offset, data):
        sealed = real_seal(h, key, session, file, seq, offset, data)
        if not corrupted:
            corrupted.append(file)
            sealed = bytes([sealed[0] ^ 0xFF]) + sealed[1:]
        return sealed

    monkeypatch.setattr(sess, "_hash_and_seal", corrupting_seal)
    c = make_cluster(tmp_path / "cluster", busybox_image_layout)
    try:
        with in_process_node(c, "node1"):
            c.start("node2")
            n1 = c.local("node1")
            n1.run("run", "-d", "--name", "bad", "busybox", "sh", "-c", COUNTER)
            wait_ticks(n1, "bad", 5)
            p = c.op("migrate", "bad", "node2", "--from", "node1", check=False)
            assert corrupted, "no chunk went through the corrupting seal"
            assert p.returncode == 125 and "corrupt" in p.stderr
            assert "keeps running on node1" in p.stderr
            _continues_on(c, "bad", "node1")
            assert c.local("node2").container_ids() == []
    finally:
        problems = c.close()
        assert not problems, "\n".join(problems)


def test_a_message_out_of_order_is_refused_and_rolled_back(
    tmp_path: Path, busybox_image_layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """node1's service runs in this process and sends ``resume`` right after the accept,
    before any file (a broken source cannot be had for real): node2 checks it against its
    phase table, answers with an error that names the message and its phase, and discards
    what it prepared; node1 rolls back and the container keeps running there."""
    from migrate.source import SourceSession

    real_precopy = SourceSession._precopy
    sent: list[str] = []

    async def resume_too_early(self: SourceSession) -> None:
        sent.append(self.session)
        await self.link.send("resume")
        await real_precopy(self)

    monkeypatch.setattr(SourceSession, "_precopy", resume_too_early)
    c = make_cluster(tmp_path / "cluster", busybox_image_layout)
    try:
        with in_process_node(c, "node1"):
            c.start("node2")
            n1 = c.local("node1")
            n1.run("run", "-d", "--name", "early", "busybox", "sh", "-c", COUNTER)
            wait_ticks(n1, "early", 5)
            p = c.op("migrate", "early", "node2", "--from", "node1", check=False)
            assert sent, "the patched pre-copy did not run"
            assert p.returncode == 125, p.stderr
            assert "resume is out of order" in p.stderr and "phase receiving" in p.stderr
            assert "keeps running on node1" in p.stderr
            _continues_on(c, "early", "node1")
            assert c.local("node2").container_ids() == []
            assert not c.incoming("node2")
    finally:
        problems = c.close()
        assert not problems, "\n".join(problems)


def test_a_strategy_whose_criu_patches_are_missing_is_refused_before_the_freeze(
    tmp_path: Path, busybox_image_layout: Path
) -> None:
    """node2 runs a copy of the same criu without jaula's patch manifest beside it: to
    jaula that is a stock CRIU, which cannot do post-copy safely (patches 0005-0009).  The
    offer is refused naming the missing patches; nothing froze, the container keeps its
    counter on node1."""
    import shutil

    from migrate import criu

    stock = tmp_path / "stock" / "sbin" / "criu"
    stock.parent.mkdir(parents=True)
    shutil.copy2(criu.find_criu(), stock)
    assert criu.patch_series(str(stock)) == frozenset()
    c = make_cluster(tmp_path / "cluster", busybox_image_layout)
    try:
        c.start("node1")
        c.start("node2", env={"JAULA_CRIU": str(stock)})
        n1 = c.local("node1")
        n1.run("run", "-d", "--name", "pc", "busybox", "sh", "-c", COUNTER)
        wait_ticks(n1, "pc", 3)
        p = c.op("migrate", "pc", "node2", "--strategy", "postcopy", check=False)
        assert p.returncode == 125, p.stderr
        assert "lacks the patch 0005-page-server-client-time-limits" in p.stderr
        assert "0006-lazy-dump-commit" in p.stderr
        _continues_on(c, "pc", "node1")
        assert c.local("node2").container_ids() == []
    finally:
        problems = c.close()
        assert not problems, "\n".join(problems)


def test_a_commit_that_cannot_be_recorded_rolls_back(
    tmp_path: Path, busybox_image_layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit point is the durable record: when writing it fails (a full disk here,
    caused by patching the write in node1's in-process service), the source has not
    committed, so it rolls back and the frozen container runs on, on node1 only."""
    from migrate.source import SourceSession
    from runtime.errors import JaulaError

    tried: list[str] = []

    async def record_fails(self: SourceSession) -> None:
        tried.append(self.session)
        raise JaulaError(f"cannot write {self.c.dir}/state.json: No space left on device")

    monkeypatch.setattr(SourceSession, "_commit", record_fails)
    c = make_cluster(tmp_path / "cluster", busybox_image_layout)
    try:
        with in_process_node(c, "node1"):
            c.start("node2")
            n1 = c.local("node1")
            n1.run("run", "-d", "--name", "full", "busybox", "sh", "-c", COUNTER)
            wait_ticks(n1, "full", 5)
            p = c.op("migrate", "full", "node2", "--from", "node1", check=False, timeout=120)
            assert tried, "the patched commit did not run"
            assert p.returncode == 125 and "No space left" in p.stderr, p.stderr
            assert "keeps running on node1" in p.stderr
            _continues_on(c, "full", "node1")
            assert c.local("node2").container_ids() == []
    finally:
        problems = c.close()
        assert not problems, "\n".join(problems)
