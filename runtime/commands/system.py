"""``version`` (and ``jaula --version``), ``info`` and ``images``, as Podman spells them.

``info`` prints the host (kernel, cgroup mode, overlayfs, CPUs, memory), the store (state
root, containers by status, images) and the versions of the tools jaula drives, as YAML-like
``key: value`` lines or, with ``--format json``, one JSON object (keys in Podman's
spelling where Podman has one: ``host.kernel``, ``host.cgroupVersion``, ``store.graphRoot``,
``store.containerStore.{number,running,paused,stopped}``, ``store.imageStore.number``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
from importlib import metadata
from typing import Any

from runtime.cgroups import CgroupMode, detect_mode
from runtime.container import Runtime
from runtime.rootfs.overlay import overlay_supported
from runtime.state import ContainerStatus


def jaula_version() -> str:
    try:
        return metadata.version("jaula")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def add_commands(sub: argparse._SubParsersAction, top: argparse.ArgumentParser | None) -> None:  # type: ignore[type-arg]
    if top is not None:
        top.add_argument(
            "-v", "--version", action="version", version=f"jaula version {jaula_version()}"
        )
    v = sub.add_parser("version", help="show jaula's version")
    v.add_argument("-f", "--format", choices=["table", "json"], default="table")
    i = sub.add_parser("info", help="show the host and the store")
    i.add_argument("-f", "--format", choices=["yaml", "json"], default="yaml")
    im = sub.add_parser("images", help="list images")
    im.add_argument("-q", "--quiet", action="store_true", help="print image ids only")
    im.add_argument("--format", choices=["table", "json"], default="table")
    im.add_argument("--no-trunc", action="store_true", help="full image ids")


def _tool_version(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"\d+\.\d+(?:\.\d+)?", out.stdout + out.stderr)
    return m.group(0) if m else None


def version_info() -> dict[str, str]:
    return {
        "Version": jaula_version(),
        "PythonVersion": platform.python_version(),
        "OsArch": f"{platform.system().lower()}/{platform.machine()}",
    }


def info(rt: Runtime) -> dict[str, Any]:
    """What ``jaula info`` prints (see the module docstring)."""
    counts = dict.fromkeys(ContainerStatus, 0)
    cs = rt.list(all=True)
    for c in cs:
        counts[c.status] += 1
    mode = detect_mode()
    mem_total = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    return {
        "host": {
            "arch": platform.machine(),
            "kernel": platform.release(),
            "os": platform.system().lower(),
            "hostname": platform.node(),
            "cpus": os.cpu_count(),
            "memTotal": mem_total,
            "cgroupVersion": "v2" if mode is CgroupMode.UNIFIED else "v1",
            "cgroupMode": mode.value,
            "overlayfs": overlay_supported(),
            "criuVersion": _tool_version(["criu", "--version"]),
            "skopeoVersion": _tool_version(["skopeo", "--version"]),
        },
        "store": {
            "graphRoot": str(rt.root),
            "containerStore": {
                "number": len(cs),
                "running": counts[ContainerStatus.RUNNING],
                "paused": counts[ContainerStatus.PAUSED],
                "stopped": counts[ContainerStatus.STOPPED] + counts[ContainerStatus.CREATED],
            },
            "imageStore": {"number": len(rt.images.list())},
        },
        "version": version_info(),
    }


def _yaml(d: dict[str, Any], indent: int = 0) -> None:
    for k, v in d.items():
        if isinstance(v, dict):
            print(f"{' ' * indent}{k}:")
            _yaml(v, indent + 2)
        else:
            print(
                f"{' ' * indent}{k}: {'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
            )


def cmd_images(rt: Runtime, a: argparse.Namespace) -> int:
    imgs = rt.images.list()
    if a.quiet:
        for img in imgs:
            print(img.id if a.no_trunc else img.id[:12])
        return 0
    if a.format == "json":
        out = [
            {
                "Id": img.id,
                "Names": list(img.names),
                "Digest": img.manifest_digest,
                "Created": img.created,
                "Size": img.size_bytes,
                "Layers": len(img.layers),
            }
            for img in imgs
        ]
        print(json.dumps(out, indent=1))
        return 0
    rows = [("REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE")]
    for img in imgs:
        for n in img.names or ("<none>:<none>",):
            repo, _, tag = n.rpartition(":")
            rows.append(
                (
                    repo,
                    tag,
                    img.id if a.no_trunc else img.id[:12],
                    (img.created or "")[:19].replace("T", " ") or "-",
                    f"{img.size_bytes / 1e6:.1f} MB",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip())
    return 0


def dispatch(rt: Runtime, a: argparse.Namespace) -> int | None:
    match a.cmd:
        case "version":
            v = version_info()
            if a.format == "json":
                print(json.dumps({"Client": v}, indent=1))
            else:
                for k, val in (
                    ("Version", v["Version"]),
                    ("Python Version", v["PythonVersion"]),
                    ("OS/Arch", v["OsArch"]),
                ):
                    print(f"{k + ':':<16}{val}")
            return 0
        case "info":
            d = info(rt)
            if a.format == "json":
                print(json.dumps(d, indent=1))
            else:
                _yaml(d)
            return 0
        case "images":
            return cmd_images(rt, a)
    return None
