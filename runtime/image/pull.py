"""``jaula pull``: fetch an image with skopeo into an OCI layout, then import it.

jaula has no registry client of its own: skopeo (Debian's ``skopeo`` package) speaks the
OCI distribution spec, TLS, the auth file Podman uses and every transport below.  It copies
the image into a temporary OCI layout under the store (``images/.pull/pull-*``, the same
filesystem), and
:meth:`runtime.image.store.ImageStore.import_path` then verifies every digest and unpacks the
layers not yet stored, as ``jaula image import`` does.  Nothing is left in the store when
either step fails.

Transports (``man containers-transports``), as ``podman pull`` takes them:

========================  ==================================================================
``docker://HOST/NAME:TAG`` a registry (also ``@sha256:DIGEST``)
``NAME[:TAG]``             the same on the default registry (``--default-registry``,
                           ``$JAULA_DEFAULT_REGISTRY``, else ``docker.io``) unless NAME starts
                           with a domain (``127.0.0.1:5000/busybox``, ``quay.io/x/y``)
``oci:DIR[:REF]``          an OCI layout directory
``oci-archive:FILE[:REF]`` an OCI layout in a tar
``docker-archive:FILE``    a ``docker save`` tarball (``[:NAME:TAG]`` picks one image)
``containers-storage:REF`` an image in the host's Podman/Buildah store
========================  ==================================================================

Names: a registry pull is named ``HOST/NAME:TAG`` normalised as import does
(:func:`runtime.image.oci.normalize_name`: ``docker.io/library/`` dropped); a pull by digest
stays unnamed (use its id), as the other transports do unless their REF is a name.

Credentials: ``authfile`` (``--authfile``) or skopeo's own default, which is Podman's:
``$REGISTRY_AUTH_FILE``, then ``${XDG_RUNTIME_DIR}/containers/auth.json``, then
``~/.docker/config.json``.  TLS is verified unless ``tls_verify=False``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from runtime.errors import ImageError
from runtime.image.oci import normalize_name
from runtime.image.store import Image, ImageStore, ImportProgress

log = structlog.get_logger(__name__)

#: the registry of a bare ``NAME[:TAG]`` unless configured (Podman's first unqualified-search
#: registry on most hosts)
DEFAULT_REGISTRY = "docker.io"

#: the directory under ``images/`` that holds a pull's OCI layout until it is imported (one
#: ``pull-*`` directory per pull, removed when the pull ends)
PULL_TMP = ".pull"

#: transports handed to skopeo as they are
LOCAL_TRANSPORTS = ("oci:", "oci-archive:", "docker-archive:", "containers-storage:")
#: skopeo's other transports, refused by name (a bare ``dir:tag`` would otherwise be a name)
OTHER_TRANSPORTS = frozenset({"dir", "docker-daemon", "ostree", "sif", "tarball"})


@dataclass(frozen=True)
class PullSource:
    """Where an image comes from: the skopeo source reference and the name it gets here.

    Attributes:
        skopeo_ref: ``TRANSPORT:REFERENCE`` for ``skopeo copy``.
        name: ``repository:tag`` to give the image, or None (digest pull, unnamed archive).
        registry: whether it comes from a registry (then TLS and credentials apply).
    """

    skopeo_ref: str
    name: str | None
    registry: bool


def parse_ref(ref: str, default_registry: str | None = None) -> PullSource:
    """Turn what the user typed into a :class:`PullSource` (see the module docstring).

    Raises ImageError for an empty reference, an unknown transport or an invalid name."""
    ref = ref.strip()
    if not ref:
        raise ImageError("no image given: use NAME[:TAG] or TRANSPORT:REFERENCE")
    for t in LOCAL_TRANSPORTS:
        if ref.startswith(t):
            rest = ref[len(t) :]
            if not rest:
                raise ImageError(f"{ref!r} names no {t[:-1]} source: use {t}PATH")
            return PullSource(ref, _local_name(t, rest), registry=False)
    if ref.startswith("docker://"):
        body = ref[len("docker://") :]
    elif (t := ref.split(":", 1)[0]) in OTHER_TRANSPORTS and ":" in ref:
        raise ImageError(
            f"unsupported transport {t!r} in {ref!r}: use docker://, oci:, oci-archive:, "
            "docker-archive: or containers-storage:"
        )
    else:
        body = ref
    first, _, rest = body.partition("/")
    if not rest or not ("." in first or ":" in first or first == "localhost"):
        reg = default_registry or os.environ.get("JAULA_DEFAULT_REGISTRY") or DEFAULT_REGISTRY
        body = f"{reg}/{body}"
    repo, at, digest = body.partition("@")
    if at:
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise ImageError(f"invalid digest {digest!r} in {ref!r}: use @sha256:<64 hex digits>")
        normalize_name(repo)  # validates; a digest pull stays unnamed
        return PullSource(f"docker://{body}", None, registry=True)
    name = normalize_name(repo)
    tagged = repo if _has_tag(repo) else f"{repo}:latest"
    return PullSource(f"docker://{tagged}", name, registry=True)


def _has_tag(repo: str) -> bool:
    last = repo.rsplit("/", 1)[-1]
    return ":" in last


def _local_name(transport: str, rest: str) -> str | None:
    """The name a local source's REF gives, when it is a name (``oci:DIR:busybox:1``)."""
    if transport == "containers-storage:":
        candidate = rest.split("@", 1)[0]
    else:
        _, _, candidate = rest.partition(":")
    if not candidate or ("/" not in candidate and ":" not in candidate):
        return None
    try:
        return normalize_name(candidate)
    except ImageError:
        return None


@dataclass(frozen=True)
class PullOptions:
    """How to reach the source (``podman pull``'s flags of the same names).

    Attributes:
        authfile: the auth file (Podman's ``auth.json`` format), or None for skopeo's default.
        creds: ``USER[:PASSWORD]`` for the registry, or None.
        cert_dir: a directory of ``*.crt`` (CA), ``*.cert`` and ``*.key`` for the registry.
        tls_verify: verify the registry's certificate and require HTTPS (default True).
        quiet: no progress output from skopeo.
        timeout_s: bound on the whole copy, in seconds.
    """

    authfile: Path | None = None
    creds: str | None = None
    cert_dir: Path | None = None
    tls_verify: bool = True
    quiet: bool = True
    timeout_s: float = 3600.0


def skopeo_argv(src: PullSource, dest_dir: Path, opts: PullOptions) -> list[str]:
    """The ``skopeo copy`` command line that copies ``src`` into the OCI layout ``dest_dir``.
    Raises ImageError when skopeo is not installed."""
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        raise ImageError("skopeo is not installed: apt-get install skopeo (or `make setup`)")
    argv = [skopeo, "copy"]
    if opts.quiet:
        argv.append("--quiet")
    if src.registry:
        argv.append(f"--src-tls-verify={'true' if opts.tls_verify else 'false'}")
        if opts.authfile is not None:
            argv += ["--src-authfile", str(opts.authfile)]
        if opts.creds is not None:
            argv += ["--src-creds", opts.creds]
        if opts.cert_dir is not None:
            argv += ["--src-cert-dir", str(opts.cert_dir)]
    argv += [src.skopeo_ref, f"oci:{dest_dir}:{src.name or 'pulled'}"]
    return argv


def pull(
    store: ImageStore,
    ref: str,
    opts: PullOptions | None = None,
    *,
    default_registry: str | None = None,
    on_progress: Callable[[ImportProgress], None] | None = None,
) -> Image:
    """Fetch ``ref`` (see the module docstring) and import it into ``store``.

    skopeo's progress goes to this process's stderr unless ``opts.quiet``; ``on_progress``
    follows the import.  Raises ImageError with skopeo's own reason on one line (unknown
    tag, refused credentials, untrusted certificate, unreachable registry, a blob whose
    digest does not match) or import's (see ``import_path``); nothing is stored then."""
    opts = opts or PullOptions()
    src = parse_ref(ref, default_registry)
    if opts.authfile is not None and not opts.authfile.is_file():
        raise ImageError(f"auth file {opts.authfile} does not exist: give an existing --authfile")
    tmp_root = store.images_dir / PULL_TMP  # not layers/.tmp: every import clears that
    tmp_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pull-", dir=tmp_root) as tmp:
        layout = Path(tmp) / "oci"
        argv = skopeo_argv(src, layout, opts)
        log.info("pulling image", ref=ref, source=src.skopeo_ref)
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if opts.quiet else None,
                stderr=subprocess.PIPE,
                text=True,
                timeout=opts.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise ImageError(f"pulling {ref} took more than {opts.timeout_s:.0f} s") from e
        if proc.returncode != 0:
            raise ImageError(f"pulling {ref} failed: {skopeo_reason(proc.stderr)}")
        return store.import_path(layout, name=src.name, on_progress=on_progress)


_MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)"')


def skopeo_reason(stderr: str) -> str:
    """The one line that says why skopeo failed: the ``msg="..."`` of its last fatal log
    line (unescaped), else its last non-empty line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for line in reversed(lines):
        m = _MSG.search(line)
        if m and ("level=fatal" in line or "level=error" in line):
            return m.group(1).replace('\\"', '"').replace("\\\\", "\\")
    return lines[-1] if lines else "skopeo exited with no message"
