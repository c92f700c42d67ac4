"""Issue 15, item 4: exported checkpoint bundles are signed by the exporting node and
checked against the cluster file on import.  A bundle edited after its export, with the
digests in its manifest updated to match, is refused; an unsigned bundle, or one signed by a
node the cluster does not list, is restored only with ``--insecure-unsigned``."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.containers import inspect
from tests.helpers.counter import COUNTER, wait_ticks
from tests.helpers.jaula import Jaula
from tests.helpers.skips import needs_criu
from tests.integration.cluster_setup import write_cluster

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]

Edit = Callable[[str, bytes], bytes]


def _edited(good: Path, out: Path, edit: Edit) -> Path:
    """A copy of the bundle tar ``good`` with ``edit(name, data)`` applied to each member,
    and the manifest's sizes and sha256 updated to match (what an attacker would do)."""
    with tarfile.open(good) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]  # type: ignore[union-attr]
    files = {m.name: edit(m.name, data) for m, data in members}
    manifest = json.loads(files["manifest.json"])
    for f in manifest["files"]:
        f["size"] = len(files[f["path"]])
        f["sha256"] = hashlib.sha256(files[f["path"]]).hexdigest()
    files["manifest.json"] = edit("manifest.json", json.dumps(manifest).encode())
    with tarfile.open(out, "w") as dst:
        for m, _ in members:
            data = files[m.name]
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    return out


def _command(name: str, data: bytes) -> bytes:
    if name != "manifest.json":
        return data
    m = json.loads(data)
    m["container"]["args"] = ["sh", "-c", "echo owned > /tmp/owned; sleep 1000"]
    return json.dumps(m).encode()


def _image(name: str, data: bytes) -> bytes:
    return data + b"\0" * 8 if name.startswith("criu/pages-") else data


def test_signed_bundles_verify_and_edited_or_unsigned_ones_are_refused(
    jaula: Jaula, jaula2: Jaula, tmp_path: Path
) -> None:
    cl = write_cluster(tmp_path / "cluster")  # node1 = jaula, node2 = jaula2 (keys only)
    other = write_cluster(tmp_path / "other", nodes=("node1", "node2"))  # another cluster
    n1, n2 = str(cl.nodes["node1"]), str(cl.nodes["node2"])
    jaula.run("run", "-d", "--name", "sig", "busybox", "sh", "-c", COUNTER)
    wait_ticks(jaula, "sig", 3)
    signed = tmp_path / "signed.tar"
    jaula.run("checkpoint", "--leave-running", "sig", "--export", str(signed), "--node-config", n1)
    with tarfile.open(signed) as tf:
        assert "manifest.sig" in tf.getnames()

    def refused(bundle: Path, *flags: str) -> str:
        p = jaula2.run("restore", "--import", str(bundle), "--node-config", n2, *flags, check=False)
        assert p.returncode == 125 and len(p.stderr.splitlines()) == 1, p.stderr
        assert jaula2.container_ids() == []
        return p.stderr

    # edited after the signature, digests updated: refused, even with the insecure flag
    for edit in (_command, _image):
        bad = _edited(signed, tmp_path / f"{edit.__name__}.tar", edit)
        assert "does not verify" in refused(bad)
        assert "does not verify" in refused(bad, "--insecure-unsigned")
    # unsigned: refused, and the error names the flag and what it risks
    unsigned = tmp_path / "unsigned.tar"
    p = jaula.run("checkpoint", "--leave-running", "sig", "--export", str(unsigned))
    assert "unsigned" in p.stderr
    err = refused(unsigned)
    assert "not signed" in err and "--insecure-unsigned" in err and "as root" in err
    # signed by a node of another cluster: foreign, refused
    foreign = tmp_path / "foreign.tar"
    jaula.run(
        "checkpoint",
        "--leave-running",
        "sig",
        "--export",
        str(foreign),
        "--node-config",
        str(other.nodes["node1"]),
    )
    assert "no node of the cluster" in refused(foreign)
    help_text = jaula2.out("restore", "--help")
    assert "--insecure-unsigned" in help_text and "root" in help_text
    # the signed one restores on the other node of its cluster
    jaula2.run("restore", "--import", str(signed), "--node-config", n2, "--name", "sig2")
    assert inspect(jaula2, "sig2")["State"]["Status"] == "running"
    # and the unsigned one with the flag (the same container: the first copy goes)
    jaula2.run("rm", "-f", "sig2")
    jaula2.run("restore", "--import", str(unsigned), "--insecure-unsigned", "--name", "sig3")
    assert inspect(jaula2, "sig3")["State"]["Status"] == "running"
