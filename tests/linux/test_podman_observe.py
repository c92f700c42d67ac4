"""``stats`` and ``events`` against real containers (issue 17): the numbers come from the
container's cgroup, the events from the state root's log written by the operations and
the monitor."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.helpers.jaula import JAULA, REPO, Jaula

pytestmark = pytest.mark.root


def test_stats_no_stream_json(jaula: Jaula) -> None:
    jaula.out(
        "run", "-d", "--name", "busy", "-m", "64m", "busybox", "sh", "-c", "while :; do :; done"
    )
    jaula.out("run", "-d", "--name", "idle", "busybox", "sh", "-c", "sleep 1000 & sleep 1001")
    from runtime.poll import wait_for

    def sampled() -> dict[str, dict[str, object]] | None:
        rows = {
            r["name"]: r for r in json.loads(jaula.out("stats", "--no-stream", "--format", "json"))
        }
        cpu = rows["busy"]["cpu_time"]
        return rows if isinstance(cpu, int) and cpu > 50_000_000 else None

    rows = wait_for(sampled, 30.0, 0.2)
    assert rows, "the busy container used no CPU"
    busy, idle = rows["busy"], rows["idle"]
    assert busy["mem_limit"] == 64 * 1024 * 1024
    assert isinstance(busy["mem_usage"], int) and 0 < busy["mem_usage"] < 64 * 1024 * 1024
    assert busy["pids"] == 1 and idle["pids"] == 2
    assert isinstance(busy["cpu_percent"], float) and busy["cpu_percent"] > 0
    table = jaula.out("stats", "--no-stream", "idle").splitlines()
    assert table[0].split()[:4] == ["ID", "NAME", "CPU", "%"]
    assert table[1].split()[1] == "idle"


def test_stats_streams_until_interrupted(jaula: Jaula) -> None:
    jaula.out("run", "-d", "--name", "s", "busybox", "sleep", "1000")
    p = subprocess.Popen(
        [*JAULA, "--state-root", str(jaula.root), "stats", "--format", "json", "-i", "0.2", "s"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert p.stdout is not None
        seen = 0
        buf = ""
        while seen < 2:
            line = p.stdout.readline()
            assert line, "stats ended on its own"
            buf += line
            if line.startswith("]"):
                assert json.loads(buf)[0]["name"] == "s"
                seen += 1
                buf = ""
    finally:
        p.terminate()
        p.wait(timeout=10)


def test_events_of_a_lifecycle(jaula: Jaula) -> None:
    t0 = time.time()
    jaula.out(
        "run", "-d", "--name", "e", "--restart", "on-failure:1", "busybox", "sh", "-c", "exit 4"
    )
    assert jaula.out("wait", "e").strip() == "4"
    jaula.out("rename", "e", "e2")
    jaula.out("rm", "e2")
    lines = jaula.out("events", "--stream=false", "--format", "json", "--since", f"{t0:.3f}")
    evs = [json.loads(x) for x in lines.splitlines()]
    statuses = [e["Status"] for e in evs]
    assert statuses == ["create", "start", "died", "restart", "died", "rename", "remove"]
    assert evs[2]["Attributes"] == {"exitCode": 4}
    assert evs[5]["Attributes"] == {"oldName": "e"} and evs[5]["Name"] == "e2"
    assert [e["timeNano"] for e in evs] == sorted(e["timeNano"] for e in evs)
    died = jaula.out(
        "events", "--stream=false", "--filter", "event=died", "--filter", "container=e"
    )
    assert len(died.splitlines()) == 2 and all(" container died " in x for x in died.splitlines())
    assert jaula.out("events", "--stream=false", "--until", f"{t0 - 3600:.0f}") == ""


def test_events_follow_sees_new_events(jaula: Jaula) -> None:
    p = subprocess.Popen(
        [*JAULA, "--state-root", str(jaula.root), "events", "--format", "json", "--since", "1s"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        jaula.out("create", "--name", "late", "busybox", "true")
        assert p.stdout is not None
        ev = json.loads(p.stdout.readline())
        assert (ev["Status"], ev["Name"]) == ("create", "late")
    finally:
        p.terminate()
        p.wait(timeout=10)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["events", "--since", "yesterday"], "invalid --since"),
        (["events", "--filter", "colour=red"], "invalid --filter"),
        (["stats", "-i", "0"], "invalid --interval"),
    ],
)
def test_bad_flags(jaula: Jaula, args: list[str], needle: str) -> None:
    p = jaula.run(*args, check=False)
    assert p.returncode == 125 and p.stderr.count("\n") == 1 and needle in p.stderr
