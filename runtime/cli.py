"""``jaula``: the command line of the runtime.  Thin: parse, call the library, print.

Flags are spelled as Podman spells them.  Exit codes follow Podman: 125 for jaula's own
errors, 126 when a command cannot be invoked, 127 when it is not found, otherwise the
container's or exec'd program's exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol

from runtime.cgroups import IO_KINDS, Resources
from runtime.container import Container, RunOptions, Runtime, require_root
from runtime.errors import CommandNotExecutable, CommandNotFound, ConfigError, JaulaError
from runtime.image.store import ImportProgress
from runtime.logconfig import configure_logging
from runtime.logs import read_log, write_record
from runtime.network.ports import parse_publish
from runtime.quota import parse_storage_opts
from runtime.restart import parse_restart
from runtime.seccomp_filter import parse_security_opts
from runtime.spec import (
    parse_blkio_weight,
    parse_capabilities,
    parse_cpus,
    parse_device_limit,
    parse_labels,
    parse_memory,
    parse_pids_limit,
    parse_signal,
    parse_volume,
)
from runtime.state import ContainerStatus
from runtime.store import LOG, default_root
from runtime.userns import parse_idmap, parse_userns

EXIT_ERROR = 125


class CliExtension(Protocol):
    """Commands a higher layer adds to ``jaula`` (``migrate`` adds checkpoint, restore,
    migrate, node) without the runtime importing it."""

    def add_commands(self, sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        """Add subparsers."""

    def add_global_options(self, p: argparse.ArgumentParser) -> None:
        """Add options that go before the command (``jaula --node N ps``)."""

    def is_remote(self, a: argparse.Namespace) -> bool:
        """True when the command acts on another node: no root and no local state needed."""

    def dispatch(self, rt: Runtime | None, a: argparse.Namespace) -> int | None:
        """Run ``a.cmd`` if it is one of this extension's commands, else return None."""


class Parser(argparse.ArgumentParser):
    """argparse with jaula's conventions: usage errors are one line and exit 125."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"jaula: error: {message} (see `{self.prog} --help`)\n")


def global_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    """--state-root and --log-level, accepted before or after the command."""
    d = argparse.SUPPRESS if suppress else None
    p.add_argument(
        "--state-root",
        type=Path,
        default=d,
        help="state root (default: $JAULA_ROOT or /var/lib/jaula)",
    )
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=d if suppress else os.environ.get("JAULA_LOG_LEVEL", "warning"),
        help="log verbosity on stderr (default: warning)",
    )


_COMMON = argparse.ArgumentParser(add_help=False)
global_options(_COMMON, suppress=True)


_SIZE = re.compile(r"^(\d+)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)


def parse_size(value: str) -> int:
    """An argparse type: bytes, or a whole number with a k/m/g/t suffix (binary units)."""
    m = _SIZE.match(value.strip())
    if not m:
        raise argparse.ArgumentTypeError(
            f"invalid size {value!r}: use bytes or a size like 512m or 16g"
        )
    return int(m.group(1)) << (10 * " kmgt".index(m.group(2).lower() or " "))


class SubParser(Parser):
    """A command's parser: also takes the global options after the command."""

    def __init__(self, **kw: Any) -> None:
        kw.setdefault("parents", [_COMMON])
        super().__init__(**kw)


def build_parser(extensions: Sequence[CliExtension] = ()) -> argparse.ArgumentParser:
    p = Parser(
        prog="jaula",
        description="A container runtime built for checkpoint/restore and live migration.",
    )
    global_options(p, suppress=False)
    for ext in extensions:
        ext.add_global_options(p)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=SubParser)

    img = sub.add_parser("image", help="manage images")
    isub = img.add_subparsers(dest="image_cmd", required=True, metavar="COMMAND")
    imp = isub.add_parser("import", help="import an OCI layout dir, oci-archive or docker-save tar")
    imp.add_argument("path", type=Path)
    imp.add_argument("--name", help="NAME[:TAG] to give the image")
    imp.add_argument(
        "--max-layer-size",
        type=parse_size,
        metavar="SIZE",
        help="refuse a layer that unpacks to more (bytes, or 16g...; default 32g)",
    )
    imp.add_argument(
        "--max-image-size",
        type=parse_size,
        metavar="SIZE",
        help="refuse an image whose layers unpack to more (default 64g)",
    )
    isub.add_parser("ls", help="list images")
    irm = isub.add_parser("rm", help="remove images")
    irm.add_argument("images", nargs="+")

    run = sub.add_parser("run", help="run a command in a new container")
    run.add_argument("--name", help="name of the container (default: a random one)")
    run.add_argument("-d", "--detach", action="store_true", help="run in the background")
    run.add_argument(
        "--rm", action="store_true", help="remove the container when it exits (not with -d)"
    )
    run.add_argument("--memory", "-m", help="memory limit (bytes, or 512m, 1g...)")
    run.add_argument("--cpus", help="CPU limit, e.g. 0.5")
    run.add_argument("--pids-limit", help="maximum number of processes")
    run.add_argument("-e", "--env", action="append", default=[], help="KEY=VALUE")
    run.add_argument(
        "-l",
        "--label",
        action="append",
        default=[],
        help="KEY=VALUE metadata (jaula.balance=false: the balancer never moves it)",
    )
    run.add_argument("-w", "--workdir")
    run.add_argument("-u", "--user", help="UID[:GID] or NAME[:GROUP]")
    run.add_argument("--hostname", help="hostname inside (default: the short id)")
    run.add_argument(
        "--network",
        default="none",
        choices=["bridge", "none", "host"],
        help="bridge: a veth into the node's bridge with a leased IP; none: only lo (default)",
    )
    run.add_argument("--ip", help="IPv4 address on the bridge network (default: a free one)")
    run.add_argument("--mac-address", help="MAC of eth0 (default: derived from the id)")
    run.add_argument("--dns", action="append", default=[], help="nameserver for resolv.conf")
    run.add_argument(
        "-p",
        "--publish",
        action="append",
        default=[],
        metavar="[HOSTIP:][HOSTPORT:]CTRPORT[/PROTO]",
        help="publish a port of a bridged container on this node (iptables DNAT; no "
        "HOSTPORT: a free one)",
    )
    run.add_argument(
        "--add-host", action="append", default=[], metavar="NAME:IP", help="line for /etc/hosts"
    )
    run.add_argument("-v", "--volume", action="append", default=[], help="HOST:CTR[:ro][,shared]")
    run.add_argument("--entrypoint", help="override the image's Entrypoint")
    run.add_argument("--cap-add", action="append", default=[], help="add a capability")
    run.add_argument(
        "--cap-drop", action="append", default=[], help="drop a capability (ALL drops every one)"
    )
    run.add_argument(
        "--privileged", action="store_true", help="keep all capabilities, mask nothing"
    )
    run.add_argument(
        "--security-opt",
        action="append",
        default=[],
        help="seccomp=unconfined or seccomp=PROFILE.json (default: Podman's profile)",
    )
    for kind, (_, _, flag) in IO_KINDS.items():
        unit = "bytes/s, e.g. /dev/sda:1mb" if kind.endswith("bps") else "operations/s"
        run.add_argument(
            flag, action="append", default=[], dest=kind, help=f"PATH:RATE, limit ({unit})"
        )
    run.add_argument("--blkio-weight", help="block-I/O weight, 10 to 1000 (BFQ devices)")
    run.add_argument(
        "--storage-opt",
        action="append",
        default=[],
        help="size=SIZE: disk quota of the container's writable layer (project quotas)",
    )
    run.add_argument(
        "--userns",
        default="host",
        help="host (default: root inside is root on the host) or auto (65536 ids of its own)",
    )
    run.add_argument(
        "--uidmap", action="append", default=[], help="CONTAINER:HOST:SIZE (repeatable)"
    )
    run.add_argument(
        "--gidmap", action="append", default=[], help="CONTAINER:HOST:SIZE (default: --uidmap)"
    )
    run.add_argument("image", help="image name, id or id prefix")
    run.add_argument(
        "command", nargs=argparse.REMAINDER, help="command and arguments (default: the image's)"
    )

    ps = sub.add_parser("ps", help="list containers")
    ps.add_argument("-a", "--all", action="store_true", help="show stopped containers too")
    ps.add_argument("-q", "--quiet", action="store_true", help="print ids only")
    ps.add_argument("--format", choices=["table", "json"], default="table")

    pt = sub.add_parser("port", help="list a container's published ports (iptables DNAT)")
    pt.add_argument("container")
    pt.add_argument("private_port", nargs="?", metavar="PRIVATE_PORT[/PROTO]")

    ins = sub.add_parser("inspect", help="show a container's configuration and state (JSON)")
    ins.add_argument("containers", nargs="+")

    lg = sub.add_parser("logs", help="print a container's output")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing until it exits")
    lg.add_argument("-n", "--tail", type=int, default=None, help="only the last N lines")
    lg.add_argument("container")

    ex = sub.add_parser("exec", help="run a command in a running container")
    ex.add_argument("-d", "--detach", action="store_true", help="do not wait for the command")
    ex.add_argument("-e", "--env", action="append", default=[], help="KEY=VALUE")
    ex.add_argument("-w", "--workdir", help="working directory inside")
    ex.add_argument("-u", "--user", help="UID[:GID] or NAME[:GROUP]")
    ex.add_argument("container", help="name, id or id prefix")
    ex.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments")

    for name, helptext in (
        ("pause", "freeze a container's processes"),
        ("resume", "thaw a paused container"),
    ):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("containers", nargs="+")
    sub._name_parser_map["unpause"] = sub._name_parser_map["resume"]

    st = sub.add_parser("stop", help="stop containers (stop signal, then SIGKILL)")
    st.add_argument(
        "-t", "--time", type=float, default=10.0, help="seconds before SIGKILL (-1: wait forever)"
    )
    st.add_argument("containers", nargs="+")

    k = sub.add_parser("kill", help="send a signal to containers")
    k.add_argument("-s", "--signal", default="KILL")
    k.add_argument("containers", nargs="+")

    rm = sub.add_parser("rm", help="remove containers")
    rm.add_argument("-f", "--force", action="store_true", help="kill running containers first")
    rm.add_argument("containers", nargs="+")

    w = sub.add_parser("wait", help="wait for containers to stop; print their exit codes")
    w.add_argument("containers", nargs="+")
    from runtime import commands  # here: it imports this module's helpers

    commands.add_commands(sub, p)
    for ext in extensions:
        ext.add_commands(sub)
    return p


def _ago(t: float) -> str:
    d = max(0, int(time.time() - t))
    for unit, secs in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if d >= secs:
            n = d // secs
            return f"{n} {unit}{'s' if n > 1 else ''}"
    return f"{d} second{'s' if d != 1 else ''}"


def _status_text(c: Container) -> str:
    st = c.state
    if st.status is ContainerStatus.RUNNING:
        return f"Up {_ago(st.started_at)}"
    if st.status is ContainerStatus.PAUSED:
        return f"Up {_ago(st.started_at)} (paused)"
    if st.status is ContainerStatus.STOPPED:
        return f"Exited ({st.exit_code}) {_ago(st.finished_at)} ago"
    if st.status is ContainerStatus.MIGRATED:
        return f"Migrated to {st.migrated_to}"
    return str(st.status.value).capitalize()


def cmd_ps(rt: Runtime, a: argparse.Namespace) -> int:
    cs = rt.list(all=a.all)
    if a.quiet:
        for c in cs:
            print(c.id[:12])
        return 0
    if a.format == "json":
        print(
            json.dumps(
                [
                    {
                        "Id": c.id,
                        "Name": c.name,
                        "Image": c.config.image_ref,
                        "Command": list(c.config.args),
                        "Status": c.status.value,
                        "Pid": c.state.pid,
                        "ExitCode": c.state.exit_code,
                        "Created": c.config.created_at,
                    }
                    for c in cs
                ],
                indent=1,
            )
        )
        return 0
    rows = [("CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES")]
    for c in cs:
        cmd = " ".join(c.config.args)
        rows.append(
            (
                c.id[:12],
                c.config.image_ref,
                cmd if len(cmd) <= 20 else cmd[:17] + "...",
                _ago(c.config.created_at) + " ago",
                _status_text(c),
                c.name,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for r in rows:
        print("  ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip())
    return 0


def cmd_run(rt: Runtime, a: argparse.Namespace) -> int:
    cmd = list(a.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    opts = RunOptions(
        image=a.image,
        command=tuple(cmd),
        entrypoint=None if a.entrypoint is None else tuple(a.entrypoint.split()),
        name=a.name,
        env=tuple(a.env),
        workdir=a.workdir,
        user=a.user,
        hostname=a.hostname,
        network=a.network,
        resources=Resources(
            memory_bytes=parse_memory(a.memory) if a.memory else None,
            cpu_quota_us=parse_cpus(a.cpus) if a.cpus else None,
            pids_max=parse_pids_limit(a.pids_limit) if a.pids_limit else None,
            blkio_weight=parse_blkio_weight(a.blkio_weight) if a.blkio_weight else None,
            io_limits=tuple(
                parse_device_limit(v, kind) for kind in IO_KINDS for v in getattr(a, kind)
            ),
        ),
        mounts=tuple(parse_volume(v) for v in a.volume),
        capabilities=parse_capabilities(a.cap_add, a.cap_drop, a.privileged),
        privileged=a.privileged,
        labels=parse_labels(a.label),
        ip=a.ip,
        mac_address=a.mac_address,
        dns=tuple(a.dns),
        add_hosts=tuple(a.add_host),
        ports=tuple(parse_publish(v) for v in a.publish),
        seccomp=parse_security_opts(a.security_opt, a.privileged),
        storage_size_bytes=parse_storage_opts(a.storage_opt),
        restart=parse_restart(a.restart),
        tty=a.tty,
        userns=parse_userns(a.userns),
        uid_map=tuple(parse_idmap(v, "--uidmap") for v in a.uidmap),
        gid_map=tuple(parse_idmap(v, "--gidmap") for v in a.gidmap),
    )
    if a.rm and a.detach:
        raise ConfigError("--rm goes with an attached run, not with -d")
    if a.cmd == "create":  # runtime.commands.lifecycle: the same flags, not started
        print(rt.create(opts).id)
        return 0
    c = rt.run(opts)
    if a.detach:
        print(c.id)
        return 0
    try:
        if a.tty:  # runtime.commands.terminal
            from runtime.commands.terminal import attach_terminal

            return attach_terminal(c, send_input=a.interactive)
        return _attach(c)
    finally:
        if a.rm:
            c.delete(force=True)


def cmd_port(rt: Runtime, a: argparse.Namespace) -> int:
    """``podman port CTR [PRIVATE_PORT[/PROTO]]``: one ``80/tcp -> 0.0.0.0:8080`` line per
    mapping (with PRIVATE_PORT: only ``0.0.0.0:8080`` of that port)."""
    c = rt.get(a.container)
    if a.private_port is None:
        for m in c.config.ports:
            print(m.podman_line())
        return 0
    port, _, proto = a.private_port.partition("/")
    if not port.isdigit() or proto not in ("", "tcp", "udp"):
        raise ConfigError(f"invalid port {a.private_port!r}: use PORT or PORT/tcp or PORT/udp")
    found = [
        m
        for m in c.config.ports
        if m.container_port == int(port) and m.protocol == (proto or "tcp")
    ]
    if not found:
        raise ConfigError(
            f"no public port {port}/{proto or 'tcp'} published for {c.name}: "
            f"see `jaula port {c.name}`"
        )
    for m in found:
        print(f"{m.host_ip or '0.0.0.0'}:{m.host_port}")
    return 0


def _attach(c: Container) -> int:
    """Stream the container's output until it exits; forward SIGINT/SIGTERM to it."""

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(c.state.pid, signum)
        except ProcessLookupError:
            pass

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, forward)

    def done() -> bool:
        c.refresh()
        return (
            c.status not in (ContainerStatus.RUNNING, ContainerStatus.PAUSED)
            and not c.monitor_alive()
        )

    for rec in read_log(c.dir / LOG, follow=True, is_done=done):
        write_record(rec)
    code = c.wait()
    return code if code is not None and code >= 0 else EXIT_ERROR


def cmd_logs(rt: Runtime, a: argparse.Namespace) -> int:
    c = rt.get(a.container)

    def done() -> bool:
        c.refresh()
        return (
            c.status not in (ContainerStatus.RUNNING, ContainerStatus.PAUSED)
            and not c.monitor_alive()
        )

    records = read_log(c.dir / LOG, follow=a.follow, is_done=done)
    if a.tail is not None:
        import collections
        import itertools

        if a.follow:
            # the last N lines so far, then follow
            head = collections.deque(read_log(c.dir / LOG), maxlen=max(a.tail, 0))
            n_seen = sum(1 for _ in read_log(c.dir / LOG))
            records = itertools.chain(head, itertools.islice(records, n_seen, None))
        else:
            records = iter(collections.deque(records, maxlen=max(a.tail, 0)))
    for rec in records:
        write_record(rec)
    return 0


def cmd_exec(rt: Runtime, a: argparse.Namespace) -> int:
    cmd = list(a.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    c = rt.get(a.container)
    return c.exec(tuple(cmd), tuple(a.env), a.workdir, a.user, a.detach)


#: Imports of fewer layer bytes than this (when the total is known) draw no progress bar.
PROGRESS_MIN_BYTES = 16 * 1024 * 1024


class ImportBar:
    """The progress bar of ``jaula image import``: rich, on stderr, only when stderr is a
    terminal and the import is long (at least :data:`PROGRESS_MIN_BYTES` of layers, or of
    unknown size).  Fed by :meth:`ImageStore.import_path`'s ``on_progress``; gone (transient)
    once the import finished."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None  # rich.progress.Progress, imported only when drawn
        self._task: Any = None

    def update(self, p: ImportProgress) -> None:
        if self._bar is None and self.enabled and not p.finished:
            if 0 < p.total_bytes < PROGRESS_MIN_BYTES:
                self.enabled = False
                return
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            console = Console(stderr=True)
            self.enabled = console.is_terminal
            if not self.enabled:
                return
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(f"importing {p.path.name}", total=p.total_bytes or None)
        if self._bar is not None:
            self._bar.update(self._task, completed=p.done_bytes)
            if p.finished:
                self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def cmd_image(rt: Runtime, a: argparse.Namespace) -> int:
    if a.image_cmd == "import":
        limits = rt.images.limits
        if a.max_layer_size is not None:
            limits = dataclasses.replace(limits, max_layer_bytes=a.max_layer_size)
        if a.max_image_size is not None:
            limits = dataclasses.replace(limits, max_image_bytes=a.max_image_size)
        bar = ImportBar(enabled=sys.stderr.isatty())
        try:
            img = rt.images.import_path(a.path, name=a.name, on_progress=bar.update, limits=limits)
        finally:
            bar.close()
        print(img.id)
        return 0
    if a.image_cmd == "ls":
        rows = [("REPOSITORY:TAG", "IMAGE ID", "LAYERS", "SIZE")]
        for img in rt.images.list():
            for n in img.names or ("<none>",):
                rows.append(
                    (n, img.id[:12], str(len(img.layers)), f"{img.size_bytes / 1e6:.1f} MB")
                )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            print("  ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip())
        return 0
    for ref in a.images:
        rt.images.remove(ref, in_use=rt.image_in_use)
        print(ref)
    return 0


def _each(a: argparse.Namespace, rt: Runtime, fn: object) -> int:
    """Apply an operation to each named container; report each failure, keep going."""
    rc = 0
    for ref in a.containers:
        try:
            out = fn(rt.get(ref))  # type: ignore[operator]
            print(ref if out is None else out)
        except JaulaError as e:
            print(f"jaula: error: {e}", file=sys.stderr)
            rc = EXIT_ERROR
    return rc


def dispatch(
    rt: Runtime | None, a: argparse.Namespace, extensions: Sequence[CliExtension] = ()
) -> int:
    for ext in extensions:
        rc = ext.dispatch(rt, a)
        if rc is not None:
            return rc
    assert rt is not None, "a remote command fell through to the local runtime"
    from runtime import commands

    if (rc := commands.dispatch(rt, a)) is not None:
        return rc
    match a.cmd:
        case "image":
            return cmd_image(rt, a)
        case "run":
            return cmd_run(rt, a)
        case "ps":
            return cmd_ps(rt, a)
        case "inspect":
            out = [rt.get(ref).inspect() for ref in a.containers]
            print(json.dumps(out, indent=1))
            return 0
        case "port":
            return cmd_port(rt, a)
        case "logs":
            return cmd_logs(rt, a)
        case "exec":
            return cmd_exec(rt, a)
        case "pause":
            return _each(a, rt, lambda c: c.pause())
        case "resume" | "unpause":
            return _each(a, rt, lambda c: c.resume())
        case "stop":
            return _each(a, rt, lambda c: (c.stop(a.time), None)[1])
        case "kill":
            sig = parse_signal(a.signal)
            return _each(a, rt, lambda c: c.kill(sig))
        case "rm":
            return _each(a, rt, lambda c: c.delete(force=a.force))
        case "wait":
            return _each(a, rt, lambda c: c.wait())
    raise AssertionError(a.cmd)


def main(argv: Sequence[str] | None = None, extensions: Sequence[CliExtension] = ()) -> int:
    """Entry point of the runtime's commands; returns the exit code.  The ``jaula`` console
    script is :func:`migrate.cli.jaula_main`, which adds the migration commands."""
    parser = build_parser(extensions)
    a = parser.parse_args(argv)
    configure_logging(a.log_level)
    try:
        rt = None
        if not any(ext.is_remote(a) for ext in extensions):
            require_root()
            rt = Runtime(a.state_root or default_root())
        return dispatch(rt, a, extensions)
    except JaulaError as e:
        print(f"jaula: error: {e}", file=sys.stderr)
        if isinstance(e, CommandNotFound) or (a.cmd == "exec" and "not found" in str(e)):
            return 127
        if isinstance(e, CommandNotExecutable) or (
            a.cmd == "exec" and str(e).startswith("exec failed")
        ):
            return 126
        return EXIT_ERROR
    except BrokenPipeError:
        # the reader went away (`jaula logs x | head`): stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
