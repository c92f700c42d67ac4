"""seccomp (issue 16): jaula's default profile denies what it denies, in the init and in
``jaula exec``; ``seccomp=unconfined`` and a profile file change that; a bad profile is refused
in one line with nothing made; and the filter is still in force after ``jaula checkpoint`` +
``jaula restore`` and after a move to another state root (CRIU dumps and restores it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.containers import host_pid, move, stdout_lines, wait_lines
from tests.helpers.jaula import Jaula
from tests.helpers.seccomp_probe import (
    EACCES,
    ENODEV,
    EPERM,
    LOOP,
    ONCE,
    host_seccomp_mode,
    needs_x86_64,
    parse,
)
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, needs_x86_64]
PROBE_LINE = r"^tick \d+ errno \d+ seccomp \d+$"


@pytest.fixture
def py(jaula: Jaula, python_image_layout: Path) -> Jaula:
    jaula.run("image", "import", str(python_image_layout), "--name", "jaula-python:latest")
    return jaula


@pytest.fixture
def py2(jaula2: Jaula, python_image_layout: Path) -> Jaula:
    jaula2.run("image", "import", str(python_image_layout), "--name", "jaula-python:latest")
    return jaula2


def latest(j: Jaula, ref: str, after: int = 0) -> tuple[int, int]:
    """(errno, Seccomp mode) of the first probe line the container printed after line
    ``after`` of its log."""
    return parse(wait_lines(j, ref, PROBE_LINE, after=after)[0])


def test_default_profile_denies_in_init_and_exec(py: Jaula) -> None:
    py.run("run", "-d", "--name", "sc", "jaula-python", "python3", "-c", LOOP)
    assert latest(py, "sc") == (EPERM, 2)
    assert host_seccomp_mode(host_pid(py, "sc")) == 2
    assert parse(py.out("exec", "sc", "python3", "-c", ONCE)) == (EPERM, 2)


def test_unconfined_and_a_profile_file(py: Jaula, tmp_path: Path) -> None:
    out = py.out("run", "--security-opt", "seccomp=unconfined", "jaula-python", "python3",
                 "-c", ONCE)  # fmt: skip
    assert parse(out) == (ENODEV, 0)
    prof = tmp_path / "deny-keys.json"
    prof.write_text(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {"names": ["add_key"], "action": "SCMP_ACT_ERRNO", "errnoRet": EACCES}
                ],
            }
        )
    )
    out = py.out("run", "--security-opt", f"seccomp={prof}", "jaula-python", "python3",
                 "-c", ONCE)  # fmt: skip
    assert parse(out) == (EACCES, 2)
    # --privileged is unconfined, as in Podman
    out = py.out("run", "--privileged", "jaula-python", "python3", "-c", ONCE)
    assert parse(out) == (ENODEV, 0)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", "not valid JSON"),
        ('{"defaultAction": "SCMP_ACT_MAYBE", "syscalls": []}', "unknown action"),
        (
            json.dumps(
                {
                    "defaultAction": "SCMP_ACT_ALLOW",
                    "syscalls": [
                        {
                            "names": ["read"],
                            "action": "SCMP_ACT_ERRNO",
                            "args": [{"index": 9, "value": 1, "op": "SCMP_CMP_EQ"}],
                        }
                    ],
                }
            ),
            "index must be 0..5",
        ),
    ],
)
def test_a_bad_profile_is_refused_in_one_line(
    py: Jaula, tmp_path: Path, text: str, words: str
) -> None:
    prof = tmp_path / "bad.json"
    prof.write_text(text)
    p = py.run("run", "-d", "--security-opt", f"seccomp={prof}", "jaula-python", "true",
               check=False)  # fmt: skip
    assert p.returncode == 125, (p.stdout, p.stderr)
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert words in p.stderr and str(prof) in p.stderr, p.stderr
    assert py.container_ids() == [], "a refused run left a container"
    p = py.run("run", "-d", "--security-opt", "seccomp", "jaula-python", "true", check=False)
    assert p.returncode == 125 and "seccomp=unconfined" in p.stderr, p.stderr


@pytest.mark.criu
@needs_criu
def test_the_filter_survives_checkpoint_restore_and_a_move(
    py: Jaula, py2: Jaula, tmp_path: Path
) -> None:
    py.run("run", "-d", "--name", "scr", "jaula-python", "python3", "-c", LOOP)
    assert latest(py, "scr") == (EPERM, 2)
    pid0 = host_pid(py, "scr")
    py.run("checkpoint", "scr")
    n = len(stdout_lines(py, "scr"))
    py.run("restore", "scr")
    pid1 = host_pid(py, "scr")
    assert pid1 != pid0
    assert host_seccomp_mode(pid1) == 2
    assert latest(py, "scr", after=n) == (EPERM, 2), "the filter is gone after the restore"
    assert parse(py.out("exec", "scr", "python3", "-c", ONCE)) == (EPERM, 2)
    after = move(py, py2, "scr", tmp_path / "scr.tar")
    assert host_seccomp_mode(host_pid(py2, "scr")) == 2
    assert latest(py2, "scr", after=after) == (EPERM, 2), "the filter is gone after the move"
