"""CRIU, driven through its RPC (``criu swrk``) with pycriu's protobuf messages.

This is the only module that imports pycriu.  pycriu's own ``criu.dump()/restore()`` send one
request and read one reply, so they never see CRIU's notifications; jaula runs ``criu swrk
FD`` itself over a ``SOCK_SEQPACKET`` socketpair and answers each ``NOTIFY``::

    jaula                                criu swrk
      criu_req{DUMP, opts} ────────────►
                           ◄──────────── criu_resp{NOTIFY, "pre-dump"}
      criu_req{NOTIFY, success} ───────►   ... "network-lock", "post-dump" (tasks frozen)
                           ◄──────────── criu_resp{DUMP, success, cr_errno}

Answering ``post-dump`` with failure makes CRIU resume the tasks instead of killing them; on
restore, holding the ``pre-resume`` answer keeps the restored tasks stopped.  Both are the
holds the two-phase migration needs (DESIGN.md, "The migration handoff").

jaula's CRIU carries a patch series (scripts/criu-patches, README there); which patches
the installed binary has is read from its *patch manifest*, a text file that
scripts/setup.sh writes when it installs the binary, at ``PREFIX/../lib/jaula/criu-patches``
for ``PREFIX/criu`` after symlinks (``/usr/local/lib/jaula/criu-patches``)::

    # comment lines
    format 1
    binary /usr/local/sbin/criu
    binary-sha256 <64 hex: sha256 of the binary it was written for>
    gitid jaula-<10 hex>[-partial]
    criu-version 4.2.1
    pin 4.2.1 <sha256 of the pinned tarball>
    source criu_4.2.1.orig.tar.xz <its sha256> debian sid 4.2.1-1
    series <64 hex: sha256 of the patches' names and diffs>
    applied 0001-page-xfer-push-the-close-command
    not-applied 0008-lazy-pages-pipe-max-size
    ...

One ``applied``/``not-applied`` line per patch, in series order; unknown keys are ignored.
The manifest counts only while ``binary-sha256`` is the sha256 of the binary in use, so a
manifest left from another build (a binary replaced by hand, by a package, by another
checkout's setup) counts as no patch at all, as does a missing one (a stock CRIU).
:data:`REQUIRED_PATCHES` says which patches each migration strategy cannot work without.

Sources: CRIU's images/rpc.proto, Documentation "RPC" and "Action scripts" on criu.org,
criu-recipe.md in shared/ (options verified on these machines).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from migrate.certs import TlsFiles
from migrate.errors import CriuError, CriuUnavailable

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger


def _log() -> FilteringBoundLogger:
    # structlog costs ~70 ms to import: not on the restore path of an armed monitor
    import structlog

    logger: FilteringBoundLogger = structlog.get_logger(__name__)
    return logger


try:  # pycriu is built from CRIU's source tree by scripts/setup.sh
    from pycriu import rpc_pb2 as rpc
except ImportError:  # pragma: no cover - reported by find_criu()
    rpc = None

#: 4.1 cannot dump TCP/UDP sockets on kernels 6.16+ (SO_PASSCRED, CRIU issue 2718)
MIN_VERSION = (4, 2)
_MAX_MSG = 4 << 20

#: criu_cg_mode values (rpc.proto)
CG_IGNORE, CG_NONE, CG_PROPS, CG_SOFT, CG_FULL, CG_STRICT = 0, 1, 2, 3, 4, 5
#: criu_network_lock_method values (rpc.proto)
NET_LOCK_IPTABLES, NET_LOCK_NFTABLES, NET_LOCK_SKIP = 1, 2, 3


@dataclass(frozen=True)
class Notify:
    """A CRIU notification: ``script`` is the action-script name (``post-dump``,
    ``pre-resume``...), ``pid`` the root task's pid where CRIU sends one (else 0)."""

    script: str
    pid: int


NotifyHandler = Callable[[Notify], bool]


class StopCriu(Exception):
    """Raised by a notification handler to end CRIU at once (SIGKILL) instead of
    answering it.  For a restore held at ``pre-resume`` that must not go on: CRIU 4.2
    resumes the tasks even when ``pre-resume`` is answered with failure (it only logs
    it), and a restore that fails after the tasks are traced can wait forever for a
    pid namespace whose tasks it traces.  The handler kills the restored tasks first
    (they are stopped and traced: they run nothing more); when CRIU dies its tracees
    are released, dead.  The call then raises CriuError with this message."""


class CriuHandle:
    """A way to end one :func:`dump` or :func:`restore` from another thread (the event
    loop, a watchdog): :meth:`kill` SIGKILLs its ``criu swrk``, and the call then raises
    CriuError with the reason given.  :meth:`arm` does the same after a time limit unless
    :meth:`disarm` comes first (a caller disarms at its point of no return: a dump whose
    ``post-dump`` was answered with success must not be killed, its tasks are dying).

    When CRIU dies the kernel lets go of every task it had seized (ptrace): a dump's tasks
    run again (a frozen cgroup stays frozen until thawed), a restore's half-restored tasks
    are left to whoever kills them.  Thread-safe; a kill before the call has started CRIU
    kills it as soon as it starts.

    Attributes:
        reason: why it was killed (None: it was not).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._timer: threading.Timer | None = None
        self._armed = False
        self.reason: str | None = None

    @property
    def pid(self) -> int:
        """The pid of its ``criu swrk`` (0 before it started)."""
        return self._proc.pid if self._proc is not None else 0

    def _attach(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._proc = proc
            if self.reason is not None:
                proc.kill()

    def kill(self, reason: str) -> None:
        """SIGKILL the CRIU (or the one about to start) because of ``reason``; nothing when
        it has already ended.  Idempotent: the first reason is kept."""
        with self._lock:
            p = self._proc
            if p is not None and p.poll() is not None:
                return  # it ended on its own: the call reports how
            if self.reason is None:
                self.reason = reason
            if p is not None:
                p.kill()

    def arm(self, limit_s: float, reason: str) -> None:
        """:meth:`kill` with ``reason`` after ``limit_s`` seconds, unless disarmed first."""
        self.disarm()
        with self._lock:
            self._armed = True
        t = threading.Timer(limit_s, self._expire, (reason,))
        t.daemon = True
        self._timer = t
        t.start()

    def _expire(self, reason: str) -> None:
        with self._lock:
            if not self._armed:
                return  # disarmed as the timer fired
        self.kill(reason)

    def disarm(self) -> bool:
        """Call off :meth:`arm` (idempotent).  Returns False when it was too late: the
        CRIU was killed already (the call fails with :attr:`reason`)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with self._lock:
            self._armed = False
            return self.reason is None


@dataclass(frozen=True)
class DumpOptions:
    """One ``criu dump`` request (rpc ``criu_opts``).

    Attributes:
        pid: host pid of the root task (the container init).
        images_dir: where CRIU writes its images.
        log_file: name of the log inside ``images_dir``.
        leave_running: ``--leave-running``: resume the tasks after a successful dump.
        freeze_cgroup: ``--freeze-cgroup``: freezer cgroup dir for a consistent freeze.
        external: ``--external`` entries (``mnt[/data]:vol0``...).
        file_locks / tcp_established / link_remap: as the CRIU options of that name.
            ``link_remap`` is on: a deleted-but-open file of a lower layer still has a link
            count of 1 through overlayfs, so CRIU wants a link remap for it and, without the
            option, fails the dump ("Can't create link remap ... Use link-remap option");
            with it, linkat fails with ENOENT and CRIU falls back to a ghost file
            (shared/cases C05).  A remap CRIU does make is removed at restore, or when the
            tasks are resumed after a failed or ``leave_running`` dump.
        ghost_limit_bytes: largest deleted-but-open file carried in the images
            (``--ghost-limit``).
        manage_cgroups_mode: ``--manage-cgroups`` (CG_SOFT by default).
        notify: answer notifications (``--action-script`` semantics over RPC).
        track_mem / parent_img: for a pre-copy strategy.
        page_server: (address, port) of a ``criu page-server`` that receives the memory
            pages (``--page-server --address --port``): the images dir then holds no
            ``pagemap-*``/``pages-*`` images, the page server's images dir has them.
        lazy_pages: ``--lazy-pages`` (post-copy): the pages of private anonymous memory
            stay in CRIU's page pipes and are served, after a successful ``post-dump``,
            to the destination's ``criu lazy-pages`` on ``ps_socket``; the tasks are
            killed before the first page is served (jaula's patch 0006).
        ps_socket: a connected TCP socket for the page-server connection (rpc ``ps.fd``,
            ``--ps-socket``), made by the caller; passed to CRIU with the same number.
        tls: certificate files for the page-server connection (``--tls``,
            ``--tls-cacert/--tls-cert/--tls-key``, ``--tls-no-cn-verify``: the CA file
            pins the peer's certificate, see :mod:`migrate.certs`).
        network_lock: ``--network-lock``: NET_LOCK_IPTABLES, or NET_LOCK_SKIP for a net
            namespace nobody else can reach (only ``lo``): locking it is pointless and costs
            about 0.1 s of downtime on each side (iptables-restore runs).
        keep_log_dir: where the log of a failed dump is copied for the error to quote
            (:func:`keep_log`; None: the process-wide kept-logs dir).
        irmap_scan_paths: the paths (inside the tasks' root) of the files that inotify or
            fanotify marks watch: with any, ``--force-irmap`` and an ``--irmap-scan-path``
            for each, so that CRIU dumps each mark by path.  It finds none on an overlayfs
            root otherwise: overlayfs gives no file handle ("fsnotify: Can't dump that
            handle"), and a handle would name the source's inode anyway.
    """

    pid: int
    images_dir: Path
    log_file: str = "dump.log"
    leave_running: bool = False
    freeze_cgroup: str | None = None
    external: tuple[str, ...] = ()
    file_locks: bool = True
    tcp_established: bool = True
    link_remap: bool = True
    ghost_limit_bytes: int = 64 << 20
    manage_cgroups_mode: int = CG_SOFT
    notify: bool = True
    track_mem: bool = False
    parent_img: str | None = None
    lazy_pages: bool = False
    network_lock: int = 1
    page_server: tuple[str, int] | None = None
    tls: TlsFiles | None = None
    ps_socket: int | None = None
    keep_log_dir: Path | None = None
    irmap_scan_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class RestoreOptions:
    """One ``criu restore`` request.

    Attributes:
        images_dir: the dump's images.
        root: ``--root``: the new container's merged overlay (mounted).
        cg_root: ``--cgroup-root ctrl:/path`` pairs (ctrl "" for the v2 / global root).
        external: ``--external`` entries for restore (``mnt[vol0]:/host/path``...).
        inherit_fd: (key, fd) pairs, key like ``pipe:[12345]``; fd as this process sees it
            (it is passed to swrk with the same number).
        rst_sibling: make the restored root task a child of the caller (swrk only).
        leave_stopped: ``--leave-stopped``.
        work_dir: where CRIU writes its log (``--work-dir``); the images dir by default.
        cgroup_yard: ``--cgroup-yard``: a directory where every cgroup hierarchy the
            images name is already mounted (see :func:`host_cgroup_yard`); CRIU otherwise
            mounts a yard of its own for each restore (about 12 ms here).
        keep_log_dir: where the log of a failed restore is copied for the error to quote
            (:func:`keep_log`; None: the process-wide kept-logs dir).
    """

    images_dir: Path
    root: str
    log_file: str = "restore.log"
    work_dir: Path | None = None
    cg_root: tuple[tuple[str, str], ...] = ()
    external: tuple[str, ...] = ()
    inherit_fd: tuple[tuple[str, int], ...] = ()
    rst_sibling: bool = True
    file_locks: bool = True
    tcp_established: bool = True
    manage_cgroups_mode: int = CG_SOFT
    notify: bool = True
    leave_stopped: bool = False
    lazy_pages: bool = False
    network_lock: int = 1
    cgroup_yard: str | None = None
    keep_log_dir: Path | None = None


@dataclass
class Result:
    """What a successful action returned: ``pid`` of the restored root task (restore only),
    seconds spent, and the notifications seen in order."""

    pid: int = 0
    duration_s: float = 0.0
    notifications: list[str] = field(default_factory=list)


def find_criu() -> str:
    """Path of the ``criu`` binary (``$JAULA_CRIU``, PATH, /usr/local/sbin).

    Raises CriuUnavailable naming what to do."""
    if rpc is None:
        raise CriuUnavailable("pycriu is not installed in this Python: run `make setup`")
    for cand in (os.environ.get("JAULA_CRIU"), shutil.which("criu"), "/usr/local/sbin/criu"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise CriuUnavailable("criu is not installed: run `make setup` (it builds CRIU 4.x)")


def version(binary: str | None = None) -> tuple[int, int, int]:
    """CRIU's version as (major, minor, sublevel), from ``criu --version``, asked once per
    binary (and again when the file changes): it is a process start, which a dump or a
    restore would otherwise pay while the tasks wait.  :func:`build` gives it with the
    patch series.  Raises CriuUnavailable."""
    binary = binary or find_criu()
    return _version_of(binary, os.stat(binary).st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _version_text(binary: str, mtime_ns: int) -> str:
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    return out.stdout


def _version_of(binary: str, mtime_ns: int) -> tuple[int, int, int]:
    text = _version_text(binary, mtime_ns)
    m = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise CriuUnavailable(f"cannot read the version of {binary}: {text.strip()!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _gitid_of(binary: str, mtime_ns: int) -> str:
    m = re.search(r"^GitID:\s*(\S+)", _version_text(binary, mtime_ns), re.MULTILINE)
    return m.group(1) if m else ""


# --- the patch series ------------------------------------------------------------------

#: The patches of scripts/criu-patches that each migration strategy cannot work without:
#: without one, the strategy is unsafe, hangs or fails (the others only make it faster).
#: A node needs them in its own CRIU to take part, as source or as destination.  Why:
#:
#: - 0005 (cold, postcopy): time limits on the page-server connection.  cold: the source
#:   waits for its dump without a limit of its own, so a destination that stops answering
#:   would keep the container frozen until TCP gives up (~15 min), or for ever when the
#:   peer is alive but stuck; a failed TLS handshake crashed CRIU (double free).  postcopy:
#:   the page socket carries jaula's own time limits, but CRIU's GnuTLS loops retried
#:   GNUTLS_E_AGAIN for ever: after the commit, the source would wait for ever on a
#:   destination gone.
#: - 0006 (postcopy): a failed lazy transfer, or a CRIU dying while serving, resumed the
#:   source's tasks after the destination's copy ran: two copies.
#: - 0007 (postcopy): CRIU ignored the socket handed over RPC for a lazy dump, and the
#:   lazy-pages daemon skipped TLS on a given socket: post-copy cannot start.
#: - 0008 (postcopy): where root lacks CAP_SYS_RESOURCE and fs.pipe-max-size < 3.2 MiB
#:   (these VMs), every page request past 64 KiB failed, after the commit: container lost.
#: - 0009 (postcopy): a lazy page in a thread's rseq area (every thread, glibc >= 2.35)
#:   made the destination's restore wait for pages only served after it.
#:
#: Not required: 0001, 0002, 0003, 0011 (downtime), 0004 (no conntrack dump of an external
#: netns: ~20 ms; without it the entries are dumped and put back), 0010 (kdat cache).
REQUIRED_PATCHES: dict[str, tuple[str, ...]] = {
    "cold": ("0005-page-server-client-time-limits",),
    "postcopy": (
        "0005-page-server-client-time-limits",
        "0006-lazy-dump-commit",
        "0007-page-server-given-socket",
        "0008-lazy-pages-pipe-max-size",
        "0009-lazy-rseq-pages-eager",
    ),
}


#: The patch a cold migration's source needs when the container holds a SysV shared memory
#: segment: stock CRIU sends the segment's pages to the page server from a forked child
#: with its own copy of the TLS session, whose record numbers the dumping process then
#: reuses (the page server fails "Decryption has failed", after the freeze).
SYSV_SHM_PATCH = "0012-ipc-ns-dump-without-fork"


def missing_patches(strategy: str, applied: Iterable[str]) -> list[str]:
    """The patches ``strategy`` needs (:data:`REQUIRED_PATCHES`) that are not in
    ``applied`` (names like ``0006-lazy-dump-commit``, as :func:`patch_series` gives
    them), in series order; empty when the strategy can run.  Raises ValueError for a
    strategy that is not in the table."""
    if strategy not in REQUIRED_PATCHES:
        raise ValueError(
            f"unknown migration strategy {strategy!r}: known are {', '.join(REQUIRED_PATCHES)}"
        )
    have = set(applied)
    return [p for p in REQUIRED_PATCHES[strategy] if p not in have]


@dataclass(frozen=True)
class PatchManifest:
    """A parsed patch manifest (format in the module docstring).

    Attributes:
        binary_sha256: sha256 (hex) of the criu binary it was written for.
        applied: names of the patches built into that binary, in series order.
        not_applied: names of the series' patches that did not apply to its source.
        criu_version / gitid / series: as the manifest says ("" when absent).
    """

    binary_sha256: str
    applied: tuple[str, ...]
    not_applied: tuple[str, ...] = ()
    criu_version: str = ""
    gitid: str = ""
    series: str = ""


def parse_manifest(text: str) -> PatchManifest:
    """Parse a patch manifest.  Raises ValueError (one line, what is wrong) when it is not
    of format 1 or has no valid ``binary-sha256``."""
    fields: dict[str, str] = {}
    applied: list[str] = []
    not_applied: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        value = value.strip()
        if key == "applied" and value:
            applied.append(value)
        elif key == "not-applied" and value:
            not_applied.append(value)
        else:
            fields.setdefault(key, value)
    if fields.get("format") != "1":
        raise ValueError(f"format {fields.get('format', '(none)')!r}, this jaula reads 1")
    digest = fields.get("binary-sha256", "")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"binary-sha256 {digest!r} is not 64 hex digits")
    return PatchManifest(
        binary_sha256=digest,
        applied=tuple(applied),
        not_applied=tuple(not_applied),
        criu_version=fields.get("criu-version", ""),
        gitid=fields.get("gitid", ""),
        series=fields.get("series", ""),
    )


def manifest_path(binary: str) -> Path:
    """Where the patch manifest of ``binary`` lives: ``PREFIX/../lib/jaula/criu-patches``
    for ``PREFIX/criu``, symlinks resolved (as scripts/setup.sh writes it)."""
    return Path(os.path.realpath(binary)).parent.parent / "lib" / "jaula" / "criu-patches"


def _stat_key(path: str | Path) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_manifest(binary: str, path: Path | None = None) -> PatchManifest | None:
    """The patch manifest of ``binary`` (at ``path``, by default :func:`manifest_path`)
    if it was written for this very file, else None: none there (a stock CRIU), unreadable,
    malformed, writable by group or others or owned by another user than root or us, or
    made for another binary (its sha256 differs: stale).  Each reason but the first is
    logged once.  Cached until the binary or the manifest changes (the sha256 of a 6 MB
    binary takes ~15 ms)."""
    path = path or manifest_path(binary)
    return _manifest_for(binary, _stat_key(binary), path, _stat_key(path))


@functools.lru_cache(maxsize=8)
def _manifest_for(
    binary: str, bkey: tuple[int, ...] | None, path: Path, mkey: tuple[int, ...] | None
) -> PatchManifest | None:
    if bkey is None or mkey is None:
        return None

    def ignored(why: str) -> None:
        log: Any = _log()
        log.warning("criu.patch_manifest.ignored", binary=binary, manifest=str(path), reason=why)

    try:
        st = os.stat(path)
        if st.st_mode & 0o022 or st.st_uid not in (0, os.geteuid()):
            ignored(f"writable by others or owned by uid {st.st_uid}")
            return None
        m = parse_manifest(path.read_text(errors="replace"))
        h = hashlib.sha256()
        with open(binary, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except (OSError, ValueError) as e:
        ignored(str(e))
        return None
    if h.hexdigest() != m.binary_sha256:
        ignored(f"stale: written for a binary of sha256 {m.binary_sha256[:12]}")
        return None
    return m


def patch_series(binary: str | None = None) -> frozenset[str]:
    """Names of jaula's patches built into the criu ``binary`` (default: the one jaula
    runs, :func:`find_criu`), like ``0006-lazy-dump-commit``; empty for a stock CRIU or
    when its manifest is missing, stale or malformed (see :func:`read_manifest`).
    Raises CriuUnavailable when no criu is installed."""
    m = read_manifest(binary or find_criu())
    return frozenset(m.applied) if m else frozenset()


@dataclass(frozen=True)
class CriuBuild:
    """What the installed CRIU is.

    Attributes:
        binary: its path.
        version: (major, minor, sublevel), as :func:`version`.
        patches: :func:`patch_series` of it.
        gitid: the GitID ``criu --version`` shows ("" when none; ``jaula-<hash>`` for
            jaula's build, ``-partial`` appended when some patch did not apply).
        series: the manifest's series hash (sha256 of the patches' names and diffs, the
            same on every node built from the same scripts/criu-patches); "" without a
            valid manifest.
    """

    binary: str
    version: tuple[int, int, int]
    patches: frozenset[str]
    gitid: str = ""
    series: str = ""

    def missing(self, strategy: str) -> list[str]:
        """:func:`missing_patches` of ``strategy`` for this build."""
        return missing_patches(strategy, self.patches)


def build(binary: str | None = None) -> CriuBuild:
    """The installed CRIU's version and patch series together (both cached per binary, so
    a call costs a few stat calls once warm).  Raises CriuUnavailable."""
    binary = binary or find_criu()
    mtime = os.stat(binary).st_mtime_ns
    m = read_manifest(binary)
    return CriuBuild(
        binary=binary,
        version=_version_of(binary, mtime),
        patches=frozenset(m.applied) if m else frozenset(),
        gitid=_gitid_of(binary, mtime),
        series=m.series if m else "",
    )


def require(min_version: tuple[int, int] = MIN_VERSION) -> str:
    """Return the criu binary after checking it is at least ``min_version``."""
    binary = find_criu()
    v = version(binary)
    if v[:2] < min_version:
        raise CriuUnavailable(
            f"criu {'.'.join(map(str, v))} is too old: jaula needs "
            f"{'.'.join(map(str, min_version))} or newer (run `make setup`)"
        )
    return binary


#: where jaula's CRIU keeps its kdat cache (``$CRIU_KDAT_DIR``, jaula's patch 0010): CRIU
#: keeps it only on a tmpfs, and /run is not one on every host; a directory of root's own,
#: closed to others, under /dev/shm (sticky: nobody else can swap it once it is ours)
KDAT_DIR = Path("/dev/shm/criu-kdat.jaula")


def criu_env() -> dict[str, str]:
    """The environment for a CRIU process: ours, plus ``CRIU_KDAT_DIR`` when
    :data:`KDAT_DIR` is (or can be made) a private directory of this user.  Saves each
    CRIU run its kernel probing (~20 ms and an ``iptables -L`` here).  A directory someone
    else made there is left alone and not used (CRIU checks again)."""
    env = dict(os.environ)
    env.pop("CRIU_KDAT_DIR", None)
    try:
        KDAT_DIR.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(KDAT_DIR)
    except OSError:
        return env
    import stat

    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077:
        env["CRIU_KDAT_DIR"] = str(KDAT_DIR)
        # CRIU writes the cache to criu.kdat.tmp (O_EXCL) then renames it: one killed in
        # between leaves a file that stops every later save until reboot
        tmp = KDAT_DIR / "criu.kdat.tmp"
        with contextlib.suppress(OSError):
            if time.time() - tmp.lstat().st_mtime > 10:
                tmp.unlink()
    else:
        log: Any = _log()
        log.warning(
            "criu.kdat_dir.untrusted",
            path=str(KDAT_DIR),
            owner=st.st_uid,
            mode=oct(st.st_mode & 0o7777),
        )
    return env


#: CRIU log lines that are harmless on these machines (criu-recipe.md, "harmless noise").
_NOISE = ("RLIMIT", "ddress already assigned")
#: CRIU log lines below the error level that name the cause of a failure
_CAUSES = ("Can't connect to server",)


def log_excerpt(path: Path, lines: int = 6) -> str:
    """The last ``Error`` lines of a CRIU log (or its last lines), joined with `` / ``, with
    the few informational lines that name a cause (a page server it could not reach).
    The harmless RLIMIT_NOFILE complaint is left out."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errs = [
        ln.strip()
        for ln in text
        if ("Error" in ln or "Err " in ln or any(c in ln for c in _CAUSES))
        and not any(n in ln for n in _NOISE)
    ]
    chosen = errs[-lines:] if errs else [ln.strip() for ln in text[-lines:]]
    return " / ".join(chosen)


# -- logs of failed actions, kept ------------------------------------------------------------
#
# CRIU writes each action's log into the images or work dir, and a failed migration removes
# its scratch dir (a failed local checkpoint its half-written bundle) before the error reaches
# anyone: the path an error quoted was gone when it was read.  So every CriuError quotes a
# copy made when the error is raised, in a directory that nothing else removes:
#
#     <kept logs dir>/<UTC time, us>-<action>-<pid>-<token>.log    mode 0600, dir 0700
#
# The directory is the one the caller gives (``keep_log_dir`` of the options), else the
# process-wide one (:func:`keep_logs_in`, meant for a node service and the CLI: the state
# root's ``logs/criu``), else ``$JAULA_CRIU_LOG_DIR``, else DEFAULT_KEPT_LOGS_DIR.  It holds
# the newest KEPT_LOGS copies; older ones are removed after each copy (names sort by time).

#: where the logs of failed CRIU actions are kept when nobody chose a directory
DEFAULT_KEPT_LOGS_DIR = Path("/var/log/jaula/criu")
#: how many kept logs a directory holds (a CRIU log at -v4 is up to a few MiB)
KEPT_LOGS = 20
_kept_logs_dir: Path | None = None
_KEPT_NAME = re.compile(r"^\d{8}T\d{6}\.\d{6}-[\w.-]+\.log$")


def keep_logs_in(directory: Path | None) -> None:
    """Keep the logs of failed CRIU actions of this process in ``directory`` (None: back
    to ``$JAULA_CRIU_LOG_DIR`` or DEFAULT_KEPT_LOGS_DIR).  Created on first use."""
    global _kept_logs_dir
    _kept_logs_dir = directory


def kept_logs_dir(directory: Path | None = None) -> Path:
    """The directory a failed action's log is copied to: ``directory`` when given, else
    the one :func:`keep_logs_in` set, ``$JAULA_CRIU_LOG_DIR``, DEFAULT_KEPT_LOGS_DIR."""
    if directory is not None:
        return directory
    if _kept_logs_dir is not None:
        return _kept_logs_dir
    env = os.environ.get("JAULA_CRIU_LOG_DIR")
    return Path(env) if env else DEFAULT_KEPT_LOGS_DIR


def keep_log(path: Path, action: str, directory: Path | None = None) -> Path:
    """Copy CRIU's log ``path`` of a failed ``action`` into :func:`kept_logs_dir` and
    return the copy's path; the oldest copies beyond KEPT_LOGS are removed.

    Never raises: when there is no log (CRIU died before writing one) or the copy fails (a
    full disk), the original ``path`` is returned and the reason logged, so the error being
    raised is not replaced by this one."""
    dest_dir = kept_logs_dir(directory)
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}"
    what = re.sub(r"[^\w.-]", "_", action)
    name = f"{stamp}-{what}-{os.getpid()}-{os.urandom(3).hex()}.log"
    dest = dest_dir / name
    try:
        dest_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with open(path, "rb") as src, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out)
    except OSError as e:
        with contextlib.suppress(OSError):
            dest.unlink()
        _log().warning("criu.log.not_kept", log=str(path), kept_dir=str(dest_dir), error=str(e))
        return path
    _prune_kept(dest_dir)
    return dest


def _prune_kept(directory: Path) -> None:
    """Remove all but the newest KEPT_LOGS kept logs of ``directory`` (only files named
    as :func:`keep_log` names them; a concurrent prune's removals are ignored)."""
    try:
        kept = sorted(n for n in os.listdir(directory) if _KEPT_NAME.match(n))
    except OSError:
        return
    for n in kept[: max(0, len(kept) - KEPT_LOGS)]:
        with contextlib.suppress(OSError):
            os.unlink(directory / n)


def _failed(
    action: str,
    message: str,
    log: Path,
    keep_dir: Path | None,
    errno: int = 0,
    excerpt: bool = True,
) -> CriuError:
    """The CriuError of a failed ``action`` whose log is ``log``: quoting a kept copy of
    that log (:func:`keep_log`) and, with ``excerpt``, its error lines."""
    kept = keep_log(log, action, keep_dir)
    return CriuError(
        action,
        message,
        errno=errno,
        log_path=str(kept),
        log_excerpt=log_excerpt(kept) if excerpt else "",
    )


class _Swrk:
    """One ``criu swrk`` process and its socket."""

    def __init__(
        self, binary: str, pass_fds: tuple[int, ...] = (), die_with_thread: bool = True
    ) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # PR_SET_PDEATHSIG (set by util-linux's setpriv, kept across exec): if the thread that
        # started it dies (a monitor killed during a restore), CRIU must not live on orphaned,
        # blocked on a socket nobody reads.  (Not preexec_fn: unsafe in a threaded process.)
        # Not for a lazy dump: after the commit it serves the only copy of the memory.
        wrap = (
            ["setpriv", "--pdeathsig", "KILL", "--"]
            if die_with_thread and shutil.which("setpriv")
            else []
        )
        self.proc = subprocess.Popen(
            [*wrap, binary, "swrk", str(theirs.fileno())],
            pass_fds=(theirs.fileno(), *pass_fds),
            close_fds=True,
            stdin=subprocess.DEVNULL,
            env=criu_env(),
        )
        theirs.close()

    def send(self, req: object) -> None:
        self.sock.send(req.SerializeToString())  # type: ignore[attr-defined]

    def recv(self) -> object:
        data = self.sock.recv(_MAX_MSG)
        if not data:
            raise EOFError("criu swrk closed the connection")
        resp = rpc.criu_resp()
        resp.ParseFromString(data)
        return resp

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _call(
    action: str,
    req_type: int,
    opts: object,
    images_dir: Path,
    log_file: str,
    on_notify: NotifyHandler | None,
    pass_fds: tuple[int, ...],
    die_with_thread: bool = True,
    keep_log_dir: Path | None = None,
    handle: CriuHandle | None = None,
    raise_inheritable: bool = False,
) -> tuple[object, Result]:
    binary = require()
    log = images_dir / log_file
    res = Result()
    t0 = time.monotonic()
    with _inheritable_raised() if raise_inheritable else contextlib.nullcontext():
        swrk = _Swrk(binary, pass_fds, die_with_thread)
    if handle is not None:
        handle._attach(swrk.proc)
    try:
        req = rpc.criu_req(type=req_type)
        req.opts.CopyFrom(opts)
        swrk.send(req)
        while True:
            try:
                resp = swrk.recv()
            except (EOFError, OSError) as e:
                why = handle.reason if handle is not None else None
                raise _failed(action, why or f"criu swrk died ({e})", log, keep_log_dir) from e
            if resp.type == rpc.NOTIFY:  # type: ignore[attr-defined]
                n = Notify(resp.notify.script, resp.notify.pid)  # type: ignore[attr-defined]
                res.notifications.append(n.script)
                ok = True
                if on_notify is not None:
                    try:
                        ok = bool(on_notify(n))
                    except StopCriu as e:
                        swrk.proc.kill()
                        swrk.proc.wait()
                        raise _failed(action, str(e), log, keep_log_dir, excerpt=False) from e
                    except Exception as e:
                        _log().error("criu.notify.handler_failed", script=n.script, error=str(e))
                        with contextlib.suppress(OSError):
                            swrk.send(rpc.criu_req(type=rpc.NOTIFY, notify_success=False))
                        _drain(swrk)
                        raise
                try:
                    swrk.send(rpc.criu_req(type=rpc.NOTIFY, notify_success=ok))
                except OSError as e:  # it died (killed?) while the handler ran
                    why = handle.reason if handle is not None else None
                    raise CriuError(
                        action,
                        why or f"criu swrk died ({e})",
                        log_path=str(images_dir / log_file),
                        log_excerpt=log_excerpt(images_dir / log_file),
                    ) from e
                continue
            break
    finally:
        swrk.close()
        if handle is not None:
            handle.disarm()
    res.duration_s = time.monotonic() - t0
    if not resp.success:  # type: ignore[attr-defined]
        errmsg = resp.cr_errmsg or ""  # type: ignore[attr-defined]
        errno_ = resp.cr_errno or 0  # type: ignore[attr-defined]
        if not errmsg or any(n in errmsg for n in _NOISE):
            errmsg = os.strerror(errno_) if errno_ else "see the log lines"
        raise _failed(action, errmsg, log, keep_log_dir, errno=errno_)
    return resp, res


def _status_caps() -> dict[str, int]:
    """CapInh/CapPrm/CapEff/CapBnd of the calling thread (/proc/thread-self/status)."""
    caps: dict[str, int] = {}
    with open("/proc/thread-self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("CapInh", "CapPrm", "CapEff", "CapBnd"):
                caps[key] = int(value, 16)
    return caps


@contextlib.contextmanager
def _inheritable_raised() -> Iterator[None]:
    """Start CRIU (in the ``with`` body) with an inheritable set as large as it may be: this
    thread's permitted set within its bounding set; the thread's own set is put back after.

    Why: CRIU's restorer (criu/pie/restorer.c ``restore_creds``) trims a task's bounding set
    first and sets its capabilities after, and capset(2) refuses (EPERM) a new inheritable
    set that is not within the old inheritable set and the bounding set.  A task whose
    inheritable set holds a capability its bounding set lacks (a jaula container starts with
    inheritable = its capabilities; a workload that then drops one from its bounding set,
    as ``capsh --drop`` does) failed "Unable to restore capabilities: -1", then CRIU's BUG
    and a segfault.  The restored tasks start with CRIU's credentials, so with CRIU's
    inheritable set holding every capability the dump may name, the check passes and the
    task still ends with exactly its dumped sets.  For root the larger inheritable set
    gives the programs CRIU runs (ip, iptables-restore) nothing more: root's exec already
    gets the bounding set.  Raising the inheritable set within the permitted set needs no
    capability (capset(2)); when it fails anyway, CRIU starts as before."""
    from runtime import syscalls as sc

    try:
        caps = _status_caps()
        want = caps["CapInh"] | (caps["CapPrm"] & caps["CapBnd"])
    except (OSError, KeyError, ValueError):
        yield
        return
    if want == caps["CapInh"]:
        yield
        return
    try:
        sc.capset(caps["CapEff"], caps["CapPrm"], want)
    except OSError as e:
        _log().warning("criu.inheritable_caps", error=str(e))
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            sc.capset(caps["CapEff"], caps["CapPrm"], caps["CapInh"])


def _drain(swrk: _Swrk) -> None:
    """After a failed notification answer, read CRIU's remaining messages (answering any
    further notification with success so it can finish rolling back)."""
    try:
        while True:
            resp = swrk.recv()
            if resp.type != rpc.NOTIFY:  # type: ignore[attr-defined]
                return
            swrk.send(rpc.criu_req(type=rpc.NOTIFY, notify_success=True))
    except (EOFError, OSError):
        return


def dump(
    opts: DumpOptions,
    on_notify: NotifyHandler | None = None,
    handle: CriuHandle | None = None,
) -> Result:
    """Checkpoint the tree rooted at ``opts.pid`` into ``opts.images_dir``.

    ``on_notify`` is called for each notification and must return True to let CRIU go on;
    returning False at ``post-dump`` resumes the tasks and fails the dump.  ``handle`` lets
    another thread kill this dump's CRIU (:class:`CriuHandle`).  Raises CriuUnavailable,
    CriuError (with the log's error lines; killed: the handle's reason)."""
    opts.images_dir.mkdir(parents=True, exist_ok=True)
    dfd = os.open(opts.images_dir, os.O_DIRECTORY | os.O_RDONLY)
    try:
        o = rpc.criu_opts(
            images_dir_fd=dfd,
            pid=opts.pid,
            log_level=4,
            log_file=opts.log_file,
            leave_running=opts.leave_running,
            file_locks=opts.file_locks,
            tcp_established=opts.tcp_established,
            link_remap=opts.link_remap,
            ghost_limit=opts.ghost_limit_bytes,
            notify_scripts=opts.notify,
            manage_cgroups=True,
            manage_cgroups_mode=opts.manage_cgroups_mode,
            track_mem=opts.track_mem,
            lazy_pages=opts.lazy_pages,
            network_lock=opts.network_lock,
        )
        if opts.freeze_cgroup:
            o.freeze_cgroup = opts.freeze_cgroup
        if opts.parent_img:
            o.parent_img = opts.parent_img
        if opts.page_server:
            o.ps.address, o.ps.port = opts.page_server
        if opts.ps_socket is not None:
            o.ps.port, o.ps.fd = 0, opts.ps_socket
        if opts.tls:
            o.tls, o.tls_no_cn_verify = True, True
            o.tls_cacert, o.tls_cert, o.tls_key = (
                str(opts.tls.cacert),
                str(opts.tls.cert),
                str(opts.tls.key),
            )
        o.external.extend(opts.external)
        if opts.irmap_scan_paths:
            o.force_irmap = True
            o.irmap_scan_paths.extend(opts.irmap_scan_paths)
        fds = (dfd,) if opts.ps_socket is None else (dfd, opts.ps_socket)
        # A lazy dump outlives its caller: once post-dump is answered with success it holds
        # the only copy of the memory.  Before that, a caller that dies closes the RPC
        # socket, which CRIU takes as a failed post-dump: the tasks resume.
        _, res = _call(
            "dump",
            rpc.DUMP,
            o,
            opts.images_dir,
            opts.log_file,
            on_notify,
            fds,
            die_with_thread=not opts.lazy_pages,
            keep_log_dir=opts.keep_log_dir,
            handle=handle,
        )
        return res
    finally:
        os.close(dfd)


def restore(
    opts: RestoreOptions,
    on_notify: NotifyHandler | None = None,
    handle: CriuHandle | None = None,
) -> Result:
    """Restore the tree in ``opts.images_dir`` onto ``opts.root``.

    With ``rst_sibling`` the restored root task is a child of the calling process, which
    must reap it.  CRIU starts with a raised inheritable set (see
    :func:`_inheritable_raised`).  ``handle`` lets another thread kill its CRIU.  Returns
    the Result with the root task's host pid.  Raises CriuError."""
    dfd = os.open(opts.images_dir, os.O_DIRECTORY | os.O_RDONLY)
    wdir = opts.work_dir or opts.images_dir
    wfd = os.open(wdir, os.O_DIRECTORY | os.O_RDONLY)
    try:
        o = rpc.criu_opts(
            images_dir_fd=dfd,
            work_dir_fd=wfd,
            log_level=4,
            log_file=opts.log_file,
            root=opts.root,
            rst_sibling=opts.rst_sibling,
            file_locks=opts.file_locks,
            tcp_established=opts.tcp_established,
            notify_scripts=opts.notify,
            manage_cgroups=True,
            manage_cgroups_mode=opts.manage_cgroups_mode,
            leave_stopped=opts.leave_stopped,
            lazy_pages=opts.lazy_pages,
            network_lock=opts.network_lock,
        )
        if opts.cgroup_yard:
            o.cgroup_yard = opts.cgroup_yard
        for ctrl, path in opts.cg_root:
            cg = o.cg_root.add()
            if ctrl:
                cg.ctrl = ctrl
            cg.path = path
        for key, fd in opts.inherit_fd:
            ifd = o.inherit_fd.add()
            ifd.key = key
            ifd.fd = fd
        o.external.extend(opts.external)
        fds = (dfd, wfd, *(fd for _, fd in opts.inherit_fd))
        resp, res = _call(
            "restore",
            rpc.RESTORE,
            o,
            wdir,
            opts.log_file,
            on_notify,
            fds,
            keep_log_dir=opts.keep_log_dir,
            handle=handle,
            raise_inheritable=True,
        )
        res.pid = resp.restore.pid  # type: ignore[attr-defined]
        return res
    finally:
        os.close(dfd)
        os.close(wfd)


class _CriuDaemon:
    """A CRIU process that reports on ``--status-fd`` once it is ready; by default killed
    with the thread that started it (``PR_SET_PDEATHSIG``)."""

    action = "criu"  # the CRIU command, as CriuError's action
    what = "criu"  # its name in messages
    proc: subprocess.Popen[bytes]
    log_path: Path
    keep_log_dir: Path | None = None

    def _start(
        self,
        args: list[str],
        ready_timeout_s: float,
        pass_fds: tuple[int, ...] = (),
        die_with_thread: bool = True,
    ) -> bool:
        import select

        r, w = os.pipe()
        wrap = (
            ["setpriv", "--pdeathsig", "KILL", "--"]
            if die_with_thread and shutil.which("setpriv")
            else []
        )
        try:
            self.proc = subprocess.Popen(
                [*wrap, require(), *args, "--status-fd", str(w)],
                pass_fds=(w, *pass_fds),
                close_fds=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=criu_env(),
            )
        except OSError:
            os.close(r)
            raise
        finally:
            os.close(w)
        try:
            ready, _, _ = select.select([r], [], [], ready_timeout_s)
            up = bool(ready) and os.read(r, 1) == b"\0"
        finally:
            os.close(r)
        if not up:
            self.kill()
        return up

    def _log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _error(self, message: str) -> CriuError:
        return _failed(self.action, message, self.log_path, self.keep_log_dir)

    def kept_log(self) -> Path:
        """A kept copy of its log as it is now (:func:`keep_log`), for an error raised
        elsewhere to quote: its own log lives in a work dir that a failed migration
        removes."""
        return keep_log(self.log_path, self.action, self.keep_log_dir)

    def wait(self, timeout_s: float | None) -> None:
        """Wait until it has done its work and exited (``timeout_s`` None: however long it
        takes).  Raises CriuError when it failed, or is still running after ``timeout_s``
        seconds (it is then killed)."""
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self._error(
                f"the {self.what} was still running after {timeout_s or 0:.0f} s"
            ) from None
        if rc != 0:
            raise self._error(f"the {self.what} exited with status {rc}")

    def kill(self) -> None:
        """Stop it (idempotent)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _tls_args(tls: TlsFiles | None) -> list[str]:
    if tls is None:
        return []
    return [
        "--tls",
        "--tls-no-cn-verify",
        "--tls-cacert",
        str(tls.cacert),
        "--tls-cert",
        str(tls.cert),
        "--tls-key",
        str(tls.key),
    ]


class PageServer(_CriuDaemon):
    """A ``criu page-server`` that receives one dump's memory pages into ``images_dir``
    (``pagemap-*.img`` and ``pages-*.img``), then exits: the destination's half of CRIU's
    ``--page-server`` (criu(8) "page-server"; criu/page-xfer.c).

    Listens on ``address`` at a port the kernel picks (``--port 0``), over TLS when ``tls``
    is given.  It serves one connection: the dumping CRIU's, which closes it before its
    ``post-dump`` notification, so by then every page has arrived.  Start it from a thread
    that outlives it (it is killed with that thread, ``PR_SET_PDEATHSIG``).

    Attributes:
        port: the TCP port it listens on.
        log_path: its log (``-v4``) in ``work_dir``, which a failed migration removes: an
            error raised elsewhere quotes :meth:`kept_log` instead.

    Raises CriuUnavailable, CriuError (it did not come up; the log's error lines)."""

    action, what = "page-server", "page server"

    def __init__(
        self,
        images_dir: Path,
        address: str,
        tls: TlsFiles | None,
        work_dir: Path,
        ready_timeout_s: float = 10.0,
        keep_log_dir: Path | None = None,
    ) -> None:
        self.log_path = work_dir / "page-server.log"
        self.keep_log_dir = keep_log_dir
        # `criu page-server` refuses --port 0: take a free port from the kernel, and try
        # again in the unlikely case another process took it in between.
        for _attempt in range(3):
            self.port = _free_port(address)
            args = [
                "page-server",
                "--images-dir",
                str(images_dir),
                "--work-dir",
                str(work_dir),
                "-o",
                self.log_path.name,
                "-v4",
                "--address",
                address,
                "--port",
                str(self.port),
                *_tls_args(tls),
            ]
            if self._start(args, ready_timeout_s):
                return
            if "Address already in use" not in self._log():
                break
        raise self._error("the page server did not start")


class LazyPagesDaemon(_CriuDaemon):
    """``criu lazy-pages``: the destination's half of post-copy (criu(8) "lazy-pages",
    criu/uffd.c).  A restore with ``lazy_pages`` hands it each task's userfaultfd over
    ``lazy-pages.socket`` in ``work_dir`` (so the restore needs the same work dir); it
    then fetches the missing pages from the source's lazy page server on ``ps_socket``
    (a connected TCP socket, TLS when ``tls`` is given): the ones a task faults on first,
    the rest in the background.  It exits once every page has arrived, or when every
    restored task has exited.

    If it dies before that, the kernel fills the pages still missing with zeros for the
    tasks: whoever started it must then kill the restored tasks.  So it is not tied to the
    life of its starter: a node service that dies during a post-copy leaves it to finish
    (before the commit it ends on its own: the source closes the connection).

    Attributes:
        log_path: its log (``-v4``) in ``work_dir``, which a failed migration removes: an
            error raised elsewhere quotes :meth:`kept_log` instead.

    Raises CriuUnavailable, CriuError (it did not come up; the log's error lines)."""

    action, what = "lazy-pages", "lazy-pages daemon"

    def __init__(
        self,
        images_dir: Path,
        work_dir: Path,
        ps_socket: int,
        tls: TlsFiles | None,
        ready_timeout_s: float = 10.0,
        keep_log_dir: Path | None = None,
    ) -> None:
        self.log_path = work_dir / "lazy-pages.log"
        self.keep_log_dir = keep_log_dir
        args = [
            "lazy-pages",
            "--page-server",
            "--ps-socket",
            str(ps_socket),
            "--images-dir",
            str(images_dir),
            "--work-dir",
            str(work_dir),
            "-o",
            self.log_path.name,
            "-v4",
            *_tls_args(tls),
        ]
        if not self._start(args, ready_timeout_s, (ps_socket,), die_with_thread=False):
            raise self._error("the lazy-pages daemon did not start")


def _free_port(address: str) -> int:
    """A TCP port free on ``address`` now (bound to port 0, then released)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def read_stats(path: Path) -> dict[str, int]:
    """A CRIU ``stats-dump`` or ``stats-restore`` image as a dict (``pages_written``,
    ``frozen_time``, ``restore_time`` in microseconds, ...); empty when there is none or
    it cannot be read (a missing detail, never an error)."""
    if rpc is None or not path.exists():
        return {}
    from pycriu import images

    try:
        with open(path, "rb") as f:
            entries = images.load(f)["entries"]
        return dict(next(iter(entries[0].values()))) if entries else {}
    except Exception:  # noqa: BLE001 - unreadable or undecodable: no statistics
        return {}


def dump_stats(images_dir: Path) -> dict[str, int]:
    """:func:`read_stats` of a dump's ``stats-dump``."""
    return read_stats(images_dir / "stats-dump")


#: pagemap entry flags (criu/include/pagemap.h)
PE_LAZY = 1 << 1


def lazy_pages_bytes(images_dir: Path) -> int:
    """Bytes of memory a lazy dump left for post-copy: the pagemap entries flagged
    ``PE_LAZY`` in ``pagemap-*.img`` (CRIU's own ``pages_lazy`` statistic is reset when
    its lazy page server starts).  0 when there are none or they cannot be read."""
    if rpc is None:
        return 0
    from pycriu import images

    total = 0
    for path in images_dir.glob("pagemap-*.img"):
        try:
            with open(path, "rb") as f:
                entries = images.load(f)["entries"]
        except Exception:  # noqa: BLE001, S112 - unreadable: counted as nothing
            continue
        total += sum(
            int(e.get("nr_pages", 0)) for e in entries[1:] if int(e.get("flags", 0)) & PE_LAZY
        )
    return total * 4096


CGROUP_MOUNTS = Path("/sys/fs/cgroup")


def host_cgroup_yard(images_dir: Path, root: Path = CGROUP_MOUNTS) -> str | None:
    """``root`` when it can serve as CRIU's cgroup yard for the images in ``images_dir``,
    else None.  CRIU's yard holds one mount per hierarchy, named after its controllers
    (``cpu,cpuacct``, ``systemd`` for ``name=systemd``, ``unified`` for cgroup v2); a
    v1 or hybrid host mounts them so under /sys/fs/cgroup.  Only when every hierarchy of
    ``cgroup.img`` is a mount point there: CRIU would otherwise create and mount the
    missing one inside ``root`` (criu/cgroup.c ``prepare_cgroup_sfd``).  A pure v2 host
    (its hierarchy is ``root`` itself) gets None."""
    path = images_dir / "cgroup.img"
    if rpc is None or not path.exists():
        return None
    from pycriu import images

    try:
        with open(path, "rb") as f:
            entries = images.load(f)["entries"]
        controllers = entries[0].get("controllers", []) if entries else []
    except Exception:  # noqa: BLE001 - unreadable: CRIU makes its own yard
        return None
    if not controllers:
        return None
    for ctrl in controllers:
        names = [n.removeprefix("name=") if n else "unified" for n in ctrl.get("cnames", [])]
        if not names or not os.path.ismount(root / ",".join(names)):
            return None
    return str(root)


def pipe_buffer_sizes(images_dir: Path) -> list[int]:
    """Buffer sizes of the pipes and FIFOs in a dump's images (``pipes-data.img``,
    ``fifo-data.img``: one entry per pipe whose read end a dumped task holds, with the size
    F_GETPIPE_SZ gave at dump time).  CRIU sets each again at restore (F_SETPIPE_SZ), which
    fails with EPERM above ``fs.pipe-max-size`` without CAP_SYS_RESOURCE."""
    if rpc is None:
        raise CriuUnavailable("pycriu is not installed in this Python: run `make setup`")
    from pycriu import images

    sizes: list[int] = []
    for name in ("pipes-data.img", "fifo-data.img"):
        path = images_dir / name
        if not path.exists():
            continue
        with open(path, "rb") as f:
            sizes += [
                int(e["size"]) for e in images.load(f, no_payload=True)["entries"] if e.get("size")
            ]
    return sizes


def rearm_expired_timerfds(images_dir: Path) -> int:
    """Make the periodic timerfds of a dump fire again after restore; returns how many.

    A periodic timerfd that has expired and not been read yet is not re-armed by the kernel
    (that happens on read), so its fdinfo shows ``it_value: (0, 0)`` with ``ticks`` >= 1.
    CRIU 4.2 dumps that as is and restores the timer with timerfd_settime(it_value 0):
    disarmed.  The pending ticks come back, then the timer never fires again (CRIU issue
    3162, still open).  A workload that reads its timer every period or so is caught in
    that state at most freezes.  Such an entry (it_value 0, an interval, ticks pending) can
    only be an expired periodic timer, since timerfd_settime clears the ticks; its
    ``it_value`` becomes one interval, so it fires again within a period of the restore.

    The same entry with no tick yet is a periodic timer caught between its expiry time and
    the hrtimer callback that counts it (microseconds; longer on a busy VM): fdinfo then
    shows the remaining time clamped to 0 and the tick not yet counted, and CRIU restored it
    disarmed for good (seen once in CI: a 50 ms timer never fired after restore).  It gets
    the tick it was about to count and one interval.  A timer someone disarmed with a zero
    ``it_value`` but a non-zero interval looks the same and would fire once more: rare, and
    far less harmful than a periodic timer that silently stops.
    Rewrites ``files.img`` in place."""
    path = images_dir / "files.img"
    if rpc is None or not path.exists():
        return 0
    from pycriu import images

    with open(path, "rb") as f:
        img = images.load(f)
    fixed = 0
    for e in img["entries"]:
        t = e.get("tfd") if e.get("type") == "TIMERFD" else None
        if t and not (t.get("vsec") or t.get("vnsec")) and (t.get("isec") or t.get("insec")):
            t["vsec"], t["vnsec"] = t.get("isec", 0), t.get("insec", 0)
            t["ticks"] = t.get("ticks") or 1  # an expiry not counted yet, see above
            fixed += 1
    if fixed:
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            images.dump(img, f)
        os.replace(tmp, path)
        _log().info("criu.timerfd.rearmed", count=fixed)
    return fixed


def check_features(lazy_pages: bool = False, mem_track: bool = False) -> dict[str, bool]:
    """Ask CRIU which optional features work here (rpc FEATURE_CHECK)."""
    binary = require()
    swrk = _Swrk(binary)
    try:
        req = rpc.criu_req(type=rpc.FEATURE_CHECK)
        req.features.mem_track = mem_track
        req.features.lazy_pages = lazy_pages
        swrk.send(req)
        resp = swrk.recv()
    finally:
        swrk.close()
    f = resp.features  # type: ignore[attr-defined]
    return {"mem_track": bool(f.mem_track), "lazy_pages": bool(f.lazy_pages)}
