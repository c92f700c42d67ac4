"""Shared fixtures for every test tier (keep this file small; tier-specific fixtures live in
the tier's own conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.images import (
    build_busybox_image,
    build_memory_image,
    build_python_image,
    build_redis_image,
    tools_missing,
    workload_tools_missing,
)


@pytest.fixture(scope="session", autouse=True)
def _kept_criu_logs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The CRIU logs of failed actions that tests provoke are kept in the session's temp
    dir, not the host's /var/log/jaula/criu (node services use their state roots')."""
    import os

    os.environ.setdefault("JAULA_CRIU_LOG_DIR", str(tmp_path_factory.mktemp("criu-logs")))


@pytest.fixture(scope="session")
def busybox_image_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer busybox OCI image layout named ``busybox:latest``, built once per session.

    Built by :func:`tests.helpers.images.build_busybox_image` with umoci from Debian's
    busybox-static: /bin/busybox and applet symlinks (sh, ls, cat, echo, sleep, ...),
    /etc/passwd and /etc/group with root and nobody (65534), empty proc, dev, sys, tmp; config
    Env PATH=/usr/sbin:/usr/bin:/sbin:/bin and JAULA_TEST=1, Cmd ["sh"], WorkingDir /tmp.
    Skips the test when root, umoci, skopeo or /bin/busybox is missing.  Treat it as read-only
    (copy it before corrupting blobs).
    """
    reason = tools_missing()
    if reason is not None:
        pytest.skip(reason)
    return build_busybox_image(tmp_path_factory.mktemp("busybox-image"))


def _workload_layout(kind: str, factory: pytest.TempPathFactory) -> Path:
    reason = workload_tools_missing(kind)
    if reason is not None:
        pytest.skip(f"cannot build the {kind} image: {reason}")
    build = {"python": build_python_image, "redis": build_redis_image,
             "memory": build_memory_image}[kind]  # fmt: skip
    return build(factory.mktemp(f"{kind}-image"))


@pytest.fixture(scope="session")
def python_image_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python workload image as an OCI layout named ``jaula-python:latest``, built once
    per session by :func:`tests.helpers.images.build_python_image`: busybox with every
    applet, Debian's python3.11 and stdlib (``python3`` on PATH), and the workloads of
    ``shared/cases`` under ``/opt/cases/C*/`` (``C05/deleted_open`` and ``C07/sysv_shm``
    compiled statically); Env PATH and PYTHONDONTWRITEBYTECODE=1, Cmd ["python3"].  Skips
    when root, umoci, gcc, the Debian python or the ``shared`` folder beside the repository
    is missing.  Read-only.
    """
    return _workload_layout("python", tmp_path_factory)


@pytest.fixture(scope="session")
def redis_image_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The redis image as an OCI layout named ``jaula-redis:latest`` (built once per session
    by :func:`tests.helpers.images.build_redis_image`): busybox plus Debian's redis-server and
    redis-cli; Cmd runs redis-server on 127.0.0.1:6379 without persistence, WorkingDir /data.
    Skips when root, umoci or redis is missing.  Read-only.
    """
    return _workload_layout("redis", tmp_path_factory)


@pytest.fixture(scope="session")
def memory_image_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The memory workload image as an OCI layout named ``jaula-mem:latest`` (built once per
    session by :func:`tests.helpers.images.build_memory_image`): the python image plus
    ``/opt/workloads/memhog.py MIB [--dirty-pct P] [--heartbeat PATH]`` (prints ``READY
    <pid>``, answers SIGUSR1 with ``VERIFY OK <counter>``); Cmd runs it with 64 MiB.  Skips
    like :func:`python_image_layout`.  Read-only.
    """
    return _workload_layout("memory", tmp_path_factory)
