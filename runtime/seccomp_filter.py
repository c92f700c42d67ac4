"""seccomp: the syscall filter a container's processes run under (``--security-opt seccomp=``).

Three settings, kept in :attr:`runtime.spec.ContainerConfig.seccomp`:

* ``"default"``: jaula's default profile (:mod:`runtime.seccomp_default`): every syscall
  allowed but a deny list of about forty that reach host-wide kernel state (modules, kexec,
  the clock, the keyring, BPF and perf, file handles, userfaultfd), which fail with
  ``EPERM`` unless the container keeps the capability that guards each one.
* ``"unconfined"``: no filter (also what ``--privileged`` implies, as in Podman).
* the text of a profile (``--security-opt seccomp=PROFILE.json``): the file is read when the
  container is created and its text is kept in the config, so that a restored or migrated
  container (and a later ``jaula exec``) needs no copy of the file on the destination.

Profile format: Docker's / containers/common's JSON (``defaultAction``, ``defaultErrnoRet``,
``archMap`` or ``architectures``, ``syscalls[]`` of ``names``/``name``, ``action``,
``errnoRet``, ``args[]`` of ``index``/``value``/``valueTwo``/``op``, ``includes``/``excludes``
by ``caps``, ``arches`` and ``minKernel``), which is also the OCI runtime spec's
``linux.seccomp`` (config-linux.md, "Seccomp") with Docker's conditions added.  The
conditions are resolved as moby's ``profiles/seccomp`` does: a rule applies when the
container has every capability in ``includes.caps`` and none in ``excludes.caps``, when the
native architecture is in ``includes.arches`` and not in ``excludes.arches``, and when the
running kernel is at least ``includes.minKernel``.  Arguments of one rule are ANDed.  A
syscall name libseccomp does not know is skipped, as runc and crun do (profiles name
syscalls of every architecture).  ``SCMP_ACT_NOTIFY`` (a listener agent) is refused.

Loading: the filter is built with libseccomp's Python bindings (Debian's python3-seccomp,
made importable from the venv by ``scripts/setup.sh``), never as hand-written BPF.  The
container init builds it (:func:`prepare`) before pivot_root and loads it after dropping privileges, with no_new_privs already
set, and right before execve; ``jaula exec`` loads the same filter in the exec'd program.
The filter is compiled once in the CLI (:func:`check`) so that a bad profile is refused
before anything is created.

Across checkpoint and restore nothing is needed from jaula: CRIU dumps every task's filters
(``seccomp.img``, with ``PTRACE_O_SUSPEND_SECCOMP`` so that its parasite is not filtered)
and restores them last, just before the tasks resume; ``/proc/PID/status`` then shows
``Seccomp: 2`` again.

Errors: :class:`runtime.errors.ConfigError`, one line naming the profile and what is wrong.
"""

from __future__ import annotations

import errno as errno_mod
import json
import os
import sys
from typing import Any

from runtime.errors import ConfigError

DEFAULT = "default"
UNCONFINED = "unconfined"

#: Where Debian's python3-seccomp installs the bindings (used when they are not importable
#: otherwise, e.g. from a venv made without the system's site-packages).
_DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"

_ACTIONS = (
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_LOG",
)
_OPS = (
    "SCMP_CMP_NE",
    "SCMP_CMP_LT",
    "SCMP_CMP_LE",
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
)
#: Docker's / Go's architecture names (``includes.arches``) of the machine's own arch.
_GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "s390x": "s390x", "ppc64le": "ppc64le"}


def bindings() -> Any:
    """The ``seccomp`` module (libseccomp's Python bindings).

    Raises ConfigError saying what to install when it cannot be imported."""
    try:
        import seccomp
    except ImportError:
        if _DEBIAN_DIST_PACKAGES not in sys.path and os.path.isdir(_DEBIAN_DIST_PACKAGES):
            sys.path.append(_DEBIAN_DIST_PACKAGES)
            try:
                import seccomp
            except ImportError:
                pass
            else:
                return seccomp
        raise ConfigError(
            "seccomp needs libseccomp's Python bindings: install python3-seccomp "
            "(`make setup` does), or run with --security-opt seccomp=unconfined"
        ) from None
    return seccomp


def default_profile_text() -> str:
    """The text (JSON) of jaula's default profile (:mod:`runtime.seccomp_default`)."""
    from runtime.seccomp_default import default_profile

    return json.dumps(default_profile())


def parse_security_opts(values: list[str], privileged: bool) -> str:
    """The seccomp setting for ``--security-opt`` values (``seccomp=unconfined``,
    ``seccomp=PROFILE.json``; ``label=``/``apparmor=`` are Podman's and refused here).

    Returns ``"default"`` (nothing given; ``"unconfined"`` with ``--privileged``),
    ``"unconfined"``, or the profile's text.  Raises ConfigError for a malformed value, an
    unreadable file or a profile :func:`check` refuses."""
    setting = UNCONFINED if privileged else DEFAULT
    for v in values:
        key, sep, val = v.partition("=")
        if key == "seccomp" and sep and val:
            if val == UNCONFINED:
                setting = UNCONFINED
                continue
            try:
                with open(val) as f:
                    text = f.read()
            except OSError as e:
                raise ConfigError(
                    f"invalid --security-opt {v!r}: cannot read {val}: {e.strerror}"
                ) from None
            check(text, source=val)
            setting = text
        else:
            raise ConfigError(
                f"invalid --security-opt {v!r}: jaula knows seccomp=unconfined and "
                "seccomp=PROFILE.json"
            )
    return setting


def profile_of(setting: str) -> dict[str, Any] | None:
    """The profile (parsed JSON) of a setting, ``None`` for unconfined.

    Raises ConfigError when the text is not a JSON object."""
    if setting == UNCONFINED:
        return None
    text = default_profile_text() if setting == DEFAULT else setting
    try:
        prof = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"seccomp profile is not valid JSON: {e}") from None
    if not isinstance(prof, dict):
        raise ConfigError("seccomp profile must be a JSON object with defaultAction and syscalls")
    return prof


def check(text: str, source: str = "the seccomp profile") -> None:
    """Build (but do not load) the filter of profile ``text`` with every capability, to
    refuse a malformed profile early.  Raises ConfigError naming ``source``."""
    try:
        prof = profile_of(text)
        if prof is None:
            return
        build(prof, capabilities=frozenset())
    except ConfigError as e:
        raise ConfigError(f"invalid seccomp profile {source}: {e}") from None


def _action(sc: Any, name: object, errno_ret: object, default_errno: int) -> Any:
    if name not in _ACTIONS:
        raise ConfigError(f"unknown action {name!r} (use one of {', '.join(_ACTIONS)})")
    if errno_ret is not None and not isinstance(errno_ret, int):
        raise ConfigError(f"errnoRet must be a number, not {errno_ret!r}")
    match name:
        case "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD":
            return sc.KILL
        case "SCMP_ACT_KILL_PROCESS":
            return sc.KILL_PROCESS
        case "SCMP_ACT_TRAP":
            return sc.TRAP
        case "SCMP_ACT_ERRNO":
            return sc.ERRNO(default_errno if errno_ret is None else errno_ret)
        case "SCMP_ACT_TRACE":
            return sc.TRACE(errno_mod.EPERM if errno_ret is None else errno_ret)
        case "SCMP_ACT_LOG":
            return sc.LOG
    return sc.ALLOW


def _kernel_at_least(version: str) -> bool:
    def nums(s: str) -> tuple[int, ...]:
        out = []
        for part in s.split("."):
            digits = "".join(ch for ch in part if ch.isdigit()) or "0"
            out.append(int(digits))
            if not part.isdigit():
                break
        return tuple(out)

    return nums(os.uname().release) >= nums(version)


def _applies(rule: dict[str, Any], caps: frozenset[str], arch: str) -> bool:
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    if not all(c in caps for c in inc.get("caps") or ()):
        return False
    if any(c in caps for c in exc.get("caps") or ()):
        return False
    if inc.get("arches") and arch not in inc["arches"]:
        return False
    if arch in (exc.get("arches") or ()):
        return False
    return not inc.get("minKernel") or _kernel_at_least(str(inc["minKernel"]))


def _arches(sc: Any, prof: dict[str, Any]) -> list[Any]:
    """The sub-architectures to add beside the native one (``archMap`` of the native arch, or
    ``architectures``), as libseccomp ``Arch`` values."""
    native = sc.system_arch() & 0xFFFFFFFF
    names: list[str] = []
    for m in prof.get("archMap") or ():
        arch = getattr(sc.Arch, str(m.get("architecture", "")).removeprefix("SCMP_ARCH_"), None)
        if arch is not None and arch & 0xFFFFFFFF == native:
            names += m.get("subArchitectures") or []
    names += prof.get("architectures") or []
    out = []
    for n in names:
        arch = getattr(sc.Arch, str(n).removeprefix("SCMP_ARCH_"), None)
        if arch is None:
            raise ConfigError(f"unknown architecture {n!r}")
        if arch & 0xFFFFFFFF != native and arch not in out:
            out.append(arch)
    return out


def build(prof: dict[str, Any], capabilities: frozenset[str]) -> Any:
    """The libseccomp ``SyscallFilter`` of profile ``prof`` for a container that keeps
    ``capabilities`` (names), not loaded; no_new_privs left to the caller (attribute off).

    Raises ConfigError naming the rule that is wrong."""
    sc = bindings()
    default_errno = prof.get("defaultErrnoRet", errno_mod.EPERM)
    defaction = _action(sc, prof.get("defaultAction"), default_errno, errno_mod.EPERM)
    f = sc.SyscallFilter(defaction=defaction)
    f.set_attr(sc.Attr.CTL_NNP, 0)
    try:
        for arch in _arches(sc, prof):
            f.add_arch(arch)
    except RuntimeError as e:
        raise ConfigError(f"cannot add the profile's architectures: {e}") from None
    go_arch = _GO_ARCH.get(os.uname().machine, os.uname().machine)
    rules = prof.get("syscalls")
    rules = [] if rules is None else rules
    if not isinstance(rules, list):
        raise ConfigError("syscalls must be a list of rules")
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict):
            raise ConfigError(f"syscalls[{i}] must be an object")
        if rule.get("action") == "SCMP_ACT_NOTIFY":
            raise ConfigError(f"syscalls[{i}]: SCMP_ACT_NOTIFY needs a listener; jaula has none")
        try:
            action = _action(sc, rule.get("action"), rule.get("errnoRet"), errno_mod.EPERM)
        except ConfigError as e:
            raise ConfigError(f"syscalls[{i}]: {e}") from None
        names = list(rule.get("names") or ()) + ([rule["name"]] if rule.get("name") else [])
        if not names or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"syscalls[{i}] must name its syscalls (names: a list of strings)")
        args = [_arg(sc, i, a) for a in rule.get("args") or ()]
        if not _applies(rule, capabilities, go_arch):
            continue
        if action == defaction:
            continue  # libseccomp refuses a rule that repeats the default action
        for name in names:
            if sc.resolve_syscall(sc.Arch.NATIVE, name) == -1:
                continue  # unknown to libseccomp (another kernel's syscall): skipped
            try:
                f.add_rule(action, name, *args)
            except (RuntimeError, ValueError) as e:
                raise ConfigError(f"syscalls[{i}] ({name}): libseccomp refused it: {e}") from None
    return f


def _arg(sc: Any, i: int, a: object) -> Any:
    if not isinstance(a, dict) or a.get("op") not in _OPS:
        raise ConfigError(
            f"syscalls[{i}].args: each needs index, value and op (one of {', '.join(_OPS)})"
        )
    index, value, two = a.get("index"), a.get("value", 0), a.get("valueTwo", 0)
    if not isinstance(index, int) or not 0 <= index <= 5:
        raise ConfigError(f"syscalls[{i}].args: index must be 0..5, not {index!r}")
    if not isinstance(value, int) or not isinstance(two, int):
        raise ConfigError(f"syscalls[{i}].args: value and valueTwo must be numbers")
    op = getattr(sc, a["op"].removeprefix("SCMP_CMP_"))
    if a["op"] == "SCMP_CMP_MASKED_EQ":
        return sc.Arg(index, op, value, two)
    return sc.Arg(index, op, value)


class Prepared:
    """A filter built and ready to load (see :func:`prepare`)."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def load(self) -> None:
        """Load the filter into the calling process (nothing for unconfined).

        Call it last before execve, after privileges are dropped and no_new_privs is set (or
        with CAP_SYS_ADMIN).  Raises OSError when the kernel refuses it."""
        if self._f is None:
            return
        try:
            self._f.load()
        except RuntimeError as e:
            raise OSError(errno_mod.EINVAL, f"loading the seccomp filter failed: {e}") from None


def prepare(setting: str, capabilities: tuple[str, ...]) -> Prepared:
    """Build the filter of ``setting`` for a process keeping ``capabilities``.

    Call it while the host's file system is still in view (before pivot_root or setns into
    the container's mount namespace): it imports the bindings and reads the default profile.
    Raises ConfigError (a bad profile, no bindings)."""
    prof = profile_of(setting)
    return Prepared(None if prof is None else build(prof, frozenset(capabilities)))


__all__ = [
    "DEFAULT",
    "UNCONFINED",
    "Prepared",
    "bindings",
    "build",
    "check",
    "default_profile_text",
    "parse_security_opts",
    "prepare",
    "profile_of",
]
