#!/usr/bin/env bash
# `make test`: the whole suite as two pytest runs side by side, because most of its time is
# spent waiting (on CRIU, timeouts, hold windows, node services), not computing.  Each shard
# is its own pytest session with its own numbered temp dir and its own cgroup parents for
# test nodes, so its leak checks see only its own containers, mounts, cgroups and
# processes (tests/helpers/leaks.py, tests/integration/cluster_setup.py).  Shard 1 prints as
# it goes; shard 2's output is kept in .build/test-shard2.log and printed after it.  The
# exit code is non-zero when either fails.
#
#   JAULA_TEST_SHARDS=1 make test        one serial run, as before
#   make test PYTEST_ARGS='-x -k foo'    extra pytest arguments for both shards
set -uo pipefail
cd "$(dirname "$0")/.."
pytest=(.venv/bin/pytest -p no:cacheprovider)
read -r -a extra <<<"${PYTEST_ARGS:-}"
if [ "${JAULA_TEST_SHARDS:-2}" = 1 ]; then
    exec "${pytest[@]}" "${extra[@]}" tests
fi
# the shards, of about the same length (pytest --durations): the node-service suites; the
# single-host root tests, the units and the two campaign samples
shard1=(tests/integration --ignore=tests/integration/test_zdtm_sample.py)
shard2=(tests/linux tests/unit tests/chaos tests/integration/test_zdtm_sample.py)
mkdir -p .build
log2=.build/test-shard2.log
"${pytest[@]}" "${extra[@]}" "${shard2[@]}" >"$log2" 2>&1 &
pid2=$!
trap 'kill -INT "$pid2" 2>/dev/null; wait "$pid2"; exit 130' INT TERM
echo "test: shard 2 (${shard2[*]}) runs beside this one; its output: $log2"
"${pytest[@]}" "${extra[@]}" "${shard1[@]}"
rc1=$?
wait "$pid2"
rc2=$?
trap - INT TERM
echo
echo "=============== shard 2 of 2: ${shard2[*]} (exit $rc2) ==============="
cat "$log2"
echo "test: shard 1 (${shard1[*]}) exit $rc1, shard 2 (${shard2[*]}) exit $rc2"
[ "$rc1" = 0 ] && [ "$rc2" = 0 ]
