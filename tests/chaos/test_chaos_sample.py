"""A sample of the fault campaign (``make chaos`` runs the whole of it): a few faults at
the phases of a migration, each checked against the two-outcome rule (the container runs on
exactly one node, its counter intact, nothing left).  ``JAULA_CHAOS_SAMPLE`` sets how many
(default 8: one of each fault, two strategies)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos.campaign import campaign
from tests.helpers.skips import needs_criu

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


@pytest.mark.timeout(3600)
def test_a_sample_of_faults_loses_doubles_and_leaks_nothing(
    tmp_path: Path, busybox_image_layout: Path
) -> None:
    n = int(os.environ.get("JAULA_CHAOS_SAMPLE", "8"))
    lines: list[str] = []

    def log(line: str) -> None:  # kept for the failure message, and shown with -s
        lines.append(line)
        print(line, flush=True)

    ledger = campaign(tmp_path, busybox_image_layout, n, ["cold", "postcopy"], 15, log)
    report = ledger.table() + "\n" + "\n".join([*lines, *ledger.notes])
    assert ledger.total("faults") >= n, report
    assert ledger.bad == 0, report
    print(report)
