#!/usr/bin/env bash
# scripts/bench-setup.sh: install what `make bench` compares jaula with (after `make setup`).
#
# The baselines of benchmarks/harness.py and what each needs (benchmarks/systems/*.py):
#   runc    Debian's runc, and umoci to unpack the workload images into rootfs dirs
#   podman  Debian's podman (4.3.1 on Debian 12), run with --runtime runc
# Both find jaula's CRIU (/usr/local/sbin/criu) on PATH.
#
# Idempotent: packages already installed are not touched (apt-get update runs only when one
# is missing). --no-install-recommends: runc recommends Debian's criu 3.17, which must not
# come in. Package scripts start no service (policy-rc.d, as scripts/setup.sh does).
# An install that fails is a warning, not an error: the harness then reports the system
# that cannot run in its rows, and jaula is measured anyway.
set -Eeuo pipefail
umask 022

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOG="$ROOT/.build/logs/bench-apt.log"
PACKAGES=(runc umoci podman)

say() { printf 'bench-setup: %s\n' "$*"; }

[ "$(id -u)" = 0 ] || { say "ERROR: run as root (it installs packages)" >&2; exit 1; }

missing=()
for p in "${PACKAGES[@]}"; do
    st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$st" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    say "runc, umoci and podman ok"
    exit 0
fi

say "apt: installing ${missing[*]} (the baselines the benchmark compares with)"
mkdir -p "$(dirname "$LOG")"
made_policy=
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# jaula bench-setup.sh: temporary, removed when it ends\nexit 101\n' \
        >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
fi
trap '[ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d' EXIT
export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-q -y -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef
          -o Dpkg::Options::=--force-confold)
if { apt-get "${APT_OPTS[@]}" update \
        && apt-get "${APT_OPTS[@]}" install --no-install-recommends "${missing[@]}"; } \
        >"$LOG" 2>&1; then
    say "apt: installed ${missing[*]}"
else
    say "WARNING: could not install ${missing[*]} (last lines of $LOG below); the benchmark" \
        "runs without them and says so in its rows" >&2
    tail -n 10 "$LOG" | sed 's/^/    /' >&2
fi
