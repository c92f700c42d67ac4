"""Unit tests (no root) for the runtime's pure parts: config parsing, the state machine, the
store, secure_join, the log format."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime.errors import (
    AmbiguousContainer,
    ConfigError,
    ContainerExists,
    ContainerNotFound,
    InvalidContainerId,
    InvalidStateTransition,
)
from runtime.logs import parse_line, read_log
from runtime.monitor import LogWriter
from runtime.rootfs.mounts import secure_join
from runtime.spec import (
    CAPABILITIES,
    DEFAULT_CAPABILITIES,
    ContainerConfig,
    Mount,
    capability_mask,
    parse_capabilities,
    parse_cpus,
    parse_env,
    parse_memory,
    parse_pids_limit,
    parse_signal,
    parse_volume,
)
from runtime.state import TRANSITIONS, ContainerStatus, State, atomic_write_json, check_transition
from runtime.store import Store


@pytest.mark.parametrize(
    "text, n",
    [
        ("8388608", 8 << 20),
        ("64m", 64 << 20),
        ("1g", 1 << 30),
        ("1.5G", 3 << 29),
        ("512MiB", 512 << 20),
        ("10mb", 10 << 20),
    ],
)
def test_parse_memory(text: str, n: int) -> None:
    assert parse_memory(text) == n


@pytest.mark.parametrize("text", ["lots", "-1", "1k", "", "5x"])
def test_parse_memory_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="--memory"):
        parse_memory(text)


def test_parse_cpus_and_pids() -> None:
    assert parse_cpus("0.5") == 50_000
    assert parse_cpus("2") == 200_000
    for bad in ("x", "0", "-1"):
        with pytest.raises(ConfigError, match="--cpus"):
            parse_cpus(bad)
    assert parse_pids_limit("100") == 100
    assert parse_pids_limit("-1") is None
    with pytest.raises(ConfigError, match="--pids-limit"):
        parse_pids_limit("-5")


def test_parse_env_merges_over_image(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_HOST", "h")
    env = parse_env(["A=2", "B=x=y", "FROM_HOST", "UNSET_VAR"], ("A=1", "PATH=/bin"))
    assert env == ("A=2", "PATH=/bin", "B=x=y", "FROM_HOST=h")
    with pytest.raises(ConfigError):
        parse_env(["=v"])
    assert any(e.startswith("PATH=") for e in parse_env([]))


def test_parse_volume(tmp_path: Path) -> None:
    m = parse_volume(f"{tmp_path}:/data:ro")
    assert m == Mount(str(tmp_path), "/data", True)
    for bad in ("x", f"{tmp_path}:rel", f"{tmp_path}:/d:rx", "/nope/nope:/d", f"{tmp_path}:/"):
        with pytest.raises(ConfigError):
            parse_volume(bad)


def test_capabilities() -> None:
    assert capability_mask(DEFAULT_CAPABILITIES) == 0x800405FB
    caps = parse_capabilities(["net_admin"], ["CAP_CHOWN"], False)
    assert "CAP_NET_ADMIN" in caps and "CAP_CHOWN" not in caps
    assert parse_capabilities([], ["ALL"], False) == ()
    assert set(parse_capabilities([], [], True)) == set(CAPABILITIES)
    with pytest.raises(ConfigError, match="unknown capability"):
        parse_capabilities(["FLY"], [], False)


def test_parse_signal() -> None:
    assert parse_signal("TERM") == 15 and parse_signal("SIGKILL") == 9 and parse_signal("10") == 10
    for bad in ("NOPE", "0", "99"):
        with pytest.raises(ConfigError):
            parse_signal(bad)


def test_config_round_trip() -> None:
    from runtime.cgroups import Resources
    from runtime.spec import User

    cfg = ContainerConfig(
        id="a" * 64,
        name="n",
        image_id="b" * 64,
        image_ref="img",
        layers=("l1", "l2"),
        args=("sh",),
        env=("A=1",),
        user=User(1, 2, (3,)),
        resources=Resources(memory_bytes=1 << 20),
        mounts=(Mount("/a", "/b", True),),
    )
    assert ContainerConfig.from_json(cfg.to_json()) == cfg


def test_transitions() -> None:
    S = ContainerStatus
    check_transition("x" * 64, S.RUNNING, S.PAUSED, "pause")
    with pytest.raises(InvalidStateTransition) as ei:
        check_transition("x" * 64, S.STOPPED, S.PAUSED, "pause")
    assert "stopped" in str(ei.value) and "paused" in str(ei.value)
    assert set(TRANSITIONS) == set(S)


def test_state_round_trip_and_atomic_write(tmp_path: Path) -> None:
    st = State(status=ContainerStatus.PAUSED, pid=5, exit_code=None)
    atomic_write_json(tmp_path / "s.json", st.to_json())
    import json

    assert State.from_json(json.loads((tmp_path / "s.json").read_text())) == st
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_store_names_ids_and_prefixes(tmp_path: Path) -> None:
    import json

    s = Store(tmp_path / "root")
    ids = []
    with s.lock():
        for name in ("web", "db"):
            s.check_name(name)
            cid = s.new_id()
            d = s.create_dir(cid)
            (d / "config.json").write_text(json.dumps({"name": name}))
            ids.append(cid)
    assert s.resolve("web") == ids[0]
    assert s.resolve(ids[1]) == ids[1]
    assert s.resolve(ids[1][:10]) == ids[1]
    with pytest.raises(ContainerExists):
        s.check_name("web")
    with pytest.raises(InvalidContainerId):
        s.check_name("bad name")
    with pytest.raises(ContainerNotFound):
        s.resolve("nope")
    if ids[0][0] == ids[1][0]:
        with pytest.raises(AmbiguousContainer):
            s.resolve(ids[0][0])
    with pytest.raises(InvalidContainerId):
        s.container_dir("../etc")
    assert s.new_name() not in ("web", "db")


def test_secure_join_never_leaves_root(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "etc").mkdir(parents=True)
    os.symlink("/etc/passwd", root / "abs")
    os.symlink("../../../..", root / "up")
    os.symlink("etc", root / "rel")
    assert secure_join(str(root), "/abs") == str(root / "etc/passwd")
    assert secure_join(str(root), "/up/x") == str(root / "x")
    assert secure_join(str(root), "../../x") == str(root / "x")
    assert secure_join(str(root), "/rel/f") == str(root / "etc/f")
    os.symlink("loop", root / "loop")
    with pytest.raises(OSError):
        secure_join(str(root), "/loop")


def test_log_writer_and_reader(tmp_path: Path) -> None:
    w = LogWriter(tmp_path / "ctr.log")
    w.feed("stdout", b"hello\nwor")
    w.feed("stderr", b"err\n")
    w.feed("stdout", b"ld\npartial")
    w.flush()
    recs = list(read_log(tmp_path / "ctr.log"))
    assert [(r.stream, r.data) for r in recs] == [
        ("stdout", b"hello\n"),
        ("stderr", b"err\n"),
        ("stdout", b"world\n"),
        ("stdout", b"partial"),
    ]
    assert parse_line(b"garbage") is None
    empty = parse_line(b"2026-01-01T00:00:00Z stdout F ")
    assert empty is not None and empty.data == b"\n"


def test_terminal_state_moves_a_ptys_settings_to_another() -> None:
    """runtime.tty: what a checkpoint saves of a terminal (issue 17) gives a fresh pty the
    same settings and window size, through JSON."""
    import fcntl
    import json
    import struct
    import termios

    from runtime import tty

    m1, s1 = os.openpty()
    m2, s2 = os.openpty()
    try:
        attrs = termios.tcgetattr(s1)
        attrs[3] &= ~termios.ECHO
        attrs[6][termios.VINTR] = b"\x07"
        termios.tcsetattr(s1, termios.TCSANOW, attrs)
        fcntl.ioctl(m1, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
        saved = json.loads(json.dumps(tty.capture(s1).to_json()))
        assert termios.tcgetattr(s2)[3] & termios.ECHO
        tty.apply(s2, tty.TerminalState.from_json(saved))
        got = termios.tcgetattr(s2)
        assert not got[3] & termios.ECHO and got[6][termios.VINTR] == b"\x07"
        assert tty.capture(s2).rows == 33 and tty.capture(s2).cols == 101
    finally:
        for fd in (m1, s1, m2, s2):
            os.close(fd)
    with pytest.raises(ValueError, match="not a saved terminal state"):
        tty.TerminalState.from_json({"termios": [1, 2], "cc": [], "winsize": [0, 0, 0, 0]})
    assert tty.criu_key(os.makedev(136, 3), 0x1A) == "tty[8803:1a]"
