"""``jaula pull`` against a real registry: Debian's docker-registry on 127.0.0.1 (started and
stopped by the ``registry`` fixture), the session's busybox image pushed into it with skopeo;
pulled by tag and by digest, then run as a container.  The failures (a missing tag, TLS
refused by default against a plain-HTTP registry, a transport we do not take, and against an
HTTPS registry with basic auth a wrong password and an untrusted certificate) are one-line
errors with exit 125 and leave nothing in the image store.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.jaula import Jaula
from tests.helpers.registry import PASSWORD, USER, Registry, local_registry, registry_missing

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(registry_missing() is not None, reason=registry_missing() or ""),
]


@pytest.fixture(scope="module")
def registry(
    tmp_path_factory: pytest.TempPathFactory, busybox_image_layout: Path
) -> Iterator[tuple[Registry, str]]:
    """A registry holding ``busybox:latest``; yields it and the manifest digest."""
    with local_registry(tmp_path_factory.mktemp("registry")) as reg:
        digest = reg.push(busybox_image_layout, "busybox:latest", "busybox:latest")
        yield reg, digest


@pytest.fixture
def empty(tmp_path_factory: pytest.TempPathFactory) -> Jaula:
    """The CLI on a state root with no image."""
    return Jaula(tmp_path_factory.mktemp("pull-state"))


def _store(j: Jaula) -> tuple[list[str], list[str]]:
    """(image ids in the index, entries of the layer dir and its tmp dir)."""
    index = j.root / "images" / "index.json"
    ids = sorted(json.loads(index.read_text())) if index.exists() else []
    layers = j.root / "layers"
    entries = sorted(p.name for p in layers.iterdir()) if layers.is_dir() else []
    for tmp in (layers / ".tmp", j.root / "images" / ".pull"):
        entries += sorted(f"{tmp.name}/{p.name}" for p in tmp.iterdir()) if tmp.is_dir() else []
    return ids, entries


def test_pull_by_tag_then_run(registry: tuple[Registry, str], empty: Jaula) -> None:
    reg, _ = registry
    out = empty.run("pull", "--tls-verify=false", f"{reg.host}/busybox:latest").stdout
    image_id = out.strip().splitlines()[-1]
    assert len(image_id) == 64
    listing = empty.out("image", "ls")
    assert f"{reg.host}/busybox:latest" in listing
    run = empty.run("run", "--rm", f"{reg.host}/busybox", "echo", "pulled-ok")
    assert run.stdout.strip() == "pulled-ok"
    assert not list((empty.root / "images" / ".pull").iterdir()), "pull left its layout behind"


def test_second_pull_and_digest_pull_reuse_the_image(
    registry: tuple[Registry, str], empty: Jaula
) -> None:
    reg, digest = registry
    first = empty.out("pull", "--tls-verify=false", f"docker://{reg.host}/busybox").strip()
    before = _store(empty)
    again = empty.out("pull", "--tls-verify=false", f"{reg.host}/busybox:latest").strip()
    by_digest = empty.out("pull", "--tls-verify=false", f"{reg.host}/busybox@{digest}").strip()
    assert first == again == by_digest
    assert _store(empty) == before  # no new image, no new layer


def test_missing_tag_is_one_line_and_stores_nothing(
    registry: tuple[Registry, str], empty: Jaula
) -> None:
    reg, _ = registry
    p = empty.run("pull", "--tls-verify=false", f"{reg.host}/busybox:nope", check=False)
    assert p.returncode == 125
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"jaula: error: pulling {reg.host}/busybox:nope failed:")
    assert "manifest unknown" in err
    assert _store(empty) in (([], []), ([], [".tmp"]))


def test_tls_is_verified_by_default(registry: tuple[Registry, str], empty: Jaula) -> None:
    reg, _ = registry  # plain HTTP: an HTTPS client must refuse it
    p = empty.run("pull", f"{reg.host}/busybox:latest", check=False)
    assert p.returncode == 125
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "https" in p.stderr.lower() or "http response" in p.stderr.lower(), p.stderr
    assert _store(empty)[0] == []


def test_pull_from_an_oci_archive(busybox_image_layout: Path, empty: Jaula, tmp_path: Path) -> None:
    archive = tmp_path / "bb.tar"
    import subprocess

    subprocess.run(
        ["skopeo", "copy", "--quiet", f"oci:{busybox_image_layout}:busybox:latest",
         f"oci-archive:{archive}:busybox:latest"],
        check=True, capture_output=True,
    )  # fmt: skip
    image_id = empty.out("pull", f"oci-archive:{archive}").strip()
    assert empty.run("run", "--rm", image_id[:12], "echo", "from-archive").stdout.strip() == (
        "from-archive"
    )


@pytest.mark.parametrize(
    ("ref", "needle"),
    [("ostree:/x", "unsupported transport 'ostree'"), ("oci:", "names no oci source")],
)
def test_bad_reference_is_refused(empty: Jaula, ref: str, needle: str) -> None:
    p = empty.run("pull", ref, check=False)
    assert p.returncode == 125
    assert len(p.stderr.strip().splitlines()) == 1
    assert needle in p.stderr


@pytest.fixture(scope="module")
def secure_registry(
    tmp_path_factory: pytest.TempPathFactory, busybox_image_layout: Path
) -> Iterator[Registry]:
    """An HTTPS registry with basic auth (user alice) holding ``busybox:latest``."""
    with local_registry(tmp_path_factory.mktemp("secure-registry"), secure=True) as reg:
        reg.push(busybox_image_layout, "busybox:latest", "busybox:latest")
        yield reg


def test_pull_over_tls_with_credentials(secure_registry: Registry, empty: Jaula) -> None:
    reg = secure_registry
    assert reg.cert_dir is not None
    image_id = empty.out(
        "pull", "--cert-dir", str(reg.cert_dir), "--creds", f"{USER}:{PASSWORD}",
        f"{reg.host}/busybox:latest",
    ).strip()  # fmt: skip
    assert len(image_id) == 64


def test_pull_with_an_auth_file(secure_registry: Registry, empty: Jaula, tmp_path: Path) -> None:
    reg = secure_registry
    assert reg.cert_dir is not None
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    authfile = tmp_path / "auth.json"
    authfile.write_text(json.dumps({"auths": {reg.host: {"auth": token}}}))
    ref = f"{reg.host}/busybox:latest"
    empty.out("pull", "--cert-dir", str(reg.cert_dir), "--authfile", str(authfile), ref)
    missing = empty.run("pull", "--authfile", str(tmp_path / "nope.json"), ref, check=False)
    assert missing.returncode == 125 and "auth file" in missing.stderr


def test_wrong_password_and_untrusted_certificate(secure_registry: Registry, empty: Jaula) -> None:
    reg = secure_registry
    assert reg.cert_dir is not None
    ref = f"{reg.host}/busybox:latest"
    wrong = empty.run(
        "pull", "--cert-dir", str(reg.cert_dir), "--creds", f"{USER}:wrong", ref, check=False
    )
    assert wrong.returncode == 125 and wrong.stderr.count("\n") == 1, wrong.stderr
    assert "unauthorized" in wrong.stderr.lower() or "authentication" in wrong.stderr.lower()
    untrusted = empty.run("pull", "--creds", f"{USER}:{PASSWORD}", ref, check=False)
    assert untrusted.returncode == 125 and untrusted.stderr.count("\n") == 1, untrusted.stderr
    assert "certificate" in untrusted.stderr
    assert _store(empty)[0] == []
