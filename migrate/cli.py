"""Command lines of the migrate layer.

- ``jaula``: the runtime's commands (:mod:`runtime.cli`) plus ``checkpoint`` and ``restore``
  (and, as they land, ``migrate`` and ``node``).
- ``migrate CTR NODE``: the same as ``jaula migrate CTR NODE``.

Thin: parse, call the library, print.  Exit codes as :mod:`runtime.cli` (125 for jaula's own
errors).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from runtime import cli as runtime_cli
from runtime.container import Runtime


class MigrateCommands:
    """``checkpoint`` and ``restore`` for ``jaula`` (a :class:`runtime.cli.CliExtension`)."""

    def add_commands(self, sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        cp = sub.add_parser("checkpoint", help="checkpoint a running container with CRIU")
        cp.add_argument("--leave-running", action="store_true",
                        help="keep the container running after the checkpoint")
        cp.add_argument("-e", "--export", type=Path, metavar="FILE",
                        help="also write the checkpoint bundle as one tar file")
        cp.add_argument("--json", action="store_true", help="print the report as JSON")
        cp.add_argument("container")
        rs = sub.add_parser("restore", help="restore a checkpointed container")
        rs.add_argument("-i", "--import", dest="import_file", type=Path, metavar="FILE",
                        help="restore from an exported checkpoint bundle")
        rs.add_argument("-n", "--name", help="name for the restored container (with --import)")
        rs.add_argument("container", nargs="?")

    def dispatch(self, rt: Runtime, a: argparse.Namespace) -> int | None:
        if a.cmd == "checkpoint":
            from migrate.checkpoint import checkpoint

            r = checkpoint(rt, a.container, leave_running=a.leave_running, export=a.export)
            if a.json:
                print(json.dumps({k: str(v) if isinstance(v, Path) else v
                                  for k, v in asdict(r).items()}, indent=1))
            else:
                print(r.container_id)
                print(f"frozen {r.frozen_s:.3f} s (dump {r.dump_s:.3f} s, rootfs "
                      f"{r.rootfs_s:.3f} s), bundle {r.bundle_bytes / 1e6:.1f} MB"
                      + (f", exported to {r.exported}" if r.exported else ""), file=sys.stderr)
            return 0
        if a.cmd == "restore":
            from migrate.restore import restore

            if (a.container is None) == (a.import_file is None):
                print("jaula: error: restore takes a container or --import FILE (one of them)",
                      file=sys.stderr)
                return runtime_cli.EXIT_ERROR
            if a.name and a.import_file is None:
                print("jaula: error: --name goes with --import", file=sys.stderr)
                return runtime_cli.EXIT_ERROR
            c = restore(rt, a.container, import_file=a.import_file, name=a.name)
            print(c.id)
            return 0
        return None


EXTENSIONS = (MigrateCommands(),)


def jaula_main(argv: Sequence[str] | None = None) -> int:
    """The ``jaula`` console script."""
    return runtime_cli.main(argv, EXTENSIONS)


def migrate_main(argv: Sequence[str] | None = None) -> int:
    """The ``migrate`` console script: ``migrate CTR NODE`` = ``jaula migrate CTR NODE``."""
    return jaula_main(["migrate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(jaula_main())
