"""CRIU's own zdtm static tests, each through a jaula migration and through plain CRIU.

A zdtm static test (``test/zdtm/static/*.c`` in CRIU's source) prepares some state a process
can hold (a socket, a mapping, a timer, a zombie...), daemonizes, waits for SIGTERM and then
checks that state itself: its verdict is the last line of its ``.out`` file (``PASS`` among
its words, as ``zdtm.py``'s ``zdtm_test.stop`` reads it).  For every test of
:data:`TESTS_FILE` this runner does, in one run:

* **plain CRIU** (zdtm.py's ``h`` flavour): the test started on this host in its own
  directory as ``make TEST.pid`` starts it (``./TEST --pidfile=TEST.pid --outfile=TEST.out
  [--filename=TEST.test | --dirname=...]``); ``criu dump -t PID`` with the ``opts`` and
  ``dopts`` of its ``.desc`` (and ``--timeout 10``, as zdtm.py); wait for the task to die;
  ``criu restore --restore-detached`` with ``opts`` and ``ropts``; SIGTERM; the verdict;
* **jaula, each strategy** (``cold``, ``postcopy``): two node services on 127.0.0.1
  (:class:`benchmarks.systems.jaula.JaulaCluster`: ``jaula cluster init`` files, ``jaula
  node serve``); the test started in a container on node1 (``jaula run -d --privileged
  jaula-zdtm /zdtm/run TEST ARGS``, image :func:`tests.helpers.images.build_zdtm_image`);
  ``jaula migrate NAME node2 --strategy S``; ``jaula exec NAME kill -TERM PID`` wherever it
  runs then; the verdict, read through ``/proc/<init>/root``.  A migration that fails is
  classed by where it stopped (``migration aborted during PHASE`` in the error): before the
  freeze (preflight, precopy) it is *refused*, after it *rolled back*; either way the test is
  then signalled on node1 and must still pass there.

Outcomes (a cell of the table): ``pass``; ``FAIL`` (the test's own verdict, after the
restore); ``refused`` (jaula: before the freeze; plain: ``criu dump`` failed and the task
went on); ``rolled back`` (jaula only: failed after the freeze, running again on node1);
``dump failed`` / ``restore failed`` (plain CRIU); ``lost`` (running nowhere); ``stuck``
(a command ran past its time limit); ``start failed``; ``error`` (the runner's own trouble).
The goal, per test and strategy: jaula passes every test plain CRIU passes, and refuses
every other one (``refused``, with the test still passing on node1); a test that does not
even start on the host (or that the runner could not run) has no baseline and is not
judged.  Containers run ``--privileged`` (every capability, nothing masked) because the
plain run has root's capabilities too: a difference in the table is then the migration's,
not the container's permissions.

The tests run as root: zdtm runs most tests under uid 18943, but CRIU then needs
CAP_SYS_RESOURCE to read the task's rlimits, and a host without it (this one) would fail
them all; with it, ``--test-uids`` runs them as zdtm does.

Build (once, cached): CRIU's ``test/zdtm`` is copied from the source tree ``make setup``
unpacks (``.build/criu-src/criu-<version>/``) to ``.build/zdtm/``, and the tests of the list
are built there with ``LDFLAGS=-static`` so that they run in a busybox image.

Output: ``results/zdtm-<date>[.N]/`` with ``report.md`` (the side-by-side table: test, plain
CRIU, jaula cold, jaula postcopy, the error line; then the totals; also printed),
``results.jsonl`` (one line per test, written as it ends) and the logs of failed runs.
A progress bar on a terminal, quiet otherwise.  The exit code is 0 when jaula met the goal
on every test run, 1 when not, 2 when the run could not start.

Usage: ``.venv/bin/python -m benchmarks.zdtm [--tests a,b] [--strategies cold,postcopy]
[--limit N] [--no-plain] [--out DIR]`` (root; ``make zdtm``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmarks.util import RunError, one_line, run_cmd, tail
from benchmarks.workloads import Image

REPO = Path(__file__).resolve().parents[1]
TESTS_FILE = Path(__file__).with_name("zdtm_tests.toml")
BUILD_DIR = REPO / ".build" / "zdtm"
CRIU_SRC = REPO / ".build" / "criu-src"
IMAGE_NAME = "jaula-zdtm:latest"
STRATEGIES = ("cold", "postcopy")
JAULA_COLUMNS = {"cold": "jaula cold", "postcopy": "jaula postcopy"}
# zdtm.py's zdtm_test.start: the uid/gids a non-suid test switches to
TEST_UIDS = {"ZDTM_UID": "18943", "ZDTM_GID": "58467", "ZDTM_GROUPS": "27495 48244"}
CAP_SYS_RESOURCE = 24
START_TIMEOUT_S = 30.0
VERDICT_TIMEOUT_S = 30.0
MIGRATE_TIMEOUT_S = 150.0
CRIU_TIMEOUT_S = 120.0
RM_TIMEOUT_S = 60.0
# the phases of a migration after which the container is frozen (migrate.protocol.SourcePhase)
AFTER_FREEZE = ("freeze", "dump", "transfer", "restore")

PASS = "pass"
FAIL = "FAIL"
REFUSED = "refused"
ROLLED_BACK = "rolled back"
DUMP_FAILED = "dump failed"
RESTORE_FAILED = "restore failed"
LOST = "lost"
STUCK = "stuck"
START_FAILED = "start failed"
ERROR = "error"
SKIPPED = "skipped"


# --- the test list ----------------------------------------------------------------------


@dataclass(frozen=True)
class TestList:
    """:data:`TESTS_FILE`: ``run`` (the tests ``make zdtm`` runs, in order), ``sample`` (the
    quick ones of ``tests/integration/test_zdtm_sample.py``) and ``excluded`` (test ->
    why it is not run)."""

    run: tuple[str, ...]
    sample: tuple[str, ...]
    sample_postcopy: tuple[str, ...]
    excluded: dict[str, str]


def load_test_list(path: Path = TESTS_FILE) -> TestList:
    """Read the test list.  Raises ``ValueError`` naming the file and the test that is both
    run and excluded, or a sample test that is not run."""
    data = tomllib.loads(path.read_text())
    run = tuple(data["run"]["tests"])
    excluded: dict[str, str] = {}
    for group in data.get("excluded", []):
        for t in group["tests"]:
            excluded[t] = str(group["reason"])
    sample = tuple(data["sample"]["tests"])
    sample_postcopy = tuple(data["sample"]["postcopy"])
    both = sorted(set(run) & set(excluded))
    if both:
        raise ValueError(f"{path}: {', '.join(both)} both run and excluded: keep one")
    stray = sorted((set(sample) | set(sample_postcopy)) - set(run))
    if stray:
        raise ValueError(f"{path}: sample tests {', '.join(stray)} are not in [run]: add them")
    return TestList(run, sample, sample_postcopy, excluded)


@dataclass(frozen=True)
class ZdtmTest:
    """One built test: its name, the argv ``make NAME.pid`` starts it with (``./NAME`` first,
    relative to its directory) and its ``.desc`` (zdtm's descriptor: ``flags``, ``opts``,
    ``dopts``, ``ropts``, ``feature``, ``timeout``...)."""

    name: str
    argv: tuple[str, ...]
    desc: dict[str, Any] = field(default_factory=dict)

    def flag(self, flag: str) -> bool:
        return flag in str(self.desc.get("flags", "")).split()

    def criu_opts(self, which: str) -> list[str]:
        """``opts`` plus ``dopts`` (``which="dump"``) or ``ropts`` (``"restore"``)."""
        extra = self.desc.get("dopts" if which == "dump" else "ropts", "")
        return [*str(self.desc.get("opts", "")).split(), *str(extra).split()]

    @property
    def timeout_s(self) -> float:
        return float(self.desc.get("timeout") or START_TIMEOUT_S)


def read_desc(path: Path) -> dict[str, Any]:
    """A test's ``.desc`` (a Python dict literal; zdtm.py evals it): ``{}`` when there is
    none.  Raises ``ValueError`` for one that is code rather than a literal."""
    if not path.is_file() or path.stat().st_size == 0:
        return {}
    try:
        desc = ast.literal_eval(path.read_text())
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"{path}: not a literal dict ({e})") from e
    if not isinstance(desc, dict):
        raise ValueError(f"{path}: not a dict")  # noqa: TRY004 - one error type for bad files
    return desc


# --- building ----------------------------------------------------------------------------


def criu_source(root: Path = CRIU_SRC) -> Path:
    """The CRIU source tree ``make setup`` unpacked (``criu-<version>`` under ``root``).
    Raises ``RunError`` when there is none."""
    trees = (
        sorted(d for d in root.glob("criu-*") if (d / "test/zdtm/static/Makefile").is_file())
        if root.is_dir()
        else []
    )
    plain = [d for d in trees if re.fullmatch(r"criu-[0-9.]+", d.name)]
    if not (plain or trees):
        raise RunError(f"no CRIU source tree with test/zdtm under {root}: run `make setup`")
    return (plain or trees)[-1]


def build_tests(
    names: Sequence[str], build_dir: Path = BUILD_DIR, src: Path | None = None
) -> tuple[dict[str, ZdtmTest], dict[str, str]]:
    """Build ``names`` statically in ``build_dir`` (a copy of the source's ``test/zdtm``,
    made once) and return (name -> test, name -> why it could not be built).  ``make -k``:
    one test that does not build leaves the others alone."""
    static = build_dir / "static"
    if not (static / "Makefile").is_file():
        source = (src or criu_source()) / "test" / "zdtm"
        if build_dir.exists():
            shutil.rmtree(build_dir)
        build_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, build_dir, symlinks=True)
    env = {**os.environ, "LDFLAGS": "-static", "MAKEFLAGS": ""}
    rc, out, err, _ = run_cmd(["make", "-C", str(build_dir / "lib"), "-j2"], 600, env)
    if rc != 0:
        raise RunError(f"building zdtm's lib failed: {tail(err or out)}")
    todo = [n for n in names if not (static / n).is_file()]
    if todo:
        run_cmd(["make", "-C", str(static), "-k", "-j2", *todo], 1800, env)
    tests: dict[str, ZdtmTest] = {}
    broken: dict[str, str] = {}
    for n in names:
        if not (static / n).is_file():
            broken[n] = f"does not build here (make -C {static} {n})"
            continue
        try:
            desc = read_desc(static / f"{n}.desc")
            tests[n] = ZdtmTest(n, start_argv(static, n), desc)
        except (ValueError, RunError) as e:
            broken[n] = str(e)
    return tests, broken


def start_argv(static: Path, name: str) -> tuple[str, ...]:
    """The command ``make NAME.pid`` runs (``make -n``), cached in ``NAME.argv``."""
    cache = static / f"{name}.argv"
    if cache.is_file():
        return tuple(json.loads(cache.read_text()))
    argv = ["make", "--no-print-directory", "-s", "-n", f"{name}.pid"]
    _rc, out, err, _ = run_cmd(argv, 120, {**os.environ, "MAKEFLAGS": ""}, static)
    for line in out.splitlines():
        words = line.split()
        if words and words[0] == f"./{name}":
            cache.write_text(json.dumps(words))
            return tuple(words)
    raise RunError(f"make -n {name}.pid names no ./{name} command: {tail(err or out, 200)}")


def makefile_tests(static: Path) -> set[str]:
    """Every test ``static/Makefile`` names (``TST_NOFILE``, ``TST_FILE``, ``TST_DIR``,
    ``TST_DIR_FILE``, ``TST``, ``TST_STATE``, also those added under a condition)."""
    text = (static / "Makefile").read_text()
    names: set[str] = set()
    var = r"^\s*(?:TST|TST_NOFILE|TST_FILE|TST_DIR|TST_DIR_FILE|TST_STATE)\s*[:+]?="
    for m in re.finditer(var + r"((?:.*\\\n)*.*)", text, re.MULTILINE):
        words = m[1].replace("\\\n", " ").split()
        names |= {w for w in words if not w.startswith(("#", "$"))}
    return names


def criu_features(names: Iterable[str], criu: str = "criu") -> dict[str, bool]:
    """``criu check --feature F`` for each feature (as zdtm.py's ``criu.check``)."""
    out = {}
    for f in sorted(set(names)):
        rc, _o, _e, _w = run_cmd([criu, "check", "--no-default-config", "--feature", f], 60)
        out[f] = rc == 0
    return out


def have_cap(cap: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


# --- one run's result --------------------------------------------------------------------


@dataclass
class Result:
    """One cell: ``outcome`` (see the module docstring), ``error`` (one line: why, when not
    ``pass``), ``seconds`` (wall time of the run) and ``log`` (where the run's files were
    kept, when it failed)."""

    outcome: str
    error: str = ""
    seconds: float = 0.0
    log: str = ""


def verdict_line(out_text: str) -> tuple[bool, str]:
    """(passed, the last line) of a test's ``.out`` (zdtm.py: ``PASS`` among the words of
    its last line)."""
    lines = [ln for ln in out_text.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    return "PASS" in last.split(), last


# CRIU logs these as errors and goes on (a host without CAP_SYS_RESOURCE)
BENIGN_ERRORS = ("Can't setup RLIMIT_NOFILE for self",)


def first_error(text: str) -> str:
    """The first ``Error``/``BUG`` line of a CRIU log (but :data:`BENIGN_ERRORS`) without
    its timestamp prefix, else the last non-empty line."""
    for ln in text.splitlines():
        if any(b in ln for b in BENIGN_ERRORS):
            continue
        if "Error (" in ln or " BUG " in ln or ln.startswith("Error"):
            return re.sub(r"^\(\s*[0-9.]+\)\s*", "", ln).strip()
    rest = [ln for ln in text.splitlines() if ln.strip()]
    return rest[-1].strip() if rest else ""


def wait_path(path: Callable[[], Path | None], timeout_s: float) -> Path | None:
    """Poll until ``path()`` names an existing file; ``None`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        p = path()
        if p is not None and p.exists():
            return p
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def pid_exists(pid: int) -> bool:
    """Whether ``pid`` is taken (a zombie still holds its pid: CRIU cannot restore a task
    with it until its parent reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while pid_exists(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- plain CRIU ----------------------------------------------------------------------------


class PlainCriu:
    """The ``h`` flavour of zdtm.py: the test on this host, ``criu dump`` and ``criu
    restore`` by hand, the test and CRIU in the same namespaces, but for the network: each
    run has a network namespace of its own (loopback up; held by an ``unshare --net sleep``
    this runner starts), so that CRIU's network lock and the tests' sockets never touch the
    host's.  Every run in ``work/plain/NAME``; kills only the test's own session (the test
    calls setsid, so its process group is its pid) and the holder."""

    ns: list[str]

    def __init__(
        self, work: Path, static: Path, env: dict[str, str], logs: Path, criu: str = "criu"
    ) -> None:
        self.work = work
        self.static = static
        self.env = env
        self.logs = logs
        self.criu = criu

    def run(self, t: ZdtmTest) -> Result:
        t0 = time.monotonic()
        d = self.work / "plain" / t.name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        os.chmod(d, 0o1777)
        shutil.copy2(self.static / t.name, d / t.name)
        pids: list[int] = []
        holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "86400"])
        try:
            self.ns = ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--"]
            res = self._in_netns(holder.pid) or self._run(t, d, pids)
        finally:
            for pid in pids:
                _kill_session(pid, d)
            holder.kill()
            holder.wait()
        res.seconds = round(time.monotonic() - t0, 2)
        if res.outcome != PASS:
            keep = self.logs / f"plain-{t.name}"
            keep.mkdir(parents=True, exist_ok=True)
            for f in [*d.glob("*.log"), *d.glob("*.out*"), *d.glob("img/*.log")]:
                shutil.copyfile(f, keep / f.name)
            res.log = str(keep)
        shutil.rmtree(d, ignore_errors=True)
        return res

    def _run(self, t: ZdtmTest, d: Path, pids: list[int]) -> Result:
        env = {**self.env, **({} if t.flag("suid") else self._uids())}
        with open(d / "test.log", "wb") as log:
            try:
                p = subprocess.run(
                    [*self.ns, *t.argv], cwd=d, env=env, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=log, timeout=t.timeout_s, check=False,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                return Result(START_FAILED, f"did not daemonize in {t.timeout_s:.0f} s")
        pidfile = d / f"{t.name}.pid"
        if p.returncode != 0 or not pidfile.is_file():
            said = _read(d / f"{t.name}.out") + _read(d / f"{t.name}.out.inprogress")
            why = (
                verdict_line(said)[1] or tail(_read(d / "test.log"), 200) or f"exit {p.returncode}"
            )
            return Result(START_FAILED, one_line(why))
        pid = int(pidfile.read_text().strip())
        pids.append(pid)
        img = d / "img"
        img.mkdir()
        rc, out, err = self._criu("dump", img, ["-t", str(pid), "--timeout", "10",
                                                *t.criu_opts("dump")])  # fmt: skip
        if rc is None:
            return Result(STUCK, f"criu dump ran past {CRIU_TIMEOUT_S:.0f} s")
        if rc != 0:
            why = first_error(_read(img / "dump.log")) or tail(err or out, 200)
            # the task should go on after a failed dump: its verdict says whether it did
            ok, line = self._verdict(t, d, pid)
            return Result(REFUSED if ok else DUMP_FAILED, one_line(why if ok else f"{why}; {line}"))
        if not wait_gone(pid, 10):
            return Result(DUMP_FAILED, f"the dumped task {pid} still runs")
        pidfile.unlink(missing_ok=True)
        rc, out, err = self._criu("restore", img, ["--restore-detached", "--pidfile",
                                                   str(pidfile), *t.criu_opts("restore")])  # fmt: skip
        if rc is None:
            return Result(STUCK, f"criu restore ran past {CRIU_TIMEOUT_S:.0f} s")
        if rc != 0 or not pidfile.is_file():
            return Result(RESTORE_FAILED, one_line(first_error(_read(img / "restore.log"))))
        pid = int(pidfile.read_text().strip())
        pids.append(pid)
        ok, line = self._verdict(t, d, pid)
        return Result(PASS) if ok else Result(FAIL, one_line(line))

    def _uids(self) -> dict[str, str]:
        return TEST_UIDS if self.env.get("JAULA_ZDTM_UIDS") == "1" else {}

    def _in_netns(self, holder: int) -> Result | None:
        """Wait for ``holder``'s own network namespace and bring its loopback up; a
        :class:`Result` saying why not, or ``None``."""
        mine = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while True:
            try:
                if os.readlink(f"/proc/{holder}/ns/net") != mine:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                return Result(ERROR, "unshare --net did not make a network namespace")
            time.sleep(0.01)
        rc, out, err, _ = run_cmd([*self.ns, "ip", "link", "set", "lo", "up"], 30)
        return Result(ERROR, f"ip link set lo up: {tail(err or out, 200)}") if rc else None

    def _criu(self, action: str, img: Path, args: list[str]) -> tuple[int | None, str, str]:
        argv = [*self.ns, self.criu, action, "-D", str(img), "-o", f"{action}.log", "-v4", *args]
        try:
            rc, out, err, _ = run_cmd(argv, CRIU_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None, "", ""
        return rc, out, err

    def _verdict(self, t: ZdtmTest, d: Path, pid: int) -> tuple[bool, str]:
        with _quiet():
            os.kill(pid, signal.SIGTERM)
        out = wait_path(lambda: d / f"{t.name}.out", VERDICT_TIMEOUT_S)
        if out is None:
            inprog = _read(d / f"{t.name}.out.inprogress")
            return False, f"no verdict in {VERDICT_TIMEOUT_S:.0f} s: {verdict_line(inprog)[1]}"
        time.sleep(0.05)  # renamed when complete; a short grace for the last write
        return verdict_line(_read(out))


def _kill_session(pid: int, d: Path) -> None:
    """SIGKILL the session ``pid`` leads if it is still our test's: its leader alive with
    its working directory in ``d`` (a pid is not reused while its group lives)."""
    try:
        if os.getsid(pid) != pid or not Path(os.readlink(f"/proc/{pid}/cwd")).is_relative_to(d):
            return
        os.killpg(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], ProcessLookupError | PermissionError)  # type: ignore[arg-type]


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except OSError:
        return ""


# --- jaula -------------------------------------------------------------------------------


class JaulaZdtm:
    """The tests in jaula containers on a :class:`JaulaCluster`, migrated node1 -> node2."""

    def __init__(
        self, cluster: Any, env: dict[str, str], logs: Path, privileged: bool = True
    ) -> None:
        self.c = cluster
        self.env = env
        self.privileged = privileged
        self.logs = logs

    def _jaula(self, node: str, *args: str, timeout_s: float = 120) -> tuple[int | None, str]:
        try:
            rc, out, err, _ = run_cmd([*self.c.local(node), *args], timeout_s)
        except subprocess.TimeoutExpired:
            return None, f"jaula {args[0]} ran past {timeout_s:.0f} s"
        return rc, (out if rc == 0 else err or out)

    def _containers(self, node: str) -> dict[str, tuple[str, int]]:
        """name -> (status, init's host pid) on ``node``, read from its state root (in
        this process: the CLI costs a second an answer on a busy machine)."""
        from runtime.container import Runtime

        out = {}
        for c in Runtime(self.c.state_root(node)).list(all=True):
            self.c.seen_ids.add(c.id)
            out[c.name] = (c.status.value, c.state.pid)
        return out

    def _init_pid(self, node: str, name: str) -> int | None:
        status, pid = self._containers(node).get(name, ("", 0))
        return pid if status == "running" and pid else None

    def _status(self, name: str) -> dict[str, str]:
        out = {}
        for node in ("node1", "node2"):
            if name in (here := self._containers(node)):
                out[node] = here[name][0]
        return out

    def run(self, t: ZdtmTest, strategy: str) -> Result:
        t0 = time.monotonic()
        name = re.sub(r"[^a-zA-Z0-9_.-]", "_", f"zdtm-{t.name}-{strategy}")
        try:
            res = self._run(t, strategy, name)
        except (RunError, OSError, ValueError, KeyError) as e:
            res = Result(ERROR, one_line(str(e)))
        res.seconds = round(time.monotonic() - t0, 2)
        if res.outcome != PASS:
            res.log = self._keep_logs(name)
        problems = self._remove(name)
        if problems and res.outcome == PASS:
            res = Result(ERROR, one_line("; ".join(problems)), res.seconds, res.log)
        elif problems:
            res.error = one_line(f"{res.error}; then {'; '.join(problems)}")
        return res

    def _run(self, t: ZdtmTest, strategy: str, name: str) -> Result:
        env = {**self.env, **({} if t.flag("suid") else self._uids())}
        args = ["run", "-d", "--name", name]
        if self.privileged:
            args.append("--privileged")
        for k, v in sorted(env.items()):
            args += ["-e", f"{k}={v}"]
        rc, out = self._jaula("node1", *args, IMAGE_NAME, "/zdtm/run", t.name, *t.argv[1:])
        if rc != 0:
            return Result(START_FAILED, one_line(f"jaula run: {out}"))
        pidfile = f"zdtm/static/{t.name}.pid"
        if self._file("node1", name, pidfile, t.timeout_s) is None:
            init = self._init_pid("node1", name)
            root = Path(f"/proc/{init}/root/zdtm/static")
            said = _read(root / f"{t.name}.out") + _read(root / f"{t.name}.out.inprogress")
            return Result(START_FAILED, one_line(verdict_line(said)[1] or "no pidfile"))
        rc, out = self._jaula_op("migrate", name, "node2", "--from", "node1",
                                 "--strategy", strategy, "--json")  # fmt: skip
        where = self._status(name)
        running = [n for n, s in where.items() if s == "running"]
        if rc is None:
            return Result(STUCK, one_line(f"{out}; status {where}"))
        if rc == 0:
            if running != ["node2"]:
                return Result(LOST, f"migrate succeeded but the container runs on {running}")
            ok, line = self._verdict(t, "node2", name)
            return Result(PASS) if ok else Result(FAIL, one_line(line))
        err = _migrate_error(out)
        if running != ["node1"]:
            return Result(LOST, one_line(f"{err}; then running on {running or 'no node'}"))
        m = re.search(r"migration aborted during (\w+)", err)
        outcome = ROLLED_BACK if m and m[1] in AFTER_FREEZE else REFUSED
        ok, line = self._verdict(t, "node1", name)
        if not ok:
            return Result(FAIL, one_line(f"{err}; then on node1: {line}"))
        return Result(outcome, one_line(err))

    def _uids(self) -> dict[str, str]:
        return TEST_UIDS if self.env.get("JAULA_ZDTM_UIDS") == "1" else {}

    def _jaula_op(self, *args: str) -> tuple[int | None, str]:
        try:
            rc, out, err, _ = run_cmd([*self.c.op(), *args], MIGRATE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None, f"jaula {args[0]} ran past {MIGRATE_TIMEOUT_S:.0f} s"
        return rc, (out if rc == 0 else err or out)

    def _file(self, node: str, name: str, rel: str, timeout_s: float) -> Path | None:
        """Wait for ``/rel`` in the container (read through its init's /proc root)."""

        pid = self._init_pid(node, name)
        if pid is None:
            return None
        return wait_path(lambda: Path(f"/proc/{pid}/root") / rel, timeout_s)

    def _verdict(self, t: ZdtmTest, node: str, name: str) -> tuple[bool, str]:
        """SIGTERM to the test (its pid in the container from its pidfile, found on the
        host by ``NSpid``), then its ``.out``."""
        init = self._init_pid(node, name)
        if init is None:
            return False, f"the container does not run on {node}"
        root = Path(f"/proc/{init}/root/zdtm/static")
        ns_pid = _read(root / f"{t.name}.pid").strip()
        host_pid = host_pid_of(init, int(ns_pid)) if ns_pid.isdigit() else None
        if host_pid is None:
            return False, f"no task {t.name} (pidfile {ns_pid!r}) in the container on {node}"
        with _quiet():
            os.kill(host_pid, signal.SIGTERM)
        out = wait_path(lambda: root / f"{t.name}.out", VERDICT_TIMEOUT_S)
        if out is None:
            inprog = _read(root / f"{t.name}.out.inprogress")
            return False, f"no verdict in {VERDICT_TIMEOUT_S:.0f} s: {verdict_line(inprog)[1]}"
        time.sleep(0.05)
        return verdict_line(_read(out))

    def _keep_logs(self, name: str) -> str:
        """Copy the node logs' tails, the container's log and the CRIU logs each node kept
        of its failed actions (``<root>/logs/criu``) to ``logs/NAME``."""
        from runtime.container import Runtime
        from runtime.store import CRIU_LOGS_DIR

        d = self.logs / name
        d.mkdir(parents=True, exist_ok=True)
        for node in ("node1", "node2"):
            (d / f"{node}.log").write_text(self.c.node_log(node))
            if name in self._containers(node):
                info = Runtime(self.c.state_root(node)).get(name).inspect()
                log = Path(str(info.get("LogPath", "")))
                if log.is_file():
                    shutil.copyfile(log, d / f"container-{node}.log")
            kept = self.c.state_root(node) / CRIU_LOGS_DIR
            for f in sorted(kept.glob("*.log")) if kept.is_dir() else ():
                shutil.copyfile(f, d / f"criu-{node}-{f.name}")
        return str(d)

    def _remove(self, name: str) -> list[str]:
        problems = []
        for node in ("node2", "node1"):
            if name not in self._containers(node):
                continue
            rc, out = self._jaula(node, "rm", "-f", name, timeout_s=RM_TIMEOUT_S)
            if rc is None or (rc != 0 and "no such container" not in out.lower()):
                problems.append(f"jaula rm -f {name} on {node}: {one_line(out, 200)}")
        return problems


def host_pid_of(init: int, ns_pid: int) -> int | None:
    """The host pid of the task that is ``ns_pid`` in the pid namespace of ``init`` (a
    container's init, host pid): the ``/proc/*/status`` whose ``NSpid`` ends with it and
    whose pid namespace is init's."""
    try:
        ns = os.readlink(f"/proc/{init}/ns/pid")
    except OSError:
        return None
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{d}/ns/pid") != ns:
                continue
            for line in Path(f"/proc/{d}/status").read_text().splitlines():
                if line.startswith("NSpid:") and int(line.split()[-1]) == ns_pid:
                    return int(d)
        except (OSError, ValueError):
            continue
    return None


def _migrate_error(text: str) -> str:
    """The line of a failed ``jaula migrate``'s stderr that says why, shortened to its
    message and, when it quotes CRIU's log, CRIU's first error (``Error (file:line):
    ...``) rather than the log's path."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = next((ln for ln in lines if ln.startswith(("error:", "jaula:"))), None)
    line = line or (lines[-1] if lines else "(no message)")
    line = re.sub(r"^(jaula: )?error: ", "", line)
    criu_error = re.search(r"(Error|BUG) \([^)]*\):[^|\n]*", text)
    if criu_error:
        head = line.split(": see the log lines", 1)[0].split(" | ", 1)[0]
        return f"{head}: {criu_error[0].strip()}"
    return line


# --- the campaign ------------------------------------------------------------------------


@dataclass
class Row:
    test: str
    cells: dict[str, Result]

    def goal_met(self, strategy: str) -> bool | None:
        """Jaula passes what plain CRIU passes and refuses the rest; ``None`` without a
        plain CRIU cell."""
        plain = self.cells.get("plain CRIU")
        cell = self.cells.get(JAULA_COLUMNS[strategy])
        if plain is None or cell is None or cell.outcome == SKIPPED:
            return None
        if plain.outcome in (START_FAILED, ERROR, SKIPPED):  # no baseline to compare with
            return None
        want = PASS if plain.outcome == PASS else REFUSED
        return cell.outcome == want

    def error_line(self) -> str:
        for col, r in self.cells.items():
            if r.outcome != PASS and r.error:
                return f"{col}: {r.error}"
        return ""

    def to_json(self) -> dict[str, Any]:
        return {"test": self.test, **{k: dataclasses.asdict(v) for k, v in self.cells.items()}}


def run_campaign(
    tests: Sequence[ZdtmTest],
    strategies: Sequence[str],
    plain: PlainCriu | None,
    jaula: JaulaZdtm | None,
    on_row: Callable[[Row], None] = lambda r: None,
    on_step: Callable[[str], None] = lambda s: None,
) -> list[Row]:
    """Run every test: plain CRIU first (when given), then each strategy through jaula."""
    rows = []
    for t in tests:
        cells: dict[str, Result] = {}
        if plain is not None:
            on_step(f"{t.name}: plain CRIU")
            cells["plain CRIU"] = plain.run(t)
        for s in strategies:
            on_step(f"{t.name}: jaula {s}")
            if jaula is None:
                cells[JAULA_COLUMNS[s]] = Result(SKIPPED, "jaula could not be set up")
            elif s == "postcopy" and t.flag("nolazy"):
                cells[JAULA_COLUMNS[s]] = Result(SKIPPED, "zdtm: nolazy (no lazy pages)")
            else:
                cells[JAULA_COLUMNS[s]] = jaula.run(t, s)
        row = Row(t.name, cells)
        rows.append(row)
        on_row(row)
    return rows


def totals(rows: Sequence[Row], strategies: Sequence[str]) -> list[str]:
    """Lines of totals: outcomes per column, then the goal per strategy."""
    cols = [c for c in ("plain CRIU", *(JAULA_COLUMNS[s] for s in strategies))]
    out = []
    for col in cols:
        n = Counter(r.cells[col].outcome for r in rows if col in r.cells)
        parts = ", ".join(f"{k} {v}" for k, v in sorted(n.items(), key=lambda kv: -kv[1]))
        out.append(f"{col}: {sum(n.values())} run: {parts}")
    for s in strategies:
        met = [r.goal_met(s) for r in rows]
        judged = [m for m in met if m is not None]
        misses = [r.test for r, m in zip(rows, met, strict=True) if m is False]
        out.append(
            f"goal (jaula {s}): met on {sum(judged)} of {len(judged)}"
            + (f"; missed: {', '.join(misses)}" if misses else "")
        )
    return out


def markdown(rows: Sequence[Row], strategies: Sequence[str], header: Sequence[str]) -> str:
    cols = ["plain CRIU", *(JAULA_COLUMNS[s] for s in strategies)]
    lines = [*(f"{h}  " for h in header), ""]
    lines.append("| test | " + " | ".join(cols) + " | error line |")
    lines.append("|" + "---|" * (len(cols) + 2))
    for r in rows:
        cells = [r.cells[c].outcome if c in r.cells else "" for c in cols]
        lines.append(f"| {r.test} | " + " | ".join(cells) + f" | {one_line(r.error_line(), 240)} |")
    lines += ["", "Totals:", "", *(f"- {t}" for t in totals(rows, strategies)), ""]
    return "\n".join(lines)


def rich_table(rows: Sequence[Row], strategies: Sequence[str]) -> Table:
    cols = ["plain CRIU", *(JAULA_COLUMNS[s] for s in strategies)]
    table = Table(show_lines=False)
    table.add_column("test")
    for c in cols:
        table.add_column(c)
    table.add_column("error line", overflow="fold")
    style = {PASS: "green", REFUSED: "yellow", SKIPPED: "dim"}
    for r in rows:
        cells = []
        for c in cols:
            o = r.cells[c].outcome if c in r.cells else ""
            cells.append(f"[{style.get(o, 'red')}]{o}[/]" if o else "")
        table.add_row(r.test, *cells, one_line(r.error_line(), 160))
    return table


def results_dir(base: Path | None) -> Path:
    root = base or REPO / "results"
    stem = f"zdtm-{dt.date.today().isoformat()}"
    d, n = root / stem, 1
    while d.exists():
        d, n = root / f"{stem}.{n}", n + 1
    d.mkdir(parents=True)
    return d


# --- set-up shared with the sample test --------------------------------------------------


@dataclass
class Campaign:
    """Everything one run needs, made by :func:`prepare` and removed by :meth:`close`."""

    tests: list[ZdtmTest]
    unbuilt: dict[str, str]
    skipped: dict[str, str]
    work: Path
    env: dict[str, str]
    plain: PlainCriu
    jaula: JaulaZdtm | None = None
    jaula_error: str = ""
    notes: list[str] = field(default_factory=list)
    _cluster: Any = None

    def close(self) -> list[str]:
        problems = self._cluster.close() if self._cluster is not None else []
        shutil.rmtree(self.work / "plain", ignore_errors=True)
        return problems


def prepare(names: Sequence[str], work: Path, logs: Path, with_jaula: bool = True,
            test_uids: bool = False, privileged: bool = True) -> Campaign:  # fmt: skip
    """Build ``names``, check their features, build and import the image, start the two
    node services under ``work``.  Raises ``RunError`` when the tests cannot be built; a
    jaula that cannot be set up is reported in ``jaula_error`` (the plain column still
    runs)."""
    from benchmarks.systems.jaula import JaulaCluster
    from tests.helpers.images import build_zdtm_image, tools_missing

    work.mkdir(parents=True, exist_ok=True)
    built, unbuilt = build_tests(names)
    feats = criu_features(f for t in built.values() for f in str(t.desc.get("feature", "")).split())
    skipped = {}
    for n, t in list(built.items()):
        lacking = [f for f in str(t.desc.get("feature", "")).split() if not feats[f]]
        if lacking:
            skipped[n] = f"this kernel/CRIU lacks {', '.join(lacking)} (criu check --feature)"
            del built[n]
    env = {"TMPDIR": "/tmp"}
    notes = []
    if test_uids and have_cap(CAP_SYS_RESOURCE):
        env["JAULA_ZDTM_UIDS"] = "1"
        notes.append("non-suid tests run under zdtm's uid 18943")
    else:
        notes.append(
            "tests run as root"
            + ("" if have_cap(CAP_SYS_RESOURCE) else " (no CAP_SYS_RESOURCE here: CRIU could "
               "not read the rlimits of a task of zdtm's uid 18943)")
        )  # fmt: skip
    tests = [built[n] for n in names if n in built]
    plain_env = {**env, "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    camp = Campaign(tests, unbuilt, skipped, work, env,
                    PlainCriu(work, BUILD_DIR / "static", plain_env, logs), notes=notes)  # fmt: skip
    if not with_jaula:
        return camp
    reason = tools_missing()
    if reason is not None:
        camp.jaula_error = f"cannot build the zdtm image: {reason}"
        return camp
    try:
        layout = build_zdtm_image(work / "image", BUILD_DIR / "static", [t.name for t in tests],
                                  IMAGE_NAME)  # fmt: skip
        cluster = JaulaCluster(work / "jaula", f"zdtm{os.getpid()}")
        camp._cluster = cluster
        cluster.setup({"zdtm": Image("zdtm", layout, layout, IMAGE_NAME)})
        camp.jaula = JaulaZdtm(cluster, env, logs, privileged)
    except (RunError, OSError, RuntimeError) as e:
        camp.jaula_error = one_line(str(e), 400)
    return camp


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.zdtm", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--tests", help="comma-separated tests (default: the [run] list)")
    ap.add_argument("--limit", type=int, help="only the first N tests of the list")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="default: %(default)s")
    ap.add_argument("--no-plain", action="store_true", help="leave out the plain CRIU column")
    ap.add_argument(
        "--test-uids",
        action="store_true",
        help="run non-suid tests under zdtm's uid 18943 (needs CAP_SYS_RESOURCE)",
    )
    ap.add_argument("--out", type=Path, help="results root (default: results/ in the repo)")
    a = ap.parse_args(argv)
    a.strategy_list = [s.strip() for s in a.strategies.split(",") if s.strip()]
    bad = [s for s in a.strategy_list if s not in STRATEGIES]
    if bad:
        ap.error(f"unknown strategies {bad}: choose among {', '.join(STRATEGIES)}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if os.geteuid() != 0:
        print("the zdtm campaign needs root", file=sys.stderr)
        return 2
    console = Console(stderr=True, soft_wrap=True)
    try:
        listed = load_test_list()
    except (OSError, ValueError, KeyError) as e:
        print(f"cannot read the test list: {e}", file=sys.stderr)
        return 2
    names = [t.strip() for t in a.tests.split(",")] if a.tests else list(listed.run)
    unknown = [n for n in names if n in listed.excluded]
    if unknown:
        print(f"excluded in {TESTS_FILE.name}: "
              + "; ".join(f"{n}: {listed.excluded[n]}" for n in unknown), file=sys.stderr)  # fmt: skip
        return 2
    if a.limit:
        names = names[: a.limit]
    out_dir = results_dir(a.out)
    work = Path(tempfile.mkdtemp(prefix="jaula-zdtm."))
    signal.signal(signal.SIGTERM, _interrupt)
    started = dt.datetime.now()
    camp: Campaign | None = None
    rows: list[Row] = []
    interrupted = False
    try:
        console.print(f"[bold]zdtm through jaula[/]: {len(names)} tests, results in {out_dir}")
        console.print("building the tests and the image, starting two node services")
        camp = prepare(names, work, out_dir / "failed", test_uids=a.test_uids)
        if camp.jaula_error:
            console.print(f"[red]jaula cannot run here:[/] {camp.jaula_error}")
        with (
            open(out_dir / "results.jsonl", "a") as jl,
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
                disable=not console.is_terminal,
            ) as progress,
        ):
            task = progress.add_task("zdtm", total=len(camp.tests))

            def on_row(r: Row) -> None:
                rows.append(r)  # here, not from the return value: an interrupt keeps them
                jl.write(json.dumps(r.to_json()) + "\n")
                jl.flush()
                progress.advance(task)

            run_campaign(
                camp.tests, a.strategy_list, None if a.no_plain else camp.plain, camp.jaula,
                on_row, lambda s: progress.update(task, description=f"{s:40}"),
            )  # fmt: skip
    except KeyboardInterrupt:
        interrupted = True
        console.print("[red]interrupted[/]: the table holds the tests that ended")
    except RunError as e:
        console.print(f"[red]cannot run:[/] {e}")
        return 2
    finally:
        problems = camp.close() if camp is not None else []
        shutil.rmtree(work, ignore_errors=True)
        for p in problems:
            console.print(f"[red]cleanup:[/] {p}")
    header = [
        (
            f"# zdtm static tests through jaula ({started:%Y-%m-%d %H:%M}, "
            f"{(dt.datetime.now() - started).total_seconds() / 60:.1f} min)"
        ),
        "",
        (
            f"kernel {platform.release()}, {os.cpu_count()} CPUs; {shutil.which('criu')}; "
            f"{len(rows)} tests run of {len(names)} asked"
            + (" (interrupted)" if interrupted else "")
        ),
        *(camp.notes if camp else []),
    ]
    if camp is not None:
        unlisted = makefile_tests(BUILD_DIR / "static") - set(listed.run) - set(listed.excluded)
        if unlisted:
            header.append(f"in CRIU's Makefile but not in {TESTS_FILE.name}: {sorted(unlisted)}")
        left = {**camp.unbuilt, **camp.skipped}
        header += [f"not run: {n}: {why}" for n, why in left.items()]
        if camp.jaula_error:
            header.append(f"jaula could not be set up: {camp.jaula_error}")
    report = markdown(rows, a.strategy_list, header)
    (out_dir / "report.md").write_text(report)
    if console.is_terminal:
        console.print(rich_table(rows, a.strategy_list))
        for line in totals(rows, a.strategy_list):
            console.print(line)
    else:
        print(report)
    console.print(f"results: {out_dir}")
    missed = any(r.goal_met(s) is False for r in rows for s in a.strategy_list)
    return 1 if missed or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
