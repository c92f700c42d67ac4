"""jaula's single-host container runtime: images, containers, cgroups, the monitor.

Public API::

    from runtime import Runtime, RunOptions, Container, ContainerStatus
    rt = Runtime(Path("/var/lib/jaula"))
    c = rt.run(RunOptions(image="busybox", command=("sleep", "100")))

Libraries log through structlog and never print; unless the application configured
structlog, only warnings and errors are written, to stderr.
"""

from __future__ import annotations

_EXPORTS = {
    "Container": "runtime.container",
    "RunOptions": "runtime.container",
    "Runtime": "runtime.container",
    "JaulaError": "runtime.errors",
    "ContainerStatus": "runtime.state",
    "State": "runtime.state",
}


def __getattr__(name: str) -> object:
    # Lazy re-exports: the monitor imports runtime.monitor and must stay small.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)


__all__ = ["Container", "ContainerStatus", "JaulaError", "RunOptions", "Runtime", "State"]
