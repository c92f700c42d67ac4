"""The state root: where a node keeps its images, layers and containers.

Layout (``<root>`` is ``--state-root``, ``$JAULA_ROOT`` or ``/var/lib/jaula``); every name
below is a constant of this module, and no other module spells one::

    <root>/lock                    ROOT_LOCK: flock, serializes container creation (names)
    <root>/node.lock               NODE_LOCK: flock of the one node service of this root
    <root>/tmp/                    TMP_DIR: transient files (imports, migrations' scratch
                                   when /dev/shm has no room)
    <root>/logs/criu/              CRIU_LOGS_DIR: copies of the CRIU logs of failed actions
                                   (the newest 20; migrate.criu.keep_log)
    <root>/events.jsonl            EVENTS: the append-only event log (runtime.events)
    <root>/images/ <root>/layers/  the image store (runtime.image.ImageStore)
    <root>/containers/<id>/        one directory per container
        config.json                CONFIG: ContainerConfig (written once, atomically)
        state.json                 STATE: State (under the container lock, atomically)
        exit.json                  EXIT: ExitRecord (written once by the monitor)
        lock                       LOCK: flock, serializes operations on this container
        ctr.log                    LOG: stdout/stderr, CRI log format, written by the monitor
        monitor.log                MONITOR_LOG: the monitor's own errors
        go.fifo                    GO_FIFO: an armed monitor waits on it for go/cancel
        armed                      ARMED_MARK: an armed monitor has loaded its restorer
        restart.json               RESTART: the --restart policy (runtime.restart), if any
        init.json                  INIT: the init a restarting monitor started last
                                   (pid, start time, restart count; runtime.restart)
        tty                        TTY_MARK: run with -t: the monitor owns a pty (runtime.tty)
        attach.sock                ATTACH_SOCK: the monitor's terminal, for attach
        stop-requested             STOP_MARK: stop/rm asked for it: the monitor restarts
                                   nothing more
        checkpoint/                CHECKPOINT_DIR: the last checkpoint bundle
        checkpoint.new/            CHECKPOINT_NEW_DIR: a checkpoint being written
        upper/ work/ merged/       UPPER, WORK, MERGED: overlayfs upperdir, workdir, and
                                   the mount point of the rootfs

Ids are 64 lowercase hex characters; names match ``[a-zA-Z0-9][a-zA-Z0-9_.-]*`` (Podman's
rule).  A container is found by its name, its full id or a unique prefix of its id.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from runtime.errors import (
    AmbiguousContainer,
    ContainerExists,
    ContainerNotFound,
    InvalidContainerId,
)

DEFAULT_ROOT = Path("/var/lib/jaula")

ROOT_LOCK = "lock"
NODE_LOCK = "node.lock"
TMP_DIR = "tmp"
CONFIG = "config.json"
STATE = "state.json"
EXIT = "exit.json"
LOCK = "lock"
LOG = "ctr.log"
MONITOR_LOG = "monitor.log"
GO_FIFO = "go.fifo"
NETNS = "netns"  # a bridged container's net namespace, pinned until its init joined it
ARMED_MARK = "armed"
EVENTS = "events.jsonl"
RESTART = "restart.json"
INIT = "init.json"
STOP_MARK = "stop-requested"
TTY_MARK = "tty"
ATTACH_SOCK = "attach.sock"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_NEW_DIR = "checkpoint.new"
CRIU_LOGS_DIR = "logs/criu"
UPPER = "upper"
WORK = "work"
MERGED = "merged"
#: what a container's root file system is made of (removed when it leaves the node)
ROOTFS_DIRS = (UPPER, WORK, MERGED, CHECKPOINT_DIR)
ID_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")

_ADJECTIVES = (
    "brave",
    "calm",
    "eager",
    "fond",
    "gentle",
    "happy",
    "jolly",
    "keen",
    "lucid",
    "merry",
    "nifty",
    "proud",
    "quiet",
    "sharp",
    "swift",
    "vivid",
    "wise",
    "zen",
)
_NOUNS = (
    "albatross",
    "badger",
    "condor",
    "dingo",
    "egret",
    "falcon",
    "gecko",
    "heron",
    "ibis",
    "jackal",
    "kestrel",
    "lemur",
    "marten",
    "newt",
    "ocelot",
    "puffin",
    "quail",
    "raven",
)


def default_root() -> Path:
    """``$JAULA_ROOT`` if set, else ``/var/lib/jaula``."""
    env = os.environ.get("JAULA_ROOT")
    return Path(env) if env else DEFAULT_ROOT


@contextlib.contextmanager
def flocked(path: Path, shared: bool = False, blocking: bool = True) -> Iterator[None]:
    """Hold an flock(2) on ``path`` (created if missing) for the ``with`` block.

    With ``blocking=False`` raises BlockingIOError at once when someone else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        flags = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        fcntl.flock(fd, flags if blocking else flags | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


class Store:
    """Container directories under one state root.

    Args:
        root: the state root; created (mode 0700) on first use.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else default_root()
        self.containers_dir = self.root / "containers"

    def ensure(self) -> None:
        """Create the state root and its containers dir if missing."""
        self.containers_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """The store-wide lock (held while a name is checked and a directory created)."""
        self.ensure()
        return flocked(self.root / "lock")

    def container_dir(self, container_id: str) -> Path:
        if not ID_RE.match(container_id):
            raise InvalidContainerId(f"invalid container id {container_id!r}", container_id)
        return self.containers_dir / container_id

    def ids(self) -> list[str]:
        """Ids of every container directory that has a config."""
        if not self.containers_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.containers_dir.iterdir()
            if ID_RE.match(p.name) and (p / CONFIG).exists()
        )

    def name_of(self, container_id: str) -> str | None:
        import json

        try:
            with open(self.containers_dir / container_id / CONFIG) as f:
                return str(json.load(f)["name"])
        except (OSError, ValueError, KeyError):
            return None

    def resolve(self, ref: str) -> str:
        """Full id for a name, a full id or a unique id prefix.

        Raises ContainerNotFound or AmbiguousContainer (listing the candidates)."""
        ids = self.ids()
        if ref in ids:
            return ref
        by_name = [i for i in ids if self.name_of(i) == ref]
        if by_name:
            return by_name[0]
        if re.match(r"^[0-9a-f]{1,63}$", ref):
            matches = [i for i in ids if i.startswith(ref)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise AmbiguousContainer(
                    f"container id prefix {ref!r} is ambiguous: it matches "
                    + ", ".join(m[:12] for m in matches)
                    + "; give more characters",
                    None,
                )
        raise ContainerNotFound(f"no such container: {ref} (see `jaula ps -a`)", None)

    def new_id(self) -> str:
        """A fresh random 64-hex id not in use."""
        while True:
            cid = secrets.token_hex(32)
            if not (self.containers_dir / cid).exists():
                return cid

    def new_name(self) -> str:
        """A random ``adjective_noun`` name not in use."""
        taken = {self.name_of(i) for i in self.ids()}
        while True:
            name = f"{secrets.choice(_ADJECTIVES)}_{secrets.choice(_NOUNS)}"
            if name not in taken:
                return name
            name += f"_{secrets.randbelow(1000)}"
            if name not in taken:
                return name

    def check_name(self, name: str) -> None:
        """Raise InvalidContainerId for a malformed name, ContainerExists for a taken one.
        Call with :meth:`lock` held."""
        if not NAME_RE.match(name):
            raise InvalidContainerId(
                f"invalid container name {name!r}: use letters, digits, '_', '.' and '-', "
                "starting with a letter or digit",
                None,
            )
        for i in self.ids():
            if self.name_of(i) == name:
                raise ContainerExists(
                    f"the container name {name!r} is already in use by {i[:12]}: "
                    "choose another name or remove that container",
                    i,
                )

    def create_dir(self, container_id: str) -> Path:
        """Create the container's directory (mode 0700); raises ContainerExists if present."""
        d = self.container_dir(container_id)
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            raise ContainerExists(f"container {container_id[:12]} exists", container_id) from None
        return d

    def remove_dir(self, container_id: str) -> None:
        """Remove the container's directory and everything in it."""
        shutil.rmtree(self.container_dir(container_id), ignore_errors=False)
