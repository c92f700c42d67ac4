"""jaula's single-host container runtime: images, containers, cgroups, the monitor.

Public API::

    from runtime import Runtime, RunOptions, Container, ContainerStatus
    rt = Runtime(Path("/var/lib/jaula"))
    c = rt.run(RunOptions(image="busybox", command=("sleep", "100")))

Libraries log through structlog and never print; configuring structlog is the application's
choice, not an import's.  The ``jaula`` CLI calls :func:`runtime.logconfig.configure_logging`
(warnings and errors on stderr unless ``--log-level`` says otherwise); a program using the
library can call it too, or else gets structlog's defaults.
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
