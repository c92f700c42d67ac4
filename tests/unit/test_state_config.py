"""The cluster file's ``[state]`` table (migrate.config) and the files backend's default."""

from __future__ import annotations

from pathlib import Path

import pytest

from migrate.cluster_init import init_cluster
from migrate.config import StateBackend, load_cluster
from migrate.errors import NodeConfigError


def _cluster(tmp_path: Path, state: str) -> Path:
    init_cluster(tmp_path, {"node1": "tcp://127.0.0.1:7001"}, operators=[])
    f = tmp_path / "cluster.toml"
    f.write_text(f.read_text() + "\n" + state)
    return f


def test_no_state_table_means_files_beside_the_cluster_file(tmp_path: Path) -> None:
    c = load_cluster(_cluster(tmp_path, ""))
    assert c.state.backend is StateBackend.FILES
    assert c.state.path == tmp_path / "cluster-state"


def test_etcd_table_resolves_paths_and_names(tmp_path: Path) -> None:
    c = load_cluster(
        _cluster(
            tmp_path,
            '[state]\nbackend = "etcd"\nendpoints = ["https://127.0.0.1:2379"]\n'
            'ca = "etcd/ca.crt"\ncert = "etcd/{name}.crt"\nkey = "etcd/{name}.key"\n',
        )
    )
    assert c.state.endpoints == ("https://127.0.0.1:2379",)
    assert c.state.ca == tmp_path / "etcd" / "ca.crt"
    assert c.state.cert_for("node1") == tmp_path / "etcd" / "node1.crt"
    assert c.state.ttl_s == 10.0


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ('backend = "zk"', "not a backend"),
        ('backend = "files"\nendpoints = []', "not used by backend"),
        ('backend = "etcd"\nendpoints = ["http://127.0.0.1:2379"]', "only over TLS"),
        (
            'backend = "etcd"\nendpoints = ["https://h:1"]\nca = "c"\ncert = "a.crt"\nkey = "k"',
            "has no {name}",
        ),
        ("ttl_s = 0", "number of seconds"),
        ("colour = 1", "unknown key"),
    ],
)
def test_bad_state_tables_are_refused(tmp_path: Path, table: str, error: str) -> None:
    with pytest.raises(NodeConfigError, match=error):
        load_cluster(_cluster(tmp_path, "[state]\n" + table + "\n"))
