"""A real OCI registry on loopback for the ``jaula pull`` tests: Debian's ``docker-registry``
(the CNCF distribution registry) started on ``127.0.0.1`` on a free port, plain HTTP, its
storage in a temporary directory; images put in it with ``skopeo copy``.

:func:`local_registry` stops the registry (SIGTERM, then SIGKILL) when its block ends, also
when the block raised.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime.poll import wait_for

REGISTRY_BIN = "docker-registry"


def registry_missing() -> str | None:
    """Why no registry can be started here, or None."""
    if shutil.which(REGISTRY_BIN) is None:
        return "docker-registry is not installed (apt-get install docker-registry)"
    if shutil.which("skopeo") is None:
        return "skopeo is not installed (apt-get install skopeo)"
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    """A running registry: ``host`` is ``127.0.0.1:PORT`` (the image name's domain)."""

    host: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def push(self, layout: Path, layout_ref: str, name: str) -> str:
        """``skopeo copy oci:LAYOUT:REF docker://HOST/NAME`` (plain HTTP); returns the
        manifest digest the registry stores (``sha256:...``)."""
        digest_file = self.log_path.parent / "pushed.digest"
        subprocess.run(
            [
                "skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                "--digestfile", str(digest_file),
                f"oci:{layout}:{layout_ref}", f"docker://{self.host}/{name}",
            ],
            check=True, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        return digest_file.read_text().strip()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


@contextlib.contextmanager
def local_registry(workdir: Path) -> Iterator[Registry]:
    """Start ``docker-registry`` on 127.0.0.1 with its storage and log under ``workdir``;
    yield it once ``/v2/`` answers; stop it afterwards whatever happened.  Raises
    RuntimeError (with its log) when it does not come up within 30 s."""
    port = free_port()
    storage = workdir / "storage"
    storage.mkdir(parents=True)
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log_path = workdir / "registry.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(config)],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        up = wait_for(
            lambda: proc.poll() is not None or _answers(f"http://127.0.0.1:{port}/v2/"), 30.0, 0.1
        )
        if not up or proc.poll() is not None:
            raise RuntimeError(f"docker-registry did not start: {log_path.read_text()[-1000:]}")
        yield Registry(f"127.0.0.1:{port}", proc, log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
