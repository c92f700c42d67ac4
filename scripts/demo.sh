#!/usr/bin/env bash
# `make demo`: the main job on a local two-node default.
#
# Starts two node services (node1, node2) on 127.0.0.1 with their own CURVE keys and state
# roots, runs a Redis container (Debian's redis-server in an OCI image the demo builds) on
# node1, fills it with data, migrates it live to node2, shows the same data served there
# and nothing left on node1, prints the downtime, then stops the nodes and cleans up.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
WORK=$(mktemp -d /tmp/jaula-demo.XXXXXX)
export JAULA_CLIENT_CONFIG="$WORK/admin-client.toml"
jaula() { "$PY" -m migrate.cli "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
PIDS=()

cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    for n in node1 node2; do
        for id in $(jaula --state-root "$WORK/state/$n" ps -a -q 2>/dev/null); do
            jaula --state-root "$WORK/state/$n" rm -f "$id" >/dev/null
        done
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

step "jaula cluster init: keys, cluster file and configs for node1, node2 and operator admin"
# --base-port 0: ports the kernel finds free now (the default is 7001, 7002, ...)
jaula cluster init "$WORK" --nodes node1,node2 --operators admin --base-port 0 \
    --cgroup-parent 'jaula-demo-{node}'

step "Build a Redis OCI image (Debian's redis-server) and import it on node1 only"
LAYOUT=$("$PY" -m tests.helpers.images redis "$WORK/image" | tail -n 1)
jaula --state-root "$WORK/state/node1" image import "$LAYOUT" --name jaula-redis:latest >/dev/null
jaula --state-root "$WORK/state/node1" image ls

step "Start the two node services (ZeroMQ + CURVE on 127.0.0.1)"
for n in node1 node2; do
    "$PY" -m migrate.cli node serve --config "$WORK/$n.toml" >"$WORK/$n.log" 2>&1 &
    PIDS+=($!)
done
for _ in $(seq 50); do
    [ "$(jaula node ls 2>/dev/null | grep -c ' yes ')" = 2 ] && break
    sleep 0.2
done
jaula node ls

step "Run Redis on node1 and fill it: 100000 keys plus one we will read back"
jaula --state-root "$WORK/state/node1" run -d --name redis jaula-redis:latest >/dev/null
for _ in $(seq 50); do
    jaula --node node1 exec redis redis-cli ping 2>/dev/null | grep -q PONG && break
    sleep 0.2
done
jaula --node node1 exec redis sh -c \
    'seq 1 100000 | awk "{print \"SET key:\" \$1 \" value:\" \$1}" | redis-cli --pipe' | tail -n 1
jaula --node node1 exec redis redis-cli SET greeting "hello from node1" >/dev/null
echo "node1: DBSIZE $(jaula --node node1 exec redis redis-cli DBSIZE), greeting: $(jaula --node node1 exec redis redis-cli GET greeting)"
RUNID1=$(jaula --node node1 exec redis redis-cli INFO server | grep run_id | tr -d '\r')
jaula node ls

step "migrate redis node2"
jaula migrate redis node2

step "The same data, served on node2 by the same process"
echo "node2: DBSIZE $(jaula --node node2 exec redis redis-cli DBSIZE), greeting: $(jaula --node node2 exec redis redis-cli GET greeting)"
RUNID2=$(jaula --node node2 exec redis redis-cli INFO server | grep run_id | tr -d '\r')
echo "redis $RUNID1 before, $RUNID2 after: $([ "$RUNID1" = "$RUNID2" ] && echo 'the same server, not restarted' || echo 'DIFFERENT')"
[ "$RUNID1" = "$RUNID2" ]
jaula --node node2 exec redis redis-cli SET after "written on node2" >/dev/null
echo "node2 keeps taking writes: $(jaula --node node2 exec redis redis-cli GET after)"

step "Nothing left on node1 (only the record of where it went)"
jaula --node node1 ps -a
CID=$(jaula --node node2 inspect redis | "$PY" -c 'import json,sys; print(json.load(sys.stdin)[0]["Id"])')
left=$(grep -c "$WORK/state/node1/containers/$CID" /proc/mounts || true)
left=$((left + $(find /sys/fs/cgroup -path "*jaula-demo-node1*" -name "$CID" | wc -l)))
if [ "$left" != 0 ]; then echo "demo: node1 still has mounts or cgroups of $CID" >&2; exit 1; fi
echo "node1 holds no mount, cgroup or process of $CID"
jaula node ls
