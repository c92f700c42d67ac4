"""Real images (busybox-static packed by umoci, converted by skopeo) through the image store,
and their layers mounted as overlayfs lowerdirs.

Needs root (umoci keeps owners, whiteouts are 0/0 devices, overlay mounts), umoci, skopeo,
busybox-static and overlayfs.  Every overlay mount is made under tmp_path and unmounted by the
``overlay`` fixture's finalizer, also when the test fails.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import runtime.image.layers as layers_mod
import runtime.image.store as store_mod
from runtime.errors import ImageError, ImageInUse, ImageNotFound
from runtime.image import Image, ImageStore
from tests.helpers.images import (
    ENV,
    TarEntry,
    build_layered_image,
    docker_archive,
    make_layer_tar,
    oci_archive,
    tools_missing,
    write_oci_layout,
)
from tests.helpers.jaula import Jaula

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(tools_missing() is not None, reason=tools_missing() or ""),
]


def overlay_supported() -> bool:
    with open("/proc/filesystems") as f:
        if any(line.split()[-1] == "overlay" for line in f if line.strip()):
            return True
    return subprocess.run(["modprobe", "overlay"], check=False, capture_output=True).returncode == 0


def mounts_under(path: Path) -> list[str]:
    p = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(p + "/")]


@pytest.fixture(scope="module")
def layered_image_layout(
    busybox_image_layout: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """busybox plus a layer deleting etc/motd and var/old and making opt/data opaque."""
    return build_layered_image(busybox_image_layout, tmp_path_factory.mktemp("layered"))


@pytest.fixture(scope="module")
def archives(
    busybox_image_layout: Path, layered_image_layout: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The same images as oci-archive and docker-archive tarballs."""
    d = tmp_path_factory.mktemp("archives")
    return {
        "busybox-oci-archive": oci_archive(busybox_image_layout, d / "busybox-oci.tar"),
        "busybox-docker": docker_archive(busybox_image_layout, d / "busybox-docker.tar"),
        "layered-oci-archive": oci_archive(layered_image_layout, d / "layered-oci.tar"),
        "layered-docker": docker_archive(layered_image_layout, d / "layered-docker.tar"),
    }


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "state")


@pytest.fixture
def unpack_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the diff_id of every layer the store unpacks."""
    calls: list[str] = []
    real = layers_mod.unpack_layer

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(str(kwargs.get("diff_id")))
        return real(*args, **kwargs)

    monkeypatch.setattr(store_mod, "unpack_layer", counting)
    return calls


def files(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


def check_busybox(store: ImageStore, image: Image) -> None:
    assert image.names == ("busybox:latest",)
    assert image.config.env == ENV
    assert image.config.cmd == ("sh",)
    assert image.config.working_dir == "/tmp"
    assert image.config.stop_signal == "SIGTERM"
    assert image.manifest_digest.startswith("sha256:")
    assert image.created
    (root,) = store.layer_dirs(image)
    assert root == store.layers_dir / image.layers[0] / "diff"
    busybox = root / "bin/busybox"
    assert busybox.stat().st_mode & stat.S_IXUSR
    assert busybox.read_bytes() == Path("/bin/busybox").read_bytes()
    assert os.readlink(root / "bin/sh") == "/bin/busybox"
    assert os.readlink(root / "bin/ls") == "busybox"
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((root / "root").stat().st_mode) == 0o700
    assert "nobody:x:65534:65534" in (root / "etc/passwd").read_text()
    for d in ("proc", "dev", "sys"):
        assert (root / d).is_dir() and not any((root / d).iterdir())
    assert image.size_bytes > busybox.stat().st_size


# --- import --------------------------------------------------------------------------------


def test_import_oci_layout(store: ImageStore, busybox_image_layout: Path) -> None:
    image = store.import_path(busybox_image_layout)
    check_busybox(store, image)
    assert store.list() == [image]


@pytest.mark.parametrize("fmt", ["busybox-oci-archive", "busybox-docker"])
def test_import_archives(
    store: ImageStore, archives: dict[str, Path], busybox_image_layout: Path, fmt: str
) -> None:
    image = store.import_path(archives[fmt])
    check_busybox(store, image)  # docker's "docker.io/library/busybox:latest" is normalised
    reference = ImageStore(store.root.parent / "reference").import_path(busybox_image_layout)
    assert image.id == reference.id
    assert image.layers == reference.layers


def test_import_with_explicit_name(store: ImageStore, busybox_image_layout: Path) -> None:
    image = store.import_path(busybox_image_layout, name="docker.io/library/mybox:1")
    assert image.names == ("mybox:1",)
    with pytest.raises(ImageNotFound):
        store.resolve("busybox")


def test_list_and_resolve(
    store: ImageStore, busybox_image_layout: Path, layered_image_layout: Path
) -> None:
    busybox = store.import_path(busybox_image_layout)
    layered = store.import_path(layered_image_layout)
    assert [i.id for i in store.list()] == [busybox.id, layered.id]
    for ref in ("busybox", "busybox:latest", "docker.io/library/busybox", busybox.id,
                busybox.id[:12], f"sha256:{busybox.id}"):  # fmt: skip
        assert store.resolve(ref) == busybox, ref
    assert store.resolve("layered").id == layered.id
    with pytest.raises(
        ImageNotFound,
        match=r"image alpine not found: pull it \(`jaula pull alpine`\) or import it with `jaula",
    ):
        store.resolve("alpine")


def test_reimport_is_idempotent(
    store: ImageStore,
    busybox_image_layout: Path,
    archives: dict[str, Path],
    unpack_calls: list[str],
) -> None:
    first = store.import_path(busybox_image_layout)
    layer = store.layer_dirs(first)[0]
    ino = layer.stat().st_ino
    assert len(unpack_calls) == 1
    for again in (
        busybox_image_layout,
        archives["busybox-oci-archive"],
        archives["busybox-docker"],
    ):
        assert store.import_path(again) == first
    assert len(unpack_calls) == 1  # verified again, never unpacked again
    assert layer.stat().st_ino == ino
    assert store.list() == [first]
    # The layered image shares the busybox layer: only its top layer is unpacked.
    layered = store.import_path(archives["layered-docker"])
    assert layered.layers[0] == first.layers[0]
    assert len(unpack_calls) == 2


def test_remove_keeps_shared_layers(
    store: ImageStore, busybox_image_layout: Path, layered_image_layout: Path
) -> None:
    busybox = store.import_path(busybox_image_layout)
    layered = store.import_path(layered_image_layout)
    with pytest.raises(ImageInUse, match="used by a container"):
        store.remove("layered", in_use=lambda image_id: image_id == layered.id)
    assert store.has_layer(layered.layers[1])
    store.remove("layered", in_use=lambda image_id: False)
    assert not store.has_layer(layered.layers[1])
    assert store.has_layer(busybox.layers[0])
    assert store.layer_dirs(busybox)[0].is_dir()
    store.remove(busybox.id[:12])
    assert store.list() == []
    assert [p.name for p in store.layers_dir.iterdir()] == [".tmp"]
    assert sorted(p.name for p in store.images_dir.iterdir()) == [".lock", "index.json"]


@pytest.mark.parametrize("blob", ["layer", "config", "manifest"])
def test_corrupt_blob_is_refused(
    store: ImageStore, busybox_image_layout: Path, tmp_path: Path, blob: str
) -> None:
    layout = tmp_path / "corrupt"
    shutil.copytree(busybox_image_layout, layout)
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs/sha256" / manifest_digest[7:]).read_text())
    digest = {
        "manifest": manifest_digest,
        "config": manifest["config"]["digest"],
        "layer": manifest["layers"][0]["digest"],
    }[blob]
    path = layout / "blobs/sha256" / digest[7:]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError) as err:
        store.import_path(layout)
    assert digest in str(err.value)
    assert store.list() == []
    assert [p.name for p in store.layers_dir.iterdir()] == [".tmp"]


def test_corrupt_docker_archive_layer_is_refused(
    store: ImageStore, archives: dict[str, Path], tmp_path: Path
) -> None:
    src = archives["busybox-docker"]
    bad = tmp_path / "bad.tar"
    with tarfile.open(src) as tin, tarfile.open(bad, "w") as tout:
        for m in tin.getmembers():
            f = tin.extractfile(m) if m.isreg() else None
            data = f.read() if f is not None else None
            if data is not None and m.name.endswith(".tar"):
                # Flip a byte inside busybox's contents (past the first headers).
                data = data[:5000] + bytes([data[5000] ^ 1]) + data[5001:]
            tout.addfile(m, io.BytesIO(data) if data is not None else None)
    with pytest.raises(ImageError, match="does not match its diff_id"):
        store.import_path(bad)
    assert store.list() == []


# --- whiteouts, opaque directories and overlayfs -----------------------------------------


@pytest.mark.parametrize("fmt", ["layout", "layered-oci-archive", "layered-docker"])
def test_whiteouts_and_opaque_dirs_in_overlay_form(
    store: ImageStore, layered_image_layout: Path, archives: dict[str, Path], fmt: str
) -> None:
    image = store.import_path(layered_image_layout if fmt == "layout" else archives[fmt])
    assert image.names == ("layered:latest",)
    base, top = store.layer_dirs(image)
    for gone in ("etc/motd", "var/old"):
        st = os.lstat(top / gone)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0), gone
    assert os.getxattr(top / "opt/data", "trusted.overlay.opaque") == b"y"
    assert files(top / "opt/data") == {"c"}
    assert not [p for p in top.rglob(".wh.*")]
    assert (base / "etc/motd").is_file()  # the lower layer is untouched
    assert files(base / "opt/data") == {"a", "b"}


@pytest.mark.parametrize("fmt", ["layout", "layered-docker"])
def test_overlay_of_layers_hides_deleted_files(
    store: ImageStore,
    layered_image_layout: Path,
    archives: dict[str, Path],
    overlay: Callable[[list[Path]], Path],
    fmt: str,
) -> None:
    image = store.import_path(layered_image_layout if fmt == "layout" else archives[fmt])
    merged = overlay(store.layer_dirs(image))
    assert not (merged / "etc/motd").exists()
    assert not (merged / "var/old").exists()
    assert (merged / "var").is_dir()
    assert files(merged / "opt/data") == {"c"}
    assert (merged / "etc/added").read_text() == "added by the upper layer\n"
    assert "root:x:0:0" in (merged / "etc/passwd").read_text()
    # The rootfs works: absolute /bin/sh -> /bin/busybox resolves inside the chroot.
    out = subprocess.run(
        [
            shutil.which("chroot") or "/usr/sbin/chroot",
            str(merged),
            "/bin/sh",
            "-c",
            "cat /etc/added; ls /opt/data; echo ok > /tmp/w",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/bin"},
    ).stdout
    assert out == "added by the upper layer\nc\n"
    # Writes land in the upper dir, never in the shared layers.
    assert (merged / "tmp/w").read_text() == "ok\n"
    assert not any((d / "tmp/w").exists() for d in store.layer_dirs(image))


def test_cli_import_bounds_what_an_image_unpacks_to(tmp_path: Path) -> None:
    """``jaula image import --max-layer-size/--max-image-size``: a one-line refusal naming
    the entry, nothing stored; without the flags the defaults let the image in."""
    layers = [make_layer_tar([TarEntry(f"f{i}", bytes([65 + i]) * 300_000)]) for i in range(2)]
    layout = write_oci_layout(tmp_path / "layout", layers, "gzip", "bounded:1").layout
    j = Jaula(tmp_path / "state")
    for flags, why in (
        (
            ["--max-layer-size", "200k"],
            "layer is larger than 204800 bytes unpacked (at entry 'f0')",
        ),
        (["--max-image-size", "500k"], "image is larger than 512000 bytes unpacked"),
    ):
        p = j.run("image", "import", str(layout), *flags, check=False)
        assert p.returncode != 0
        assert why in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert j.out("image", "ls").strip().count("\n") == 0  # the header line only
    p = j.run("image", "import", str(layout), "--max-layer-size", "lots", check=False)
    assert p.returncode == 125 and "invalid size 'lots'" in p.stderr
    j.run("image", "import", str(layout))
    assert "bounded:1" in j.out("image", "ls")
