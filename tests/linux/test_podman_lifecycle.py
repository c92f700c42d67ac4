"""``create``, ``start``, ``restart`` and ``--restart`` policies against real containers
(issue 17): a stopped container starts again with a new init in the same upperdir; the
monitor restarts an init as its policy says, and ``stop``/``rm -f`` end that for good."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.jaula import Jaula

pytestmark = pytest.mark.root


def _inspect(j: Jaula, name: str) -> dict[str, object]:
    (d,) = json.loads(j.out("inspect", name))
    assert isinstance(d, dict)
    return d


def _state(j: Jaula, name: str) -> dict[str, object]:
    st = _inspect(j, name)["State"]
    assert isinstance(st, dict)
    return st


def _alive(pid: object) -> bool:
    """Whether ``pid`` runs (a zombie does not: the monitor may be reparented to a
    subreaper that reaps it later)."""
    assert isinstance(pid, int)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_create_then_start_twice_keeps_the_upperdir(jaula: Jaula) -> None:
    cid = jaula.out("create", "--name", "c1", "busybox", "sh", "-c", "echo x >> /f; cat /f")
    assert len(cid.strip()) == 64
    assert _state(jaula, "c1")["Status"] == "created"
    assert jaula.run("start", "-a", "c1").stdout.splitlines() == ["x"]
    assert _state(jaula, "c1")["Status"] == "stopped"
    jaula.out("start", "c1")
    assert jaula.out("wait", "c1").strip() == "0"
    # the second run appended to the file the first one wrote: same upperdir
    assert jaula.out("logs", "c1").splitlines() == ["x", "x", "x"]


def test_start_of_a_running_container_is_refused(jaula: Jaula) -> None:
    jaula.out("run", "-d", "--name", "r", "busybox", "sleep", "1000")
    p = jaula.run("start", "r", check=False)
    assert p.returncode == 125
    assert p.stderr.count("\n") == 1 and "is running: cannot start it" in p.stderr


def test_restart_runs_a_new_init(jaula: Jaula) -> None:
    jaula.out("run", "-d", "--name", "w", "busybox", "sh", "-c", "echo up >> /n; sleep 1000")
    first = _state(jaula, "w")["Pid"]
    jaula.out("restart", "-t", "1", "w")
    st = _state(jaula, "w")
    assert st["Status"] == "running" and st["Pid"] != first and not _alive(first)
    assert jaula.out("exec", "w", "cat", "/n").splitlines() == ["up", "up"]


def test_on_failure_restarts_at_most_n_times(jaula: Jaula) -> None:
    jaula.out(
        "run", "-d", "--name", "f", "--restart", "on-failure:2", "busybox",
        "sh", "-c", "echo run; exit 3",
    )  # fmt: skip
    assert jaula.out("wait", "f").strip() == "3"
    assert jaula.out("logs", "f").splitlines() == ["run", "run", "run"]
    d = _inspect(jaula, "f")
    assert d["RestartCount"] == 2
    assert d["HostConfig"] == {"RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 2}}


def test_on_failure_does_not_restart_a_success(jaula: Jaula) -> None:
    jaula.out("run", "-d", "--name", "ok", "--restart", "on-failure", "busybox", "echo", "once")
    assert jaula.out("wait", "ok").strip() == "0"
    assert jaula.out("logs", "ok").splitlines() == ["once"]
    assert _inspect(jaula, "ok")["RestartCount"] == 0


def test_always_restarts_until_stopped(jaula: Jaula) -> None:
    jaula.out(
        "run", "-d", "--name", "a", "--restart", "always", "busybox",
        "sh", "-c", "echo tick >> /ticks; echo tick",
    )  # fmt: skip
    from runtime.poll import wait_for

    assert wait_for(lambda: len(jaula.out("logs", "a").splitlines()) >= 3, 30.0, 0.1)
    jaula.out("stop", "-t", "1", "a")
    st = _state(jaula, "a")
    assert st["Status"] == "stopped"
    assert not _alive(st["MonitorPid"]), "the monitor still runs: it would restart it"
    n = len(jaula.out("logs", "a").splitlines())
    jaula.out("start", "a")  # a stop then a start: the policy applies again
    assert wait_for(lambda: len(jaula.out("logs", "a").splitlines()) >= n + 2, 30.0, 0.1)
    jaula.out("rm", "-f", "a")


@pytest.mark.parametrize("bad", ["sometimes", "always:3", "on-failure:x"])
def test_bad_restart_policy(jaula: Jaula, bad: str) -> None:
    p = jaula.run("run", "-d", "--restart", bad, "busybox", "true", check=False)
    assert p.returncode == 125
    assert p.stderr.count("\n") == 1 and "invalid --restart" in p.stderr
    assert jaula.container_ids() == []


def test_restart_policy_holds_after_a_checkpoint_and_restore(jaula: Jaula) -> None:
    from tests.helpers.skips import criu_works

    if (why := criu_works()) is not None:
        pytest.skip(why)
    script = "while [ ! -e /go ]; do sleep 0.1; done; echo done; exit 5"
    jaula.out(
        "run", "-d", "--name", "cr", "--restart", "on-failure:1", "busybox", "sh", "-c", script
    )  # fmt: skip
    jaula.out("checkpoint", "cr")
    jaula.out("restore", "cr")
    jaula.out("exec", "cr", "touch", "/go")
    # the restored init exits 5, the monitor starts the command once more (/go is still in
    # the upperdir: it exits 5 at once), and on-failure:1 ends it there
    assert jaula.out("wait", "cr").strip() == "5"
    assert jaula.out("logs", "cr").splitlines() == ["done", "done"]
    assert _inspect(jaula, "cr")["RestartCount"] == 1
