"""The real ``jaula`` CLI, run as a subprocess against one state root (``--state-root``).

Every linux and integration test drives the runtime this way, as a user would: the command
is ``python -m migrate.cli`` from the repository's root, so the tree under test is the one
that runs, with the migration commands the console script adds.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: argv of the CLI (the ``jaula`` console script is migrate.cli:jaula_main)
JAULA = [sys.executable, "-m", "migrate.cli"]


@dataclass
class Jaula:
    """Runs the real CLI against one state root."""

    root: Path

    def run(
        self, *args: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``jaula --state-root ROOT ARGS...``; with ``check``, raise AssertionError (with
        both outputs) when it exits non-zero."""
        p = subprocess.run(
            [*JAULA, "--state-root", str(self.root), *args],
            text=True,
            check=False,
            capture_output=True,
            timeout=timeout,
            input=input,
            cwd=REPO,
        )
        if check and p.returncode != 0:
            raise AssertionError(
                f"jaula {' '.join(args)} exited {p.returncode}:\n"
                f"stdout: {p.stdout}\nstderr: {p.stderr}"
            )
        return p

    def out(self, *args: str, timeout: float = 60) -> str:
        """The stdout of a command that must succeed."""
        return self.run(*args, timeout=timeout).stdout

    def container_ids(self) -> list[str]:
        """Ids of every container under the state root, sorted."""
        d = self.root / "containers"
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
