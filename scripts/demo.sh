#!/usr/bin/env bash
# `make demo`: the main job on a local default.
#
# Builds a real OCI image (Debian's busybox-static packed by umoci), imports it into a
# throw-away state root, runs a container from it, execs into it, reads its logs, removes
# it, and checks that nothing (mount, cgroup, process) is left behind.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
WORK=$(mktemp -d /tmp/jaula-demo.XXXXXX)
export JAULA_ROOT="$WORK/state"
jaula() { "$PY" -m migrate.cli "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

cleanup() {
    for id in $(jaula ps -a -q 2>/dev/null); do jaula rm -f "$id" >/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

step "Build a busybox OCI image with umoci"
LAYOUT=$("$PY" -c 'import sys; from pathlib import Path
from tests.helpers.images import build_busybox_image
print(build_busybox_image(Path(sys.argv[1])))' "$WORK/image")
echo "$LAYOUT"

step "jaula image import"
jaula image import "$LAYOUT" --name busybox:latest
jaula image ls

step "jaula run -d: a counter with a memory limit, in its own namespaces"
jaula run -d --name demo --memory 64m --pids-limit 32 --hostname demo busybox \
    sh -c 'i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 0.2; done'
sleep 1
jaula ps

step "jaula exec: the container's own pid namespace, hostname and mounts"
jaula exec demo sh -c 'hostname; ps; grep -E " / | /proc | /dev " /proc/mounts'

step "jaula logs"
jaula logs demo | tail -n 3

step "jaula pause / resume"
jaula pause demo && jaula ps && jaula resume demo

step "jaula rm -f"
CID=$(jaula inspect demo | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["Id"])')
jaula rm -f demo
left=$( (grep -c "$CID" /proc/mounts || true; find /sys/fs/cgroup -name "$CID" | wc -l) | awk "{s+=\$1} END {print s}")
if [ "$left" != "0" ]; then echo "demo: something was left behind for $CID" >&2; exit 1; fi
echo "nothing left behind: no mount, cgroup or process of $CID"
