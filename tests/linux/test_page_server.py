"""A real ``criu page-server`` over TLS (:class:`migrate.criu.PageServer`), as the
destination of a migration starts it: only the holder of the session's pinned identity can
write memory pages into its images dir.

The clients here speak CRIU's page-server protocol themselves
(:func:`tests.helpers.page_server.forged_pages`, the ``page_server_iov`` commands of
criu/page-xfer.c): one page of a made-up pid.  Two controls show that this conversation does
write ``pagemap-*.img`` and ``pages-*.img`` (without TLS, and over TLS with the pinned
identity), so the refusals are the TLS pinning at work, not a malformed stream.  The last tests dump a real container through the page server with real
CRIU.  Every server is killed by the fixture's finalizer, and the test fails if a CRIU
process working below its tmp dir is left."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from migrate import certs, criu
from migrate.errors import CriuError
from tests.helpers.containers import wait_for
from tests.helpers.counter import COUNTER, assert_continuous, ticks, wait_ticks
from tests.helpers.jaula import Jaula
from tests.helpers.leaks import session_leaks
from tests.helpers.page_server import FORGED_PID, WAIT_S, forged_pages, page_images
from tests.helpers.page_server import send_tls as _send_tls
from tests.helpers.skips import needs_criu, needs_root

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_root, needs_criu]


@dataclass(frozen=True)
class Identities:
    """A session's pair of identities made as :mod:`migrate.source` makes them, and a
    stranger's.

    Attributes:
        destination: the page server's files (its CA file: the source's certificate).
        source: the dumping side's files (its CA file: the destination's certificate).
        stranger: another self-signed identity (made the same way, in another dir) that
            knows the destination's certificate (certificates are not secret).
    """

    destination: certs.TlsFiles
    source: certs.TlsFiles
    stranger: certs.TlsFiles


@pytest.fixture
def ids(tmp_path: Path) -> Identities:
    dirs = {n: tmp_path / f"tls-{n}" for n in ("source", "destination", "stranger")}
    for d in dirs.values():
        d.mkdir()
    src_pem, src_cert, src_key = certs.make_identity(dirs["source"], "source")
    dst, dst_pem = certs.session_tls(dirs["destination"], "destination", src_pem)
    src = certs.TlsFiles(certs.trust_peer(dirs["source"], dst_pem), src_cert, src_key)
    _, st_cert, st_key = certs.make_identity(dirs["stranger"], "source")
    stranger = certs.TlsFiles(certs.trust_peer(dirs["stranger"], dst_pem), st_cert, st_key)
    return Identities(dst, src, stranger)


@dataclass
class Started:
    """A page server the fixture started, and the images dir it writes into."""

    server: criu.PageServer
    images: Path


StartFn = Callable[[certs.TlsFiles | None], Started]


@pytest.fixture
def page_server(tmp_path: Path) -> Iterator[StartFn]:
    """``start(tls) -> Started``: a page server on 127.0.0.1 writing into a fresh images
    dir.  Finalizer: every server started is killed; fails if a CRIU process is left."""
    started: list[criu.PageServer] = []

    def start(tls: certs.TlsFiles | None) -> Started:
        n = len(started)
        images, work = tmp_path / f"ps{n}-images", tmp_path / f"ps{n}-work"
        images.mkdir()
        work.mkdir()
        ps = criu.PageServer(images, "127.0.0.1", tls, work)
        started.append(ps)
        return Started(ps, images)

    try:
        yield start
    finally:
        for ps in started:
            ps.kill()
        left = session_leaks(tmp_path).get("processes", [])
        assert not left, f"CRIU processes left: {left}"


def _send_plain(port: int, parts: list[bytes]) -> bytes:
    """Connect without TLS, send ``parts`` and end our side (a server still reading sees
    EOF instead of waiting out WAIT_S); returns what the server answered (if any)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as s:
        try:
            for part in parts:
                s.sendall(part)
            s.shutdown(socket.SHUT_WR)
            return s.recv(64)
        except OSError:
            return b""


def _refused(s: Started) -> str:
    with pytest.raises(CriuError) as e:
        s.server.wait(WAIT_S)
    assert e.value.action == "page-server"
    assert page_images(s.images) == []
    assert list(s.images.iterdir()) == [], "the refused page server wrote something"
    return f"{e.value} {e.value.log_excerpt}"


# -- controls: the forged conversation does write pages when it is allowed to -------------


def test_control_without_tls_the_forged_pages_are_written(page_server: StartFn) -> None:
    s = page_server(None)
    assert _send_plain(s.server.port, forged_pages()) == b"\0\0\0\0"
    s.server.wait(WAIT_S)
    assert f"pagemap-{FORGED_PID}.img" in page_images(s.images)
    pages = list(s.images.glob("pages-*.img"))
    assert len(pages) == 1 and pages[0].read_bytes() == b"\xab" * 4096


def test_control_the_pinned_identity_writes_pages_over_tls(
    page_server: StartFn, ids: Identities
) -> None:
    s = page_server(ids.destination)
    answer = _send_tls(
        s.server.port, forged_pages(), ids.source.cert, ids.source.key, ids.source.cacert
    )
    assert answer == b"\0\0\0\0"
    s.server.wait(WAIT_S)
    assert f"pagemap-{FORGED_PID}.img" in page_images(s.images)
    pages = list(s.images.glob("pages-*.img"))
    assert len(pages) == 1 and pages[0].read_bytes() == b"\xab" * 4096


# -- refusals ---------------------------------------------------------------------------


def test_plain_tcp_client_is_refused_and_nothing_is_written(
    page_server: StartFn, ids: Identities
) -> None:
    s = page_server(ids.destination)
    _send_plain(s.server.port, forged_pages())
    text = _refused(s)
    assert "TLS handshake failed" in text


def test_strangers_certificate_is_refused_and_nothing_is_written(
    page_server: StartFn, ids: Identities
) -> None:
    """A stranger cannot inject memory pages: its self-signed certificate (made exactly as
    the source's, trusting the destination's) completes the handshake, then fails the pin."""
    s = page_server(ids.destination)
    answer = _send_tls(
        s.server.port, forged_pages(), ids.stranger.cert, ids.stranger.key, ids.stranger.cacert
    )
    assert answer == b""
    text = _refused(s)
    assert "Invalid certificate" in text or "NOT trusted" in text


def test_tls_client_without_a_certificate_is_refused(page_server: StartFn, ids: Identities) -> None:
    s = page_server(ids.destination)
    assert _send_tls(s.server.port, forged_pages(), None, None, None) == b""
    text = _refused(s)
    assert "Certificate is required" in text or "certificate" in text.lower()


def test_the_destinations_own_certificate_does_not_open_it(
    page_server: StartFn, ids: Identities
) -> None:
    """The CA file pins the source's certificate only: the page server's own identity
    (which an observer of the accept could also not use without its key, but which the
    destination itself holds) is not a way in either."""
    s = page_server(ids.destination)
    assert (
        _send_tls(s.server.port, forged_pages(), ids.destination.cert, ids.destination.key, None)
        == b""
    )
    text = _refused(s)
    assert "Invalid certificate" in text or "NOT trusted" in text


# -- lifetime ---------------------------------------------------------------------------


def test_kill_is_idempotent_and_leaves_no_process(
    page_server: StartFn, ids: Identities, tmp_path: Path
) -> None:
    s = page_server(ids.destination)
    pid, port = s.server.proc.pid, s.server.port
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "criu"
    s.server.kill()
    assert s.server.proc.returncode is not None
    s.server.kill()  # again: no error
    assert session_leaks(tmp_path).get("processes", []) == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    with pytest.raises(CriuError, match="status"):  # it did not finish its job
        s.server.wait(WAIT_S)
    # a server that already exited on its own (refused a client) is killed without error too
    t = page_server(ids.destination)
    _send_plain(t.server.port, [b"junk"])
    with pytest.raises(CriuError):
        t.server.wait(WAIT_S)
    t.server.kill()
    t.server.kill()
    assert session_leaks(tmp_path).get("processes", []) == []


# -- a real dump through the page server ------------------------------------------------

Counter = tuple[Jaula, Any]  # the CLI, and the runtime's Container object


@pytest.fixture
def counter(jaula: Jaula) -> Counter:
    """A running busybox container ``ps`` printing ticks (removed by the jaula fixture)."""
    from runtime.container import Runtime

    jaula.run("run", "-d", "--name", "ps", "busybox", "sh", "-c", COUNTER)
    wait_ticks(jaula, "ps", 5)
    return jaula, Runtime(jaula.root).get("ps")


def _dump_opts(
    c: Any, images: Path, port: int, tls: certs.TlsFiles, leave_running: bool = False
) -> criu.DumpOptions:
    """The dump a migration's source runs (:mod:`migrate.source`), through a page
    server on 127.0.0.1."""
    from migrate.checkpoint import dump_externals, external_netns, freezer_path
    from migrate.restorer import network_lock

    return criu.DumpOptions(
        pid=c.state.pid,
        images_dir=images,
        freeze_cgroup=freezer_path(c),
        network_lock=network_lock(c.config),
        leave_running=leave_running,
        external=dump_externals([], external_netns(c)),
        page_server=("127.0.0.1", port),
        tls=tls,
    )


def _keeps_running(j: Jaula) -> None:
    n = ticks(j, "ps")[-1]
    wait_ticks(j, "ps", n + 10, timeout=30)
    assert_continuous(ticks(j, "ps"))


def test_dump_streams_its_pages_to_the_page_server(
    page_server: StartFn, ids: Identities, counter: Counter, tmp_path: Path
) -> None:
    """As in a migration: CRIU holds the tasks at post-dump once every page has gone; the
    answer False (a rollback) resumes them."""
    j, c = counter
    s = page_server(ids.destination)
    local = tmp_path / "local-images"
    seen: list[str] = []

    def on_notify(n: criu.Notify) -> bool:
        seen.append(n.script)
        return n.script != "post-dump"

    with pytest.raises(CriuError):  # post-dump answered with failure: the dump "fails"
        criu.dump(_dump_opts(c, local, s.server.port, ids.source), on_notify)
    assert "post-dump" in seen
    s.server.wait(WAIT_S)  # exited 0: every page arrived before post-dump
    got = page_images(s.images)
    assert any(n.startswith("pagemap-") for n in got), got
    assert sum(p.stat().st_size for p in s.images.glob("pages-*.img")) > 0, got
    assert page_images(local) == [], "pages were written locally too"
    assert (local / "dump.log").exists()
    _keeps_running(j)


def test_dump_stats_count_the_pages_the_page_server_received(
    page_server: StartFn, ids: Identities, counter: Counter, tmp_path: Path
) -> None:
    """The migration report's page_server_bytes is stats-dump's pages_written x 4096: it
    must be what the page server wrote."""
    j, c = counter
    s = page_server(ids.destination)
    local = tmp_path / "local-images"
    criu.dump(_dump_opts(c, local, s.server.port, ids.source, leave_running=True))
    s.server.wait(WAIT_S)
    received = sum(p.stat().st_size for p in s.images.glob("pages-*.img"))
    assert received > 0 and page_images(local) == []
    assert criu.dump_stats(local).get("pages_written", 0) * 4096 == received
    _keeps_running(j)


def test_dump_with_a_strangers_identity_writes_no_pages(
    page_server: StartFn, ids: Identities, counter: Counter, tmp_path: Path
) -> None:
    """A real CRIU dump presenting the stranger's certificate: the page server refuses it,
    the dump fails, nothing reaches the page server's dir, and the container keeps
    running."""
    j, c = counter
    s = page_server(ids.destination)
    with pytest.raises(CriuError):
        criu.dump(_dump_opts(c, tmp_path / "local-images", s.server.port, ids.stranger))
    text = _refused(s)
    assert "Invalid certificate" in text or "NOT trusted" in text
    _keeps_running(j)


def test_dump_refuses_a_page_server_it_does_not_pin(
    page_server: StartFn, ids: Identities, counter: Counter, tmp_path: Path
) -> None:
    """An impostor page server (it trusts the source, but shows its own certificate, not
    the destination's) gets no pages: the dumping CRIU refuses it, and the container keeps
    running."""
    j, c = counter
    d = tmp_path / "tls-impostor"
    d.mkdir()
    impostor, _ = certs.session_tls(d, "destination", ids.source.cert.read_bytes())
    s = page_server(impostor)
    local = tmp_path / "local-images"
    with pytest.raises(CriuError) as e:
        criu.dump(_dump_opts(c, local, s.server.port, ids.source))
    assert "Invalid certificate" in e.value.log_excerpt or "NOT trusted" in e.value.log_excerpt
    with pytest.raises(CriuError):
        s.server.wait(WAIT_S)
    assert page_images(s.images) == [] and page_images(local) == []
    _keeps_running(j)


def test_dump_to_a_silent_peer_fails_instead_of_staying_frozen(
    ids: Identities, counter: Counter, tmp_path: Path
) -> None:
    """A "page server" that accepts the connection and then says nothing (a hung host, a
    cut network): jaula's CRIU (patch 0005) gives the connection a time limit, so the dump
    fails and the tasks run again, rather than staying frozen for as long as the peer is
    silent.  (No timing is asserted: only that it ends, with the cause in the error.)"""
    import socket
    import threading

    j, c = counter
    held: list[Any] = []
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        port = lst.getsockname()[1]
        t = threading.Thread(target=lambda: held.append(lst.accept()), daemon=True)
        t.start()
        c.cgroup().freeze()  # as a migration does, before CRIU
        try:
            with pytest.raises(CriuError) as e:
                criu.dump(_dump_opts(c, tmp_path / "local-images", port, ids.source))
        finally:
            c.cgroup().thaw()
            for conn, _ in held:
                conn.close()
    assert "handshake" in str(e.value) or "handshake" in e.value.log_excerpt, str(e.value)
    assert page_images(tmp_path / "local-images") == []
    _keeps_running(j)


# -- the destination's choice: a page server only when it can offer one ---------------------


def _ps_procs(staging: Path) -> list[str]:
    """CRIU processes working in ``staging`` (a session's scratch dir, under /dev/shm)."""
    return session_leaks(staging).get("processes", [])


@pytest.mark.parametrize(
    "listen, offer, started",
    [
        ("tcp://127.0.0.1:1", {"page_server": ["tls"], "ps_cert": "SOURCE"}, True),
        ("tcp://127.0.0.1:1", {}, False),  # a source that does not offer one (older jaula)
        ("tcp://127.0.0.1:1", {"page_server": ["tls"]}, False),  # ... or without its certificate
        ("tcp://127.0.0.1:1", {"page_server": ["plain"], "ps_cert": "SOURCE"}, False),
        ("tcp://127.0.0.1:1", {"page_server": ["tls"], "ps_cert": b"garbage"}, False),
        ("ipc:///run/jaula/none.ipc", {"page_server": ["tls"], "ps_cert": "SOURCE"}, False),
        # a host name: resolved first (`criu page-server --address` takes IP literals only)
        ("tcp://localhost:1", {"page_server": ["tls"], "ps_cert": "SOURCE"}, True),
        ("tcp://no-such-host.invalid:1", {"page_server": ["tls"], "ps_cert": "SOURCE"}, False),
    ],
)
def test_destination_offers_a_page_server_only_when_it_can(
    tmp_path: Path, ids: Identities, listen: str, offer: dict[str, Any], started: bool
) -> None:
    """DestinationSession._start_page_server with real CRIU: the ``accept`` fields it
    returns, the page server it leaves running (pinned to the source's certificate), and
    finish() killing it and removing the staging dir."""
    import asyncio

    from migrate.destination import DestinationSession
    from runtime.container import Runtime

    if offer.get("ps_cert") == "SOURCE":
        offer = {**offer, "ps_cert": ids.source.cert.read_bytes()}
    rt = Runtime(tmp_path / "state")

    async def scenario() -> None:
        async def send(frames: list[bytes]) -> None:
            raise AssertionError("nothing is sent here")

        s = DestinationSession(
            rt, send, {"session": "pstest0123456789", **offer}, "node1", listen=listen
        )
        (s.staging / "criu").mkdir(parents=True)  # as on_offer makes it
        try:
            fields = s._start_page_server()
            if not started:
                assert fields == {} and s.page_server is None
                assert _ps_procs(s.staging) == []
                return
            assert s.page_server is not None
            ps = fields["page_server"]
            assert ps["address"] == "127.0.0.1" and ps["port"] == s.page_server.port
            assert ps["cert"] == (s.staging / "destination-cert.pem").read_bytes()
            assert (s.staging / "peer-ca.pem").read_bytes() == offer["ps_cert"]
            assert s.page_server.proc.poll() is None and _ps_procs(s.staging)
            # the source's identity is the one it accepts (the control of the tests above)
            src = certs.TlsFiles(
                certs.trust_peer(tmp_path / "tls-source", ps["cert"]),
                ids.source.cert,
                ids.source.key,
            )
            answer = await asyncio.to_thread(
                _send_tls, ps["port"], forged_pages(), src.cert, src.key, src.cacert
            )
            assert answer == b"\0\0\0\0"
            await asyncio.to_thread(s.page_server.wait, WAIT_S)
            assert f"pagemap-{FORGED_PID}.img" in page_images(s.staging / "criu")
        finally:
            staging = s.staging
            await s.finish()
            assert _ps_procs(staging) == [] and not staging.exists()

    asyncio.run(scenario())


# -- SysV shared memory through the page server (issue 11, item C) ------------------------


@pytest.fixture
def sysv(jaula: Jaula, python_image_layout: Path) -> Counter:
    """A running container ``shm`` of the C07 workload (``shared/cases/C07/sysv_shm``: a 1 MiB
    SysV segment on key 0xC07 in the container's IPC namespace, a writer and a checking
    child), past its first counter line (removed by the jaula fixture)."""
    from runtime.container import Runtime

    jaula.run("image", "import", str(python_image_layout), "--name", "jaula-python:latest")
    jaula.run("run", "-d", "--name", "shm", "jaula-python", "/opt/cases/C07/sysv_shm")
    wait_for(lambda: "counter=" in jaula.out("logs", "shm"), 30, "the C07 counter")
    return jaula, Runtime(jaula.root).get("shm")


def _shmem_segment(images: Path, shmid: int, size: int) -> bytes:
    """The SysV segment ``shmid`` (``size`` bytes) as the images in ``images`` hold it:
    ``pagemap-shmem-<shmid>.img`` names its pages file and the present page runs (by offset
    in the segment), the pages file holds them in that order; absent pages read as zeros."""
    from pycriu import images as img

    with open(images / f"pagemap-shmem-{shmid}.img", "rb") as f:
        head, *runs = img.load(f)["entries"]
    data = bytearray(size)
    with open(images / f"pages-{head['pages_id']}.img", "rb") as pages:
        for r in runs:
            vaddr = r["vaddr"] if isinstance(r["vaddr"], int) else int(r["vaddr"], 0)
            n = r["nr_pages"] * 4096
            data[vaddr : vaddr + n] = pages.read(n)
    return bytes(data)


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_dump_sends_a_sysv_shm_segment_through_the_page_server(
    page_server: StartFn, ids: Identities, sysv: Counter, tmp_path: Path, tls: bool
) -> None:
    """The segment's pages go through the page server with the task's pages, over TLS as
    over plain TCP.  Over TLS this failed every time before jaula's patch 0012 ("tls: Failed
    receiving data: Decryption has failed", then "The page server doesn't answer"): CRIU
    dumped the IPC namespace in a forked child, which sent the pages with its own copy of
    the TLS session, so the dumping process's next record reused sequence numbers the page
    server had seen.  The content check: the workload's counter word ``v`` (word 0) and its
    slot (word ``1 + v % 1000``, written before ``v`` is published) agree, ``v`` > 0."""
    import struct

    j, c = sysv
    s = page_server(ids.destination if tls else None)
    local = tmp_path / "local-images"
    opts = _dump_opts(c, local, s.server.port, ids.source, leave_running=True)
    criu.dump(opts if tls else dataclasses.replace(opts, tls=None))
    s.server.wait(WAIT_S)
    assert list(local.glob("ipcns-shm-*.img")), "the segment's description is not in the images"
    seg = _shmem_segment(s.images, 0, 1 << 20)
    v = struct.unpack_from("<Q", seg, 0)[0]
    assert v > 0 and struct.unpack_from("<Q", seg, 8 * (1 + v % 1000))[0] == v, v
    assert page_images(local) == [], "pages were written locally too"
    wait_for(lambda: f"counter={v // 20 * 20 + 40} " in j.out("logs", "shm"), 30, "C07 counting on")
    assert "FAIL" not in j.out("logs", "shm")
