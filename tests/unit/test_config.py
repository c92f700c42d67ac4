"""CURVE key files (:mod:`migrate.keys`) and the node, cluster and client configuration
files (:mod:`migrate.config`), in tmp_path.  No root, no network.

Every configuration error must name the file and the key that was wrong, and say what to
write instead; the parametrized cases check the file path and the dotted key appear in the
message.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import zmq

from migrate import keys
from migrate.config import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ClientConfig,
    Cluster,
    NodeConfig,
    Peer,
    PeerKind,
    check_node_in_cluster,
    default_client_config_path,
    load_client_config,
    load_cluster,
    load_node,
    load_node_config,
)
from migrate.errors import MigrationError, NodeConfigError

# -- keys -------------------------------------------------------------------------------------


def test_keygen_writes_a_public_and_a_private_certificate(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    public, secret = keys.keygen_command(out, "node1")
    assert (public, secret) == (out / "node1.key", out / "node1.key_secret")
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) == 0o700  # created by keygen
    assert sorted(p.name for p in out.iterdir()) == ["node1.key", "node1.key_secret"]
    pub = keys.load_public(public)
    assert keys.load_secret(secret)[0] == pub and keys.is_z85_key(pub)
    assert b"secret-key" not in public.read_bytes()
    # pyzmq reads them back as it wrote them
    import zmq.auth

    assert zmq.auth.load_certificate(public) == (pub, None)


def test_keygen_keeps_an_existing_directory_mode(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    out.mkdir(mode=0o755)
    os.chmod(out, 0o755)
    keys.generate(out, "a")
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_keygen_never_overwrites(tmp_path: Path) -> None:
    _, secret = keys.generate(tmp_path, "node1")
    before = secret.read_bytes()
    with pytest.raises(NodeConfigError, match=r"node1\.key.* already exists"):
        keys.generate(tmp_path, "node1")
    assert secret.read_bytes() == before
    secret.unlink()  # only the public half left: still refused
    with pytest.raises(NodeConfigError, match="already exists"):
        keys.generate(tmp_path, "node1")
    assert not list(tmp_path.glob(".node1.keygen-*"))


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 64, "sp ace"])
def test_keygen_refuses_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(NodeConfigError, match="invalid key name"):
        keys.generate(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def test_two_keypairs_differ(tmp_path: Path) -> None:
    a = keys.load_secret(keys.generate(tmp_path, "a")[1])
    b = keys.load_secret(keys.generate(tmp_path, "b")[1])
    assert a[0] != b[0] and a[1] != b[1]


def test_load_public_refuses_a_secret_file(tmp_path: Path) -> None:
    _, secret = keys.generate(tmp_path, "n")
    with pytest.raises(NodeConfigError, match=r"holds a secret key.*NAME\.key"):
        keys.load_public(secret)


def test_load_secret_refuses_a_public_file(tmp_path: Path) -> None:
    public, _ = keys.generate(tmp_path, "n")
    os.chmod(public, 0o600)
    with pytest.raises(NodeConfigError, match="holds no secret-key"):
        keys.load_secret(public)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_load_secret_refuses_a_readable_secret(tmp_path: Path, mode: int) -> None:
    _, secret = keys.generate(tmp_path, "n")
    os.chmod(secret, mode)
    with pytest.raises(NodeConfigError) as e:
        keys.load_secret(secret)
    assert str(secret) in str(e.value) and f"chmod 600 {secret}" in str(e.value)
    assert e.value.path == str(secret)


def test_load_secret_refuses_a_mismatched_pair(tmp_path: Path) -> None:
    _, secret = keys.generate(tmp_path, "n")
    other_pub, _ = zmq.curve_keypair()
    text = secret.read_text()
    real_pub = keys.load_public(tmp_path / "n.key").decode()
    secret.write_text(text.replace(real_pub, other_pub.decode()))
    with pytest.raises(NodeConfigError, match="does not belong to its secret-key"):
        keys.load_secret(secret)


@pytest.mark.parametrize(
    "content, message",
    [
        ("garbage\n", "expected a ZeroMQ certificate"),
        ('curve\n    public-key = "tooshort"\n', "not 40 Z85 characters"),
        ('curve\n    public-key = "' + "~" * 40 + '"\n', "not 40 Z85 characters"),
    ],
)
def test_load_public_refuses_bad_files(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "bad.key"
    f.write_text(content)
    with pytest.raises(NodeConfigError, match=message) as e:
        keys.load_public(f)
    assert str(f) in str(e.value)


def test_missing_key_files_say_how_to_make_one(tmp_path: Path) -> None:
    for load in (keys.load_public, keys.load_secret):
        with pytest.raises(NodeConfigError, match="does not exist.*jaula node keygen"):
            load(tmp_path / "nope.key")


def test_is_z85_key() -> None:
    pub, sec = zmq.curve_keypair()
    assert keys.is_z85_key(pub) and keys.is_z85_key(sec.decode())
    assert not keys.is_z85_key(pub[:-1])
    assert not keys.is_z85_key("#" * 40)  # alphabet ok, but 5 '#' overflow 32 bits
    assert not keys.is_z85_key("é" * 40)


def test_node_config_error_is_a_migration_error() -> None:
    assert issubclass(NodeConfigError, MigrationError)


# -- a cluster in tmp_path --------------------------------------------------------------------


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    for n in ("node1", "node2", "alice", "bob"):
        keys.generate(d, n)
    return d


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


CLUSTER = """\
[nodes.node1]
endpoint = "tcp://127.0.0.1:7001"
public_key = "keys/node1.key"

[nodes.node2]
endpoint = "tcp://127.0.0.1:7002"
public_key = "{node2}"

[operators.alice]
public_key = "keys/alice.key"
"""

NODE1 = """\
name = "node1"
listen = "tcp://127.0.0.1:7001"
state_root = "/var/lib/jaula/node1"
secret_key = "keys/node1.key_secret"
cluster = "cluster.toml"
"""


def cluster_text(keydir: Path) -> str:
    return CLUSTER.format(node2=keys.load_public(keydir / "node2.key").decode())


def test_cluster_loads_key_files_and_inline_keys(tmp_path: Path, keydir: Path) -> None:
    c = load_cluster(write(tmp_path / "cluster.toml", cluster_text(keydir)))
    n1 = keys.load_public(keydir / "node1.key")
    n2 = keys.load_public(keydir / "node2.key")
    alice = keys.load_public(keydir / "alice.key")
    assert c.nodes == {
        "node1": Peer("node1", PeerKind.NODE, n1, "tcp://127.0.0.1:7001"),
        "node2": Peer("node2", PeerKind.NODE, n2, "tcp://127.0.0.1:7002"),
    }
    assert c.operators == {"alice": Peer("alice", PeerKind.OPERATOR, alice, None)}
    assert c.source == tmp_path / "cluster.toml"
    assert c.by_key(n2) == c.nodes["node2"] and c.by_key(n2.decode()) == c.nodes["node2"]
    assert c.by_key(alice).kind == "operator"  # type: ignore[union-attr]
    assert c.by_key(keys.load_public(keydir / "bob.key")) is None
    assert c.node("node1").endpoint == "tcp://127.0.0.1:7001"


def test_cluster_paths_are_relative_to_the_cluster_file(tmp_path: Path, keydir: Path) -> None:
    sub = tmp_path / "etc" / "jaula"
    write(
        sub / "cluster.toml",
        '[nodes.node1]\nendpoint = "tcp://10.0.0.1:7001"\npublic_key = "../../keys/node1.key"\n',
    )
    c = load_cluster(sub / "cluster.toml")
    assert c.nodes["node1"].public_key == keys.load_public(keydir / "node1.key")
    # and a relative path to the cluster file itself is made absolute
    cwd = os.getcwd()
    try:
        os.chdir(sub)
        assert load_cluster("cluster.toml").source == sub / "cluster.toml"
    finally:
        os.chdir(cwd)


def test_cluster_node_lookup_names_the_known_nodes(tmp_path: Path, keydir: Path) -> None:
    c = load_cluster(write(tmp_path / "cluster.toml", cluster_text(keydir)))
    with pytest.raises(NodeConfigError) as e:
        c.node("node9")
    assert "node9" in str(e.value) and "known nodes: node1, node2" in str(e.value)
    assert str(tmp_path / "cluster.toml") in str(e.value)


def test_cluster_built_in_code_refuses_a_shared_key() -> None:
    k = zmq.curve_keypair()[0]
    with pytest.raises(NodeConfigError, match="same public key"):
        Cluster(
            {"a": Peer("a", PeerKind.NODE, k, "tcp://h:1")}, {"b": Peer("b", PeerKind.OPERATOR, k)}
        )


def _bad_cluster_cases(keydir: Path) -> list[tuple[str, str, str]]:
    n1 = keys.load_public(keydir / "node1.key").decode()
    ok1 = '[nodes.node1]\nendpoint = "tcp://127.0.0.1:7001"\npublic_key = "keys/node1.key"\n'
    return [
        # (file content, dotted key expected in the message, words expected in it)
        ("", "nodes", "add at least one table"),
        ("[operators.alice]\npublic_key = 'keys/alice.key'\n", "nodes", "add at least one"),
        (ok1 + "[servers.x]\n", "servers", "[nodes.NAME]"),
        (
            '[nodes.node1]\npublic_key = "keys/node1.key"\n',
            "nodes.node1.endpoint",
            'write endpoint = "tcp://',
        ),
        (
            '[nodes.node1]\nendpoint = "tcp://127.0.0.1:7001"\n',
            "nodes.node1.public_key",
            "missing; write public_key",
        ),
        (ok1.replace("endpoint =", "endpoit ="), "nodes.node1.endpoit", "unknown key"),
        (ok1.replace("127.0.0.1:7001", "*:7001"), "nodes.node1.endpoint", "peers need a host"),
        (
            ok1.replace("tcp://127.0.0.1:7001", "127.0.0.1:7001"),
            "nodes.node1.endpoint",
            "not a ZeroMQ endpoint",
        ),
        (ok1.replace(":7001", ":70001"), "nodes.node1.endpoint", "out of range"),
        (ok1.replace('"tcp://127.0.0.1:7001"', "7001"), "nodes.node1.endpoint", "non-empty string"),
        (
            ok1.replace("keys/node1.key", "keys/nope.key"),
            "nodes.node1.public_key",
            "does not exist",
        ),
        (
            ok1.replace("keys/node1.key", "keys/node1.key_secret"),
            "nodes.node1.public_key",
            "holds a secret key",
        ),
        (ok1.replace("keys/node1.key", n1[:-1]), "nodes.node1.public_key", "does not exist"),
        (
            ok1 + '[operators.alice]\npublic_key = "keys/alice.key"\nendpoint = "tcp://h:1"\n',
            "operators.alice.endpoint",
            "unknown key",
        ),
        (
            ok1 + f'[operators.alice]\npublic_key = "{n1}"\n',
            "operators.alice.public_key",
            "the same key as nodes.node1",
        ),
        (
            ok1 + '[operators.node1]\npublic_key = "keys/alice.key"\n',
            "nodes.node1",
            "also used in [operators.node1]",
        ),
        (ok1.replace("[nodes.node1]", '[nodes."bad name"]'), "nodes.bad name", "not a valid name"),
        ("nodes = 3\n", "nodes", "add at least one table"),
        ('[nodes]\nnode1 = "tcp://127.0.0.1:7001"\n', "nodes.node1", "must be a table"),
        ("[nodes.node1\n", "", "not valid TOML"),
    ]


def test_every_cluster_error_names_file_and_key(tmp_path: Path, keydir: Path) -> None:
    f = tmp_path / "cluster.toml"
    for content, key, words in _bad_cluster_cases(keydir):
        write(f, content)
        with pytest.raises(NodeConfigError) as e:
            load_cluster(f)
        msg = str(e.value)
        assert msg.startswith(f"{f}: "), (content, msg)
        assert f": {key}:" in msg or not key, (content, msg)
        assert words in msg, (content, msg)
        assert e.value.path == str(f)
        if key:
            assert e.value.key == key, (content, e.value.key)


def test_missing_cluster_file_shows_an_example(tmp_path: Path) -> None:
    with pytest.raises(
        NodeConfigError, match=r"cluster file .* does not exist.*\[nodes\.node1\]; endpoint"
    ) as e:
        load_cluster(tmp_path / "cluster.toml")
    assert e.value.path == str(tmp_path / "cluster.toml")


# -- node config ------------------------------------------------------------------------------


def test_node_config_resolves_relative_paths(tmp_path: Path) -> None:
    f = write(tmp_path / "etc" / "node1.toml", NODE1.replace("/var/lib/jaula/node1", "state"))
    cfg = load_node_config(f)
    assert cfg == NodeConfig(
        name="node1",
        listen="tcp://127.0.0.1:7001",
        state_root=tmp_path / "etc" / "state",
        secret_key=tmp_path / "etc" / "keys" / "node1.key_secret",
        cluster=tmp_path / "etc" / "cluster.toml",
        cgroup_parent=None,
        max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
        source=f,
    )
    assert DEFAULT_MAX_MESSAGE_BYTES == 8 * 1024 * 1024


def test_node_config_absolute_and_home_paths_and_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    f = write(
        tmp_path / "n.toml",
        NODE1.replace('"keys/', '"~/keys/')
        .replace('"cluster.toml"', f'"{tmp_path}/c/cluster.toml"')
        .replace("tcp://127.0.0.1:7001", "tcp://*:7001")
        + 'cgroup_parent = "machine.slice/jaula"\nmax_message_bytes = 65536\n'
        + "metrics_port = 9101\n",
    )
    cfg = load_node_config(f)
    assert cfg.secret_key == tmp_path / "home" / "keys" / "node1.key_secret"
    assert cfg.cluster == tmp_path / "c" / "cluster.toml"
    assert cfg.state_root == Path("/var/lib/jaula/node1")
    assert cfg.listen == "tcp://*:7001"
    assert (cfg.cgroup_parent, cfg.max_message_bytes) == ("machine.slice/jaula", 65536)
    assert (cfg.metrics_port, cfg.metrics_host) == (9101, "0.0.0.0")  # listen's host, * = all
    assert load_node_config(write(tmp_path / "m.toml", NODE1)).metrics_port is None  # off


@pytest.mark.parametrize(
    "change, key, words",
    [
        (('name = "node1"\n', ""), "name", 'missing; write name = "node1"'),
        (('name = "node1"', 'name = "../node1"'), "name", "not a valid name"),
        (('name = "node1"', "name = 1"), "name", "must be a non-empty string"),
        (('name = "node1"', 'name = ""'), "name", "must be a non-empty string"),
        (('listen = "tcp://127.0.0.1:7001"\n', ""), "listen", "missing; write listen"),
        (("tcp://127.0.0.1:7001", "http://127.0.0.1:7001"), "listen", "not a ZeroMQ endpoint"),
        (("tcp://127.0.0.1:7001", "tcp://127.0.0.1:0"), "listen", "out of range"),
        (("tcp://127.0.0.1:7001", "tcp://127.0.0.1:*"), "listen", "not a ZeroMQ endpoint"),
        (('state_root = "/var/lib/jaula/node1"\n', ""), "state_root", "missing; write"),
        (('secret_key = "keys/node1.key_secret"\n', ""), "secret_key", "missing; write"),
        (('cluster = "cluster.toml"\n', ""), "cluster", 'missing; write cluster = "'),
        (
            ('cluster = "cluster.toml"', 'clutser = "cluster.toml"'),
            "clutser",
            "unknown key; the top level takes only",
        ),
        (("", 'cgroup_parent = "/jaula"\n'), "cgroup_parent", "relative cgroup path"),
        (("", 'cgroup_parent = "jaula/../x"\n'), "cgroup_parent", "without '..'"),
        (("", "max_message_bytes = 10\n"), "max_message_bytes", "integer from 4096"),
        (("", "max_message_bytes = true\n"), "max_message_bytes", "integer from 4096"),
        (("", 'max_message_bytes = "8M"\n'), "max_message_bytes", "integer from 4096"),
        (("", "max_message_bytes = 2147483648\n"), "max_message_bytes", "to 1073741824"),
        (("", "metrics_port = 0\n"), "metrics_port", "integer from 1 to 65535"),
        (("", 'metrics_port = "9101"\n'), "metrics_port", "write metrics_port = 9101"),
    ],
)
def test_every_node_config_error_names_file_and_key(
    tmp_path: Path, change: tuple[str, str], key: str, words: str
) -> None:
    old, new = change
    f = write(tmp_path / "node1.toml", NODE1.replace(old, new, 1) if old else NODE1 + new)
    with pytest.raises(NodeConfigError) as e:
        load_node_config(f)
    assert str(e.value).startswith(f"{f}: {key}: "), str(e.value)
    assert words in str(e.value)
    assert (e.value.path, e.value.key) == (str(f), key)


def test_node_config_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(
        NodeConfigError,
        match=r"node config file .*node1\.toml does not exist"
        r".*listen = ",
    ) as e:
        load_node_config(tmp_path / "node1.toml")
    assert e.value.path == str(tmp_path / "node1.toml")
    f = write(tmp_path / "node1.toml", 'name = "node1\n')
    with pytest.raises(NodeConfigError, match=rf"{f}: not valid TOML"):
        load_node_config(f)


def test_load_node_checks_the_node_is_in_its_cluster(tmp_path: Path, keydir: Path) -> None:
    write(tmp_path / "cluster.toml", cluster_text(keydir))
    cfg, cluster = load_node(write(tmp_path / "node1.toml", NODE1))
    assert cfg.name == "node1" and cluster.node("node1").kind is PeerKind.NODE

    # a name the cluster does not list
    f = write(tmp_path / "node3.toml", NODE1.replace('"node1"', '"node3"'))
    with pytest.raises(NodeConfigError) as e:
        load_node(f)
    assert str(e.value).startswith(f"{tmp_path / 'cluster.toml'}: nodes.node3: missing")
    assert "add [nodes.node3]" in str(e.value) and str(f) in str(e.value)

    # listed, but with another node's key
    f = write(
        tmp_path / "node1b.toml", NODE1.replace("keys/node1.key_secret", "keys/node2.key_secret")
    )
    with pytest.raises(NodeConfigError) as e:
        load_node(f)
    assert str(e.value).startswith(f"{tmp_path / 'cluster.toml'}: nodes.node1.public_key: ")
    assert "does not belong" in str(e.value) and e.value.key == "nodes.node1.public_key"

    # its secret key file is readable by others: named through the node config's key
    os.chmod(keydir / "node1.key_secret", 0o644)
    with pytest.raises(NodeConfigError) as e:
        load_node(tmp_path / "node1.toml")
    assert str(e.value).startswith(f"{tmp_path / 'node1.toml'}: secret_key: ")
    assert "chmod 600" in str(e.value)

    # the cluster file it names is missing: named through the node config's key
    f = write(tmp_path / "node1c.toml", NODE1.replace('"cluster.toml"', '"nope.toml"'))
    with pytest.raises(NodeConfigError) as e:
        load_node(f)
    assert str(e.value).startswith(f"{f}: cluster: cluster file ")
    assert (e.value.path, e.value.key) == (str(f), "cluster")


def test_check_node_in_cluster_returns_its_entry(tmp_path: Path, keydir: Path) -> None:
    cluster = load_cluster(write(tmp_path / "cluster.toml", cluster_text(keydir)))
    cfg = load_node_config(write(tmp_path / "node1.toml", NODE1))
    me = check_node_in_cluster(cfg, cluster, keys.load_public(keydir / "node1.key"))
    assert me is cluster.nodes["node1"]


# -- client config ----------------------------------------------------------------------------

CLIENT = 'secret_key = "keys/alice.key_secret"\ncluster = "cluster.toml"\n'


def test_client_config_explicit_path(tmp_path: Path, keydir: Path) -> None:
    f = write(tmp_path / "client.toml", CLIENT)
    c = load_client_config(f)
    pub, sec = keys.load_secret(keydir / "alice.key_secret")
    assert c == ClientConfig(pub, sec, tmp_path / "cluster.toml", DEFAULT_MAX_MESSAGE_BYTES, f)
    assert sec.decode() not in repr(c)  # the secret stays out of logs and tracebacks


def test_client_config_from_env_then_xdg_then_home(
    tmp_path: Path, keydir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "home" / ".config" / "jaula").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("JAULA_CLIENT_CONFIG", raising=False)
    home_cfg = tmp_path / "home" / ".config" / "jaula" / "client.toml"
    assert default_client_config_path() == home_cfg
    write(home_cfg, f'secret_key = "{keydir}/alice.key_secret"\ncluster = "c.toml"\n')
    assert load_client_config().source == home_cfg
    assert load_client_config().cluster == home_cfg.parent / "c.toml"

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_client_config_path() == tmp_path / "xdg" / "jaula" / "client.toml"
    with pytest.raises(NodeConfigError) as e:
        load_client_config()
    assert "JAULA_CLIENT_CONFIG is not set" in str(e.value)
    assert str(tmp_path / "xdg" / "jaula" / "client.toml") in str(e.value)
    assert 'secret_key = "keys/alice.key_secret"' in str(e.value)  # what to write

    env_cfg = write(tmp_path / "env.toml", CLIENT)
    monkeypatch.setenv("JAULA_CLIENT_CONFIG", str(env_cfg))
    assert load_client_config().source == env_cfg
    monkeypatch.setenv("JAULA_CLIENT_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(NodeConfigError, match=r"from \$JAULA_CLIENT_CONFIG.*missing\.toml"):
        load_client_config()
    # an explicit path wins over the environment
    assert load_client_config(env_cfg).source == env_cfg


@pytest.mark.parametrize(
    "content, key, words",
    [
        ('cluster = "cluster.toml"\n', "secret_key", "missing; write secret_key"),
        ('secret_key = "keys/alice.key_secret"\n', "cluster", "missing; write cluster"),
        (CLIENT + 'name = "alice"\n', "name", "unknown key"),
        (CLIENT + "max_message_bytes = 1\n", "max_message_bytes", "integer from 4096"),
        (CLIENT.replace("alice.key_secret", "alice.key"), "secret_key", "holds no secret-key"),
        (CLIENT.replace("alice.key_secret", "carol.key_secret"), "secret_key", "does not exist"),
    ],
)
def test_every_client_config_error_names_file_and_key(
    tmp_path: Path, keydir: Path, content: str, key: str, words: str
) -> None:
    os.chmod(keydir / "alice.key", 0o600)  # so the public-file case fails on content
    f = write(tmp_path / "client.toml", content)
    with pytest.raises(NodeConfigError) as e:
        load_client_config(f)
    assert str(e.value).startswith(f"{f}: {key}: "), str(e.value)
    assert words in str(e.value)
    assert (e.value.path, e.value.key) == (str(f), key)


def test_client_config_from_node_uses_the_node_key(tmp_path: Path, keydir: Path) -> None:
    cfg = load_node_config(write(tmp_path / "node1.toml", NODE1 + "max_message_bytes = 65536\n"))
    c = ClientConfig.from_node(cfg)
    assert (c.public_key, c.secret_key) == keys.load_secret(keydir / "node1.key_secret")
    assert (c.cluster, c.max_message_bytes, c.source) == (cfg.cluster, 65536, cfg.source)
    (keydir / "node1.key_secret").unlink()
    with pytest.raises(NodeConfigError) as e:
        ClientConfig.from_node(cfg)
    assert str(e.value).startswith(f"{cfg.source}: secret_key: ")
