"""User namespaces (``--userns=auto``, ``--uidmap``; issue 16) with real containers.

Root in the container is an unprivileged host uid (``/proc/PID/status``), what it writes
lands in the upperdir with the mapped host ids, the image's files are seen as the
container's own through id-mapped layers, two auto containers get disjoint ranges, exec
joins the user namespace, and a checkpoint + restore keeps the mapping.  Bad input is
refused in one line with exit 125 and nothing left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from runtime.userns import AUTO_FIRST, AUTO_SIZE
from tests.helpers.containers import host_pid, inspect
from tests.helpers.jaula import Jaula
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root]


def _ids(pid: int) -> tuple[int, int]:
    """(real uid, real gid) of host ``pid`` from /proc/PID/status."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0])


def _uid_map(pid: int) -> list[list[int]]:
    return [
        list(map(int, line.split()))
        for line in Path(f"/proc/{pid}/uid_map").read_text().splitlines()
    ]


def _start(j: Jaula, name: str, *flags: str) -> int:
    j.run("run", "-d", "--name", name, *flags, "busybox", "sleep", "1000")
    return host_pid(j, name)


def test_auto_maps_root_to_a_high_uid_and_files_to_the_mapped_ids(jaula: Jaula) -> None:
    pid = _start(jaula, "a", "--userns=auto")
    uid, gid = _ids(pid)
    assert uid >= AUTO_FIRST and gid == uid, (uid, gid)
    assert _uid_map(pid) == [[0, uid, AUTO_SIZE]]
    assert jaula.out("exec", "a", "id").startswith("uid=0(root) gid=0(root)")
    # the image's files are root's inside (id-mapped layers), writable by it
    assert jaula.out("exec", "a", "stat", "-c", "%u:%g", "/etc/passwd").strip() == "0:0"
    jaula.out("exec", "a", "sh", "-c", "echo x >> /etc/passwd && touch /made && "
              "mkdir /d && chown 5:6 /d")  # fmt: skip
    upper = Path(inspect(jaula, "a")["UpperDir"])
    for rel, want in (("made", (uid, gid)), ("d", (uid + 5, gid + 6)), ("etc/passwd", (uid, gid))):
        st = os.stat(upper / rel)
        assert (st.st_uid, st.st_gid) == want, (rel, st.st_uid, st.st_gid)
    # exec joins the user namespace too
    exec_pid = jaula.out("exec", "a", "sh", "-c", "cat /proc/self/status | grep ^Uid")
    assert exec_pid.split()[1] == "0"


def test_two_auto_containers_get_disjoint_ranges(jaula: Jaula) -> None:
    a, b = _start(jaula, "a", "--userns=auto"), _start(jaula, "b", "--userns=auto")
    (ua, _), (ub, _) = _ids(a), _ids(b)
    assert abs(ua - ub) >= AUTO_SIZE, (ua, ub)
    held = json.loads((jaula.root / "idranges.json").read_text())
    assert len(held) == 2
    jaula.run("rm", "-f", "a")
    held = json.loads((jaula.root / "idranges.json").read_text())
    assert list(held) == [inspect(jaula, "b")["Id"]]


def test_uidmap_as_given(jaula: Jaula) -> None:
    pid = _start(jaula, "m", "--uidmap", "0:300000:1000", "--uidmap", "1000:400000:10")
    assert _ids(pid) == (300000, 300000)
    assert _uid_map(pid) == [[0, 300000, 1000], [1000, 400000, 10]]
    assert jaula.out("exec", "m", "id", "-u").strip() == "0"


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (("--uidmap", "0:100000:10", "--uidmap", "5:200000:10"), "overlap"),
        (("--uidmap", "0:100000"), "CONTAINER:HOST:SIZE"),
        (("--userns=keep-id",), "host and auto"),
        (("--userns=auto", "--network", "host"), "--network host"),
    ],
)
def test_bad_userns_input_is_refused_in_one_line(
    jaula: Jaula, flags: tuple[str, ...], words: str
) -> None:
    p = jaula.run("run", "-d", *flags, "busybox", "true", check=False)
    assert p.returncode == 125, p
    assert words in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert jaula.container_ids() == []


@needs_criu
def test_checkpoint_and_restore_keep_the_mapping(jaula: Jaula) -> None:
    pid = _start(jaula, "c", "--userns=auto")
    before = _ids(pid)
    jaula.out("exec", "c", "touch", "/before")
    jaula.run("checkpoint", "c")
    jaula.run("restore", "c")
    pid = host_pid(jaula, "c")
    assert _ids(pid) == before
    assert _uid_map(pid) == [[0, before[0], AUTO_SIZE]]
    assert jaula.out("exec", "c", "stat", "-c", "%u", "/before").strip() == "0"
    jaula.out("exec", "c", "touch", "/after")
    st = os.stat(Path(inspect(jaula, "c")["UpperDir"]) / "after")
    assert st.st_uid == before[0]
