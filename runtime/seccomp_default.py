"""jaula's default seccomp profile: a deny list of the syscalls that reach kernel state a
container must not touch, in Docker's profile format (:mod:`runtime.seccomp_filter`).

Written for jaula, not copied: every other syscall is allowed (``SCMP_ACT_ALLOW`` by
default), and each one below fails with ``EPERM``, as it would for a process lacking the
capability, unless the container keeps the capability named beside it (Docker's
``includes.caps`` condition).  The groups follow the reasons Docker's documentation gives
for its default profile ("Seccomp security profiles for Docker", significant syscalls
blocked) and the capability each syscall's man page names:

* the host's kernel: modules, kexec, reboot, swap, accounting, quotas (init_module(2),
  kexec_load(2), reboot(2), swapon(2), acct(2), quotactl(2));
* the clock, which no namespace separates (settimeofday(2), clock_adjtime(2));
* the kernel keyring, which is not namespaced (add_key(2), keyctl(2), request_key(2));
* tracing and BPF, which see the whole host (bpf(2), perf_event_open(2), fanotify_init(2));
* file handles, which bypass the mount namespace (open_by_handle_at(2), the "shocker"
  escape) and userfaultfd(2), a common aid to kernel exploits;
* obsolete or i386-only calls nobody in a container needs (uselib, nfsservctl, _sysctl,
  vm86, iopl...).

A process with ``--privileged`` or ``--security-opt seccomp=unconfined`` runs without any
filter; CRIU's restorer creates the userfaultfd of a post-copy restore before it restores
the filter, so post-copy migration is not affected by the deny entry.
"""

from __future__ import annotations

from typing import Any

#: syscall name -> the capability that lifts the denial ("" : denied whatever the caps)
DENIED: dict[str, str] = {
    # kernel modules, kexec, reboot
    "init_module": "CAP_SYS_MODULE",
    "finit_module": "CAP_SYS_MODULE",
    "delete_module": "CAP_SYS_MODULE",
    "create_module": "",
    "query_module": "",
    "get_kernel_syms": "",
    "kexec_load": "CAP_SYS_BOOT",
    "kexec_file_load": "CAP_SYS_BOOT",
    "reboot": "CAP_SYS_BOOT",
    # swap, process accounting, disk quotas
    "swapon": "CAP_SYS_ADMIN",
    "swapoff": "CAP_SYS_ADMIN",
    "acct": "CAP_SYS_PACCT",
    "quotactl": "CAP_SYS_ADMIN",
    # the clock
    "settimeofday": "CAP_SYS_TIME",
    "stime": "CAP_SYS_TIME",
    "clock_settime": "CAP_SYS_TIME",
    "clock_adjtime": "CAP_SYS_TIME",
    # the kernel keyring
    "add_key": "",
    "keyctl": "",
    "request_key": "",
    # tracing, BPF, whole-host notification
    "bpf": "CAP_SYS_ADMIN",
    "perf_event_open": "CAP_SYS_ADMIN",
    "fanotify_init": "CAP_SYS_ADMIN",
    "lookup_dcookie": "CAP_SYS_ADMIN",
    # file handles and userfaultfd
    "open_by_handle_at": "CAP_DAC_READ_SEARCH",
    "userfaultfd": "CAP_SYS_PTRACE",
    # obsolete, or port I/O
    "uselib": "",
    "nfsservctl": "",
    "_sysctl": "",
    "sysfs": "",
    "ustat": "",
    "vm86": "",
    "vm86old": "",
    "iopl": "CAP_SYS_RAWIO",
    "ioperm": "CAP_SYS_RAWIO",
}


def default_profile() -> dict[str, Any]:
    """The profile as a Docker-format dict: ``defaultAction`` allow, one ``ERRNO(EPERM)``
    rule per group of syscalls that the same capability (or none) lifts."""
    by_cap: dict[str, list[str]] = {}
    for name, cap in DENIED.items():
        by_cap.setdefault(cap, []).append(name)
    rules: list[dict[str, Any]] = []
    for cap, names in by_cap.items():
        rule: dict[str, Any] = {"names": sorted(names), "action": "SCMP_ACT_ERRNO", "errnoRet": 1}
        if cap:
            rule["excludes"] = {"caps": [cap]}
        rules.append(rule)
    return {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}
