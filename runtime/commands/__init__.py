"""Podman's everyday commands that ``jaula`` adds beside its core ones (issue 17).

Each module adds its subparsers and runs them; :mod:`runtime.cli` calls
:func:`add_commands` while it builds the parser and :func:`dispatch` before its own
commands, so that the core CLI stays small and these grow apart from it:

* :mod:`runtime.commands.images`: ``pull``.
* :mod:`runtime.commands.lifecycle`: ``create``, ``start``, ``restart``, ``run --restart``.
* :mod:`runtime.commands.containers`: ``cp``, ``top``, ``rename``, ``rm -a``.
* :mod:`runtime.commands.system`: ``version``, ``--version``, ``info``, ``images``.
* :mod:`runtime.commands.observe`: ``stats``, ``events``.
* :mod:`runtime.commands.terminal`: ``-i``/``-t``, ``attach``.
"""

from __future__ import annotations

import argparse

from runtime.commands import containers, images, lifecycle, observe, system, terminal
from runtime.container import Runtime

_MODULES = (terminal, images, lifecycle, containers, system, observe)


def add_commands(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    top: argparse.ArgumentParser | None = None,
) -> None:
    """Add every command of this package to ``jaula``'s subparsers (and ``--version`` to
    ``top``, the ``jaula`` parser)."""
    images.add_commands(sub)
    terminal.add_commands(sub)  # before lifecycle: create copies run's flags
    lifecycle.add_commands(sub)
    containers.add_commands(sub)
    system.add_commands(sub, top)
    observe.add_commands(sub)


def dispatch(rt: Runtime, a: argparse.Namespace) -> int | None:
    """Run ``a.cmd`` if one of these modules owns it; else None."""
    for m in _MODULES:
        rc: int | None = m.dispatch(rt, a)
        if rc is not None:
            return rc
    return None
