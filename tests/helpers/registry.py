"""A real OCI registry on loopback for the ``jaula pull`` tests: Debian's ``docker-registry``
(the CNCF distribution registry) started on ``127.0.0.1`` on a free port, its storage in a
temporary directory; images put in it with ``skopeo copy``.  Plain HTTP, or (``secure=True``)
HTTPS with a self-signed certificate made by ``openssl`` for ``IP:127.0.0.1`` and basic auth
from an htpasswd file (bcrypt, through libxcrypt's ``crypt``), user :data:`USER`.

:func:`local_registry` stops the registry (SIGTERM, then SIGKILL) when its block ends, also
when the block raised.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime.poll import wait_for

REGISTRY_BIN = "docker-registry"
USER, PASSWORD = "alice", "s3cret-pw"


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
    #: with ``secure``: a directory holding the CA (``ca.crt``) for ``--cert-dir``
    cert_dir: Path | None = None

    def push(self, layout: Path, layout_ref: str, name: str) -> str:
        """``skopeo copy oci:LAYOUT:REF docker://HOST/NAME`` (plain HTTP); returns the
        manifest digest the registry stores (``sha256:...``)."""
        digest_file = self.log_path.parent / "pushed.digest"
        auth = [] if self.cert_dir is None else ["--dest-creds", f"{USER}:{PASSWORD}"]
        subprocess.run(
            [
                "skopeo", "copy", "--quiet", "--dest-tls-verify=false", *auth,
                "--digestfile", str(digest_file),
                f"oci:{layout}:{layout_ref}", f"docker://{self.host}/{name}",
            ],
            check=True, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        return digest_file.read_text().strip()


def _answers(url: str) -> bool:
    """Whether the registry answers HTTP at ``url`` (401 counts: auth is on)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
            return bool(r.status == 200)
    except urllib.error.HTTPError as e:
        return e.code == 401
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def _secure_files(workdir: Path) -> tuple[str, Path]:
    """The config lines for TLS and basic auth, and the CA directory for clients."""
    key, cert = workdir / "key.pem", workdir / "cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

        hashed = crypt.crypt(PASSWORD, crypt.mksalt(crypt.METHOD_BLOWFISH))
    htpasswd = workdir / "htpasswd"
    htpasswd.write_text(f"{USER}:{hashed}\n")
    ca_dir = workdir / "certs"
    ca_dir.mkdir()
    shutil.copy(cert, ca_dir / "ca.crt")
    lines = (
        f"  tls:\n    certificate: {cert}\n    key: {key}\n"
        f"auth:\n  htpasswd:\n    realm: jaula-test\n    path: {htpasswd}\n"
    )
    return lines, ca_dir


@contextlib.contextmanager
def local_registry(workdir: Path, secure: bool = False) -> Iterator[Registry]:
    """Start ``docker-registry`` on 127.0.0.1 with its storage and log under ``workdir``
    (``secure``: HTTPS and basic auth, see the module docstring); yield it once ``/v2/``
    answers; stop it afterwards whatever happened.  Raises RuntimeError (with its log)
    when it does not come up within 30 s."""
    port = free_port()
    extra, ca_dir = _secure_files(workdir) if secure else ("", None)
    storage = workdir / "storage"
    storage.mkdir(parents=True)
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n" + extra
    )
    log_path = workdir / "registry.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(config)],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        url = f"{'https' if secure else 'http'}://127.0.0.1:{port}/v2/"
        up = wait_for(lambda: proc.poll() is not None or _answers(url), 30.0, 0.1)
        if not up or proc.poll() is not None:
            raise RuntimeError(f"docker-registry did not start: {log_path.read_text()[-1000:]}")
        yield Registry(f"127.0.0.1:{port}", proc, log_path, ca_dir)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
