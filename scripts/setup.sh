#!/usr/bin/env bash
# scripts/setup.sh: install everything jaula needs on a Debian 12 host (`make setup`).
#
# Idempotent: every step checks first and does nothing when already done, so a second
# run takes a second or two. What it does:
#   1. Debian packages (apt-get update only when a package is missing). Services are not
#      started by package scripts (policy-rc.d).
#   2. CRIU >= 4.2 that passes `criu check` and is jaula's build: Debian's sid (then forky,
#      trixie) source with scripts/criu-patches/*.patch applied, installed to
#      /usr/local/sbin/criu; `criu --version` shows "GitID: jaula-<hash of the patches>".
#      CRIU keeps its kernel-feature cache (/run/criu.kdat) only when /run is a tmpfs, as
#      on systemd hosts; elsewhere (this VM) every dump and restore probes the kernel again,
#      ~10 ms each. Never in a world-writable place: root's CRIU trusts that file. Debian
#      12's own criu 3.17 fails on recent kernels: never used.
#   3. The venv .venv (python3 >= 3.11) with `pip install -e '.[test]'`, redone only when
#      pyproject.toml changes.
#   4. pycriu (not on PyPI), built from the same CRIU source tree, installed into the venv.
#
# Work files live in .build/ (gitignored): the CRIU source and its own apt lists in
# .build/criu-src, logs of long steps in .build/logs. Nothing is added to /etc/apt.
#
# Knobs (environment):
#   JAULA_CRIU_SUITES  Debian suites to take the CRIU source from, in order (default
#                      "sid forky trixie"). CRIU 4.2 or newer is needed: on kernels 6.16+
#                      4.1 cannot dump any TCP/UDP socket ("Can't get 1:16 opt", CRIU
#                      issue 2718, fixed in 4.2), so trixie's 4.1.1 is only a last resort
#                      that the version check then refuses.
#   JAULA_CRIU_PREFIX  where to install criu (default /usr/local/sbin). When set, a criu
#                      elsewhere on PATH is not accepted: useful to test the build path.
set -Eeuo pipefail
umask 022

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BUILD="$ROOT/.build"
SRC="$BUILD/criu-src"
LOGS="$BUILD/logs"
VENV="$ROOT/.venv"
CRIU_MIN=4.2
CRIU_SUITES=${JAULA_CRIU_SUITES:-sid forky trixie}
CRIU_PREFIX=${JAULA_CRIU_PREFIX:-/usr/local/sbin}
CRIU_BIN="$CRIU_PREFIX/criu"
DEBIAN_MIRROR=http://deb.debian.org/debian
DEBIAN_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
JOBS=$(nproc 2>/dev/null || echo 2)

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1
# We may be run from make: keep its jobserver and flags away from CRIU's make.
unset MAKEFLAGS MFLAGS MAKELEVEL MAKEOVERRIDES

APT_PACKAGES=(
    # used by jaula, its tests and its demo
    busybox-static umoci skopeo runc redis-server iptables iproute2 e2fsprogs util-linux
    # protoc, for pycriu's Python protobuf modules
    protobuf-compiler
    # to build CRIU (the minimal set found by building 4.1.1 and 4.2.1 here; libbsd and
    # gnutls are optional for CRIU but named so that every node builds the same features)
    gcc make libc6-dev pkg-config xz-utils patch
    libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler
    libnl-3-dev libnet1-dev libcap-dev uuid-dev libbsd-dev libgnutls28-dev
)

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }
trap 'printf "setup: ERROR: line %s failed (exit %s): %s\n" "$LINENO" "$?" "$BASH_COMMAND" >&2' ERR

CLEANUP=()
cleanup() { local c; for c in "${CLEANUP[@]}"; do eval "$c" || true; done; }
trap cleanup EXIT
trap 'exit 130' INT TERM    # so that the EXIT trap runs

# run_logged NAME CMD...: run CMD with its output in .build/logs/NAME.log; on failure show
# the end of the log and stop.
run_logged() {
    local name=$1; shift
    local log="$LOGS/$name.log"
    mkdir -p "$LOGS"
    if ! "$@" >"$log" 2>&1 9>&-; then    # 9: the setup lock, not for children
        printf 'setup: ERROR: %s failed: %s\n' "$name" "$*" >&2
        printf 'setup: last lines of %s:\n' "$log" >&2
        tail -n 25 "$log" | sed 's/^/    /' >&2
        exit 1
    fi
}

version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

# ---------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "run as root (it installs packages and /usr/local/sbin/criu)"
{ [ -r /etc/debian_version ] && command -v apt-get >/dev/null; } || die "this script expects Debian (apt-get)"
mkdir -p "$BUILD"
exec 9>"$BUILD/.setup.lock"
flock -w 900 9 || die "another setup run holds $BUILD/.setup.lock"

# --- 1. Debian packages -----------------------------------------------------------------
command -v python3 >/dev/null || APT_PACKAGES+=(python3)
if command -v python3 >/dev/null && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    APT_PACKAGES+=(python3-venv)    # Debian's python3 has no ensurepip without it
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
    st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$st" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    say "apt packages ok"
else
    say "apt: installing ${missing[*]}"
    # Keep package scripts from starting services (redis-server): the docker-style
    # policy-rc.d, only for the time of this run and only if there is none already.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# jaula setup.sh: temporary, removed when setup ends\nexit 101\n' \
            >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        CLEANUP+=("rm -f /usr/sbin/policy-rc.d")
    fi
    APT_OPTS=(-q -y -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef
              -o Dpkg::Options::=--force-confold)
    run_logged apt-update apt-get "${APT_OPTS[@]}" update
    # --no-install-recommends: runc recommends Debian's criu 3.17, which must not come in.
    run_logged apt-install apt-get "${APT_OPTS[@]}" install --no-install-recommends "${missing[@]}"
    say "apt: installed ${#missing[@]} package(s)"
fi
command -v python3 >/dev/null || die "python3 not found on PATH"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "python3 on PATH is $(python3 -V 2>&1); jaula needs >= 3.11"

# --- CRIU helpers -----------------------------------------------------------------------
PATCHES=("$ROOT"/scripts/criu-patches/*.patch)
BUILD_ID="jaula-$(cat "${PATCHES[@]}" | sha256sum | cut -c1-10)"
# criu_ours BIN: BIN is jaula's build of CRIU (the patches of this checkout; a build where
# some did not apply is marked "-partial" and said again at every run).
criu_ours() { [[ $({ "$1" --version 2>/dev/null || true; }) == *"GitID: $BUILD_ID"* ]]; }
criu_partial() { [[ $({ "$1" --version 2>/dev/null || true; }) == *"GitID: $BUILD_ID-partial"* ]]; }
criu_version() { { "$1" --version 2>/dev/null || true; } | sed -n 's/^Version: *//p' | head -n1; }

# criu_good BIN: BIN runs, is >= CRIU_MIN and `criu check` says "Looks good".
criu_good() {
    local bin=$1 v out
    [ -x "$bin" ] || return 1
    v=$(criu_version "$bin")
    [ -n "$v" ] && version_ge "$v" "$CRIU_MIN" || return 1
    out=$("$bin" check 2>&1) || return 1
    [[ $out == *"Looks good"* ]]
}

# apt_src_opts SUITE: sets APT_SRC_OPTS, options for apt-get/apt-cache to use a private
# configuration that only knows the deb-src entry of SUITE (written by apt_src_update). Its
# lists live in .build/criu-src/apt, so the host's apt sources and lists stay as they were.
apt_src_opts() {
    local d="$SRC/apt/$1"
    APT_SRC_OPTS=(-o "Dir::Etc::SourceList=$d/sources.list" -o "Dir::Etc::SourceParts=$d/parts"
                  -o "Dir::State::Lists=$d/lists" -o "Dir::Cache=$d/cache"
                  -o APT::Sandbox::User=root -o Acquire::Languages=none)
}
apt_src_update() {
    local suite=$1 d="$SRC/apt/$1"
    mkdir -p "$d/parts" "$d/lists/partial" "$d/cache/archives/partial"
    printf 'deb-src [signed-by=%s] %s %s main\n' "$DEBIAN_KEYRING" "$DEBIAN_MIRROR" "$suite" \
        >"$d/sources.list"
    apt_src_opts "$suite"
    apt-get -q "${APT_SRC_OPTS[@]}" update >"$LOGS/apt-src-$suite.log" 2>&1 \
        && ! grep -q '^E: ' "$LOGS/apt-src-$suite.log"
}
# Debian version of criu in SUITE's sources, e.g. 4.1.1-1.
apt_src_version() {
    apt_src_opts "$1"
    apt-cache "${APT_SRC_OPTS[@]}" showsrc criu 2>/dev/null | sed -n 's/^Version: //p' \
        | sort -V | tail -n1
}
src_desc() { local deb suite file; read -r deb suite file <"$SRC_TREE/.jaula-unpacked"
             printf 'Debian %s source %s (%s)\n' "$suite" "$deb" "$file"; }
upstream_of() { local v=${1#*:}; printf '%s\n' "${v%-*}"; }

# fetch_source SUITE: put the upstream source of SUITE's criu in $SRC/criu-<version>.
# Only the orig tarball is used: the mirror may not serve the .dsc and Debian tarball, and
# CRIU builds with plain make. Prints the tree's path.
fetch_source() {
    local suite=$1 deb up dl orig sum want tree tmp
    deb=$(apt_src_version "$suite")
    [ -n "$deb" ] || return 1
    up=$(upstream_of "$deb")
    tree="$SRC/criu-$up"
    if [ -f "$tree/.jaula-unpacked" ]; then printf '%s\n' "$tree"; return 0; fi
    dl="$SRC/dl-$suite"
    rm -rf "$dl"; mkdir -p "$dl"
    apt_src_opts "$suite"
    # Fails when the .dsc or the Debian tarball is missing; the orig tarball may be there.
    (cd "$dl" && apt-get -q "${APT_SRC_OPTS[@]}" source --download-only "criu=$deb") \
        >"$LOGS/criu-source-$suite.log" 2>&1 || true
    orig=$(find "$dl" -maxdepth 1 -name "criu_$up.orig.tar.*" ! -name '*.asc' | head -n1)
    [ -n "$orig" ] || { say "criu: no source tarball from $suite (see $LOGS/criu-source-$suite.log)" >&2; return 1; }
    # the tarball's sha256 from the (signed) source index, in the stanza of version $deb
    want=$(apt-cache "${APT_SRC_OPTS[@]}" showsrc criu 2>/dev/null | awk -v v="$deb" \
        -v f="$(basename "$orig")" '
        function flush() { if (ver == v && sum != "") { print sum; done = 1; exit } ver = sum = "" }
        /^$/ { flush(); next }
        /^Version: / { ver = $2 }
        /^Checksums-Sha256:/ { s = 1; next }
        /^[^ ]/ { s = 0 }
        s && $3 == f { sum = $1 }
        END { if (!done) flush() }')
    sum=$(sha256sum "$orig" | cut -d' ' -f1)
    [ -n "$want" ] && [ "$sum" = "$want" ] || { say "criu: checksum mismatch for $orig" >&2; return 1; }
    tmp=$(mktemp -d "$SRC/unpack.XXXXXX")
    tar -xf "$orig" -C "$tmp"
    [ -f "$tmp/criu-$up/Makefile" ] || { rm -rf "$tmp"; say "criu: unexpected layout in $orig" >&2; return 1; }
    rm -rf "$tree"
    mv "$tmp/criu-$up" "$tree"
    rmdir "$tmp"
    # stamp: Debian version, suite, tarball
    printf '%s %s %s\n' "$deb" "$suite" "$(basename "$orig")" >"$tree/.jaula-unpacked"
    printf '%s\n' "$tree"
}

# ensure_source [WANT]: a CRIU source tree, preferably of upstream version WANT; a cached
# tree is used without touching the network. Sets SRC_TREE.
ensure_source() {
    local want=${1:-} t suite later=()
    mkdir -p "$SRC" "$LOGS"
    if [ -n "$want" ] && [ -f "$SRC/criu-$want/.jaula-unpacked" ]; then
        SRC_TREE="$SRC/criu-$want"; return 0
    fi
    if [ -z "$want" ]; then
        for suite in $CRIU_SUITES; do
            # a tree already unpacked from a suite we would pick: no network needed
            for t in "$SRC"/criu-*/.jaula-unpacked; do
                case $t in *.jaula-*/.jaula-unpacked) continue ;; esac  # a patched build copy
                [ -f "$t" ] && [ "$(cut -d' ' -f2 "$t")" = "$suite" ] && { SRC_TREE=$(dirname "$t"); return 0; }
            done
        done
    fi
    say "criu: fetching the source from Debian ($CRIU_SUITES)"
    # Suites in order; with WANT, a suite carrying another version is only a fallback.
    # A suite's index is downloaded only if no earlier suite gave a usable source.
    for suite in $CRIU_SUITES; do
        if ! apt_src_update "$suite"; then
            say "criu: could not read $suite's source index (see $LOGS/apt-src-$suite.log)" >&2
            continue
        fi
        if [ -n "$want" ] && [ "$(upstream_of "$(apt_src_version "$suite")")" != "$want" ]; then
            later+=("$suite"); continue
        fi
        if SRC_TREE=$(fetch_source "$suite"); then say "criu: got $(src_desc)"; return 0; fi
    done
    for suite in "${later[@]}"; do
        if SRC_TREE=$(fetch_source "$suite"); then say "criu: got $(src_desc)"; return 0; fi
    done
    die "could not get CRIU's source from Debian suites: $CRIU_SUITES (logs in $LOGS)"
}

# build_tree: build the criu binary and lib/ (libcriu, pycriu's generated modules) in a
# copy of the source tree with jaula's patches applied; sets SRC_TREE to that copy.
build_tree() {
    local out="$SRC_TREE.$BUILD_ID" p
    if [ -f "$out/.jaula-built" ] && [ -x "$out/criu/criu" ] \
        && [ -f "$out/lib/pycriu/rpc_pb2.py" ]; then
        SRC_TREE=$out; return 0
    fi
    rm -rf "$out" "$out.tmp" "$SRC_TREE".jaula-*  # older builds: one is enough
    cp -a "$SRC_TREE" "$out.tmp"
    rm -f "$out.tmp/.jaula-built"
    local gitid=$BUILD_ID
    for p in "${PATCHES[@]}"; do
        # --fuzz=0: on a newer CRIU a hunk applies exactly where it was written, or not at all
        if patch -d "$out.tmp" -p1 --forward --fuzz=0 --dry-run <"$p" >>"$LOGS/criu-patch.log" 2>&1; then
            patch -d "$out.tmp" -p1 --forward --fuzz=0 <"$p" >>"$LOGS/criu-patch.log" 2>&1
            say "criu: applied $(basename "$p")"
        else
            gitid=$BUILD_ID-partial
            say "WARNING: $(basename "$p") does not apply to $(basename "$SRC_TREE"); building without it (see $LOGS/criu-patch.log)" >&2
        fi
    done
    say "criu: building $(basename "$SRC_TREE") as $gitid (make -j$JOBS criu lib, ~40 s)"
    local t0=$SECONDS
    run_logged criu-clean make -C "$out.tmp" clean
    run_logged criu-build make -C "$out.tmp" -j"$JOBS" criu GITID="$gitid"
    run_logged criu-build-lib make -C "$out.tmp" -j"$JOBS" lib GITID="$gitid"
    touch "$out.tmp/.jaula-built"
    mv "$out.tmp" "$out"
    SRC_TREE=$out
    say "criu: built in $((SECONDS - t0)) s"
}

# --- 2. CRIU ----------------------------------------------------------------------------
CRIU=""
if criu_good "$CRIU_BIN" && criu_ours "$CRIU_BIN"; then
    CRIU=$CRIU_BIN
    say "criu $(criu_version "$CRIU") ok (cached, $CRIU)"
elif [ -z "${JAULA_CRIU_PREFIX:-}" ] && sys=$(command -v criu) && [ "$sys" != "$CRIU_BIN" ] \
        && criu_good "$sys" && criu_ours "$sys"; then
    CRIU=$sys
    say "criu $(criu_version "$CRIU") ok (system, $CRIU)"
else
    if criu_good "$CRIU_BIN"; then
        say "criu: $CRIU_BIN is not $BUILD_ID (scripts/criu-patches); rebuilding"
    elif [ -e "$CRIU_BIN" ]; then
        say "criu: $CRIU_BIN ($(criu_version "$CRIU_BIN" || true)) fails the check; rebuilding"
    fi
    ensure_source ""
    build_tree
    criu_good "$SRC_TREE/criu/criu" \
        || die "the freshly built criu fails 'criu check': $("$SRC_TREE/criu/criu" check 2>&1 | tail -n 5)"
    mkdir -p "$CRIU_PREFIX"
    install -m 0755 "$SRC_TREE/criu/criu" "$CRIU_BIN.new.$$"
    mv -f "$CRIU_BIN.new.$$" "$CRIU_BIN"    # atomic: a criu running now keeps its binary
    criu_good "$CRIU_BIN" || die "installed $CRIU_BIN but it fails 'criu check'"
    CRIU=$CRIU_BIN
    say "criu $(criu_version "$CRIU") ok (built from $(src_desc), installed as $CRIU)"
fi
criu_partial "$CRIU" && say "WARNING: $CRIU lacks some of scripts/criu-patches (they did not apply to its source): it works, with longer downtimes" >&2
CRIU_VER=$(criu_version "$CRIU")
if [ -z "${JAULA_CRIU_PREFIX:-}" ]; then
    onpath=$(command -v criu || true)
    if [ "$onpath" != "$CRIU" ]; then
        say "WARNING: 'criu' on PATH is ${onpath:-missing}, not $CRIU: put $(dirname "$CRIU") first in PATH" >&2
    fi
fi

# --- 3. venv ----------------------------------------------------------------------------
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    [ -e "$VENV" ] && say "venv: $VENV is unusable, recreating it"
    rm -rf "$VENV"
    run_logged venv python3 -m venv "$VENV"
    say "venv: created with $("$VENV/bin/python" -V 2>&1)"
fi
PY="$VENV/bin/python"
PYPROJECT_HASH=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
if [ "$(cat "$VENV/.jaula-pyproject.sha256" 2>/dev/null || true)" = "$PYPROJECT_HASH" ]; then
    say "venv ok (cached)"
else
    say "venv: pip install -e '.[test]'"
    run_logged pip-install "$PY" -m pip install -q -e "${ROOT}[test]"
    echo "$PYPROJECT_HASH" >"$VENV/.jaula-pyproject.sha256"
    say "venv ok"
fi

# --- 4. pycriu --------------------------------------------------------------------------
# Import pycriu as installed (-I: not from the cwd), use rpc_pb2, and turn an image message
# with a repeated field into a dict and back (pb2dict is what breaks across protobuf majors).
# Prints the version on stdout; errors (and warnings) go to .build/logs/pycriu-check.log.
pycriu_version() {
    mkdir -p "$LOGS"
    (cd / && "$PY" -I - 2>"$LOGS/pycriu-check.log") <<'EOF'
import pycriu
from pycriu import rpc_pb2
from pycriu.images import pb, pb2dict
req = rpc_pb2.criu_req(type=rpc_pb2.DUMP, notify_success=True)
req.opts.images_dir_fd = 3
req.opts.inherit_fd.add(key="pipe:[1]", fd=4)
assert rpc_pb2.criu_req.FromString(req.SerializeToString()) == req
entry = pb.pstree_entry(pid=1, ppid=0, pgid=1, sid=1, threads=[1, 2])
d = pb2dict.pb2dict(entry)
back = pb.pstree_entry()
pb2dict.dict2pb(d, back)
assert back == entry, (d, back)
print(pycriu.__version__)
EOF
}
pyver=$(pycriu_version) && ok=1 || ok=0
stamp=$(cat "$VENV/.jaula-pycriu-for" 2>/dev/null || true)
if [ "$ok" = 0 ] && (cd / && "$PY" -I -c 'import pycriu' >/dev/null 2>&1); then
    # Installed but failing: perhaps the venv's packages drifted (protobuf upgraded by hand).
    say "pycriu: installed but failing ($(tail -n1 "$LOGS/pycriu-check.log")); reinstalling jaula's dependencies"
    run_logged pip-install "$PY" -m pip install -q -e "${ROOT}[test]"
    pyver=$(pycriu_version) && ok=1 || ok=0
fi
# (Re)install when it does not work, or when it was made for another criu than the one in use.
if [ "$ok" = 1 ] && { [ "$pyver" = "$CRIU_VER" ] || [ "$stamp" = "$CRIU_VER" ]; }; then
    say "pycriu $pyver ok (cached)"
else
    [ "$ok" = 1 ] && say "pycriu: $pyver installed, criu is $CRIU_VER: reinstalling"
    ensure_source "$CRIU_VER"
    build_tree
    # Not editable: the venv must keep working after `make clean-build` removes .build.
    run_logged pycriu-install "$PY" -m pip install -q --no-deps --force-reinstall "$SRC_TREE/lib"
    pyver=$(pycriu_version) || die "pycriu does not work after install:
$(tail -n 15 "$LOGS/pycriu-check.log")
(protobuf in the venv: $("$PY" -c 'import google.protobuf as p; print(p.__version__)' 2>&1))"
    echo "$CRIU_VER" >"$VENV/.jaula-pycriu-for"
    [ "$pyver" = "$CRIU_VER" ] || say "note: pycriu $pyver is built from another CRIU version than criu $CRIU_VER"
    say "pycriu $pyver ok (installed into $VENV)"
fi

say "done"
