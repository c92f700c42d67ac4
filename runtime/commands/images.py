"""``jaula pull``: images from registries and the other skopeo transports
(:mod:`runtime.image.pull`), flags as ``podman pull`` spells them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.container import Runtime
from runtime.image.pull import PullOptions, pull


def _bool(value: str) -> bool:
    """``--tls-verify=false``: Podman's boolean spelling."""
    v = value.lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {value!r}: use true or false")


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("pull", help="pull an image from a registry or another transport")
    p.add_argument("ref", metavar="IMAGE", help="NAME[:TAG], docker://..., oci:DIR, ...")
    p.add_argument("--authfile", type=Path, help="auth file (default: $REGISTRY_AUTH_FILE...)")
    p.add_argument("--creds", metavar="USER[:PASS]", help="registry credentials")
    p.add_argument("--cert-dir", type=Path, help="directory of the registry's certificates")
    p.add_argument(
        "--tls-verify",
        type=_bool,
        nargs="?",
        const=True,
        default=True,
        metavar="BOOL",
        help="require HTTPS and verify certificates (default true)",
    )
    p.add_argument(
        "--default-registry",
        metavar="HOST[:PORT]",
        help="registry of a bare NAME (default: $JAULA_DEFAULT_REGISTRY or docker.io)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only the image id")


def dispatch(rt: Runtime, a: argparse.Namespace) -> int | None:
    if a.cmd != "pull":
        return None
    from runtime.cli import ImportBar

    opts = PullOptions(
        authfile=a.authfile,
        creds=a.creds,
        cert_dir=a.cert_dir,
        tls_verify=a.tls_verify,
        quiet=a.quiet or not sys.stderr.isatty(),
    )
    bar = ImportBar(enabled=sys.stderr.isatty() and not a.quiet)
    try:
        img = pull(
            rt.images, a.ref, opts, default_registry=a.default_registry, on_progress=bar.update
        )
    finally:
        bar.close()
    print(img.id)
    return 0
