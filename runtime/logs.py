"""Reading a container's log (``ctr.log``, CRI format written by :mod:`runtime.monitor`).

Each line is ``TIMESTAMP STREAM TAG TEXT`` where STREAM is ``stdout`` or ``stderr`` and TAG
is ``F`` (full line) or ``P`` (partial: no newline follows).  Source: the Kubernetes CRI
logging format (kubelet ``pkg/kubelet/kuberuntime/logs``), also Podman's ``k8s-file`` driver.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LogRecord:
    """One log line: ``timestamp`` as written (RFC 3339, ns), ``stream``, ``data`` (bytes,
    with the newline restored for full lines)."""

    timestamp: str
    stream: str
    data: bytes


def parse_line(line: bytes) -> LogRecord | None:
    """Parse one CRI log line (with its trailing newline); None if malformed."""
    parts = line.rstrip(b"\n").split(b" ", 3)
    if len(parts) < 3:
        return None
    ts, stream, tag = parts[0], parts[1], parts[2]
    text = parts[3] if len(parts) == 4 else b""
    return LogRecord(ts.decode(), stream.decode(), text + (b"\n" if tag == b"F" else b""))


def read_log(
    path: Path,
    follow: bool = False,
    is_done: Callable[[], bool] | None = None,
    poll_s: float = 0.05,
) -> Iterator[LogRecord]:
    """Yield records from ``path``; with ``follow`` keep reading until ``is_done()`` is true
    and the file has no more complete lines."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        return
    with f:
        buf = b""
        while True:
            chunk = f.read(65536)
            if chunk:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    rec = parse_line(line)
                    if rec:
                        yield rec
                continue
            if not follow or (is_done is not None and is_done()):
                # one more read: the writer may have finished just now
                chunk = f.read()
                if chunk:
                    buf += chunk
                    continue
                return
            time.sleep(poll_s)


def write_record(rec: LogRecord) -> None:
    """Write a record's data to this process's stdout or stderr (unbuffered)."""
    os.write(2 if rec.stream == "stderr" else 1, rec.data)
