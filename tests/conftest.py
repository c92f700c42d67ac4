"""Shared fixtures for every test tier (keep this file small; tier-specific fixtures live in
the tier's own conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.images import build_busybox_image, tools_missing


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
