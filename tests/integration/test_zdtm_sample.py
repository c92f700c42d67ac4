"""A dozen of CRIU's zdtm static tests through a jaula migration (``make zdtm`` runs them all).

The runner's own code (:mod:`benchmarks.zdtm`) on the ``[sample]`` of
``benchmarks/zdtm_tests.toml``: each test built statically from CRIU's source tree, put in
the zdtm image, run in a container on node1 of two real node services, migrated to node2
with ``cold`` (and ``postcopy`` for the sample's ``postcopy`` ones), signalled, and judged
by its own verdict; beside it the same test through plain ``criu dump``/``criu restore`` on
this host.  The assertion is the project's goal: a test plain CRIU passes passes through
jaula; one it does not pass is refused before the freeze (the container untouched on node1,
the test still passing there).  The campaign runs once for the module; each test is its own
case, naming the error line when it fails.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from benchmarks import zdtm
from tests.helpers.skips import needs_criu

# the module's campaign runs in the first case's set-up: about two minutes here
pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu, pytest.mark.timeout(900)]

SAMPLE = zdtm.load_test_list()


def _source_missing() -> str | None:
    try:
        zdtm.criu_source()
    except zdtm.RunError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, zdtm.Row]]:
    """Every sample test's row (test -> plain CRIU and jaula cells); the node services,
    containers and cgroups are removed at the end and a leak fails the module."""
    reason = _source_missing()
    if reason is not None:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("zdtm")
    camp = zdtm.prepare(SAMPLE.sample, work, work / "failed")
    try:
        if camp.jaula is None:
            pytest.fail(f"jaula could not be set up: {camp.jaula_error}")
        rows: dict[str, zdtm.Row] = {}
        for t in camp.tests:
            strategies = ["cold", *(["postcopy"] if t.name in SAMPLE.sample_postcopy else [])]
            (row,) = zdtm.run_campaign([t], strategies, camp.plain, camp.jaula)
            rows[t.name] = row
        for name, why in {**camp.unbuilt, **camp.skipped}.items():
            rows[name] = zdtm.Row(name, {"plain CRIU": zdtm.Result(zdtm.SKIPPED, why)})
        yield rows
    finally:
        problems = camp.close()
        assert not problems, "\n".join(problems)


CASES = [(t, "cold") for t in SAMPLE.sample] + [(t, "postcopy") for t in SAMPLE.sample_postcopy]


@pytest.mark.parametrize(("test", "strategy"), CASES, ids=[f"{t}-{s}" for t, s in CASES])
def test_zdtm_through_a_migration(campaign: dict[str, zdtm.Row], test: str, strategy: str) -> None:
    row = campaign[test]
    plain = row.cells["plain CRIU"]
    if plain.outcome == zdtm.SKIPPED:
        pytest.skip(f"{test}: {plain.error}")
    cell = row.cells[zdtm.JAULA_COLUMNS[strategy]]
    want = zdtm.PASS if plain.outcome == zdtm.PASS else zdtm.REFUSED
    assert cell.outcome == want, (
        f"{test} with {strategy}: jaula {cell.outcome} ({cell.error}; files in {cell.log}), "
        f"plain CRIU {plain.outcome} {plain.error}"
    )


def test_every_makefile_test_is_run_or_excluded_with_a_reason() -> None:
    reason = _source_missing()
    if reason is not None:
        pytest.skip(reason)
    static = zdtm.criu_source() / "test" / "zdtm" / "static"
    listed = set(SAMPLE.run) | set(SAMPLE.excluded)
    unlisted = sorted(zdtm.makefile_tests(static) - listed)
    assert not unlisted, f"add these to benchmarks/zdtm_tests.toml (run or excluded): {unlisted}"
    assert all(SAMPLE.excluded.values()), "every excluded test needs its reason"
