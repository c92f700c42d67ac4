"""Which namespaces ``jaula exec`` joins: those of the init that differ from the caller's,
in order, user last (runtime.exec_process.namespaces_to_join), on a fake /proc where a
shared namespace is a hard link (same st_dev and st_ino)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime.errors import NamespaceError
from runtime.exec_process import namespaces_to_join


def fake_proc(tmp_path: Path, own: tuple[str, ...], shared: tuple[str, ...]) -> Path:
    """/proc with ``self/ns/<own>``, and pid 7's namespaces: ``shared`` ones hard links to
    self's, the others (of ``own``) distinct files."""
    proc = tmp_path / "proc"
    (proc / "self/ns").mkdir(parents=True)
    (proc / "7/ns").mkdir(parents=True)
    for ns in own:
        (proc / "self/ns" / ns).write_text(ns)
        if ns in shared:
            os.link(proc / "self/ns" / ns, proc / "7/ns" / ns)
        else:
            (proc / "7/ns" / ns).write_text(ns)
    return proc


def test_joins_what_differs_in_order_time_included_user_last(tmp_path: Path) -> None:
    every = ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts")
    proc = fake_proc(tmp_path, every, shared=("cgroup", "net"))
    got = namespaces_to_join(7, str(proc))
    try:
        assert [ns for ns, _ in got] == ["ipc", "uts", "pid", "time", "mnt", "user"]
    finally:
        for _, fd in got:
            os.close(fd)


def test_a_kernel_without_time_namespaces_is_fine(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, ("ipc", "mnt", "pid", "uts", "user"), shared=("user",))
    got = namespaces_to_join(7, str(proc))
    for _, fd in got:
        os.close(fd)
    assert [ns for ns, _ in got] == ["ipc", "uts", "pid", "mnt"]


def test_an_init_that_is_gone_names_the_namespace_and_leaks_no_fd(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, ("ipc", "uts", "pid", "time", "mnt"), shared=())
    (proc / "7/ns/time").unlink()
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(NamespaceError, match=r"time namespace of pid 7 .*/7/ns/time"):
        namespaces_to_join(7, str(proc))
    assert len(os.listdir("/proc/self/fd")) == before
