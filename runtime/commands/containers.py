"""``cp``, ``top``, ``rename`` and ``rm -a``, as Podman spells them.

``cp SRC DEST``: one side is ``CONTAINER:PATH``, the other a host path (``podman cp``; no
``-`` tar streams).  Paths inside are resolved as the container sees them, in ``/proc/PID/root``
of a running container, in its overlay (mounted for the copy) when it is created or stopped.  As in
Podman: a directory is copied into DEST when DEST is an existing directory, else to DEST;
``SRC/.`` copies the directory's contents; a file onto an existing directory lands inside
it; a missing parent of DEST is an error.  Modes and times are kept; owners are kept, as Podman
keeps them.  The side in the container runs chrooted into the container's root, so no
symlink there, in the path or inside a copied tree, can lead to the host's files.

``top CONTAINER``: the container's processes (its cgroup's tasks), with their pid inside the
container, user (from the container's ``/etc/passwd``), parent, CPU time, elapsed time and
command line (``podman top``'s default descriptors but ``%CPU`` and ``TTY``).
"""

from __future__ import annotations

import argparse
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

from runtime.container import Runtime
from runtime.errors import ConfigError, ContainerError
from runtime.rootfs.mounts import secure_join
from runtime.state import ContainerStatus

EXIT_ERROR = 125


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cp = sub.add_parser("cp", help="copy files between a container and the host")
    cp.add_argument("src", metavar="SRC", help="CONTAINER:PATH or a host path")
    cp.add_argument("dest", metavar="DEST", help="CONTAINER:PATH or a host path")

    top = sub.add_parser("top", help="show a container's processes")
    top.add_argument("container")

    rn = sub.add_parser("rename", help="rename a container")
    rn.add_argument("container")
    rn.add_argument("new_name", metavar="NAME")

    rm = sub._name_parser_map["rm"]
    rm.add_argument("-a", "--all", action="store_true", help="remove every container")
    for action in rm._actions:
        if action.dest == "containers":
            action.nargs = "*"


def dispatch(rt: Runtime, a: argparse.Namespace) -> int | None:
    match a.cmd:
        case "cp":
            return cmd_cp(rt, a.src, a.dest)
        case "top":
            return cmd_top(rt, a.container)
        case "rename":
            rt.get(a.container).rename(a.new_name)
            return 0
        case "rm":
            if a.all and a.containers:
                raise ConfigError("rm takes either --all or container names, not both")
            if not a.all and not a.containers:
                raise ConfigError("rm needs at least one container name or id, or --all")
            if a.all:
                a.containers = [c.id for c in rt.list(all=True)]
            return None  # the core rm removes them
    return None


def _split(arg: str) -> tuple[str | None, str]:
    """``CONTAINER:PATH`` -> (container, path); a host path -> (None, path).  A path that
    starts with ``/`` or ``.`` is a host path even with a colon in it, as in Podman."""
    if arg.startswith(("/", ".")) or ":" not in arg:
        return None, arg
    ctr, _, path = arg.partition(":")
    return ctr, path or "/"


def cmd_cp(rt: Runtime, src: str, dest: str) -> int:
    """Copy between a container and the host (see the module docstring).  Raises
    ConfigError for two host paths or two containers, or a missing source or parent."""
    s_ctr, s_path = _split(src)
    d_ctr, d_path = _split(dest)
    if (s_ctr is None) == (d_ctr is None):
        raise ConfigError(
            "cp copies between a container and the host: give CONTAINER:PATH on exactly one side"
        )
    if s_ctr is not None:
        with rt.get(s_ctr).filesystem() as root:
            _transfer(s_path, d_path, pack_root=Path(root))
    else:
        assert d_ctr is not None
        with rt.get(d_ctr).filesystem() as root:
            _transfer(s_path, d_path, unpack_root=Path(root))
    return 0


def _transfer(
    src: str, dest: str, pack_root: Path | None = None, unpack_root: Path | None = None
) -> None:
    """Copy ``src`` to ``dest`` as a tar stream through a pipe: the packing side runs in a
    child chrooted into ``pack_root`` (when the source is in the container), the unpacking
    side in a child chrooted into ``unpack_root`` (when the destination is); so every
    symlink, of the path or inside the tree, resolves within the container's root.  The
    host side runs in this process.  Raises ConfigError with the first side's reason."""
    r, w = os.pipe()
    err_r, err_w = os.pipe()
    children: list[int] = []
    if pack_root is not None:
        children.append(_child(pack_root, lambda: _pack(src, w), (r, err_r), err_w))
        os.close(w)
    if unpack_root is not None:
        children.append(_child(unpack_root, lambda: _unpack(r, dest, src), (w, err_r), err_w))
        os.close(r)
    os.close(err_w)
    host_error: Exception | None = None
    try:
        if pack_root is None:
            _pack(src, w)
        else:
            _unpack(r, dest, src)
    except (OSError, tarfile.TarError) as e:
        host_error = e
    errors = b""
    while chunk := os.read(err_r, 4096):
        errors += chunk
    os.close(err_r)
    for pid in children:
        os.waitpid(pid, 0)
    # the packing side's error first (the other side then only saw the stream end),
    # unless the packer only saw the unpacker go away
    if host_error is not None and pack_root is None and not isinstance(host_error, BrokenPipeError):
        raise ConfigError(f"cp: {_reason(host_error)}") from host_error
    if errors.strip():
        raise ConfigError("cp: " + errors.decode(errors="replace").strip().splitlines()[0])
    if host_error is not None:
        raise ConfigError(f"cp: {_reason(host_error)}") from host_error


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def _child(root: Path, fn: Callable[[], None], close: tuple[int, ...], err_w: int) -> int:
    """Fork a child that chroots into ``root`` and runs ``fn``; its error, one line, goes
    to ``err_w``.  Returns its pid."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            for fd in close:
                os.close(fd)
            os.chroot(root)
            os.chdir("/")
            fn()
        except BaseException as e:  # noqa: BLE001 - reported to the parent, one line
            os.write(err_w, f"{_reason(e)}\n".encode())
            code = 1
        finally:
            os._exit(code)
    return pid


def _pack(src: str, w: int) -> None:
    """Write ``src`` (a file, link or tree) to the fd ``w`` (closed at the end) as a tar
    whose top entry is ``SRC``.  A final symlink is copied as a link unless ``src`` ends
    in ``/``; ``DIR/.`` packs the directory (its contents go to the destination)."""
    with os.fdopen(w, "wb") as out:
        path = src.rstrip("/") or "/"
        if path.endswith("/."):
            path = path[:-2] or "/"
        if src.endswith("/"):
            path = os.path.realpath(path)
        if not os.path.lexists(path):
            raise FileNotFoundError(f"{src} does not exist: check the source path")
        with tarfile.open(fileobj=out, mode="w|") as tf:
            tf.add(path, arcname="SRC", recursive=True)


def _unpack(r: int, dest: str, src: str) -> None:
    """Read the tar of :func:`_pack` from the fd ``r`` (closed at the end) and put it at
    ``dest`` with Podman's rules (module docstring): into an existing directory under the
    source's name, else as ``dest`` (its parent must exist); ``SRC/.``: the directory's
    contents into ``dest``."""
    with os.fdopen(r, "rb") as inp:
        contents = src.rstrip("/").endswith("/.") or src in (".", "./")
        name = os.path.basename(src.rstrip("/").removesuffix("/.").rstrip("/")) or "root"
        if os.path.isdir(dest):
            base, top = dest, ("." if contents else name)
        else:
            parent = os.path.dirname(dest.rstrip("/")) or "/"
            if not os.path.isdir(parent):
                raise FileNotFoundError(
                    f"the parent directory of {dest} does not exist: create it first"
                )
            base, top = parent, os.path.basename(dest.rstrip("/"))
        with tarfile.open(fileobj=inp, mode="r|") as tf:
            for member in tf:
                rest = member.name[len("SRC") :].lstrip("/")
                if not rest and top == ".":
                    continue  # DIR/. into an existing directory: keep that directory
                member.name = os.path.join(top, rest) if rest else top
                tf.extract(member, path=base, filter="tar")


def _users(root: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    try:
        text = Path(secure_join(str(root), "/etc/passwd")).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        f = line.split(":")
        if len(f) > 2 and f[2].isdigit():
            out.setdefault(int(f[2]), f[0])
    return out


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def cmd_top(rt: Runtime, ref: str) -> int:
    """Print the container's processes (see the module docstring)."""
    c = rt.get(ref)
    if c.status not in (ContainerStatus.RUNNING, ContainerStatus.PAUSED):
        raise ContainerError(f"container {c.name} is {c.status.value}: top needs it running", c.id)
    users = _users(Path(f"/proc/{c.state.pid}/root"))
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    rows = [("USER", "PID", "PPID", "ELAPSED", "TIME", "COMMAND")]
    host_to_ns: dict[int, int] = {}
    procs = []
    for pid in sorted(c.cgroup().pids()):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # ended meanwhile
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        nspid = int(fields.get("NSpid", str(pid)).split()[-1])
        uid = int(fields.get("Uid", "0").split()[1])
        host_to_ns[pid] = nspid
        procs.append((pid, nspid, uid, int(stat[1]), stat, cmd))
    for _pid, nspid, uid, ppid, stat, cmd in procs:
        cpu_s = (int(stat[11]) + int(stat[12])) / tick
        elapsed = uptime - int(stat[19]) / tick
        args = " ".join(a.decode(errors="replace") for a in cmd if a)
        rows.append(
            (
                users.get(uid, str(uid)),
                str(nspid),
                str(host_to_ns.get(ppid, 0)),
                _clock(max(elapsed, 0.0)),
                _clock(cpu_s),
                args or "[kernel thread]",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip())
    return 0
