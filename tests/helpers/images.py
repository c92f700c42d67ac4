"""Build small test images: real ones with umoci/skopeo, synthetic ones in pure Python.

Real images (need root, ``umoci``, ``skopeo`` and Debian's ``busybox-static``):

* :func:`build_busybox_image`: a one-layer busybox rootfs as an OCI layout, named via
  ``org.opencontainers.image.ref.name``.
* :func:`build_layered_image`: busybox plus a second layer that deletes ``/etc/motd`` and
  ``/var/old`` (whiteouts) and replaces ``/opt/data`` (opaque directory).
* :func:`oci_archive`, :func:`docker_archive`: the same image as an oci-archive tar or as a
  ``docker save``-style tarball (``skopeo copy oci:DIR:REF docker-archive:FILE:NAME``).

Workload images for the checkpoint/restore tests, the demo and the benchmarks (root, umoci,
and the host's Debian packages; :func:`workload_tools_missing` says what is lacking):

* :func:`build_python_image`: busybox (every applet) plus Debian's python3.11 with its
  stdlib and libraries, and the workloads of ``shared/cases`` under ``/opt/cases`` (the C
  ones compiled statically).
* :func:`build_redis_image`: busybox plus Debian's redis-server and redis-cli.
* :func:`build_memory_image`: the python image plus ``/opt/workloads/memhog.py``
  (``tests/workloads/memhog.py``).
* :func:`build_zdtm_image`: busybox plus CRIU's zdtm static test programs (built by
  ``benchmarks/zdtm.py``) under ``/zdtm/static`` and the ``/zdtm/run`` entrypoint.

Each builds in one or two seconds.  From the shell (the demo and the benchmarks):
``python -m tests.helpers.images {busybox,python,redis,memory} OUTDIR [--name NAME]``.

Synthetic images (no root, no tools): :func:`make_layer_tar` and :func:`write_oci_layout`,
:func:`write_docker_archive`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = (
    "cat", "echo", "ls", "sleep", "true", "false", "id", "env", "pwd", "mkdir", "rm", "touch",
    "ps", "grep", "wc", "head", "stat", "readlink", "kill", "test", "uname", "hostname",
)  # fmt: skip
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"
ENV = ("PATH=/usr/sbin:/usr/bin:/sbin:/bin", "JAULA_TEST=1")


def tools_missing() -> str | None:
    """Why real images cannot be built here, or ``None`` when they can."""
    for tool in ("umoci", "skopeo"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install umoci skopeo)"
    if not BUSYBOX.is_file():
        return "/bin/busybox is missing (apt-get install busybox-static)"
    if os.geteuid() != 0:
        return "building images with umoci needs root"
    return None


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")


def busybox_rootfs(dest: Path) -> Path:
    """Write a minimal busybox rootfs to ``dest``: /bin/busybox, applet symlinks (``sh`` with
    the absolute target ``/bin/busybox``, the others relative), /etc/passwd and /etc/group
    with root and nobody (65534), /etc/motd, /opt/data/{a,b}, /var/old/file, and empty
    proc, dev, sys, tmp (1777), root (0700).
    """
    for d in ("bin", "etc", "proc", "dev", "sys", "tmp", "root", "opt/data", "var/old"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    os.chmod(dest / "root", 0o700)
    shutil.copy2(BUSYBOX, dest / "bin/busybox")
    os.symlink("/bin/busybox", dest / "bin/sh")
    for applet in BUSYBOX_APPLETS:
        os.symlink("busybox", dest / "bin" / applet)
    (dest / "etc/passwd").write_text(PASSWD)
    (dest / "etc/group").write_text(GROUP)
    (dest / "etc/motd").write_text("welcome to the lower layer\n")
    (dest / "opt/data/a").write_text("a from the lower layer\n")
    (dest / "opt/data/b").write_text("b from the lower layer\n")
    (dest / "var/old/file").write_text("old\n")
    return dest


def _tag_of(name: str) -> str:
    return name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"


def _set_ref_name(layout: Path, name: str) -> None:
    """Set ``org.opencontainers.image.ref.name`` of the layout's only manifest to ``name``."""
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    (entry,) = index["manifests"]
    entry.setdefault("annotations", {})["org.opencontainers.image.ref.name"] = name
    index_path.write_text(json.dumps(index))


def ref_name(layout: Path) -> str:
    """The ``ref.name`` annotation of the layout's only manifest."""
    (entry,) = json.loads((layout / "index.json").read_text())["manifests"]
    return str(entry["annotations"]["org.opencontainers.image.ref.name"])


def build_busybox_image(workdir: Path, name: str = "busybox:latest") -> Path:
    """Build a one-layer busybox image as an OCI layout in ``workdir/layout``; return it.

    Made with ``umoci init``/``new``/``unpack``, :func:`busybox_rootfs` written into the
    bundle, ``umoci repack`` and ``umoci config`` (Env, Cmd ``sh``, WorkingDir ``/tmp``,
    StopSignal SIGTERM); ``index.json`` then names it ``name`` the way skopeo does.
    (``umoci insert`` is avoided: Debian's umoci 0.4.7 ends its layer tars without padding.)
    """
    workdir.mkdir(parents=True, exist_ok=True)
    layout = workdir / "layout"
    bundle = workdir / "bundle"
    image = f"{layout}:{_tag_of(name)}"
    _run("umoci", "init", "--layout", str(layout))
    _run("umoci", "new", "--image", image)
    _run("umoci", "unpack", "--image", image, str(bundle))
    busybox_rootfs(bundle / "rootfs")
    _run("umoci", "repack", "--image", image, "--no-history", str(bundle))
    config_args = [f"--config.env={e}" for e in ENV]
    _run(
        "umoci", "config", "--image", image, "--no-history", *config_args,
        "--config.cmd=sh", "--config.workingdir=/tmp", "--config.stopsignal=SIGTERM",
    )  # fmt: skip
    _set_ref_name(layout, name)
    return layout


def build_layered_image(base_layout: Path, workdir: Path, name: str = "layered:latest") -> Path:
    """Copy ``base_layout`` (a busybox layout) and add a layer that deletes ``etc/motd`` and
    ``var/old`` (``.wh.`` whiteouts), makes ``opt/data`` opaque holding only a new ``c``, and
    adds ``etc/added``.  The layer is written by :func:`make_layer_tar` and appended with
    ``umoci raw add-layer``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    layout = workdir / "layout"
    shutil.copytree(base_layout, layout, symlinks=True)
    # umoci looks tags up by ref.name; give it a plain tag while it works.
    _set_ref_name(layout, "work")
    layer = workdir / "layer2.tar"
    layer.write_bytes(
        make_layer_tar(
            [
                TarEntry("etc/.wh.motd"),
                TarEntry("var/.wh.old"),
                TarEntry("opt/data/.wh..wh..opq"),
                TarEntry("opt/data/", kind="dir", mode=0o755),
                TarEntry("opt/data/c", data=b"c from the upper layer\n"),
                TarEntry("etc/added", data=b"added by the upper layer\n"),
            ]
        )
    )
    _run("umoci", "raw", "add-layer", "--image", f"{layout}:work", "--no-history", str(layer))
    _set_ref_name(layout, name)
    return layout


def oci_archive(layout_dir: Path, out_tar: Path) -> Path:
    """Tar the OCI layout (``index.json``, ``oci-layout``, ``blobs/``) into ``out_tar``."""
    with tarfile.open(out_tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for item in ("oci-layout", "index.json", "blobs"):
            tf.add(layout_dir / item, arcname=item)
    return out_tar


def docker_archive(layout_dir: Path, out_tar: Path, name: str | None = None) -> Path:
    """Convert the layout to a ``docker save`` tarball with ``skopeo copy``; the archive's
    RepoTags is ``name`` (default: the layout's ref.name).
    """
    ref = ref_name(layout_dir)
    _run(
        "skopeo", "--insecure-policy", "copy", "--quiet",
        f"oci:{layout_dir}:{ref}", f"docker-archive:{out_tar}:{name or ref}",
    )  # fmt: skip
    return out_tar


# --- workload images --------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_CASES = REPO_ROOT.parent / "shared" / "cases"
WORKLOADS = REPO_ROOT / "tests" / "workloads"
MEMHOG = WORKLOADS / "memhog.py"
PYTHON = Path("/usr/bin/python3.11")
PYTHON_STDLIB = Path("/usr/lib/python3.11")
MULTIARCH = getattr(sys.implementation, "_multiarch", f"{os.uname().machine}-linux-gnu")
# glibc dlopens libgcc_s for pthread_exit/pthread_cancel (daemon threads at interpreter exit).
LIBGCC_S = Path("/lib") / MULTIARCH / "libgcc_s.so.1"
REDIS_SERVER = Path("/usr/bin/redis-server")
REDIS_CLI = Path("/usr/bin/redis-cli")
WORKLOAD_PATH = "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
# No .pyc files in the image (kept small) and none written at run time either, so a
# container's upper dir holds only what its workload writes.
PYTHON_ENV = (WORKLOAD_PATH, "PYTHONDONTWRITEBYTECODE=1")
STDLIB_SKIP_DIRS = frozenset({
    "__pycache__", "test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo",
    "ensurepip", f"config-3.11-{MULTIARCH}",  # libpython3.11.a: 25 MB
})  # fmt: skip
DYNLOAD_SKIP_PREFIXES = ("_test", "_ctypes_test", "_xxtestfuzz", "xxlimited", "_xxsubinterp")
REDIS_CMD = (
    "redis-server", "--port", "6379", "--bind", "127.0.0.1", "--save", "",
    "--appendonly", "no", "--protected-mode", "no",
)  # fmt: skip
MEMHOG_CMD = ("python3", "/opt/workloads/memhog.py", "64")


def workload_tools_missing(kind: str) -> str | None:
    """Why the workload image ``kind`` (python, redis, memory) cannot be built, or ``None``."""
    reason = tools_missing()
    if reason is not None:
        return reason
    needs: list[tuple[Path, str]] = []
    if kind in ("python", "memory"):
        needs += [
            (PYTHON, "apt-get install python3.11-minimal"),
            (PYTHON_STDLIB / "os.py", "apt-get install libpython3.11-stdlib"),
            (LIBGCC_S, "apt-get install libgcc-s1"),
            (SHARED_CASES, "the shared/cases folder beside the repository is missing"),
        ]
        if shutil.which("gcc") is None:
            return "gcc is not installed (apt-get install gcc libc6-dev)"
    if kind == "memory":
        needs.append((MEMHOG, "tests/workloads/memhog.py is missing"))
    if kind == "redis":
        needs += [
            (REDIS_SERVER, "apt-get install redis-server"),
            (REDIS_CLI, "apt-get install redis-tools"),
        ]
    if shutil.which("ldd") is None:
        return "ldd is missing (apt-get install libc-bin)"
    for path, hint in needs:
        if not path.exists():
            return f"{path} is missing ({hint})" if hint.startswith("apt") else hint
    return None


def shared_libraries(files: Iterable[Path]) -> set[Path]:
    """The shared libraries ``ldd`` resolves for ``files`` (executables or shared objects),
    as the paths ldd names (the dynamic loader included).  Raises when one is not found.
    """
    argv = ["ldd", *map(str, files)]
    out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    libs: set[Path] = set()
    for line in out.splitlines():
        line = line.strip()
        if "not found" in line:
            raise RuntimeError(f"ldd: {line}")
        if "=>" in line:
            target = line.split("=>", 1)[1].split()
            if target and target[0].startswith("/"):
                libs.add(Path(target[0]))
        elif line.startswith("/") and "(0x" in line:
            libs.add(Path(line.split()[0]))
    return libs


def _copy_into(rootfs: Path, src: Path, dest: str | None = None, mode: int | None = None) -> Path:
    """Copy the host file ``src`` (symlinks followed) to the same path, or ``dest``, in rootfs."""
    target = rootfs / (dest or str(src)).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, target)
    if mode is not None:
        os.chmod(target, mode)
    return target


def _install_libraries(rootfs: Path, files: Sequence[Path], dlopened: Sequence[Path] = ()) -> None:
    """Copy the libraries ``files`` link against, and ``dlopened`` with theirs."""
    for lib in sorted(shared_libraries([*files, *dlopened]) | set(dlopened)):
        if not (rootfs / str(lib).lstrip("/")).exists():
            _copy_into(rootfs, lib)


def _install_all_applets(rootfs: Path) -> None:
    """Link every busybox applet (``busybox --list-full``) not already present."""
    out = subprocess.run(
        [str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True
    ).stdout
    for rel in out.split():
        link = rootfs / rel
        if not os.path.lexists(link):
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink("/bin/busybox", link)


def _dynload_modules() -> list[Path]:
    return sorted(
        p
        for p in (PYTHON_STDLIB / "lib-dynload").glob("*.so")
        if not p.name.startswith(DYNLOAD_SKIP_PREFIXES)
    )


def _install_python(rootfs: Path) -> None:
    """Debian's interpreter, its stdlib (without tests, GUI, ensurepip, bytecode, the static
    libpython) and the libraries the interpreter and its extension modules load."""
    _copy_into(rootfs, PYTHON)
    os.symlink("python3.11", rootfs / "usr/bin/python3")
    dest_root = rootfs / str(PYTHON_STDLIB).lstrip("/")
    for dirpath, dirnames, filenames in os.walk(PYTHON_STDLIB, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS)
        rel = Path(dirpath).relative_to(PYTHON_STDLIB)
        (dest_root / rel).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            src = Path(dirpath) / name
            if rel == Path("lib-dynload") and name.startswith(DYNLOAD_SKIP_PREFIXES):
                continue
            if name.endswith((".pyc", ".pyo")) or not src.exists():
                continue
            shutil.copy2(src, dest_root / rel / name)  # follows links (sitecustomize.py)
    _install_libraries(rootfs, [PYTHON, *_dynload_modules()], [LIBGCC_S])


def _install_cases(rootfs: Path, cases: Path = SHARED_CASES) -> None:
    """Every ``C*/`` folder of ``cases`` under ``/opt/cases``; ``*.c`` also compiled with
    ``gcc -O2 -static`` beside the source (``C05/deleted_open.c`` -> ``C05/deleted_open``)."""
    if not cases.is_dir():
        raise FileNotFoundError(f"{cases}: the shared cases folder is missing")
    for case in sorted(d for d in cases.glob("C*") if d.is_dir()):
        dest = rootfs / "opt/cases" / case.name
        dest.mkdir(parents=True, exist_ok=True)
        for src in sorted(f for f in case.iterdir() if f.is_file()):
            mode = 0o755 if os.access(src, os.X_OK) else 0o644
            _copy_into(rootfs, src, f"/opt/cases/{case.name}/{src.name}", mode)
            if src.suffix == ".c":
                _run("gcc", "-O2", "-static", "-o", str(dest / src.stem), str(src))


def _install_redis(rootfs: Path) -> None:
    # /usr/bin/redis-server links to redis-check-rdb; redis picks its mode from argv[0].
    _copy_into(rootfs, REDIS_SERVER, "/usr/bin/redis-server", 0o755)
    _copy_into(rootfs, REDIS_CLI, "/usr/bin/redis-cli", 0o755)
    (rootfs / "data").mkdir(mode=0o755, exist_ok=True)
    _install_libraries(rootfs, [REDIS_SERVER, REDIS_CLI])


def _set_image_config(layout: Path, **fields: object) -> None:
    """Set ``fields`` (Env, Cmd, WorkingDir, ...) in the ``config`` of the layout's only
    image: new config and manifest blobs, ``index.json`` pointing at them, old blobs removed.
    (``umoci config`` drops empty arguments such as redis's ``--save ""``.)
    """
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    (entry,) = index["manifests"]
    old_manifest = entry["digest"]
    manifest = json.loads(_blob_path(layout, old_manifest).read_bytes())
    old_config = manifest["config"]["digest"]
    config = json.loads(_blob_path(layout, old_config).read_bytes())
    config.setdefault("config", {}).update(fields)
    manifest["config"]["digest"], manifest["config"]["size"] = _blob(
        layout, json.dumps(config).encode()
    )
    entry["digest"], entry["size"] = _blob(layout, json.dumps(manifest).encode())
    index_path.write_text(json.dumps(index))
    for digest in (old_manifest, old_config):
        if digest not in (entry["digest"], manifest["config"]["digest"]):
            _blob_path(layout, digest).unlink()


def _blob_path(layout: Path, digest: str) -> Path:
    algo, hexd = digest.split(":", 1)
    return layout / "blobs" / algo / hexd


def _workload_config(env: Sequence[str], cmd: Sequence[str], working_dir: str) -> dict[str, object]:
    return {"Env": list(env), "Cmd": list(cmd), "WorkingDir": working_dir, "StopSignal": "SIGTERM"}


def _build_rootfs_image(
    workdir: Path, name: str, populate: Callable[[Path], None],
    env: Sequence[str], cmd: Sequence[str], working_dir: str,
) -> Path:  # fmt: skip
    """One-layer image: :func:`busybox_rootfs` with every applet, then ``populate(rootfs)``.
    The unpacked bundle is removed afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    layout, bundle = workdir / "layout", workdir / "bundle"
    image = f"{layout}:{_tag_of(name)}"
    _run("umoci", "init", "--layout", str(layout))
    _run("umoci", "new", "--image", image)
    _run("umoci", "unpack", "--image", image, str(bundle))
    rootfs = busybox_rootfs(bundle / "rootfs")
    _install_all_applets(rootfs)
    populate(rootfs)
    _run("umoci", "repack", "--image", image, "--no-history", str(bundle))
    shutil.rmtree(bundle)
    _set_image_config(layout, **_workload_config(env, cmd, working_dir))
    _run("umoci", "gc", "--layout", str(layout))
    _set_ref_name(layout, name)
    return layout


def build_python_image(workdir: Path, name: str = "jaula-python:latest") -> Path:
    """Build the python workload image in ``workdir/layout``.

    One layer: :func:`busybox_rootfs` plus every busybox applet (``/usr/bin/env`` for the
    ``#!/usr/bin/env python3`` scripts, ``mkfifo``, ``dd``, ``ps``...); Debian's
    ``/usr/bin/python3.11`` (``python3`` links to it) with ``/usr/lib/python3.11`` minus
    tests, idlelib, tkinter, turtledemo, ensurepip, bytecode and the static libpython; the
    libraries ``ldd`` finds for the interpreter and its ``lib-dynload`` modules, and
    libgcc_s (glibc loads it when a thread exits at interpreter shutdown); every
    ``shared/cases/C*/`` file under ``/opt/cases/C*/`` with the C sources compiled
    statically beside them (``/opt/cases/C05/deleted_open``, ``/opt/cases/C07/sysv_shm``).
    Config: Env PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin and
    PYTHONDONTWRITEBYTECODE=1, Cmd ``["python3"]``, WorkingDir ``/tmp``.
    """

    def populate(rootfs: Path) -> None:
        _install_python(rootfs)
        _install_cases(rootfs)

    return _build_rootfs_image(workdir, name, populate, PYTHON_ENV, ["python3"], "/tmp")


def build_redis_image(workdir: Path, name: str = "jaula-redis:latest") -> Path:
    """Build the redis image in ``workdir/layout``.

    One layer: :func:`busybox_rootfs` plus every busybox applet, Debian's redis-server and
    redis-cli with the libraries ``ldd`` finds, an empty ``/data``.  Config: Env PATH as
    in :func:`build_python_image`, WorkingDir ``/data``, Cmd :data:`REDIS_CMD` (port 6379 on
    127.0.0.1, no RDB snapshots, no AOF, protected mode off).
    """
    env = (WORKLOAD_PATH,)
    return _build_rootfs_image(workdir, name, _install_redis, env, REDIS_CMD, "/data")


def build_memory_image(workdir: Path, name: str = "jaula-mem:latest") -> Path:
    """Build the memory workload image in ``workdir/layout``.

    The python image plus a second layer holding ``/opt/workloads/memhog.py``
    (``tests/workloads/memhog.py``, see its docstring), added with ``umoci raw add-layer``.
    Cmd: :data:`MEMHOG_CMD` (64 MiB, nothing re-dirtied).
    """
    layout = build_python_image(workdir, "work")  # umoci finds images by ref.name
    layer = workdir / "memhog.tar"
    layer.write_bytes(make_layer_tar([
        TarEntry("opt/workloads/", kind="dir", mode=0o755),
        TarEntry("opt/workloads/memhog.py", data=MEMHOG.read_bytes(), mode=0o755),
    ]))  # fmt: skip
    _run("umoci", "raw", "add-layer", "--image", f"{layout}:work", "--no-history", str(layer))
    layer.unlink()
    _set_image_config(layout, **_workload_config(PYTHON_ENV, MEMHOG_CMD, "/tmp"))
    _run("umoci", "gc", "--layout", str(layout))
    _set_ref_name(layout, name)
    return layout


ZDTM_DIR = "/zdtm/static"
# pid 1 of a zdtm container: start the test as zdtm's Makefile does (``make TEST.pid``), in
# /zdtm/static; the test forks, its parent writes TEST.pid and exits when the child is
# ready; then stay as init (the daemonized test is reparented here).
ZDTM_RUN = f"""#!/bin/sh
# /zdtm/run TEST [ARGS...]: run ./TEST ARGS in {ZDTM_DIR}, then stay as the container's init.
cd {ZDTM_DIR} || exit 1
"./$@"
rc=$?
[ "$rc" -eq 0 ] || echo "zdtm: $1 did not start (exit $rc)" >&2
exec sleep 2147483647
"""


def build_zdtm_image(
    workdir: Path, tests_dir: Path, tests: Sequence[str], name: str = "jaula-zdtm:latest"
) -> Path:
    """Build the image of CRIU's zdtm static tests in ``workdir/layout``.

    One layer: :func:`busybox_rootfs` plus every busybox applet; the test programs
    ``tests`` copied from ``tests_dir`` (a built ``test/zdtm/static`` of CRIU's source,
    linked statically so that they need no library) into ``/zdtm/static`` (mode 1777: a
    test writes its ``.out``, ``.pid`` and ``.test`` files beside itself, possibly after
    changing to zdtm's test uid), and ``/zdtm/run`` (:data:`ZDTM_RUN`), the entrypoint:
    ``/zdtm/run TEST ARGS...`` starts one test as ``make TEST.pid`` would and stays pid 1.
    Config: Env PATH as in :func:`build_python_image`, Cmd ``["/zdtm/run"]``, WorkingDir
    ``/zdtm/static``.  Raises ``FileNotFoundError`` naming a test that ``tests_dir`` lacks.
    """
    missing = [t for t in tests if not (tests_dir / t).is_file()]
    if missing:
        raise FileNotFoundError(f"{tests_dir}: no test program {', '.join(missing[:5])}")

    def populate(rootfs: Path) -> None:
        dest = rootfs / ZDTM_DIR.lstrip("/")
        dest.mkdir(parents=True)
        os.chmod(dest, 0o1777)
        for t in tests:
            _copy_into(rootfs, tests_dir / t, f"{ZDTM_DIR}/{t}", 0o755)
        run = rootfs / "zdtm/run"
        run.write_text(ZDTM_RUN)
        os.chmod(run, 0o755)

    env = (WORKLOAD_PATH,)
    return _build_rootfs_image(workdir, name, populate, env, ["/zdtm/run"], ZDTM_DIR)


BUILDERS: dict[str, Callable[[Path, str], Path]] = {
    "busybox": build_busybox_image,
    "python": build_python_image,
    "redis": build_redis_image,
    "memory": build_memory_image,
}
DEFAULT_NAMES = {
    "busybox": "busybox:latest",
    "python": "jaula-python:latest",
    "redis": "jaula-redis:latest",
    "memory": "jaula-mem:latest",
}


# --- synthetic images -------------------------------------------------------------------


@dataclass
class TarEntry:
    """One tar member for :func:`make_layer_tar`.

    ``kind``: file, dir, symlink, hardlink, chr, blk, fifo.  ``target`` is the link target.
    ``xattrs`` go into PAX ``SCHILY.xattr.*`` records.
    """

    name: str
    data: bytes = b""
    kind: str = "file"
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 1_600_000_000
    target: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


_KINDS = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def make_layer_tar(entries: Iterable[TarEntry]) -> bytes:
    """An uncompressed PAX tar holding ``entries`` in order (names are written verbatim)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = _KINDS[e.kind]
            info.mode = e.mode
            info.uid, info.gid = e.uid, e.gid
            info.mtime = e.mtime
            info.linkname = e.target
            info.devmajor, info.devminor = e.devmajor, e.devminor
            if e.xattrs:
                info.pax_headers = {
                    f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                    for k, v in e.xattrs.items()
                }
            if e.kind == "file":
                info.size = len(e.data)
                tf.addfile(info, io.BytesIO(e.data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def compress(data: bytes, kind: str) -> bytes:
    """``kind``: none, gzip or zstd."""
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


LAYER_MEDIA_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


def _blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return f"sha256:{digest}", len(data)


def image_config(diff_ids: list[str], **config: object) -> dict[str, object]:
    """An OCI image config for linux on the host architecture with these diff_ids."""
    from runtime.image.oci import host_architecture

    return {
        "created": "2024-01-01T00:00:00Z",
        "architecture": host_architecture(),
        "os": "linux",
        "config": config or {"Env": list(ENV), "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }


@dataclass
class SyntheticImage:
    """What :func:`write_oci_layout` wrote: paths and digests, for tests to corrupt or check."""

    layout: Path
    manifest_digest: str
    config_digest: str
    layer_digests: list[str]
    diff_ids: list[str]


def write_oci_layout(
    layout: Path,
    layers: list[bytes],
    compression: str = "gzip",
    ref_name: str | None = "test:latest",
    config: dict[str, object] | None = None,
) -> SyntheticImage:
    """Write an OCI layout holding one image made of uncompressed layer tars ``layers``."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    diff_ids = [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in layers]
    layer_descs = []
    for tar in layers:
        digest, size = _blob(layout, compress(tar, compression))
        layer_descs.append(
            {"mediaType": LAYER_MEDIA_TYPES[compression], "digest": digest, "size": size}
        )
    cfg = config if config is not None else image_config(diff_ids)
    config_digest, config_size = _blob(layout, json.dumps(cfg).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layer_descs,
    }
    manifest_digest, manifest_size = _blob(layout, json.dumps(manifest).encode())
    entry: dict[str, object] = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest,
        "size": manifest_size,
    }
    if ref_name is not None:
        entry["annotations"] = {"org.opencontainers.image.ref.name": ref_name}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    return SyntheticImage(
        layout, manifest_digest, config_digest, [str(d["digest"]) for d in layer_descs], diff_ids
    )


def write_docker_archive(
    out_tar: Path,
    layers: list[bytes],
    repo_tags: list[str],
    config: dict[str, object] | None = None,
) -> str:
    """Write a ``docker save``-style tarball (legacy ``<id>/layer.tar`` symlinks included);
    return the config digest.
    """
    diff_ids = [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in layers]
    cfg = json.dumps(config if config is not None else image_config(diff_ids)).encode()
    config_hex = hashlib.sha256(cfg).hexdigest()
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def add(name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        members.append((info, data))

    layer_names = []
    for i, tar in enumerate(layers):
        hexd = diff_ids[i].split(":")[1]
        add(f"{hexd}.tar", tar)
        legacy = f"{i:064x}"
        link = tarfile.TarInfo(f"{legacy}/layer.tar")
        link.type = tarfile.SYMTYPE
        link.linkname = f"../{hexd}.tar"
        members.append((link, None))
        layer_names.append(f"{legacy}/layer.tar")
    add(f"{config_hex}.json", cfg)
    manifest = [{"Config": f"{config_hex}.json", "RepoTags": repo_tags, "Layers": layer_names}]
    add("manifest.json", json.dumps(manifest).encode())
    with tarfile.open(out_tar, "w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return f"sha256:{config_hex}"


# --- command line -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.helpers.images KIND OUTDIR [--name NAME]``: build one image as an OCI
    layout in ``OUTDIR/layout`` (an older one there is replaced) and print its path."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.helpers.images", description="Build a test image as an OCI layout."
    )
    parser.add_argument("kind", choices=sorted(BUILDERS))
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--name", help="image name (default: %(choices)s's usual name)")
    args = parser.parse_args(argv)
    reason = tools_missing() if args.kind == "busybox" else workload_tools_missing(args.kind)
    if reason is not None:
        print(f"cannot build the {args.kind} image: {reason}", file=sys.stderr)
        return 2
    outdir = args.outdir.resolve()
    for stale in (outdir / "layout", outdir / "bundle"):
        if stale.is_dir():
            shutil.rmtree(stale)
    layout = BUILDERS[args.kind](outdir, args.name or DEFAULT_NAMES[args.kind])
    print(layout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
