"""Podman's everyday commands that ``jaula`` adds beside its core ones (issue 17).

Each module adds its subparsers and runs them; :mod:`runtime.cli` calls
:func:`add_commands` while it builds the parser and :func:`dispatch` before its own
commands, so that the core CLI stays small and these grow apart from it:

* :mod:`runtime.commands.images`: ``pull``.
* :mod:`runtime.commands.lifecycle`: ``create``, ``start``, ``restart``, ``run --restart``.
"""

from __future__ import annotations

import argparse

from runtime.commands import images, lifecycle
from runtime.container import Runtime

_MODULES = (images, lifecycle)


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add every command of this package to ``jaula``'s subparsers."""
    for m in _MODULES:
        m.add_commands(sub)


def dispatch(rt: Runtime, a: argparse.Namespace) -> int | None:
    """Run ``a.cmd`` if one of these modules owns it; else None."""
    for m in _MODULES:
        rc: int | None = m.dispatch(rt, a)
        if rc is not None:
            return rc
    return None
