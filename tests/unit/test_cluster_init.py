"""``jaula cluster init|join`` (:mod:`migrate.cluster_init` and its CLI), in tmp_path.  No
root, no network (only ``bind`` to ask the kernel for free ports).

What is written must load with :mod:`migrate.config`'s own loaders (as a node service and an
operator's CLI will load it); refused input writes nothing; a failure half-way removes what
was written.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from migrate import cluster_init, keys
from migrate.cli import jaula_main
from migrate.cluster_init import init_cluster, join_cluster, plan_endpoints
from migrate.config import load_client_config, load_cluster, load_node
from migrate.errors import NodeConfigError
from runtime.cli import EXIT_ERROR

EP = {"node1": "tcp://127.0.0.1:7001", "node2": "tcp://127.0.0.1:7002"}


def tree(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (relative path -> content); empty when ``d`` is missing."""
    if not d.exists():
        return {}
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# -- init ---------------------------------------------------------------------------------------


def test_init_writes_keys_cluster_node_and_client_files_that_load(tmp_path: Path) -> None:
    root = tmp_path / "c"
    c = init_cluster(root, EP, ("admin",), cgroup_parent="jaula-x-{node}")
    assert sorted(tree(root)) == [
        "admin-client.toml",
        "cluster.toml",
        "keys/admin.key",
        "keys/admin.key_secret",
        "keys/node1.key",
        "keys/node1.key_secret",
        "keys/node2.key",
        "keys/node2.key_secret",
        "node1.toml",
        "node2.toml",
    ]
    assert sorted(c.written) == sorted(root / f for f in tree(root))
    assert stat.S_IMODE((root / "keys").stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "keys/node1.key_secret").stat().st_mode) == 0o600
    for n, e in EP.items():
        cfg, cluster = load_node(c.nodes[n].config)  # also checks the node's key is listed
        assert (cfg.name, cfg.listen, cfg.cgroup_parent) == (n, e, f"jaula-x-{n}")
        assert cfg.state_root == root / "state" / n == c.nodes[n].state_root
        assert cluster.nodes[n].endpoint == e
        assert cluster.nodes[n].public_key == keys.load_public(root / "keys" / f"{n}.key")
        assert not cfg.state_root.exists()  # the runtime makes its own
    client = load_client_config(c.operators["admin"].client_config)
    assert client.public_key == load_cluster(client.cluster).operators["admin"].public_key
    # relative paths: the directory works from anywhere it is moved to
    text = (root / "node1.toml").read_text()
    assert str(root) not in text and 'secret_key = "keys/node1.key_secret"' in text
    assert str(root) not in (root / "cluster.toml").read_text()


def test_init_options_state_dir_outside_and_message_size(tmp_path: Path) -> None:
    c = init_cluster(
        tmp_path / "c",
        {"n1": "tcp://[::1]:7001"},
        (),
        state_dir=tmp_path / "var",
        max_message_bytes=65536,
    )
    cfg, cluster = load_node(c.nodes["n1"].config)
    assert cfg.state_root == tmp_path / "var" / "n1"
    assert str(tmp_path / "var" / "n1") in c.nodes["n1"].config.read_text()  # absolute
    assert cfg.max_message_bytes == 65536 and cfg.cgroup_parent is None
    assert cluster.operators == {} and c.operators == {}
    assert not (tmp_path / "c" / "admin-client.toml").exists()


def test_init_never_overwrites_and_writes_nothing_then(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    (root / "node2.toml").write_text("mine\n")
    with pytest.raises(NodeConfigError, match=r"node2\.toml already exists.*never overwrites"):
        init_cluster(root, EP)
    assert tree(root) == {"node2.toml": b"mine\n"}
    (root / "node2.toml").unlink()
    init_cluster(root, EP)
    before = tree(root)
    with pytest.raises(NodeConfigError, match=r"already exists \(and 9 more\)"):
        init_cluster(root, EP)
    assert tree(root) == before


@pytest.mark.parametrize(
    ("endpoints", "operators", "kw", "message"),
    [
        ({}, ("admin",), {}, "at least one node"),
        ({"node 1": "tcp://127.0.0.1:1"}, (), {}, "invalid node name 'node 1'"),
        (EP, ("node1",), {}, "'node1' is given twice"),
        (EP, ("bad/op",), {}, "invalid operator name"),
        ({"cluster": "tcp://127.0.0.1:1"}, (), {}, "would both be cluster.toml"),
        ({"a-client": "tcp://127.0.0.1:1"}, ("a",), {}, "would both be a-client.toml"),
        ({"n": "tcp://*:7001"}, (), {}, "endpoint of n: .*bind address"),
        ({"n": "http://h:1"}, (), {}, "not a ZeroMQ endpoint"),
        ({"n": "tcp://h:70000"}, (), {}, "out of range"),
        (EP, (), {"cgroup_parent": "../{node}"}, "cgroup parent '../{node}' for node node1"),
        (EP, (), {"max_message_bytes": 10}, "max_message_bytes 10 is not from 4096"),
    ],
)
def test_init_refuses_bad_input_before_writing(
    tmp_path: Path,
    endpoints: dict[str, str],
    operators: tuple[str, ...],
    kw: dict[str, object],
    message: str,
) -> None:
    with pytest.raises(NodeConfigError, match=message):
        init_cluster(tmp_path / "c", endpoints, operators, **kw)  # type: ignore[arg-type]
    assert not (tmp_path / "c").exists()


def test_init_failing_half_way_removes_what_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = cluster_init._write_new

    def write_new(path: Path, text: str) -> None:
        if path.name == "node2.toml":
            raise NodeConfigError(f"cannot write {path}: No space left on device")
        real(path, text)

    monkeypatch.setattr(cluster_init, "_write_new", write_new)
    with pytest.raises(NodeConfigError, match="No space left"):
        init_cluster(tmp_path / "c", EP)
    assert not (tmp_path / "c").exists()  # keys, cluster.toml, node1.toml and the dirs made


# -- endpoints --------------------------------------------------------------------------------


def test_plan_endpoints() -> None:
    assert plan_endpoints(["a", "b", "c"], "10.0.0.1", 7001) == {
        "a": "tcp://10.0.0.1:7001",
        "b": "tcp://10.0.0.1:7002",
        "c": "tcp://10.0.0.1:7003",
    }
    assert plan_endpoints(["a"], "::1", 9) == {"a": "tcp://[::1]:9"}
    assert plan_endpoints(["a"], "[::1]", 9) == {"a": "tcp://[::1]:9"}
    free = plan_endpoints(["a", "b", "c"], "127.0.0.1", 0)
    ports = {int(e.rsplit(":", 1)[1]) for e in free.values()}
    assert len(ports) == 3 and all(1024 <= p <= 65535 for p in ports)
    with pytest.raises(NodeConfigError, match="beyond port 65535"):
        plan_endpoints(["a", "b"], "h", 65535)
    with pytest.raises(NodeConfigError, match="not an address the others can connect to"):
        plan_endpoints(["a"], "*", 7001)
    with pytest.raises(NodeConfigError, match="not a ZeroMQ endpoint"):
        plan_endpoints(["a"], "a b", 7001)


# -- join -------------------------------------------------------------------------------------


def test_join_adds_a_node_and_keeps_the_cluster_file(tmp_path: Path) -> None:
    root = tmp_path / "c"
    init_cluster(root, EP, ("admin",))
    cluster_file = root / "cluster.toml"
    old = cluster_file.read_text() + "# a comment of the operator's\n"
    cluster_file.write_text(old)
    j = join_cluster(root, "node3", "tcp://10.0.0.3:7001", listen="tcp://*:7001")
    assert j.written == (
        root / "keys/node3.key",
        root / "keys/node3.key_secret",
        root / "node3.toml",
    )
    assert cluster_file.read_text().startswith(old)  # extended, not rewritten
    cfg, cluster = load_node(root / "node3.toml")
    assert (cfg.listen, cluster.nodes["node3"].endpoint) == ("tcp://*:7001", "tcp://10.0.0.3:7001")
    assert sorted(cluster.nodes) == ["node1", "node2", "node3"]
    assert sorted(cluster.operators) == ["admin"]
    for n in EP:
        load_node(root / f"{n}.toml")  # the others still load with the extended file
    assert not list(root.glob(".cluster.toml.*"))


@pytest.mark.parametrize(
    ("node", "endpoint", "message"),
    [
        ("node2", "tcp://127.0.0.1:7009", r"nodes\.node2 already exists"),
        ("admin", "tcp://127.0.0.1:7009", r"operators\.admin already exists"),
        ("node3", "tcp://127.0.0.1:7002", r"nodes\.node2 already listens at"),
        ("node3", "tcp://*:7003", "--endpoint: .*bind address"),
        ("no/de", "tcp://127.0.0.1:7009", "invalid node name"),
    ],
)
def test_join_refuses_before_writing(
    tmp_path: Path, node: str, endpoint: str, message: str
) -> None:
    init_cluster(tmp_path, EP, ("admin",))
    before = tree(tmp_path)
    with pytest.raises(NodeConfigError, match=message):
        join_cluster(tmp_path, node, endpoint)
    assert tree(tmp_path) == before


def test_join_needs_a_cluster_dir(tmp_path: Path) -> None:
    with pytest.raises(NodeConfigError, match=r"cluster\.toml does not exist.*cluster init"):
        join_cluster(tmp_path, "node3", "tcp://127.0.0.1:7003")
    assert list(tmp_path.iterdir()) == []


def test_join_that_cannot_extend_the_file_undoes_everything(tmp_path: Path) -> None:
    """An inline ``nodes = {...}`` table cannot take a ``[nodes.node3]`` after it: the
    extended file does not load, so the keys and node3.toml go and cluster.toml stays."""
    init_cluster(tmp_path, {"node1": EP["node1"]}, ())
    (tmp_path / "cluster.toml").write_text(
        f'nodes = {{ node1 = {{ endpoint = "{EP["node1"]}", public_key = "keys/node1.key" }} }}\n'
    )
    before = tree(tmp_path)
    with pytest.raises(
        NodeConfigError,
        match=r"cluster\.toml with \[nodes\.node3\] appended does not load: "
        r".*cluster\.toml: not valid TOML",
    ):
        join_cluster(tmp_path, "node3", "tcp://127.0.0.1:7003")
    assert tree(tmp_path) == before


# -- the CLI ----------------------------------------------------------------------------------


def test_cli_init_join_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "cl"
    argv = ["cluster", "init", str(d), "--nodes", "a,b", "--operators", "op", "--base-port", "0"]
    assert jaula_main([*argv, "--cgroup-parent", "jaula-t-{node}"]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [
        str(d / f)
        for f in (
            "keys/a.key",
            "keys/a.key_secret",
            "keys/b.key",
            "keys/b.key_secret",
            "keys/op.key",
            "keys/op.key_secret",
            "cluster.toml",
            "a.toml",
            "b.toml",
            "op-client.toml",
        )
    ]
    assert f"jaula node serve --config {d / 'a.toml'}" in err
    assert f"JAULA_CLIENT_CONFIG={d / 'op-client.toml'}" in err
    cfg, cluster = load_node(d / "b.toml")
    assert cfg.cgroup_parent == "jaula-t-b" and cluster.nodes["a"].endpoint != cfg.listen

    before = tree(d)
    assert jaula_main(argv) == EXIT_ERROR
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"jaula: error: {d / 'cluster.toml'} already exists")
    assert tree(d) == before

    assert jaula_main(["cluster", "join", str(d), "--node", "c", "--endpoint", "tcp://h:7"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        str(d / "keys/c.key"),
        str(d / "keys/c.key_secret"),
        str(d / "c.toml"),
        f"{d / 'cluster.toml'} (added [nodes.c])",
    ]
    assert "restart the running node services" in err
    assert load_cluster(d / "cluster.toml").nodes["c"].endpoint == "tcp://h:7"

    assert jaula_main(["cluster", "join", str(d), "--node", "c", "--endpoint", "tcp://h:8"]) == (
        EXIT_ERROR
    )
    assert "nodes.c already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's usage errors exit 125 as jaula's own
        jaula_main(["cluster", "init", str(tmp_path / "x"), "--nodes", "a", "--base-port", "x"])
    assert e.value.code == EXIT_ERROR and "invalid int value" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
