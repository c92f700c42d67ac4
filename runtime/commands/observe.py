"""``stats`` and ``events``, as Podman spells them.

``stats [CONTAINER...]``: for each running container (default: all of them), from its
cgroup (:meth:`runtime.cgroups.CgroupManager.stats`): CPU % (of one CPU, over the last
interval; with ``--no-stream`` over its whole run, Podman's first sample), memory in use
and its limit (the container's ``--memory``, else the host's RAM), memory %, tasks, CPU
time.  ``--format json``: Podman's keys (``id``, ``name``, ``cpu_percent``, ``mem_usage``,
``mem_limit``, ``mem_percent``, ``pids``, ``cpu_time``) with numbers, not formatted strings
(scripts read them; jaula differs there on purpose).  Net and block I/O are not shown.

``events``: the state root's event log (:mod:`runtime.events`), followed until interrupted
unless ``--stream=false``; ``--since``/``--until`` take RFC 3339 times, Unix seconds or a
duration before now (``10m``, ``1h30m``); ``--filter`` takes ``container=``, ``event=``
(or ``status=``), ``image=``, ``type=``, as many as wanted (same key: any of them).
``--format json``: one JSON object per line with Podman's keys.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
from typing import Any

from runtime import events
from runtime.commands.images import _bool
from runtime.container import Container, Runtime
from runtime.errors import ConfigError
from runtime.state import ContainerStatus


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    st = sub.add_parser("stats", help="show containers' CPU, memory and task use")
    st.add_argument("containers", nargs="*", help="names or ids (default: every running one)")
    st.add_argument("-a", "--all", action="store_true", help="also stopped ones (zeros)")
    st.add_argument("--no-stream", action="store_true", help="print once and exit")
    st.add_argument("--format", choices=["table", "json"], default="table")
    st.add_argument(
        "-i", "--interval", type=float, default=5.0, help="seconds between updates (default 5)"
    )
    ev = sub.add_parser("events", help="show the containers' events")
    ev.add_argument("--since", help="from this time (RFC 3339, Unix seconds or a duration ago)")
    ev.add_argument("--until", help="up to this time (same forms)")
    ev.add_argument("-f", "--filter", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--format", choices=["text", "json"], default="text")
    ev.add_argument(
        "--stream",
        type=_bool,
        nargs="?",
        const=True,
        default=True,
        metavar="BOOL",
        help="keep following (default true)",
    )


def dispatch(rt: Runtime, a: argparse.Namespace) -> int | None:
    if a.cmd == "stats":
        return cmd_stats(rt, a)
    if a.cmd == "events":
        return cmd_events(rt, a)
    return None


# -- stats ---------------------------------------------------------------------------------


def _host_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.4g}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1000
    return f"{n}"


def _duration(ns: int) -> str:
    if ns >= 1_000_000_000:
        return f"{ns / 1e9:.3f}s"
    return f"{ns / 1e6:.3f}ms"


def sample(c: Container, prev: dict[str, tuple[int, float]]) -> dict[str, Any]:
    """One container's numbers (see the module docstring); ``prev`` maps an id to its last
    (cpu ns, monotonic s) and is updated."""
    running = c.status in (ContainerStatus.RUNNING, ContainerStatus.PAUSED)
    cpu_ns = mem = pids = 0
    if running:
        s = c.cgroup().stats()
        cpu_ns, mem, pids = s.cpu_usage_ns, s.memory_bytes, s.pids
    now = time.monotonic()
    if c.id in prev:
        last_ns, last_t = prev[c.id]
        span_ns = (now - last_t) * 1e9
        used_ns = cpu_ns - last_ns
    else:
        span_ns = max(time.time() - c.state.started_at, 1e-3) * 1e9 if running else 0.0
        used_ns = cpu_ns
    prev[c.id] = (cpu_ns, now)
    limit = c.config.resources.memory_bytes or _host_memory()
    return {
        "id": c.id,
        "name": c.name,
        "cpu_percent": round(100.0 * used_ns / span_ns, 2) if span_ns > 0 else 0.0,
        "mem_usage": mem,
        "mem_limit": limit,
        "mem_percent": round(100.0 * mem / limit, 2) if limit else 0.0,
        "pids": pids,
        "cpu_time": cpu_ns,
    }


def _table(rows: list[dict[str, Any]]) -> None:
    out = [("ID", "NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "PIDS", "CPU TIME")]
    for r in rows:
        out.append(
            (
                r["id"][:12],
                r["name"],
                f"{r['cpu_percent']:.2f}%",
                f"{_size(r['mem_usage'])} / {_size(r['mem_limit'])}",
                f"{r['mem_percent']:.2f}%",
                str(r["pids"]),
                _duration(r["cpu_time"]),
            )
        )
    widths = [max(len(line[i]) for line in out) for i in range(len(out[0]))]
    for line in out:
        print("  ".join(v.ljust(widths[i]) for i, v in enumerate(line)).rstrip())


def cmd_stats(rt: Runtime, a: argparse.Namespace) -> int:
    if a.interval <= 0:
        raise ConfigError(f"invalid --interval {a.interval}: give a positive number of seconds")
    prev: dict[str, tuple[int, float]] = {}
    while True:
        if a.containers:
            cs = [rt.get(ref) for ref in a.containers]
        else:
            cs = rt.list(all=a.all)
        rows = [sample(c, prev) for c in cs]
        if a.format == "json":
            print(json.dumps(rows, indent=1))
        else:
            if not a.no_stream and sys.stdout.isatty():
                print("\x1b[2J\x1b[H", end="")
            _table(rows)
        sys.stdout.flush()
        if a.no_stream:
            return 0
        time.sleep(a.interval)


# -- events --------------------------------------------------------------------------------

_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_time_ns(value: str, flag: str) -> int:
    """``--since``/``--until``: RFC 3339, Unix seconds, or a duration ago (``90s``, ``1h``).
    Raises ConfigError."""
    v = value.strip()
    m = _DURATION.match(v)
    if v and m and any(m.groups()):
        h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        return time.time_ns() - int((h * 3600 + mi * 60 + s) * 1e9)
    try:
        return int(float(v) * 1e9)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(v)
    except ValueError:
        raise ConfigError(
            f"invalid {flag} {value!r}: use an RFC 3339 time, Unix seconds or a duration like 10m"
        ) from None
    if t.tzinfo is None:
        t = t.astimezone()
    return int(t.timestamp() * 1e9)


_FILTER_KEYS = {"container", "event", "status", "image", "type"}


def _filter(specs: list[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for spec in specs:
        key, eq, value = spec.partition("=")
        if not eq or key not in _FILTER_KEYS or not value:
            raise ConfigError(
                f"invalid --filter {spec!r}: use container=, event=, image= or type= with a value"
            )
        out.setdefault("event" if key == "status" else key, set()).add(value)
    return out


def _keeps(f: dict[str, set[str]]) -> Any:
    def keep(ev: events.Event) -> bool:
        if "container" in f and not any(
            v in (ev.name, ev.id) or (len(v) >= 3 and ev.id.startswith(v)) for v in f["container"]
        ):
            return False
        if "event" in f and ev.status not in f["event"]:
            return False
        if "image" in f and ev.image not in f["image"]:
            return False
        return not ("type" in f and ev.type not in f["type"])

    return keep


def _rfc3339_ns(ns: int) -> str:
    t = dt.datetime.fromtimestamp(ns // 1_000_000_000, dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 1_000_000_000:09d}Z"


def cmd_events(rt: Runtime, a: argparse.Namespace) -> int:
    since = parse_time_ns(a.since, "--since") if a.since else None
    until = parse_time_ns(a.until, "--until") if a.until else None
    keep = _keeps(_filter(a.filter))
    for ev in events.read(rt.root, since, until, follow=a.stream, keep=keep):
        if a.format == "json":
            d = {
                "ID": ev.id,
                "Image": ev.image,
                "Name": ev.name,
                "Status": ev.status,
                "Time": _rfc3339_ns(ev.time_ns),
                "Type": ev.type,
                "Attributes": ev.attributes,
                "timeNano": ev.time_ns,
            }
            print(json.dumps(d, separators=(",", ":")))
        else:
            t = dt.datetime.fromtimestamp(ev.time_ns // 1_000_000_000, dt.UTC)
            when = t.strftime("%Y-%m-%d %H:%M:%S") + f".{ev.time_ns % 1_000_000_000:09d} +0000 UTC"
            attrs = ", ".join(
                f"{k}={v}" for k, v in {"image": ev.image, "name": ev.name, **ev.attributes}.items()
            )
            print(f"{when} {ev.type} {ev.status} {ev.id} ({attrs})")
        sys.stdout.flush()
    return 0
