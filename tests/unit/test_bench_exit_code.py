"""The benchmark's exit code (:func:`benchmarks.harness.exit_code`): jaula's runs decide it;
a baseline that cannot run here, or fails, is reported and does not fail the run."""

from __future__ import annotations

from typing import Any

from benchmarks.harness import exit_code

ALL = ["jaula", "runc", "podman"]


def run(system: str, ok: bool = True) -> dict[str, Any]:
    return {"system": system, "ok": ok}


def test_jaula_decides() -> None:
    good = [run("jaula (cold)"), run("jaula (postcopy)"), run("runc")]
    assert exit_code(good, {}, ALL) == 0
    # podman not installed, runc failing: reported, not fatal
    assert exit_code([*good, run("runc", ok=False)], {"podman": "not installed"}, ALL) == 0
    assert exit_code([*good, run("jaula (postcopy)", ok=False)], {}, ALL) == 1
    assert exit_code(good, {"jaula (cold)": "node serve failed"}, ALL) == 1
    assert exit_code([run("runc")], {"jaula": "no strategies"}, ALL) == 1
    assert exit_code([], {}, ALL) == 1


def test_without_jaula_the_baselines_that_ran_decide() -> None:
    asked = ["runc", "podman"]
    assert exit_code([run("runc")], {"podman": "not installed"}, asked) == 0
    assert exit_code([run("runc", ok=False)], {}, asked) == 1
    assert exit_code([], {"runc": "x", "podman": "y"}, asked) == 1
