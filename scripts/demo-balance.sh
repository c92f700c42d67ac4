#!/usr/bin/env bash
# `make demo-balance`: a loaded node relieved by the balancing daemon, on a local three-node
# default.
#
# Starts three node services (node1..node3) on 127.0.0.1, runs two CPU-busy containers
# (busy loops held to half a core each by --cpus) and an idle one on node1, shows what
# `jaula balancer plan` would do, starts `jaula balancer run` and waits until it has moved
# a busy container off node1, shows `jaula balancer status` (the rounds, the move with its
# predicted and measured downtime, the cool-down) and where each container runs, then stops
# everything and cleans up.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
WORK=$(mktemp -d /tmp/jaula-demo-balance.XXXXXX)
export JAULA_CLIENT_CONFIG="$WORK/admin-client.toml"
jaula() { "$PY" -m balancer.cli "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
NODES=(node1 node2 node3)
PIDS=()

cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    for n in "${NODES[@]}"; do
        for id in $(jaula --state-root "$WORK/state/$n" ps -a -q 2>/dev/null); do
            jaula --state-root "$WORK/state/$n" rm -f "$id" >/dev/null
        done
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

step "jaula cluster init: node1, node2, node3 and operator admin"
jaula cluster init "$WORK" --nodes node1,node2,node3 --operators admin --base-port 0 \
    --cgroup-parent 'jaula-demo-{node}' 2>/dev/null

step "A busybox image on every node"
LAYOUT=$("$PY" -m tests.helpers.images busybox "$WORK/image" | tail -n 1)
for n in "${NODES[@]}"; do
    jaula --state-root "$WORK/state/$n" image import "$LAYOUT" --name busybox:latest >/dev/null
done

step "Start the three node services"
for n in "${NODES[@]}"; do
    # "$PY" itself in the background, not the jaula function: $! must be the service's pid
    "$PY" -m balancer.cli node serve --config "$WORK/$n.toml" >"$WORK/$n.log" 2>&1 &
    PIDS+=($!)
done
for _ in $(seq 100); do
    [ "$(jaula node ls 2>/dev/null | grep -c ' yes ')" = 3 ] && break
    sleep 0.2
done
jaula node ls

step "Load node1: two busy loops (half a core each) and an idle shell"
for c in busy1 busy2; do
    jaula --state-root "$WORK/state/node1" run -d --name "$c" --cpus 0.5 busybox \
        sh -c 'while :; do :; done' >/dev/null
done
jaula --state-root "$WORK/state/node1" run -d --name idle busybox \
    sh -c 'while :; do sleep 1; done' >/dev/null
jaula --node node1 ps

# the three nodes share this host, so each is judged by its containers' share of it
cat >"$WORK/balancer.toml" <<TOML
[balancer]
interval_s = 2.0
hold_rounds = 2
load_from = "containers"
strategies = ["cold"]
memory_reserve_bytes = 0
TOML
sleep 3  # a few metrics samples

step "jaula balancer plan: what a round would do now"
jaula balancer plan --config "$WORK/balancer.toml"

step "jaula balancer run (the daemon; rounds every 2 s, hold 2 rounds)"
"$PY" -m balancer.cli --log-level warning balancer run --config "$WORK/balancer.toml" \
    >"$WORK/balancer.log" 2>&1 &
PIDS+=($!)
moved=""
for _ in $(seq 120); do
    if jaula balancer status --config "$WORK/balancer.toml" | grep -q '^  finished'; then
        moved=yes
        break
    fi
    sleep 1
done
[ -n "$moved" ] || { echo "demo: no move within 120 s" >&2; cat "$WORK/balancer.log" >&2; exit 1; }
sleep 6  # a few more rounds: nothing else moves

step "jaula balancer status"
jaula balancer status --config "$WORK/balancer.toml"

step "Where each container runs now"
for n in "${NODES[@]}"; do
    echo "$n: $(jaula --node "$n" ps -q | wc -l) running: $(jaula --node "$n" ps --format json |
        "$PY" -c 'import json,sys; print(" ".join(c["name"] for c in json.load(sys.stdin)) or "-")')"
done
