"""Restore a container from a checkpoint bundle (``jaula restore``).

Two entry points:
- :func:`restore`: from the container's own local checkpoint, or from an exported bundle tar
  (``--import``), possibly under another state root (another node on the same host).
- the restorer the container's monitor calls in restore mode is
  :func:`migrate.restorer.criu_restorer` (kept in a module of its own, light to import).

Sequence::

    preflight: bundle digests, format and CRIU version, CPU flags, cgroups, pipe sizes,
               layers, name                                                   (nothing made)
    container dir + config + status checkpointed; upperdir <- rootfs-diff.tar
    Runtime.revive: overlay mounted, cgroup with the same limits created, monitor started
      monitor: criu restore --root merged --cgroup-root ctrl:/jaula/ID
               --inherit-fd pipe:[OLD]=<new pipe>  --external mnt[volN]:SOURCE  (rst_sibling)
    status running; on any failure everything made here is undone
"""

from __future__ import annotations

import json
import secrets
import shutil
from dataclasses import replace
from pathlib import Path

import structlog

from migrate import criu, rootfs_diff
from migrate.bundle import Bundle, Manifest, check_signature, cpu_flags
from migrate.errors import BundleError, PreflightError
from runtime import quota
from runtime.cgroups import CgroupMode, Resources, detect_mode
from runtime.container import Container, Runtime, require_root
from runtime.errors import ContainerError, ContainerExists
from runtime.spec import ContainerConfig
from runtime.state import ContainerStatus, State
from runtime.store import CHECKPOINT_DIR, CONFIG, LOG, TTY_MARK

log = structlog.get_logger(__name__)

RESTORER = "migrate.restorer:criu_restorer"

#: CPU flags a restored program may rely on; missing on this node -> refuse.
_USER_CPU_FLAGS = (
    "sse",
    "sse2",
    "ssse3",
    "sse4_1",
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "bmi1",
    "bmi2",
    "aes",
    "pclmulqdq",
    "sha_ni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512cd",
    "xsave",
    "xsavec",
    "xsaveopt",
    "movbe",
    "popcnt",
    "f16c",
    "adx",
    "rdrand",
    "rdseed",
    "vaes",
    "vpclmulqdq",
    "lzcnt",
    "abm",
)


def check_compatible(m: Manifest) -> None:
    """Refuse a bundle this node cannot restore: CRIU older than the one that dumped it, CPU
    features the source had and this node lacks, cgroups that cannot hold the container
    (:func:`check_cgroups`).  Raises PreflightError."""
    here = criu.version()
    if here[:2] < tuple(m.criu_version[:2]):
        raise PreflightError(
            f"the checkpoint was made by CRIU {'.'.join(map(str, m.criu_version))}, this node "
            f"has {'.'.join(map(str, here))}: upgrade CRIU here (`make setup`)"
        )
    if m.cpu_flags:
        mine = set(cpu_flags())
        missing = sorted(f for f in _USER_CPU_FLAGS if f in m.cpu_flags and f not in mine)
        if missing:
            raise PreflightError(
                f"this CPU lacks features the source CPU had ({', '.join(missing)})"
                ": the restored programs could crash; restore on a node with "
                "the same CPU features"
            )
    check_cgroups(m)


def _controllers_here(mode: CgroupMode) -> set[str]:
    root = Path("/sys/fs/cgroup")
    if mode is CgroupMode.UNIFIED:
        try:
            return set((root / "cgroup.controllers").read_text().split())
        except OSError:
            return set()
    from runtime.cgroups.v1 import find_v1_mounts

    return set(find_v1_mounts(root))


def check_cgroups(m: Manifest) -> None:
    """Refuse a container whose cgroups this node cannot give back (shared/cases C19): a
    checkpoint made on a node with the other cgroup version (CRIU's cgroup images name v1
    controllers or the v2 tree), or a limit whose controller this node lacks (the restored
    tasks would run unlimited).  An empty ``m.cgroup_mode`` (not recorded) skips the first
    check.  Raises PreflightError."""
    here = detect_mode()
    if m.cgroup_mode:
        src_v2 = m.cgroup_mode == CgroupMode.UNIFIED.value
        if src_v2 != (here is CgroupMode.UNIFIED):

            def kind(v2: bool) -> str:
                return "v2 (unified)" if v2 else "v1 (legacy or hybrid)"

            raise PreflightError(
                f"the checkpoint was made on a node with cgroup {kind(src_v2)} ({m.cgroup_mode})"
                f", this node has cgroup {kind(not src_v2)} ({here.value}): CRIU cannot move "
                "the tasks' cgroups across versions; restore on a node with the same cgroup "
                "version"
            )
    res = Resources(**(m.container.get("resources") or {}))
    needs = {"memory": res.memory_bytes, "pids": res.pids_max, "cpu": res.cpu_quota_us}
    have = _controllers_here(here)
    missing = sorted(
        ctrl for ctrl, limit in needs.items() if limit is not None and ctrl not in have
    )
    if missing:
        raise PreflightError(
            f"this node cannot enforce the container's limits: no {' and no '.join(missing)} "
            f"cgroup controller here ({here.value} cgroups, controllers: "
            f"{' '.join(sorted(have)) or 'none'}); restore on a node that has "
            f"{'them' if len(missing) > 1 else 'it'}"
        )


def check_pipes(bundle: Bundle) -> None:
    """Refuse a checkpoint holding a pipe or FIFO whose buffer is larger than this node lets
    CRIU make it (shared/cases C12): above ``fs.pipe-max-size``, F_SETPIPE_SZ needs
    CAP_SYS_RESOURCE, and CRIU aborts the restore on its EPERM.  Raises PreflightError."""
    from migrate.checkpoint import has_cap_sys_resource

    sizes = criu.pipe_buffer_sizes(bundle.criu_dir)
    if not sizes or has_cap_sys_resource():
        return
    try:
        limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    except (OSError, ValueError):
        return
    if max(sizes) > limit:
        raise PreflightError(
            f"the checkpoint holds a pipe with a {max(sizes)}-byte buffer; this node's "
            f"fs.pipe-max-size is {limit} and it lacks CAP_SYS_RESOURCE, so the pipe cannot be "
            f"made that large again: raise fs.pipe-max-size to at least {max(sizes)} here "
            "(sysctl) or restore on another node"
        )


def check_layers(rt: Runtime, m: Manifest) -> None:
    """Every layer of the container's image is in this node's store.  Raises
    PreflightError naming the first missing digest."""
    for layer in m.image.get("layers", []):
        if not rt.images.has_layer(layer):
            raise PreflightError(
                f"layer sha256:{layer} of image {m.image.get('ref')} is not on this node: "
                "import the image here (`jaula image import`) and retry"
            )


def mark_terminal(cdir: Path, stdio: dict[str, str | None]) -> None:
    """Make the container dir say whether the container has a terminal, as its dump does
    (``stdio["tty"]``, :class:`migrate.checkpoint.DumpPlan`): the file ``tty`` there tells
    the restoring monitor to make a new pty (:mod:`runtime.monitor`) and lets ``attach``
    reach it.  Before the monitor is told to go."""
    if stdio.get("tty"):
        (cdir / TTY_MARK).touch()
    else:
        (cdir / TTY_MARK).unlink(missing_ok=True)


def _restorer_arg(bundle: Path) -> str:
    return json.dumps({"bundle": str(bundle)})


def restore(
    rt: Runtime,
    ref: str | None = None,
    *,
    import_file: Path | None = None,
    name: str | None = None,
    signers: dict[str, bytes] | None = None,
    insecure_unsigned: bool = False,
) -> Container:
    """Restore a container: its local checkpoint (``ref``), or an exported bundle
    (``import_file``) into ``rt``'s state root, optionally under a new ``name``.

    An imported bundle must be signed by one of ``signers`` (node -> Ed25519 public key, the
    cluster file's ``signing_key`` entries), unless ``insecure_unsigned``
    (:func:`migrate.bundle.check_signature`); a signature that does not verify is refused.

    The container keeps its id (and name unless ``name`` is given).  Returns it running.
    A stopped container whose checkpoint was kept (``checkpoint --leave-running``) can be
    restored too: it goes back to that checkpoint, its filesystem rolled back with it.

    Ownership: when ``rt.admission`` is set (a node of a cluster: :mod:`migrate.membership`)
    the id is claimed for this node before anything runs; another node's claim refuses the
    restore, naming that node (an export made with ``--leave-running`` imported elsewhere
    while the original runs would be a second live copy).

    Raises BundleError, PreflightError, CriuError, ContainerError, a JaulaError of the
    admission (owned elsewhere, store unavailable); on failure an imported container is
    removed again (its new claim released) and a local one stays ``checkpointed``."""
    require_root()
    criu.require()
    if import_file is not None:
        return _restore_import(rt, import_file, name, signers or {}, insecure_unsigned)
    if ref is None:
        raise ContainerError("restore needs a container or --import FILE")
    c = rt.get(ref)
    bundle = Bundle(c.dir / CHECKPOINT_DIR)
    with c.locked():
        kept = c.status is ContainerStatus.STOPPED and (bundle.path / "manifest.json").exists()
        if c.status is not ContainerStatus.CHECKPOINTED and not kept:
            raise ContainerError(
                f"container {c.name} is {c.status.value}, not checkpointed: nothing to restore",
                c.id,
            )
        m = bundle.verify(digests=False)  # made here and never moved: sizes suffice
        check_compatible(m)
        check_pipes(bundle)
        check_layers(rt, m)
        if kept:
            # A stopped container with a checkpoint kept from `checkpoint --leave-running`
            # (shared/cases C17): restoring rolls it back to that checkpoint, filesystem
            # included.  From here its upperdir is the checkpoint's.
            c.wait_monitor(10.0)
            if c.monitor_alive():
                raise ContainerError(f"container {c.name} is still shutting down: retry", c.id)
            c.state.status = ContainerStatus.CHECKPOINTED
            c.save()
        if rt.admission is not None:
            rt.admission.claim(c.id)
        _fresh_upper(c.dir, bundle)
        mark_terminal(c.dir, m.stdio)
    return rt.revive(c.id, RESTORER, _restorer_arg(bundle.path))


def _fresh_upper(cdir: Path, bundle: Bundle) -> None:
    for d in ("upper", "work"):
        shutil.rmtree(cdir / d, ignore_errors=True)
    cfg = ContainerConfig.from_json(json.loads((cdir / CONFIG).read_text()))
    quota.prepare_dirs(cdir, cfg.storage_size_bytes)  # the disk quota, before the files
    rootfs_diff.extract(bundle.rootfs_diff, cdir / "upper")


def _restore_import(
    rt: Runtime, tar_path: Path, name: str | None, signers: dict[str, bytes], insecure: bool
) -> Container:
    if not tar_path.is_file():
        raise BundleError(f"no bundle file at {tar_path}")
    rt.store.ensure()
    staging = rt.root / "tmp" / f"import-{secrets.token_hex(6)}"
    staging.parent.mkdir(parents=True, exist_ok=True)
    bundle = Bundle.import_tar(tar_path, staging)
    claimed = False
    try:
        check_signature(bundle, signers, insecure)
        m = bundle.manifest()
        check_compatible(m)
        check_pipes(bundle)
        check_layers(rt, m)
        cfg = ContainerConfig.from_json(m.container)
        cfg = replace(cfg, name=name or cfg.name, cgroup_parent=rt.cgroup_parent)
        try:
            if rt.admission is not None and not (rt.store.containers_dir / cfg.id).exists():
                claimed = rt.admission.claim(cfg.id)
            c = rt.adopt(cfg, State(status=ContainerStatus.CHECKPOINTED))
        except ContainerExists as e:
            if claimed and rt.admission is not None:
                rt.admission.release(cfg.id)
            if e.container_id == cfg.id:
                raise PreflightError(
                    f"container {cfg.id[:12]} already exists on this node: "
                    "remove it first (`jaula rm -f`)"
                ) from e
            raise PreflightError(f"{e} (or restore with --name NEW)") from e
        cdir = c.dir
        staging.rename(cdir / CHECKPOINT_DIR)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        _fresh_upper(cdir, Bundle(cdir / CHECKPOINT_DIR))
        if (cdir / CHECKPOINT_DIR / LOG).exists():
            shutil.copyfile(cdir / CHECKPOINT_DIR / LOG, cdir / LOG)
        mark_terminal(cdir, m.stdio)
        return rt.revive(cfg.id, RESTORER, _restorer_arg(cdir / CHECKPOINT_DIR))
    except BaseException:
        shutil.rmtree(cdir, ignore_errors=True)
        if claimed and rt.admission is not None:
            rt.admission.release(cfg.id)
        raise
