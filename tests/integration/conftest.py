"""Fixtures for tests that run node services on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.poll import wait_for
from tests.helpers.etcd import ETCD, StateCluster, StateNodes, state_cluster, state_for
from tests.helpers.nodes import Cluster2, make_cluster, serving
from tests.integration.cluster_setup import ClusterFiles, write_cluster


@pytest.fixture
def cluster_files(tmp_path: Path) -> ClusterFiles:
    """A fresh cluster in ``tmp_path``: nodes ``node1`` and ``node2`` on free ports of
    127.0.0.1 and operator ``alice``, with real CURVE keypairs.

    Returns a :class:`tests.integration.cluster_setup.ClusterFiles`: the paths of the cluster
    file, of each node's config (``.nodes["node1"]``), of alice's client config
    (``.clients["alice"]``), the keys dir and the endpoints, plus loaders
    (``.node_config(name)``, ``.load_cluster()``, ``.client_config(name)`` for alice or a
    node, ``.public_key(name)``).  Nothing is started; the files are removed with tmp_path.
    """
    return write_cluster(tmp_path)


def _zmq_threads() -> list[str]:
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        if name.startswith("ZMQbg"):
            names.append(name)
    return names


@pytest.fixture
def zmq_leak_check() -> Iterator[None]:
    """Fail the test if it leaves ZeroMQ contexts open (their ``ZMQbg/*`` threads alive).

    A context closed at the test's end (a finalizer, the event loop's last callbacks) may
    take a moment to stop its threads on a loaded host: the check waits for them up to 10 s
    (a fresh clone's run once failed two tests on an IO thread still ending)."""
    before = len(_zmq_threads())
    yield
    wait_for(lambda: len(_zmq_threads()) <= before, 10.0)
    after = _zmq_threads()
    assert len(after) <= before, f"ZeroMQ contexts left open (threads {after})"


@pytest.fixture
def nodes(
    request: pytest.FixtureRequest, tmp_path: Path, busybox_image_layout: Path
) -> Iterator[Cluster2]:
    """node1 and node2 serving on 127.0.0.1 with busybox on both; stopped and leak-checked
    at the end (:func:`tests.helpers.nodes.serving`).

    The cluster-state backend is the indirect parameter when a test gives one
    (``@both_backends``: ``files`` and ``etcd``, a real 3-member etcd), else
    ``$JAULA_TEST_STATE`` (``make test-etcd``), else ``files``."""
    backend = getattr(request, "param", None)
    with serving(make_cluster(tmp_path / "cluster", busybox_image_layout, backend=backend)) as c:
        yield c


@pytest.fixture(params=["files", "etcd"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateCluster]:
    """A cluster (node1..node3, operator admin) with its state store, once per backend:
    ``files``, and ``etcd`` with one real member (TLS, auth on, a 2 s membership TTL);
    stopped at the end (:func:`tests.helpers.etcd.state_cluster`)."""
    if request.param == "etcd" and not os.access(ETCD, os.X_OK):
        pytest.skip("etcd not installed (make setup installs etcd-server)")
    with state_cluster(tmp_path / "cluster", request.param) as sc:
        yield sc


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[StateCluster]:
    """As :func:`state` with a 3-member etcd cluster."""
    if not os.access(ETCD, os.X_OK):
        pytest.skip("etcd not installed (make setup installs etcd-server)")
    with state_cluster(tmp_path / "cluster", "etcd", members=3) as sc:
        yield sc


@pytest.fixture(params=["files", "etcd"])
def state_nodes(
    request: pytest.FixtureRequest, tmp_path: Path, busybox_image_layout: Path
) -> Iterator[StateNodes]:
    """node1 and node2 serving as :func:`nodes` does, once per cluster-state backend:
    ``files``, and ``etcd`` with one real member (TLS, auth on); a 2 s membership TTL.
    Yields a :class:`tests.helpers.etcd.StateNodes` (the cluster, its etcd or None, and
    the store as operator alice); the services stop before the store does."""
    if request.param == "etcd" and not os.access(ETCD, os.X_OK):
        pytest.skip("etcd not installed (make setup installs etcd-server)")
    root = tmp_path / "cluster"
    c = make_cluster(root, busybox_image_layout)
    with state_for(root, request.param, ("node1", "node2"), ("alice",)) as etcd:
        sn = StateNodes(c, etcd, request.param)
        try:
            with serving(c):
                yield sn
        finally:
            sn.close()
