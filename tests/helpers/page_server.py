"""CRIU's page server as the tests see it from outside: its processes (found in /proc by
the directory they work in and by their parent), and a stranger's client speaking its
protocol.

:func:`forged_pages` is the conversation of a page-server client writing one page of a
made-up pid (the ``page_server_iov`` commands of criu/page-xfer.c); :func:`send_tls` sends it
over TLS with Python's ``ssl``, presenting whatever certificate it is given.  Used by
``tests/linux/test_page_server.py`` (one page server started by the test) and
``tests/integration/test_page_server_faults.py`` (the page server a node service starts for a
migration)."""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: CRIU page-server commands (criu/page-xfer.c) and the pagemap type of a task's memory
PS_IOV_ADD, PS_IOV_OPEN, PS_IOV_CLOSE, PS_TYPE_PID = 1, 3, 0x1023, 1
FORGED_PID = 4242
WAIT_S = 60.0


def forged_pages(pid: int = FORGED_PID) -> list[bytes]:
    """The messages of a page-server client writing one page of task ``pid``: open its
    pagemap, add one present page (header, then the 4096 bytes), close.  Each message is
    sent on its own (over TLS, CRIU's server reads a page only after polling the socket)."""

    def iov(cmd: int, nr_pages: int, vaddr: int) -> bytes:
        # struct page_server_iov { u32 cmd; u64 nr_pages; u64 vaddr; u64 dst_id; }
        return struct.pack("<I4xQQQ", cmd, nr_pages, vaddr, pid << 8 | PS_TYPE_PID)

    return [
        iov(PS_IOV_OPEN, 0, 0),
        iov(PS_IOV_ADD, 1, 0x10000),
        b"\xab" * 4096,
        iov(PS_IOV_CLOSE, 0, 0),
    ]


def page_images(d: Path) -> list[str]:
    """The ``pagemap-*.img`` and ``pages-*.img`` in ``d`` (none when ``d`` is missing)."""
    try:
        return sorted(p.name for p in d.iterdir() if p.name.startswith(("pagemap-", "pages-")))
    except FileNotFoundError:
        return []


def send_tls(
    port: int,
    parts: list[bytes],
    cert: Path | None,
    key: Path | None,
    cacert: Path | None,
    timeout_s: float = WAIT_S,
) -> bytes:
    """Connect to 127.0.0.1:``port`` over TLS, presenting ``cert``/``key`` when given and
    checking the server against ``cacert`` when given; send ``parts`` one by one and return
    the 4-byte answer to the close command (b"" when the server hung up or refused)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if cacert is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cacert)
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    try:
        t = ctx.wrap_socket(raw)  # raw is detached into t
    except (ssl.SSLError, OSError):
        raw.close()
        return b""
    try:
        for part in parts:
            t.sendall(part)
        answer = t.recv(4)
        if answer:  # a clean TLS close: the server waits for ours, then for the EOF
            t.unwrap().close()
        return answer
    except (ssl.SSLError, OSError):
        return b""
    finally:
        t.close()


@dataclass(frozen=True)
class PageServerProc:
    """A running ``criu page-server`` seen in /proc.

    Attributes:
        pid / ppid: its pid and its parent's (``setpriv --pdeathsig`` execs CRIU: the parent
            is whoever started it).
        argv: its command line.
    """

    pid: int
    ppid: int
    argv: tuple[str, ...]

    def _opt(self, name: str) -> str:
        i = self.argv.index(name)
        return self.argv[i + 1]

    @property
    def port(self) -> int:
        """``--port N``: where it listens."""
        return int(self._opt("--port"))

    @property
    def work_dir(self) -> Path:
        """``--work-dir``: a migration's staging dir (its log and certificates are there)."""
        return Path(self._opt("--work-dir"))

    @property
    def images_dir(self) -> Path:
        """``--images-dir``: where it writes the pages it receives."""
        return Path(self._opt("--images-dir"))

    @property
    def log_path(self) -> Path:
        """Its log (``-o NAME`` in the work dir)."""
        return self.work_dir / self._opt("-o")

    def log(self) -> str:
        """Its log so far ("" before it exists or once its dir is removed)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        """Still running: not exited (a zombie its parent has not reaped yet counts as
        exited) and not another process that took its pid."""
        return proc_state(self.pid) not in (None, "Z") and _argv(self.pid) == self.argv


def _argv(pid: int) -> tuple[str, ...] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)


def proc_state(pid: int) -> str | None:
    """The state letter of ``pid`` (``R``, ``S``, ``Z``...), None when there is no such
    process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def listening(port: int) -> bool:
    """Whether a TCP socket of this network namespace listens on ``port`` (any address)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # TCP_LISTEN
                return True
    return False


def page_server_procs(under: Iterable[Path], parent: int | None = None) -> list[PageServerProc]:
    """The live ``criu page-server`` processes whose command line names a path inside one of
    ``under`` (a node's scratch dirs), started by ``parent`` when given."""
    prefixes = [str(p).rstrip("/") + "/" for p in under]
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        pid = int(d.name)
        try:
            if (d / "comm").read_text().strip() != "criu":
                continue
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        argv = _argv(pid)
        if stat[0] == "Z" or not argv or "page-server" not in argv[1:2]:
            continue
        if not any(p in a or a == p.rstrip("/") for a in argv for p in prefixes):
            continue
        ppid = int(stat[1])
        if parent is not None and ppid != parent:
            continue
        found.append(PageServerProc(pid, ppid, argv))
    return found
