"""The event log of a state root: what happened to its containers, for ``jaula events``.

One append-only file, ``<root>/events.jsonl`` (:data:`runtime.store.EVENTS`): one JSON object
per line, each written by one ``write(2)`` on an ``O_APPEND`` descriptor, so lines from
several processes (the CLI, monitors, the node service) never interleave::

    {"time_ns": 1733100000123456789, "type": "container", "status": "start",
     "id": "<64 hex>", "name": "web", "image": "busybox", "attributes": {...}}

``status`` is Podman's event name: ``create``, ``start``, ``died`` (the init exited; written
by the monitor, with ``exitCode``), ``restart`` (the monitor started it again), ``stop``,
``kill`` (with ``signal``), ``pause``, ``unpause``, ``rename`` (with ``oldName``), ``remove``,
``exec``, ``restore``.  Recording is best effort: a full disk never fails an operation (the
failure is logged).  Libraries write events; only the CLI prints them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from runtime.poll import wait_for
from runtime.store import EVENTS

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Event:
    """One line of the event log (see the module docstring)."""

    time_ns: int
    status: str
    id: str
    name: str
    image: str = ""
    type: str = "container"
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "time_ns": self.time_ns,
            "type": self.type,
            "status": self.status,
            "id": self.id,
            "name": self.name,
            "image": self.image,
            "attributes": self.attributes,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Event:
        return cls(
            time_ns=int(d["time_ns"]),
            status=str(d["status"]),
            id=str(d["id"]),
            name=str(d.get("name", "")),
            image=str(d.get("image", "")),
            type=str(d.get("type", "container")),
            attributes=dict(d.get("attributes") or {}),
        )


def record(
    root: Path, status: str, container_id: str, name: str, image: str = "", **attributes: Any
) -> None:
    """Append one event to ``root``'s log; never raises (an error is logged)."""
    ev = Event(time.time_ns(), status, container_id, name, image, attributes=attributes)
    line = (json.dumps(ev.to_json(), separators=(",", ":")) + "\n").encode()
    try:
        fd = os.open(root / EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("event.not_recorded", status=status, id=container_id[:12], error=str(e))


def read(
    root: Path,
    since_ns: int | None = None,
    until_ns: int | None = None,
    follow: bool = False,
    keep: Callable[[Event], bool] = lambda _e: True,
    poll_s: float = 0.2,
) -> Iterator[Event]:
    """The events of ``root`` in the order written, from ``since_ns`` (ns since the epoch)
    to ``until_ns``; with ``follow``, then new ones as they come, until ``until_ns`` passes
    (or forever).  A torn last line (a writer mid-write) is read again once complete."""
    path = root / EVENTS
    offset = 0
    buf = b""
    while True:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        offset += len(chunk)
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            try:
                ev = Event.from_json(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue  # not one of ours: skip it
            if since_ns is not None and ev.time_ns < since_ns:
                continue
            if until_ns is not None and ev.time_ns > until_ns:
                return
            if keep(ev):
                yield ev
        if not follow or (until_ns is not None and time.time_ns() > until_ns):
            return
        seen = offset
        wait_for(lambda: _size(path) > seen, 1.0, poll_s)  # noqa: B023 - nothing announces a write


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
