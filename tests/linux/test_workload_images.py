"""The workload images (python, redis, memory) imported into a fresh state root and run
through the real ``jaula`` CLI: the interpreter and its stdlib work, the shared-case
programs start and report OK, redis answers over its socket, memhog touches its memory and
verifies it on SIGUSR1 (and notices a page changed behind its back)."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.containers import host_pid, wait_for
from tests.helpers.images import REPO_ROOT, SHARED_CASES, ref_name, tools_missing
from tests.helpers.jaula import Jaula

pytestmark = pytest.mark.root

STDLIB_MODULES = (
    "mmap, fcntl, os, signal, struct, hashlib, json, socket, threading, "
    "multiprocessing.shared_memory, select, time"
)


def wait_log(j: Jaula, ref: str, pattern: str, timeout: float = 15.0) -> str:
    """The container's log once it matches ``pattern`` (a regex)."""

    def matched() -> str:
        log = j.out("logs", ref)
        return log if re.search(pattern, log) else ""

    try:
        return wait_for(matched, timeout, f"{pattern!r} in the log of {ref}")
    except AssertionError as e:
        raise AssertionError(f"{e}; log so far:\n{j.out('logs', ref)}") from None


@pytest.fixture
def py(jaula: Jaula, python_image_layout: Path) -> Jaula:
    jaula.run("image", "import", str(python_image_layout), "--name", "jaula-python:latest")
    return jaula


@pytest.fixture
def redis(jaula: Jaula, redis_image_layout: Path) -> Jaula:
    jaula.run("image", "import", str(redis_image_layout), "--name", "jaula-redis:latest")
    return jaula


@pytest.fixture
def mem(jaula: Jaula, memory_image_layout: Path) -> Jaula:
    jaula.run("image", "import", str(memory_image_layout), "--name", "jaula-mem:latest")
    return jaula


# -- python ---------------------------------------------------------------------------------


def test_python_imports_the_stdlib_and_writes_no_bytecode(py: Jaula) -> None:
    p = py.run(
        "run", "--name", "py", "jaula-python", "sh", "-c",
        f"python3 -c \"import {STDLIB_MODULES}; print('ok')\" && "
        "find /usr/lib/python3.11 -name __pycache__ | wc -l",
    )  # fmt: skip
    assert p.stdout.split() == ["ok", "0"], p.stderr
    version = py.out("run", "--name", "v", "jaula-python", "python3", "-c",
                     "import sys; print(sys.executable, sys.prefix, sys.version_info[:2])")  # fmt: skip
    assert version.strip() == "/usr/bin/python3 /usr (3, 11)"


def test_shared_cases_are_in_the_image(py: Jaula) -> None:
    cases = sorted(d.name for d in SHARED_CASES.glob("C*") if d.is_dir())
    assert py.out("run", "--name", "ls", "jaula-python", "ls", "/opt/cases").split() == cases
    scripts = sorted(f"/opt/cases/{p.parent.name}/{p.name}" for p in SHARED_CASES.glob("C*/*.py"))
    check = "import ast, sys; [ast.parse(open(f).read(), f) for f in sys.argv[1:]]; print('parsed')"
    assert py.out("run", "--name", "ast", "jaula-python", "python3", "-c", check, *scripts) == (
        "parsed\n"
    )
    for sh in sorted(SHARED_CASES.glob("C*/*.sh")):
        py.run("run", "--name", f"n-{sh.stem}", "jaula-python", "sh", "-n",
               f"/opt/cases/{sh.parent.name}/{sh.name}")  # fmt: skip


def test_c05_deleted_open_runs_on_upper_and_lower_files(py: Jaula) -> None:
    py.run("run", "-d", "--name", "c05", "jaula-python", "/opt/cases/C05/deleted_open")
    py.run("run", "-d", "--name", "c05-lower", "jaula-python", "/opt/cases/C05/deleted_open",
           "/opt/cases/C05/deleted_open.c")  # fmt: skip
    upper = wait_log(py, "c05", r"(?m)^OK sum=")
    lower = wait_log(py, "c05-lower", r"(?m)^OK sum=")
    assert "deleted /tmp/c05.data size=3145728" in upper
    assert "deleted /opt/cases/C05/deleted_open.c" in lower
    for log in (upper, lower):
        assert "FAIL" not in log
        want = re.search(r"sum=([0-9a-f]+)", log.splitlines()[0])
        assert want and f"OK sum={want.group(1)}" in log
    py.run("exec", "c05", "test", "!", "-e", "/tmp/c05.data")
    py.run("exec", "c05-lower", "test", "!", "-e", "/opt/cases/C05/deleted_open.c")


def test_c07_sysv_shm_lives_in_the_containers_ipc_namespace(py: Jaula) -> None:
    py.run("run", "-d", "--name", "c07", "jaula-python", "/opt/cases/C07/sysv_shm")
    log = wait_log(py, "c07", r"counter=20 ")
    assert log.startswith("key=0xc07 ") and "FAIL" not in log
    rows = py.out("exec", "c07", "cat", "/proc/sysvipc/shm").splitlines()
    header, segments = rows[0].split(), [dict(zip(rows[0].split(), r.split())) for r in rows[1:]]
    assert "key" in header
    # Only the workload's segment: the container has an IPC namespace of its own.
    assert [(s["key"], s["size"], s["nattch"]) for s in segments] == [("3079", "1048576", "2")]


# -- redis ----------------------------------------------------------------------------------


def test_redis_answers_ping_set_get_dbsize(redis: Jaula) -> None:
    redis.run("run", "-d", "--network", "none", "--name", "r", "jaula-redis")
    wait_for(lambda: redis.run("exec", "r", "redis-cli", "ping", check=False).stdout == "PONG\n",
             what="redis PONG")  # fmt: skip
    assert redis.out("exec", "r", "redis-cli", "dbsize") == "0\n"
    assert redis.out("exec", "r", "redis-cli", "set", "k", "v1") == "OK\n"
    assert redis.out("exec", "r", "redis-cli", "get", "k") == "v1\n"
    assert redis.out("exec", "r", "redis-cli", "dbsize") == "1\n"
    redis.run("stop", "-t", "5", "r")
    assert re.search(r"Exited \(0\).*\br$", redis.out("ps", "-a"), re.MULTILINE)
    assert "Ready to accept connections" in redis.out("logs", "r")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_redis_on_the_host_network_listens_on_loopback(redis: Jaula) -> None:
    port = free_port()
    redis.run("run", "-d", "--network", "host", "--name", "rh", "jaula-redis", "redis-server",
              "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")  # fmt: skip

    def ping() -> bytes:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64)
        except OSError:
            return b""

    assert wait_for(ping, what=f"redis on 127.0.0.1:{port}") == b"+PONG\r\n"
    redis.run("stop", "-t", "5", "rh")
    assert ping() == b""


# -- memory ---------------------------------------------------------------------------------

MEMHOG = "/opt/workloads/memhog.py"


def test_memhog_ready_verify_heartbeat_and_clean_stop(mem: Jaula) -> None:
    mem.run("run", "-d", "--name", "m", "jaula-mem", "python3", MEMHOG, "16",
            "--dirty-pct", "10", "--heartbeat", "/tmp/hb")  # fmt: skip
    assert re.search(r"(?m)^READY 1$", wait_log(mem, "m", r"READY"))
    time.sleep(0.3)
    mem.run("kill", "-s", "USR1", "m")
    first = int(re.findall(r"VERIFY OK (\d+)", wait_log(mem, "m", r"VERIFY"))[0])
    assert first >= 1
    beat = float(mem.out("exec", "m", "cat", "/tmp/hb"))
    assert abs(beat - time.time()) < 5
    time.sleep(0.3)
    assert float(mem.out("exec", "m", "cat", "/tmp/hb")) > beat
    mem.run("kill", "-s", "USR1", "m")
    log = wait_log(mem, "m", r"VERIFY OK \d+\n.*VERIFY")
    assert "FAIL" not in log
    assert int(re.findall(r"VERIFY OK (\d+)", log)[1]) > first
    mem.run("stop", "-t", "5", "m")  # SIGTERM: exits 0 with the heartbeat thread running
    assert re.search(r"Exited \(0\).*\bm$", mem.out("ps", "-a"), re.MULTILINE)


def test_memhog_default_command_runs(mem: Jaula) -> None:
    mem.run("run", "-d", "--name", "m64", "jaula-mem")
    wait_log(mem, "m64", r"READY 1")
    mem.run("kill", "-s", "USR1", "m64")
    assert "VERIFY OK" in wait_log(mem, "m64", r"VERIFY")


def _find_page0(pid: int, mib: int) -> int:
    """Address of memhog's mapping in ``pid``: page 0 is header (0, 0) + the start of R."""
    page0 = struct.pack("<QQ", 0, 0) + hashlib.shake_256(b"jaula-memhog").digest(64)
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as m:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if fields[1] != "rw-p" or len(fields) > 5 or end - start < mib << 20:
                continue
            m.seek(start)
            at = m.read(end - start).find(page0)
            if at >= 0 and at % 4096 == 0:
                return start + at
    raise AssertionError(f"no memhog mapping in /proc/{pid}/maps")


def test_memhog_notices_a_page_changed_behind_its_back(mem: Jaula) -> None:
    mem.run("run", "-d", "--name", "mc", "jaula-mem", "python3", MEMHOG, "8")
    wait_log(mem, "mc", r"READY")
    pid = host_pid(mem, "mc")
    addr = _find_page0(pid, 8)
    with open(f"/proc/{pid}/mem", "r+b") as m:  # one byte in the body of page 5
        m.seek(addr + 5 * 4096 + 100)
        byte = m.read(1)
        m.seek(addr + 5 * 4096 + 100)
        m.write(bytes([byte[0] ^ 0xFF]))
    mem.run("kill", "-s", "USR1", "mc")
    assert re.search(r"VERIFY FAIL \d+ bad_pages=1 first=\[5\]", wait_log(mem, "mc", "VERIFY"))


# -- builder CLI ----------------------------------------------------------------------------


def test_builder_cli_prints_the_layout(tmp_path: Path) -> None:
    reason = tools_missing()
    if reason is not None:
        pytest.skip(reason)
    p = subprocess.run(
        [sys.executable, "-m", "tests.helpers.images", "busybox", str(tmp_path), "--name", "bb:1"],
        capture_output=True, text=True, cwd=REPO_ROOT, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    layout = Path(p.stdout.strip())
    assert layout == tmp_path / "layout" and ref_name(layout) == "bb:1"
