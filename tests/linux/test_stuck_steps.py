"""Checkpoint and restore never leave a container stuck (issue 11, A and B), on one host with
real containers and real CRIU:

- a container holding a stopped task (``kill -STOP``) is checkpointed and restored, the task
  stopped again; before, CRIU hung in the kernel seizing it inside the frozen cgroup;
- a dump whose CRIU is stuck is killed at its time limit and the container thawed;
- a workload that dropped a capability from its bounding, permitted and effective sets is
  restored with exactly its sets; before, CRIU failed "Unable to restore capabilities";
- a restore that fails after its tasks were made (one of them refused its credentials) is
  torn down at once; before, CRIU and the pid namespace's init waited for each other;
- ``rm -f`` of a container whose restore holds its lock ends, and leaves nothing.

A stuck CRIU is had for real: it is stopped (SIGSTOP) once it has started, by the test that
started it.  Each test bounds its own waits, so that on code without the fix it fails
instead of hanging the suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.containers import inspect
from tests.helpers.counter import COUNTER, count, ticks, wait_ticks
from tests.helpers.images import WORKLOADS
from tests.helpers.jaula import Jaula
from tests.helpers.skips import needs_criu
from tests.helpers.stuck import (
    STOPPED_CHILD,
    caps_of,
    children,
    criu_children,
    freezer_state,
    poison_child_creds,
    state_of,
    task_states,
    unrestorable_bit,
)

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]

#: how long a step may take here before the test calls it hung (the fixed code ends far
#: sooner: a stuck dump at its scaled limit, a failed restore seconds after CRIU fails)
HUNG_S = 60.0


def test_a_stopped_task_is_checkpointed_and_stopped_again(jaula: Jaula) -> None:
    jaula.run("run", "-d", "--name", "stp", "busybox", "sh", "-c", STOPPED_CHILD)
    wait_ticks(jaula, "stp", 5)
    init = inspect(jaula, "stp")["State"]["Pid"]
    before = task_states(init)
    stopped = [k for k, s in before.items() if s == "T"]
    assert len(stopped) == 1, f"the workload did not stop its child: {before}"
    try:
        jaula.run("checkpoint", "stp", timeout=HUNG_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the checkpoint of a container with a stopped task hung for {HUNG_S:.0f} s")
    jaula.run("restore", "stp", timeout=HUNG_S)
    init = inspect(jaula, "stp")["State"]["Pid"]
    states = task_states(init)
    assert sorted(states.values()).count("T") == 1, f"not stopped after restore: {states}"
    n = count(jaula, "stp")
    wait_ticks(jaula, "stp", n + 5)
    # and it still answers SIGCONT, as a stopped task does
    (k,) = [k for k, s in states.items() if s == "T"]
    os.kill(k, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while state_of(k) == "T" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state_of(k) != "T"


def test_a_stuck_dump_is_killed_at_its_limit_and_the_container_thawed(
    jaula: Jaula, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint runs in this process; its CRIU is stopped at its first notification
    (``pre-dump``: the cgroup is frozen by then), so it answers nothing more."""
    from migrate import checkpoint, criu
    from migrate.errors import CriuError
    from runtime.container import Runtime

    monkeypatch.setenv("JAULA_LIMIT_SCALE", "0.1")  # the dump's limit: 3 s, not 30 s
    jaula.run("run", "-d", "--name", "stk", "busybox", "sh", "-c", COUNTER)
    wait_ticks(jaula, "stk", 5)
    real_dump = criu.dump
    stopped: list[int] = []

    def dump(opts: criu.DumpOptions, on_notify: criu.NotifyHandler | None = None, *a: object):
        def stop_criu(n: criu.Notify) -> bool:
            if n.script == "pre-dump" and not stopped:
                stopped.extend(criu_children(os.getpid()))
                for pid in stopped:
                    os.kill(pid, signal.SIGSTOP)
            return on_notify(n) if on_notify else True

        return real_dump(opts, stop_criu, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(criu, "dump", dump)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            checkpoint.checkpoint(Runtime(jaula.root), "stk")
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - the test reads it
            outcome.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(HUNG_S)
    if t.is_alive():
        for pid in stopped:  # let the hung dump end, then fail
            os.kill(pid, signal.SIGKILL)
        t.join(30)
        pytest.fail(f"the dump's CRIU was stuck and the checkpoint waited {HUNG_S:.0f} s")
    assert stopped, "no CRIU was stopped"
    (err,) = outcome
    assert isinstance(err, CriuError), err
    assert "did not reach post-dump within 3 s" in str(err)
    assert inspect(jaula, "stk")["State"]["Status"] == "running"
    assert freezer_state(jaula, "stk") == "THAWED"
    n = count(jaula, "stk")
    wait_ticks(jaula, "stk", n + 5)
    assert not any(Path(f"/proc/{p}").exists() and state_of(p) != "Z" for p in stopped)


@pytest.fixture
def py(jaula: Jaula, python_image_layout: Path) -> Jaula:
    jaula.run("image", "import", str(python_image_layout), "--name", "jaula-python:latest")
    return jaula


def caps_workload(j: Jaula, name: str, where: str = "child") -> tuple[int, dict[str, str]]:
    """Run the capability workload; returns (host pid of the process that dropped, its
    capability sets)."""
    script = (WORKLOADS / "caps_drop.py").read_text()
    j.run(
        "run", "-d", "--name", name, "-e", f"WHERE={where}", "jaula-python", "python3", "-c", script
    )
    deadline = time.monotonic() + 20
    while "child ready" not in j.out("logs", name):
        assert time.monotonic() < deadline, j.out("logs", name)
        time.sleep(0.1)
    init = inspect(j, name)["State"]["Pid"]
    pid = children(init)[0] if where == "child" else init
    return pid, caps_of(pid)


@pytest.mark.parametrize("where", ["child", "init"])
def test_a_workload_that_dropped_capabilities_is_restored_with_them(py: Jaula, where: str) -> None:
    pid, before = caps_workload(py, "cap", where)
    assert before["CapInh"] != before["CapBnd"], before  # the shape that failed
    py.run("checkpoint", "cap", timeout=HUNG_S)
    p = py.run("restore", "cap", timeout=HUNG_S, check=False)
    assert p.returncode == 0, p.stderr
    init = inspect(py, "cap")["State"]["Pid"]
    pid = children(init)[0] if where == "child" else init
    assert caps_of(pid) == before
    n = ticks(py, "cap")[-1]
    wait_ticks(py, "cap", n + 5)


def test_a_restore_that_fails_after_its_tasks_were_made_is_torn_down_at_once(
    py: Jaula,
) -> None:
    bit = unrestorable_bit()
    if bit is None:
        pytest.skip("root has every capability here: no credentials CRIU cannot restore")
    caps_workload(py, "bad")
    py.run("checkpoint", "bad", timeout=HUNG_S)
    info = inspect(py, "bad")
    poison_child_creds(Path(info["UpperDir"]).parent / "checkpoint" / "criu", bit)
    try:
        p = py.run("restore", "bad", timeout=HUNG_S, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a failed restore hung for {HUNG_S:.0f} s")
    assert p.returncode != 0
    assert "Unable to restore capabilities" in p.stderr or "restore failed" in p.stderr, p.stderr
    info = inspect(py, "bad")
    assert info["State"]["Status"] == "checkpointed"
    # nothing of the failed restore is left: no monitor, no task, no CRIU
    mon = info["State"]["MonitorPid"]
    assert not mon or not Path(f"/proc/{mon}").exists() or state_of(mon) == "Z"
    cdir = str(Path(info["UpperDir"]).parent)
    left = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if cdir in (d / "cmdline").read_bytes().decode(errors="replace"):
                    left.append(d.name)
            except OSError:
                continue
    assert left == [], f"processes of the failed restore are left: {left}"


def test_rm_f_of_a_container_whose_restore_holds_it_ends(jaula: Jaula, tmp_path: Path) -> None:
    """A restore held at ``pre-resume`` (as a migration's destination holds it, here for a
    decision that never comes) holds the container's lock: ``rm -f`` kills it and removes
    the container instead of waiting for ever."""
    from migrate.restore import RESTORER
    from runtime.container import Runtime

    jaula.run("run", "-d", "--name", "held", "busybox", "sh", "-c", COUNTER)
    wait_ticks(jaula, "held", 5)
    jaula.run("checkpoint", "held")
    info = inspect(jaula, "held")
    cid, cdir = info["Id"], Path(info["UpperDir"]).parent
    arg = json.dumps({"bundle": str(cdir / "checkpoint"), "hold": str(tmp_path / "nobody.sock")})
    errors: list[BaseException] = []

    def revive() -> None:
        try:
            Runtime(jaula.root).revive(cid, RESTORER, arg)
        except BaseException as e:  # noqa: BLE001 - expected: it is removed under it
            errors.append(e)

    t = threading.Thread(target=revive, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while (
        not list(cdir.glob("restore.log")) or "pre-resume" not in (cdir / "restore.log").read_text()
    ):
        assert time.monotonic() < deadline and t.is_alive(), f"the restore was not held: {errors}"
        time.sleep(0.05)
    try:
        jaula.run("rm", "-f", "held", timeout=HUNG_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"rm -f of a container whose restore is held hung for {HUNG_S:.0f} s")
    finally:
        t.join(30)
    assert not t.is_alive(), "the held restore did not end"
    assert "held" not in jaula.out("ps", "-a")
    assert not cdir.exists()
