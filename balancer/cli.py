"""``jaula balancer run|plan|status``, and the ``jaula`` console script with every layer's
commands (runtime's, :mod:`migrate.cli`'s and these: the balancer is the top layer, so it is
the one that can name them all).

- ``jaula balancer run --config FILE [--dry-run]``: the daemon (:mod:`balancer.daemon`);
  it leads or waits as a standby; SIGINT/SIGTERM stop it.
- ``jaula balancer plan [--config FILE] [--json]``: what a round would do now (each move
  with its predicted gain and cost, or why nothing), from the same metrics and the history
  in the event log; it moves nothing and records nothing.
- ``jaula balancer status [--rounds N] [--json]``: the leader, the recent rounds and moves,
  and the containers cooling down, from the event log.

Who we are: ``--client-config`` (an operator keypair and the cluster file), as for
``migrate``.  Thin: parse, call the library, print.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from balancer.config import BalancerConfig
from balancer.errors import BalancerError
from runtime import cli as runtime_cli
from runtime.container import Runtime


class BalancerCommands:
    """``jaula balancer ...`` (a :class:`runtime.cli.CliExtension`)."""

    def add_global_options(self, p: argparse.ArgumentParser) -> None:
        pass  # --client-config comes from migrate.cli

    def is_remote(self, a: argparse.Namespace) -> bool:
        return bool(a.cmd == "balancer")

    def add_commands(self, sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        b = sub.add_parser("balancer", help="the load balancer: run the daemon, plan, status")
        bsub = b.add_subparsers(dest="balancer_cmd", required=True, metavar="COMMAND")
        run = bsub.add_parser("run", help="run the balancing daemon (leader or standby)")
        run.add_argument("--config", type=Path, required=True, help="the balancer's TOML file")
        run.add_argument(
            "--dry-run", action="store_true", help="decide and record rounds, move nothing"
        )
        run.add_argument(
            "--prometheus-port",
            type=int,
            default=0,
            metavar="PORT",
            help="serve the cluster's figures and the moves' cost for Prometheus on this "
            "port (default 0: not served)",
        )
        run.add_argument(
            "--prometheus-addr",
            default="127.0.0.1",
            metavar="ADDR",
            help="address for --prometheus-port (default 127.0.0.1)",
        )
        pl = bsub.add_parser("plan", help="what the balancer would do now, and why")
        pl.add_argument("--config", type=Path, help="the balancer's TOML file (default: defaults)")
        pl.add_argument("--json", action="store_true", help="print the decision as JSON")
        st = bsub.add_parser("status", help="leader, recent rounds and moves, cool-downs")
        st.add_argument("--config", type=Path, help="the balancer's TOML file (default: defaults)")
        st.add_argument("--rounds", type=int, default=5, help="recent rounds to show (default 5)")
        st.add_argument("--json", action="store_true", help="print as JSON")

    def dispatch(self, rt: Runtime | None, a: argparse.Namespace) -> int | None:
        if a.cmd != "balancer":
            return None
        try:
            cfg = BalancerConfig.from_toml(a.config) if a.config else BalancerConfig()
            if a.balancer_cmd == "run":
                return asyncio.run(_run(a, cfg))
            if a.balancer_cmd == "plan":
                return asyncio.run(_plan(a, cfg))
            return _status(a, cfg)
        except BalancerError as e:
            print(f"jaula: error: {e}", file=sys.stderr)
            return runtime_cli.EXIT_ERROR


def _open(a: argparse.Namespace, cfg: BalancerConfig) -> Any:
    from balancer.daemon import Balancer
    from migrate.cli import Nodes, operator_name
    from migrate.cluster_state import open_state

    nodes = Nodes(a.client_config)
    me = operator_name(nodes)
    state = open_state(nodes.cluster, me, nodes.client_cfg.secret_key)
    return Balancer(
        cfg, nodes, nodes.cluster.nodes, state, me, dry_run=getattr(a, "dry_run", False)
    )


async def _run(a: argparse.Namespace, cfg: BalancerConfig) -> int:
    b = _open(a, cfg)
    if a.prometheus_port:
        from balancer.prometheus import Exporter
        from runtime.errors import JaulaError

        b.exporter = Exporter()
        try:
            b.exporter.serve(a.prometheus_port, a.prometheus_addr)
        except OSError as e:
            b.state.close()
            raise JaulaError(
                f"--prometheus-port {a.prometheus_port}: cannot listen on "
                f"{a.prometheus_addr}: {e.strerror or e}; pick a free port"
            ) from e
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await b.run(stop)
    finally:
        b.state.close()
    return 0


async def _plan(a: argparse.Namespace, cfg: BalancerConfig) -> int:
    from balancer.daemon import decision_json, history_from_events
    from balancer.policy import plan

    b = _open(a, cfg)
    try:
        events = await asyncio.to_thread(b.state.events_since, 0, 1_000_000)
        history = history_from_events(events, cfg)
        view, down = await b.collect()
    finally:
        b.state.close()
    d = plan(view, cfg, history, view.at_s)
    if a.json:
        print(json.dumps({**decision_json(d, view), "unreachable": down}, indent=1))
        return 0
    loads = ", ".join(
        f"{n.name} {100 * (n.cpu_percent + n.memory_percent) / 200:.1f}%"
        + (" (draining)" if n.draining else "")
        for n in view.nodes
    )
    print(f"imbalance {d.imbalance:.3f} (threshold {cfg.threshold:g}); node loads: {loads}")
    for n, why in down.items():
        print(f"{n}: not reachable, left out ({why})")
    if not d.moves:
        print(f"no move: {d.reason.value}: {d.detail}")
        return 0
    print(f"{len(d.moves)} move(s), imbalance {d.imbalance:.3f} -> {d.imbalance_after:.3f}:")
    for m in d.moves:
        print(
            f"  {m.container[:12]} {m.source} -> {m.destination} ({m.why}, {m.strategy}): "
            f"gain {m.gain:.3f}, relief {m.relief:.3f}, cost {m.cost_score:.4f} "
            f"(downtime {m.cost.downtime_s:.3f} s, {m.cost.bytes / 1e6:.1f} MB, "
            f"total {m.cost.total_s:.2f} s)"
        )
    return 0


def _status(a: argparse.Namespace, cfg: BalancerConfig) -> int:
    from balancer.daemon import (
        ELECTION,
        EV_FAILED,
        EV_FINISHED,
        EV_ROUND,
        EV_STARTED,
        history_from_events,
    )
    from migrate.cli import Nodes, operator_name
    from migrate.cluster_state import open_state

    nodes = Nodes(a.client_config)
    state = open_state(nodes.cluster, operator_name(nodes), nodes.client_cfg.secret_key)
    try:
        leader = state.leader(ELECTION)
        events = state.events_since(0, 1_000_000)
        members = state.members()
    finally:
        state.close()
    now = time.time()
    history = history_from_events(events, cfg)
    rounds = [e for e in events if e.kind == EV_ROUND][-max(0, a.rounds) :]
    moves = [e for e in events if e.kind in (EV_STARTED, EV_FINISHED, EV_FAILED)][-20:]
    cooling = {
        m.container: until
        for m in history.moves
        if (until := history.cooldown_until_s(m.container, now, cfg)) > now
    }
    if a.json:
        out = {
            "leader": leader,
            "members": {m.name: m.status.value for m in members},
            "rounds": [{"seq": e.seq, "node": e.node, **e.data} for e in rounds],
            "moves": [{"seq": e.seq, "kind": e.kind, "node": e.node, **e.data} for e in moves],
            "cooling_down": {c: until - now for c, until in cooling.items()},
        }
        print(json.dumps(out, indent=1))
        return 0
    print(f"leader: {leader or 'none (no balancer runs)'}")
    if members:
        print("members: " + ", ".join(f"{m.name} {m.status.value}" for m in members))
    print(f"last {len(rounds)} round(s):")
    for e in rounds:
        d = e.data
        when = time.strftime("%H:%M:%S", time.localtime(e.time))
        print(
            f"  {when} by {e.node}: imbalance {d.get('imbalance', 0):.3f}, "
            f"{d.get('reason')}: {d.get('detail')}"
        )
    print(f"last {len(moves)} move event(s):")
    for e in moves:
        d = e.data
        what = e.kind.rsplit(".", 1)[-1]
        extra = ""
        if e.kind == EV_FINISHED:
            pred = d.get("predicted") or {}
            extra = (
                f": downtime {d.get('downtime_s', 0):.3f} s (predicted "
                f"{pred.get('downtime_s', 0):.3f}), {d.get('bytes_sent', 0) / 1e6:.1f} MB, "
                f"total {d.get('total_s', 0):.2f} s"
            )
        elif e.kind == EV_FAILED:
            extra = f": {d.get('error', '')[:200]}"
        print(
            f"  {what:<8} {str(d.get('container', ''))[:12]} {d.get('source')} -> "
            f"{d.get('destination')}{extra}"
        )
    for c, until in sorted(cooling.items()):
        print(f"cooling down: {c[:12]} for {until - now:.0f} s more")
    return 0


def extensions() -> tuple[runtime_cli.CliExtension, ...]:
    """Every layer's commands: runtime's come with :func:`runtime.cli.main`, then
    :mod:`migrate.cli`'s and the balancer's."""
    from migrate.cli import EXTENSIONS

    return (*EXTENSIONS, BalancerCommands())


def jaula_main(argv: Sequence[str] | None = None) -> int:
    """The ``jaula`` console script: every command, ``balancer`` included."""
    return runtime_cli.main(argv, extensions())


if __name__ == "__main__":
    sys.exit(jaula_main())
