"""The seccomp profile compiler (runtime.seccomp_filter) without loading anything: Docker's
conditions on capabilities resolve as moby's do, jaula's default denies what it denies, and
malformed profiles are refused with the rule named.  Needs libseccomp's Python bindings (Debian's
python3-seccomp, linked into the venv by `make setup`), not root."""

from __future__ import annotations

import json
import re
import tempfile
from typing import Any

import pytest

from runtime import seccomp_filter as sf
from runtime.errors import ConfigError

try:
    sf.bindings()
except ConfigError as e:  # pragma: no cover - without python3-seccomp
    pytest.skip(str(e), allow_module_level=True)


def action_of(prof: dict[str, Any], caps: list[str], syscall: str) -> str:
    """The action the compiled filter takes for ``syscall`` (from libseccomp's PFC dump)."""
    with tempfile.TemporaryFile("w+") as t:
        sf.build(prof, frozenset(caps)).export_pfc(t)
        t.seek(0)
        pfc = t.read()
    m = re.search(rf'call "{syscall}" \(\d+\).*?\n.*?\n\s+action (\S+);', pfc)
    if m is None:
        m = re.search(r"# default action\n\s*action (\S+);", pfc)
    assert m, pfc[:500]
    return m.group(1)


def test_the_default_denies_and_allows_by_capability() -> None:
    prof = sf.profile_of(sf.DEFAULT)
    assert prof is not None
    assert action_of(prof, [], "bpf") == "ERRNO(1)"
    assert action_of(prof, ["CAP_SYS_ADMIN"], "bpf") == "ALLOW"
    assert action_of(prof, [], "add_key") == "ERRNO(1)"
    assert action_of(prof, ["CAP_SYS_ADMIN"], "add_key") == "ERRNO(1)"
    assert action_of(prof, [], "clock_settime") == "ERRNO(1)"
    assert action_of(prof, ["CAP_SYS_TIME"], "clock_settime") == "ALLOW"
    assert action_of(prof, [], "read") == "ALLOW"


def test_oci_style_profile_with_errno_ret() -> None:
    prof = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86"],
        "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}],
    }
    assert action_of(prof, [], "mkdir") == "ERRNO(13)"


@pytest.mark.parametrize(
    ("prof", "words"),
    [
        ({"defaultAction": "SCMP_ACT_NOPE"}, "unknown action"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": {}}, "must be a list"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"action": "SCMP_ACT_LOG"}]},
         "syscalls[0] must name"),
        ({"defaultAction": "SCMP_ACT_ALLOW",
          "syscalls": [{"names": ["read"], "action": "SCMP_ACT_NOTIFY"}]}, "listener"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_Z80"]},
         "unknown architecture"),
    ],
)  # fmt: skip
def test_malformed_profiles_are_refused_naming_what(prof: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)) as info:
        sf.check(json.dumps(prof), source="p.json")
    assert "p.json" in str(info.value) and "\n" not in str(info.value)


def test_unknown_syscall_names_are_skipped_as_runc_does() -> None:
    prof = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["no_such_call", "mkdir"], "action": "SCMP_ACT_ERRNO"}],
    }
    assert action_of(prof, [], "mkdir") == "ERRNO(1)"
