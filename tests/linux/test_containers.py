"""Real containers from a real image, driven through the ``jaula`` CLI."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.helpers.containers import wait_for
from tests.helpers.jaula import JAULA, Jaula
from tests.helpers.leaks import cgroup_dirs, mounts_under

pytestmark = pytest.mark.root


def inspect(j: Jaula, ref: str) -> dict:
    return json.loads(j.out("inspect", ref))[0]


def log_text(j: Jaula, ref: str) -> str:
    return j.out("logs", ref)


# -- lifecycle ------------------------------------------------------------------------------


def test_run_attached_returns_exit_code_and_output(jaula: Jaula) -> None:
    p = jaula.run(
        "run", "--name", "t", "busybox", "sh", "-c", "echo out; echo err >&2; exit 3", check=False
    )
    assert p.returncode == 3
    assert p.stdout == "out\n"
    assert p.stderr == "err\n"
    ps = jaula.out("ps", "-a")
    assert "Exited (3)" in ps and " t" in ps
    info = inspect(jaula, "t")
    assert info["State"]["Status"] == "stopped" and info["State"]["ExitCode"] == 3


def test_detached_container_survives_cli_and_is_seen_from_new_process(jaula: Jaula) -> None:
    cid = jaula.out("run", "-d", "--name", "sleeper", "busybox", "sleep", "1000").strip()
    assert len(cid) == 64
    info = inspect(jaula, cid[:8])  # unique prefix works
    st = info["State"]
    assert st["Status"] == "running"
    os.kill(st["Pid"], 0)
    os.kill(st["MonitorPid"], 0)
    with open(f"/proc/{st['MonitorPid']}/status") as f:
        ppid = int(next(line for line in f if line.startswith("PPid:")).split()[1])
    assert ppid != os.getpid(), "the monitor must not be a child of the caller"
    assert "sleeper" in jaula.out("ps")
    jaula.run("stop", "-t", "1", "sleeper")
    info = inspect(jaula, "sleeper")
    assert info["State"]["Status"] == "stopped"
    assert info["State"]["ExitCode"] == 137  # sh/sleep as pid 1 ignores SIGTERM
    assert "sleeper" not in jaula.out("ps")
    assert "sleeper" in jaula.out("ps", "-a")


def test_kill_with_signal_and_wait(jaula: Jaula) -> None:
    jaula.run(
        "run",
        "-d",
        "--name",
        "k",
        "busybox",
        "sh",
        "-c",
        "trap 'exit 42' USR1; while true; do sleep 0.1; done",
    )
    time.sleep(0.3)
    jaula.run("kill", "-s", "USR1", "k")
    assert jaula.out("wait", "k").strip() == "42"


def test_logs_and_follow(jaula: Jaula) -> None:
    jaula.run(
        "run",
        "-d",
        "--name",
        "lg",
        "busybox",
        "sh",
        "-c",
        "for i in 1 2 3; do echo line$i; echo e$i >&2; sleep 0.2; done",
    )
    p = jaula.run("logs", "-f", "lg", timeout=20)
    assert p.stdout == "line1\nline2\nline3\n"
    assert p.stderr == "e1\ne2\ne3\n"


def test_exec_sees_pid_namespace_and_files(jaula: Jaula) -> None:
    jaula.run(
        "run", "-d", "--name", "ex", "busybox", "sh", "-c", "echo hello > /tmp/f; exec sleep 1000"
    )
    wait_for(lambda: (Path(inspect(jaula, "ex")["UpperDir"]) / "tmp/f").exists(), what="file")
    assert jaula.out("exec", "ex", "cat", "/tmp/f") == "hello\n"
    assert jaula.out("exec", "ex", "cat", "/proc/1/cmdline").startswith("sleep")
    ps = jaula.out("exec", "ex", "ps")
    pids = [line.split()[0] for line in ps.splitlines()[1:]]
    assert "1" in pids and all(int(p) < 100 for p in pids)
    assert jaula.run("exec", "ex", "sh", "-c", "exit 5", check=False).returncode == 5
    p = jaula.run("exec", "ex", "no-such-program", check=False)
    assert p.returncode == 127 and "not found" in p.stderr
    assert jaula.run("exec", "-w", "/tmp", "ex", "pwd").stdout == "/tmp\n"
    assert jaula.run("exec", "-u", "65534", "ex", "id", "-u").stdout == "65534\n"
    assert jaula.run("exec", "-e", "FOO=bar", "ex", "sh", "-c", "echo $FOO").stdout == "bar\n"


def test_pause_resume_freezes_processes(jaula: Jaula) -> None:
    jaula.run(
        "run",
        "-d",
        "--name",
        "pz",
        "busybox",
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo $i > /tmp/c; sleep 0.05; done",
    )
    upper = Path(inspect(jaula, "pz")["UpperDir"])
    wait_for(lambda: (upper / "tmp/c").exists(), what="counter")
    jaula.run("pause", "pz")
    info = inspect(jaula, "pz")
    assert info["State"]["Status"] == "paused"
    freezer = info["CgroupPaths"].get("freezer")
    if freezer:
        assert Path(freezer, "freezer.state").read_text().strip() == "FROZEN"
    a = (upper / "tmp/c").read_text()
    time.sleep(0.4)
    assert (upper / "tmp/c").read_text() == a, "counter advanced while paused"
    assert "paused" in jaula.out("ps")
    jaula.run("resume", "pz")
    wait_for(lambda: (upper / "tmp/c").read_text() != a, what="counter to advance")
    assert inspect(jaula, "pz")["State"]["Status"] == "running"


# -- isolation and privileges ----------------------------------------------------------------


def test_namespaces_mounts_and_privileges(jaula: Jaula) -> None:
    jaula.run("run", "-d", "--name", "pv", "--hostname", "box", "busybox", "sleep", "1000")
    run = lambda *a: jaula.out("exec", "pv", *a)
    assert run("hostname").strip() == "box"
    assert run("cat", "/proc/1/status").count("NSpid:\t") == 1
    status = run("cat", "/proc/self/status")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["CapEff"].strip() == "00000000800405fb"  # Podman's default set
    assert fields["CapBnd"].strip() == "00000000800405fb"
    assert fields["NoNewPrivs"].strip() == "1"
    sid = run("cat", "/proc/1/stat").split(")")[1].split()[3]
    assert sid == "1", "the init must be a session leader"
    for masked in ("/proc/keys", "/proc/timer_list", "/proc/kcore"):
        if os.path.exists(masked):  # the host kernel has it: the container sees it empty
            assert run("cat", masked) == ""
            assert f" {masked} " in run("cat", "/proc/mounts")
    for masked in ("/proc/acpi", "/sys/firmware"):  # directories: empty and read-only
        if os.path.isdir(masked) and os.listdir(masked):
            assert run("ls", "-A", masked) == ""
            assert f" {masked} " in run("cat", "/proc/mounts")
            assert jaula.run("exec", "pv", "touch", f"{masked}/x", check=False).returncode != 0
    # the empty dir they are bound from cannot be filled from inside either
    assert jaula.run("exec", "pv", "mkdir", "/dev/.masked/x", check=False).returncode != 0
    assert (
        jaula.run(
            "exec", "pv", "sh", "-c", "echo 1 > /proc/sys/kernel/domainname", check=False
        ).returncode
        != 0
    )
    ifaces = run("ls", "/sys/class/net").split()
    assert ifaces == ["lo"]
    assert (
        "UP" in run("cat", "/sys/class/net/lo/operstate").upper()
        or int(run("cat", "/sys/class/net/lo/flags").strip(), 16) & 1
    )
    mounts = run("cat", "/proc/mounts")
    for mp in (
        " / overlay",
        " /proc proc",
        " /dev tmpfs",
        " /dev/pts devpts",
        " /dev/shm tmpfs",
        " /sys sysfs ro",
    ):
        assert mp in mounts.replace("overlay / overlay", " / overlay"), (mp, mounts)
    for dev in ("null", "zero", "full", "random", "urandom", "tty"):
        assert run("ls", f"/dev/{dev}").strip() == f"/dev/{dev}"


def test_cap_add_drop_privileged_and_user(jaula: Jaula) -> None:
    jaula.run(
        "run",
        "-d",
        "--name",
        "c1",
        "--cap-drop",
        "CHOWN",
        "--cap-add",
        "NET_ADMIN",
        "busybox",
        "sleep",
        "1000",
    )
    eff = int(jaula.out("exec", "c1", "grep", "CapEff", "/proc/self/status").split()[1], 16)
    assert not eff & (1 << 0) and eff & (1 << 12)
    jaula.run("run", "-d", "--name", "c2", "--privileged", "busybox", "sleep", "1000")
    eff = int(jaula.out("exec", "c2", "grep", "CapEff", "/proc/self/status").split()[1], 16)
    assert eff & (1 << 21)  # CAP_SYS_ADMIN
    p = jaula.run("run", "--name", "c3", "-u", "65534:65534", "busybox", "id")
    assert "uid=65534" in p.stdout and "gid=65534" in p.stdout
    p = jaula.run(
        "run",
        "--name",
        "c4",
        "-u",
        "nobody",
        "busybox",
        "sh",
        "-c",
        "grep CapEff /proc/self/status",
    )
    assert p.stdout.split()[1] == "0000000000000000"


def test_env_workdir_network_host_and_volumes(jaula: Jaula, tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "in.txt").write_text("from host\n")
    p = jaula.run(
        "run",
        "--name",
        "v",
        "-e",
        "A=1",
        "-w",
        "/work",
        "-v",
        f"{vol}:/data",
        "busybox",
        "sh",
        "-c",
        "echo $A; pwd; cat /data/in.txt; echo back > /data/out",
    )
    assert p.stdout == "1\n/work\nfrom host\n"
    assert (vol / "out").read_text() == "back\n"
    p = jaula.run(
        "run",
        "--name",
        "ro",
        "-v",
        f"{vol}:/data:ro",
        "busybox",
        "sh",
        "-c",
        "echo x > /data/y",
        check=False,
    )
    assert p.returncode != 0 and not (vol / "y").exists()
    # the host's interfaces, those that stayed while the container looked: other runs of
    # this host (the other make test shard) add and remove bridges and veths meanwhile
    before = set(os.listdir("/sys/class/net"))
    p = jaula.run("run", "--name", "hn", "--network", "host", "busybox", "ls", "/sys/class/net")
    stayed = before & set(os.listdir("/sys/class/net"))
    seen = set(p.stdout.split())
    assert stayed <= seen and "lo" in seen and len(stayed) > 1, (stayed, seen)


# -- filesystem ------------------------------------------------------------------------------


def test_writes_land_in_upperdir_and_containers_are_separate(jaula: Jaula) -> None:
    jaula.run(
        "run",
        "-d",
        "--name",
        "a",
        "busybox",
        "sh",
        "-c",
        "echo A > /tmp/mine; rm /etc/group; exec sleep 1000",
    )
    jaula.run("run", "-d", "--name", "b", "busybox", "sleep", "1000")
    ua = Path(inspect(jaula, "a")["UpperDir"])
    wait_for(lambda: (ua / "tmp/mine").exists(), what="write")
    assert (ua / "tmp/mine").read_text() == "A\n"
    wh = ua / "etc/group"
    wait_for(lambda: wh.exists() or wh.is_char_device(), what="whiteout")
    assert wh.is_char_device() and os.stat(wh, follow_symlinks=False).st_rdev == 0
    assert jaula.run("exec", "b", "cat", "/tmp/mine", check=False).returncode != 0
    assert jaula.run("exec", "b", "cat", "/etc/group").returncode == 0
    img_root = Path(jaula.root) / "layers"
    assert not any(p.name == "mine" for p in img_root.rglob("mine"))


# -- limits ----------------------------------------------------------------------------------


def test_memory_limit_oom_kills(jaula: Jaula) -> None:
    p = jaula.run(
        "run",
        "--name",
        "oom",
        "--memory",
        "32m",
        "busybox",
        "sh",
        "-c",
        "head -c 300000000 /dev/zero | sort > /dev/null",
        check=False,
        timeout=120,
    )
    assert p.returncode != 0
    info = inspect(jaula, "oom")
    assert info["State"]["OOMKilled"] is True
    mem = info["CgroupPaths"].get("memory")
    if mem and Path(mem, "memory.limit_in_bytes").exists():
        assert int(Path(mem, "memory.limit_in_bytes").read_text()) == 32 * 1024 * 1024


def test_pids_limit_refuses_forks(jaula: Jaula) -> None:
    jaula.run(
        "run",
        "-d",
        "--name",
        "pl",
        "--pids-limit",
        "6",
        "busybox",
        "sh",
        "-c",
        "(for i in 1 2 3 4 5 6 7 8 9 10; do sleep 100 & done); exec sleep 1000",
    )
    paths = inspect(jaula, "pl")["CgroupPaths"]
    pids_dir = Path(paths.get("pids") or paths[""])
    wait_for(lambda: "can't fork" in jaula.run("logs", "pl").stderr, what="fork refusals")
    procs = (pids_dir / "cgroup.procs").read_text().split()
    assert 1 < len(procs) <= 6
    assert (pids_dir / "pids.max").read_text().strip() == "6"
    assert inspect(jaula, "pl")["State"]["Status"] == "running"


def test_cpu_limit_written(jaula: Jaula) -> None:
    jaula.run("run", "-d", "--name", "cpu", "--cpus", "0.5", "busybox", "sleep", "1000")
    paths = inspect(jaula, "cpu")["CgroupPaths"]
    cpu = paths.get("cpu") or paths.get("cpu,cpuacct") or paths.get("")
    f = Path(cpu, "cpu.cfs_quota_us")
    if f.exists():
        assert int(f.read_text()) == 50000
    else:
        assert Path(cpu, "cpu.max").read_text().split() == ["50000", "100000"]


# -- bad input: one line, non-zero, nothing left ---------------------------------------------


def _assert_nothing_left(j: Jaula) -> None:
    assert j.container_ids() == []
    assert [m for m in mounts_under(j.root) if "/containers/" in m] == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "nosuchimage", "true"], "not found"),
        (["run", "--memory", "lots", "busybox", "true"], "--memory"),
        (["run", "--memory", "1k", "busybox", "true"], "minimum"),
        (["run", "--cpus", "x", "busybox", "true"], "--cpus"),
        (["run", "--pids-limit", "-5", "busybox", "true"], "--pids-limit"),
        (["run", "busybox", "no-such-command"], "not found"),
        (["run", "-u", "ghost", "busybox", "true"], "ghost"),
        (["run", "-v", "/does/not/exist:/x", "busybox", "true"], "does not exist"),
        (["run", "-w", "/etc/passwd", "busybox", "true"], "working directory"),
        (["run", "--name", "bad name!", "busybox", "true"], "invalid container name"),
        (["exec", "nosuch", "true"], "no such container"),
        (["rm", "nosuch"], "no such container"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(
    jaula: Jaula, args: list[str], message: str
) -> None:
    p = jaula.run(*args, check=False)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], p.stderr
    _assert_nothing_left(jaula)


def test_name_taken(jaula: Jaula) -> None:
    jaula.run("run", "-d", "--name", "dup", "busybox", "sleep", "100")
    p = jaula.run("run", "-d", "--name", "dup", "busybox", "sleep", "100", check=False)
    assert p.returncode == 125 and "already in use" in p.stderr
    assert len(jaula.container_ids()) == 1


def test_rm_running_needs_force(jaula: Jaula) -> None:
    cid = jaula.out("run", "-d", "--name", "r", "busybox", "sleep", "100").strip()
    p = jaula.run("rm", "r", check=False)
    assert p.returncode != 0 and "rm -f" in p.stderr
    jaula.run("rm", "-f", "r")
    assert jaula.container_ids() == [] and cgroup_dirs(cid) == []


def test_not_root_is_refused(
    jaula: Jaula, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The venv's interpreter lives under /root here, which another uid cannot execute, so the
    # uid is faked in-process rather than by running the CLI as another user.
    from runtime import cli

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["--state-root", str(jaula.root), "ps"]) == 125
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs root" in err[0]


def test_cap_drop_all_drops_everything(jaula: Jaula) -> None:
    p = jaula.run(
        "run", "--name", "nocap", "--cap-drop", "ALL", "busybox", "grep", "Cap", "/proc/self/status"
    )
    caps = dict(line.split(":") for line in p.stdout.split("\n") if line)
    assert all(int(caps[k], 16) == 0 for k in ("CapInh", "CapPrm", "CapEff", "CapBnd"))


def test_exit_codes_as_podman(jaula: Jaula, tmp_path: Path) -> None:
    assert jaula.run("run", "busybox", "nosuchcmd", check=False).returncode == 127
    assert jaula.run("run", "busybox", "/etc/passwd", check=False).returncode == 126
    p = jaula.run("run", "--network", "bogus", "busybox", "true", check=False)
    assert p.returncode == 125 and p.stderr.startswith("jaula: error:")
    p = jaula.run("stop", "-t", "abc", "x", check=False)
    assert p.returncode == 125 and len(p.stderr.strip().splitlines()) == 1
    # global options after the command work too
    assert jaula.run("ps", "--state-root", str(jaula.root), check=False).returncode == 0


def test_rm_flag_tail_inspect_array_and_closed_pipe(jaula: Jaula) -> None:
    import subprocess

    p = jaula.run(
        "run",
        "--rm",
        "--name",
        "gone",
        "busybox",
        "sh",
        "-c",
        "for i in 1 2 3 4 5; do echo $i; done",
    )
    assert p.stdout.split() == ["1", "2", "3", "4", "5"]
    assert "gone" not in jaula.out("ps", "-a")
    jaula.run(
        "run", "--name", "five", "busybox", "sh", "-c", "for i in 1 2 3 4 5; do echo $i; done"
    )
    assert jaula.out("logs", "--tail", "2", "five").split() == ["4", "5"]
    jaula.run("run", "-d", "--name", "six", "busybox", "sleep", "100")
    both = json.loads(jaula.out("inspect", "five", "six"))
    assert [i["Name"] for i in both] == ["five", "six"]
    assert both[1]["State"]["Running"] is True and both[0]["State"]["ExitCode"] == 0
    cmd = " ".join(
        [
            *JAULA,
            "--state-root",
            str(jaula.root),
            "inspect",
            "five",
        ]
    )
    r = subprocess.run(
        f"{cmd} | head -c 10",
        shell=True,
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert "Traceback" not in r.stderr


def test_failed_env_leaves_no_directory(jaula: Jaula) -> None:
    p = jaula.run("run", "-e", "=x", "busybox", "true", check=False)
    assert p.returncode == 125 and "-e" in p.stderr
    assert jaula.container_ids() == []
