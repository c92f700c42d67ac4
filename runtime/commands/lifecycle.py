"""``create``, ``start``, ``restart`` and the ``--restart`` flag of ``run``/``create``, as
Podman spells them.  ``create`` takes ``run``'s flags (but ``-d`` and ``--rm``) and prints
the new container's id; ``start`` runs a created or stopped container again (a new init in
the same rootfs: its upperdir is kept); ``restart`` stops a running one (``-t``) and starts
it.  Restart policies are carried out by the monitor (:mod:`runtime.restart`)."""

from __future__ import annotations

import argparse
import sys

from runtime.container import Container, Runtime
from runtime.errors import JaulaError

EXIT_ERROR = 125


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    run = sub._name_parser_map["run"]
    restart_help = "no, always, unless-stopped or on-failure[:N] (default no)"
    run.add_argument("--restart", default="no", metavar="POLICY", help=restart_help)
    create = sub.add_parser("create", help="create a container without starting it")
    have = {o for act in create._actions for o in act.option_strings}
    for action in run._actions:  # run's own flags (the global ones create has already)
        if action.dest in ("detach", "rm") or have & set(action.option_strings):
            continue
        create._add_action(action)
    create.set_defaults(detach=False, rm=False)

    st = sub.add_parser("start", help="start created or stopped containers")
    st.add_argument("-a", "--attach", action="store_true", help="follow the output (one container)")
    st.add_argument("containers", nargs="+")

    rs = sub.add_parser("restart", help="stop (if running) and start containers")
    rs.add_argument(
        "-t", "--time", type=float, default=10.0, help="seconds before SIGKILL (-1: forever)"
    )
    rs.add_argument("containers", nargs="+")


def dispatch(rt: Runtime, a: argparse.Namespace) -> int | None:
    if a.cmd == "create":
        from runtime.cli import cmd_run

        return cmd_run(rt, a)
    if a.cmd == "start":
        if a.attach and len(a.containers) != 1:
            print("jaula: error: start -a takes one container", file=sys.stderr)
            return EXIT_ERROR
        if a.attach:
            from runtime.cli import _attach
            from runtime.commands.terminal import attach_terminal
            from runtime.store import TTY_MARK

            c = rt.get(a.containers[0])
            c.start()
            if (c.dir / TTY_MARK).exists():  # created with -t: its terminal
                return attach_terminal(c, send_input=True)
            return _attach(c)
        return _each(rt, a.containers, lambda c: c.start())
    if a.cmd == "restart":

        def restart(c: Container) -> None:
            c.stop(a.time)
            c.start()

        return _each(rt, a.containers, restart)
    return None


def _each(rt: Runtime, refs: list[str], fn: object) -> int:
    """Apply ``fn`` to each container, printing its ref; report failures, keep going."""
    rc = 0
    for ref in refs:
        try:
            fn(rt.get(ref))  # type: ignore[operator]
            print(ref)
        except JaulaError as e:
            print(f"jaula: error: {e}", file=sys.stderr)
            rc = EXIT_ERROR
    return rc
