#!/usr/bin/env bash
# `make demo`: the main job on a local two-node default.
#
# Starts two node services (node1, node2) on 127.0.0.1 with their own CURVE keys and state
# roots, and a two-host network on this machine (migrate/localnet.py: node1's and node2's
# bridges joined by a veth "wire", and a client namespace on the wire playing a machine
# outside the cluster).  Runs a Redis container (Debian's redis-server in an OCI image the
# demo builds) on node1 with --network bridge, fills it with data, and starts a client in the
# client namespace that holds one TCP connection to the Redis, writing and reading back every
# 10 ms.  Migrates the Redis live to node2, shows the same data served there at the same IP,
# nothing left on node1, and the client's own longest gap next to jaula's downtime, its
# connection never reset.  Everything it made is removed at the end, also on failure.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
WORK=$(mktemp -d /tmp/jaula-demo.XXXXXX)
export JAULA_CLIENT_CONFIG="$WORK/admin-client.toml"
jaula() { "$PY" -m migrate.cli "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
PIDS=()
CLIENT=

cleanup() {
    set +e
    if [ -n "$CLIENT" ]; then kill "$CLIENT" 2>/dev/null; wait "$CLIENT" 2>/dev/null; fi
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    for n in node1 node2; do
        for id in $(jaula --state-root "$WORK/state/$n" ps -a -q 2>/dev/null); do
            jaula --state-root "$WORK/state/$n" rm -f "$id" >/dev/null
        done
    done
    "$PY" -m migrate.localnet down "$WORK/localnet.json"
    rm -rf "$WORK"
}
trap cleanup EXIT

step "jaula cluster init: keys, cluster file and configs for node1, node2 and operator admin"
# --base-port 0: ports the kernel finds free now (the default is 7001, 7002, ...)
jaula cluster init "$WORK" --nodes node1,node2 --operators admin --base-port 0 \
    --cgroup-parent 'jaula-demo-{node}'

step "A two-host network on this machine: node1's and node2's bridges on one wire, and a client"
eval "$("$PY" -m migrate.localnet up "$WORK/localnet.json" --leases "$WORK/leases.json" \
    --node-root "$WORK/state/node1" --node-root "$WORK/state/node2")"
echo "node1 bridge $bridge1, node2 bridge $bridge2, joined by wire $wire; subnet $subnet"
echo "client (outside the cluster): $client_ip in its own net namespace"

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

step "Run Redis on node1 (--network bridge) and fill it: 100000 keys plus one we will read back"
jaula --state-root "$WORK/state/node1" run -d --network bridge --name redis jaula-redis:latest \
    redis-server --port 6379 --bind 0.0.0.0 --save "" --appendonly no --protected-mode no >/dev/null
IP=$(jaula --node node1 inspect redis | "$PY" -c \
    'import json,sys; print(json.load(sys.stdin)[0]["NetworkSettings"]["IPAddress"])')
incl() { nsenter --net="$client_ns" "$@"; }
for _ in $(seq 50); do
    incl redis-cli -h "$IP" ping 2>/dev/null | grep -q PONG && break
    sleep 0.2
done
echo "redis on node1 at $IP:6379; from the client: $(incl redis-cli -h "$IP" ping)"
jaula --node node1 exec redis sh -c \
    'seq 1 100000 | awk "{print \"SET key:\" \$1 \" value:\" \$1}" | redis-cli --pipe' | tail -n 1
incl redis-cli -h "$IP" SET greeting "hello from node1" >/dev/null
echo "node1: DBSIZE $(incl redis-cli -h "$IP" DBSIZE), greeting: $(incl redis-cli -h "$IP" GET greeting)"
RUNID1=$(incl redis-cli -h "$IP" INFO server | grep run_id | tr -d '\r')
jaula node ls

step "A client outside the cluster connects once and keeps writing and reading (every 10 ms)"
incl "$PY" scripts/resp_client.py "$IP" 6379 "$WORK/client.stop" "$WORK/client.progress" \
    >"$WORK/client.out" 2>&1 &
CLIENT=$!
for _ in $(seq 100); do
    [ "$(cat "$WORK/client.progress" 2>/dev/null || echo 0)" -ge 50 ] && break
    kill -0 "$CLIENT" 2>/dev/null || break
    sleep 0.1
done
echo "client $client_ip -> $IP:6379: $(cat "$WORK/client.progress" 2>/dev/null || echo 0) round trips so far"

step "migrate redis node2"
jaula migrate redis node2 | tee "$WORK/migrate.out"
DOWNTIME=$(sed -n 's/^downtime \([0-9.]*\) s.*/\1/p' "$WORK/migrate.out")
AT=$(cat "$WORK/client.progress")
for _ in $(seq 100); do  # the client goes on on node2
    [ "$(cat "$WORK/client.progress")" -ge $((AT + 50)) ] && break
    kill -0 "$CLIENT" 2>/dev/null || break
    sleep 0.1
done
touch "$WORK/client.stop"
rc=0; wait "$CLIENT" || rc=$?
CLIENT=
read -r verdict count gap <"$WORK/client.out" || true
if [ "$rc" != 0 ] || [ "$verdict" != ok ]; then
    echo "demo: the client failed: $(cat "$WORK/client.out")" >&2; exit 1
fi
echo "client: $count round trips on one connection, never reset; its longest gap" \
    "$(awk "BEGIN{printf \"%.0f\", $gap*1000}") ms, jaula's downtime" \
    "$(awk "BEGIN{printf \"%.0f\", $DOWNTIME*1000}") ms"

step "The same data, served on node2 by the same process, at the same IP"
echo "node2: DBSIZE $(incl redis-cli -h "$IP" DBSIZE), greeting: $(incl redis-cli -h "$IP" GET greeting), client's key: $(incl redis-cli -h "$IP" GET jaula:client)"
IP2=$(jaula --node node2 inspect redis | "$PY" -c \
    'import json,sys; print(json.load(sys.stdin)[0]["NetworkSettings"]["IPAddress"])')
echo "address on node2: $IP2 ($([ "$IP" = "$IP2" ] && echo 'the same' || echo 'DIFFERENT'))"
[ "$IP" = "$IP2" ]
RUNID2=$(incl redis-cli -h "$IP" INFO server | grep run_id | tr -d '\r')
echo "redis $RUNID1 before, $RUNID2 after: $([ "$RUNID1" = "$RUNID2" ] && echo 'the same server, not restarted' || echo 'DIFFERENT')"
[ "$RUNID1" = "$RUNID2" ]
incl redis-cli -h "$IP" SET after "written on node2" >/dev/null
echo "node2 keeps taking writes: $(jaula --node node2 exec redis redis-cli GET after)"

step "Nothing left on node1 (only the record of where it went)"
jaula --node node1 ps -a
CID=$(jaula --node node2 inspect redis | "$PY" -c 'import json,sys; print(json.load(sys.stdin)[0]["Id"])')
left=$(grep -c "$WORK/state/node1/containers/$CID" /proc/mounts || true)
left=$((left + $(find /sys/fs/cgroup -path "*jaula-demo-node1*" -name "$CID" | wc -l)))
if [ "$left" != 0 ]; then echo "demo: node1 still has mounts or cgroups of $CID" >&2; exit 1; fi
if ip link show "jl${CID:0:12}" >/dev/null 2>&1; then echo "demo: node1's veth of $CID is left" >&2; exit 1; fi
echo "node1 holds no mount, cgroup, veth or process of $CID"
jaula node ls
