#!/usr/bin/env bash
# scripts/setup.sh: install everything jaula needs on a Debian 12 host (`make setup`).
#
# Idempotent: every step checks first and does nothing when already done, so a second
# run takes a second or two. What it does:
#   1. Debian packages (apt-get update only when a package is missing). Services are not
#      started by package scripts (policy-rc.d).
#   2. CRIU: the pinned upstream version (CRIU_PIN below: version and the sha256 of Debian's
#      orig tarball) from whichever Debian suite still serves it, with
#      scripts/criu-patches/*.patch applied (patch --fuzz=0), installed to
#      /usr/local/sbin/criu; `criu --version` shows "GitID: jaula-<hash of the series>". Next
#      to it, /usr/local/lib/jaula/criu-patches (the manifest: PREFIX/../lib/jaula for
#      another prefix) names the patches that applied and the sha256 of that binary:
#      migrate/criu.py reads it (criu.patch_series()) and ignores it for any other binary.
#      When no suite serves the pin any more, the newest CRIU >= 4.2 served is built
#      instead, with the patches that still apply exactly ("-partial" in the GitID when
#      some do not); the strategies that need a missing patch are then refused.
#      An installed criu counts as ours only with a manifest that matches it.
#      CRIU keeps its kernel-feature cache (/run/criu.kdat) only when /run is a tmpfs, as
#      on systemd hosts; elsewhere patch 0010 keeps it in $CRIU_KDAT_DIR (a root-only
#      directory under /dev/shm that migrate/criu.py sets), never in a world-writable
#      place: root's CRIU trusts that file. Debian 12's own criu 3.17 fails on recent
#      kernels: never used.
#   3. The venv .venv (python3 >= 3.11) with `pip install -e '.[test]'`, redone only when
#      pyproject.toml changes.
#   4. pycriu (not on PyPI), built from the same CRIU source tree, installed into the venv.
#   5. A check that migrate/criu.py reads the manifest of the criu in use: it says which
#      migration strategies that criu can do.
#
# Work files live in .build/ (gitignored): the CRIU source and its own apt lists in
# .build/criu-src, logs of long steps in .build/logs. Nothing is added to /etc/apt.
#
# Knobs (environment):
#   JAULA_CRIU_SUITES  Debian suites to look for CRIU's source in, in order (default
#                      "sid forky trixie-backports trixie"): the first that serves the
#                      pinned version gives it; failing that, the newest >= 4.2 served. On
#                      kernels 6.16+ 4.1 cannot dump any TCP/UDP socket ("Can't get 1:16
#                      opt", CRIU issue 2718, fixed in 4.2): trixie's 4.1.1 is refused.
#   JAULA_CRIU_PIN     "VERSION SHA256" to pin another CRIU (default: CRIU_PIN_DEFAULT below).
#   JAULA_CRIU_PREFIX  where to install criu (default /usr/local/sbin; the manifest goes
#                      to PREFIX/../lib/jaula/criu-patches). When set, a criu elsewhere on
#                      PATH is not accepted: useful to test the build path.
set -Eeuo pipefail
umask 022

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BUILD="$ROOT/.build"
SRC="$BUILD/criu-src"
LOGS="$BUILD/logs"
VENV="$ROOT/.venv"
CRIU_MIN=4.2
# The CRIU that scripts/criu-patches is made for, and the sha256 of Debian's
# criu_<version>.orig.tar.xz (the same in every suite that serves the version).
CRIU_PIN_DEFAULT="4.2.1 29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9"
read -r CRIU_PIN CRIU_PIN_SHA256 _ <<<"${JAULA_CRIU_PIN:-$CRIU_PIN_DEFAULT}"
[[ ${CRIU_PIN_SHA256:-} =~ ^[0-9a-f]{64}$ ]] \
    || { echo "setup: ERROR: JAULA_CRIU_PIN must be \"VERSION SHA256\" (64 hex digits), not '${JAULA_CRIU_PIN:-}'" >&2; exit 1; }
CRIU_SUITES=${JAULA_CRIU_SUITES:-sid forky trixie-backports trixie}
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
    # `jaula pull` tests: a local registry on 127.0.0.1 (started by a test fixture only)
    docker-registry
    # the cluster store of migrate/cluster_state (its tests start their own etcd members)
    etcd-server
    # libseccomp's Python bindings (runtime/seccomp_filter.py; linked into the venv below)
    # and XFS, whose project quotas back --storage-opt size= (the tests make a loop XFS)
    python3-seccomp xfsprogs
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
    # Keep package scripts from starting services (redis-server, etcd-server): the docker-style
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
[ -f "${PATCHES[0]}" ] || die "no patches in scripts/criu-patches"
# The series' identity: each patch's name and its diff (not its description, so that
# editing a description does not rebuild CRIU).
SERIES=$(for p in "${PATCHES[@]}"; do
             basename "$p" .patch
             awk '/^(diff --git |--- a\/)/ { d = 1 } d' "$p"
         done | sha256sum | cut -d' ' -f1)
BUILD_ID="jaula-${SERIES:0:10}"
criu_gitid() { { "$1" --version 2>/dev/null || true; } | sed -n 's/^GitID: *//p' | head -n1; }
criu_version() { { "$1" --version 2>/dev/null || true; } | sed -n 's/^Version: *//p' | head -n1; }

# manifest_of BIN: where the manifest of BIN lives (PREFIX/../lib/jaula/criu-patches for
# PREFIX/criu, after symlinks), as migrate/criu.py's manifest_path() finds it.
manifest_of() { local b; b=$(realpath -m "$1"); printf '%s/lib/jaula/criu-patches\n' "$(dirname "$(dirname "$b")")"; }
manifest_get() { sed -n "s/^$2 //p" "$1" | head -n1; }
# manifest_ok BIN: BIN's manifest is there, not writable by others, of format 1, made for
# this very file (sha256), this series and this pin.
manifest_ok() {
    local m; m=$(manifest_of "$1")
    [ -f "$m" ] && [ -z "$(find "$m" -perm /022)" ] || return 1
    [ "$(manifest_get "$m" format)" = 1 ] || return 1
    [ "$(manifest_get "$m" series)" = "$SERIES" ] || return 1
    [ "$(manifest_get "$m" pin)" = "$CRIU_PIN $CRIU_PIN_SHA256" ] || return 1
    [ "$(manifest_get "$m" binary-sha256)" = "$(sha256sum "$1" | cut -d' ' -f1)" ]
}
# criu_ours BIN: BIN is jaula's build of this series (complete or "-partial") with its
# manifest.
criu_ours() {
    local g; g=$(criu_gitid "$1")
    { [ "$g" = "$BUILD_ID" ] || [ "$g" = "$BUILD_ID-partial" ]; } && manifest_ok "$1"
}

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
# The stamp of an unpacked tree: Debian version, suite, tarball, tarball's sha256.
src_desc() { local deb suite file sum; read -r deb suite file sum <"$SRC_TREE/.jaula-unpacked"
             printf 'Debian %s source %s (%s, sha256 %s)\n' "$suite" "$deb" "$file" "${sum:0:12}…"; }
upstream_of() { local v=${1#*:}; printf '%s\n' "${v%-*}"; }
# tree_ok TREE VERSION: TREE is an unpacked source of VERSION with a full stamp, and the
# pinned tarball when VERSION is the pin.
tree_ok() {
    local deb suite file sum
    [ -f "$1/.jaula-unpacked" ] || return 1
    read -r deb suite file sum <"$1/.jaula-unpacked"
    [[ ${sum:-} =~ ^[0-9a-f]{64}$ ]] || return 1    # a stamp of an older setup: fetch again
    [ "$2" != "$CRIU_PIN" ] || [ "$sum" = "$CRIU_PIN_SHA256" ]
}

# fetch_source SUITE: put the upstream source of SUITE's criu in $SRC/criu-<version>.
# Only the orig tarball is used: the mirror may not serve the .dsc and Debian tarball, and
# CRIU builds with plain make. Its sha256 must be the one of the (signed) source index,
# and for the pinned version the pinned one. Prints the tree's path.
fetch_source() {
    local suite=$1 deb up dl orig sum want tree tmp
    deb=$(apt_src_version "$suite")
    [ -n "$deb" ] || return 1
    up=$(upstream_of "$deb")
    tree="$SRC/criu-$up"
    if tree_ok "$tree" "$up"; then printf '%s\n' "$tree"; return 0; fi
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
    if [ "$up" = "$CRIU_PIN" ] && [ "$sum" != "$CRIU_PIN_SHA256" ]; then
        say "criu: $suite's $(basename "$orig") has sha256 $sum, not the pinned $CRIU_PIN_SHA256: not used" >&2
        return 1
    fi
    tmp=$(mktemp -d "$SRC/unpack.XXXXXX")
    tar -xf "$orig" -C "$tmp"
    [ -f "$tmp/criu-$up/Makefile" ] || { rm -rf "$tmp"; say "criu: unexpected layout in $orig" >&2; return 1; }
    rm -rf "$tree"
    mv "$tmp/criu-$up" "$tree"
    rmdir "$tmp"
    printf '%s %s %s %s\n' "$deb" "$suite" "$(basename "$orig")" "$sum" >"$tree/.jaula-unpacked"
    printf '%s\n' "$tree"
}

# ensure_source [WANT]: a CRIU source tree of upstream version WANT (default: the pin),
# taken from the first suite that serves it; when none does, the newest version >=
# CRIU_MIN that one serves (with a warning when WANT is the pin). A cached tree is used
# without touching the network. Sets SRC_TREE.
ensure_source() {
    local want=${1:-$CRIU_PIN} suite v best="" bestv=""
    mkdir -p "$SRC" "$LOGS"
    if tree_ok "$SRC/criu-$want" "$want"; then SRC_TREE="$SRC/criu-$want"; return 0; fi
    say "criu: fetching CRIU $want's source from Debian ($CRIU_SUITES)"
    for suite in $CRIU_SUITES; do
        if ! apt_src_update "$suite"; then
            say "criu: could not read $suite's source index (see $LOGS/apt-src-$suite.log)" >&2
            continue
        fi
        v=$(upstream_of "$(apt_src_version "$suite")")
        [ -n "$v" ] || continue
        if [ "$v" = "$want" ]; then
            if SRC_TREE=$(fetch_source "$suite"); then say "criu: got $(src_desc)"; return 0; fi
        elif version_ge "$v" "$CRIU_MIN" && { [ -z "$bestv" ] || ! version_ge "$bestv" "$v"; }; then
            best=$suite bestv=$v
        fi
    done
    [ -n "$best" ] || die "no Debian suite ($CRIU_SUITES) gave CRIU $want (see above), nor serves another CRIU >= $CRIU_MIN (logs in $LOGS)"
    if [ "$want" = "$CRIU_PIN" ]; then
        say "WARNING: no Debian suite ($CRIU_SUITES) serves the pinned CRIU $CRIU_PIN any more: building $bestv from $best; patches that do not apply to it exactly are left out, and the migration strategies that need one are refused (update CRIU_PIN and the patches)" >&2
    fi
    if tree_ok "$SRC/criu-$bestv" "$bestv"; then SRC_TREE="$SRC/criu-$bestv"; return 0; fi
    SRC_TREE=$(fetch_source "$best") || die "could not get CRIU $bestv's source from $best (logs in $LOGS)"
    say "criu: got $(src_desc)"
}

# build_tree: build the criu binary and lib/ (libcriu, pycriu's generated modules) in a
# copy of the source tree with jaula's patches applied; sets SRC_TREE to that copy. The
# copy's .jaula-applied lists "applied NAME" or "not-applied NAME" for each patch, in order.
build_tree() {
    local out="$SRC_TREE.$BUILD_ID" p name
    if [ -f "$out/.jaula-built" ] && [ -f "$out/.jaula-applied" ] && [ -x "$out/criu/criu" ] \
        && [ -f "$out/lib/pycriu/rpc_pb2.py" ]; then
        SRC_TREE=$out; return 0
    fi
    rm -rf "$out" "$out.tmp" "$SRC_TREE".jaula-*  # older builds: one is enough
    cp -a "$SRC_TREE" "$out.tmp"
    rm -f "$out.tmp/.jaula-built" "$out.tmp/.jaula-applied"
    local gitid=$BUILD_ID applied=()
    : >"$LOGS/criu-patch.log"
    for p in "${PATCHES[@]}"; do
        name=$(basename "$p" .patch)
        # --fuzz=0: on a newer CRIU a hunk applies exactly where it was written, or not at all
        if patch -d "$out.tmp" -p1 --forward --fuzz=0 --dry-run <"$p" >>"$LOGS/criu-patch.log" 2>&1; then
            patch -d "$out.tmp" -p1 --forward --fuzz=0 <"$p" >>"$LOGS/criu-patch.log" 2>&1
            applied+=("applied $name")
            say "criu: applied $name"
        else
            applied+=("not-applied $name")
            gitid=$BUILD_ID-partial
            say "WARNING: $name does not apply to $(basename "$SRC_TREE"); building without it (see $LOGS/criu-patch.log)" >&2
        fi
    done
    printf '%s\n' "${applied[@]}" >"$out.tmp/.jaula-applied"
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

# write_manifest BIN: BIN's manifest (see migrate/criu.py, "The patch manifest"), from the
# build tree SRC_TREE that BIN was installed from; atomic.
write_manifest() {
    local bin=$1 m deb suite file sum
    m=$(manifest_of "$bin")
    read -r deb suite file sum <"$SRC_TREE/.jaula-unpacked"
    mkdir -p "$(dirname "$m")"
    {
        printf '# jaula: the CRIU patch series built into one criu binary. Written by\n'
        printf '# scripts/setup.sh when it installs the binary; migrate/criu.py ignores it\n'
        printf '# unless binary-sha256 is the sha256 of the criu it runs.\n'
        printf 'format 1\n'
        printf 'binary %s\n' "$(realpath -m "$bin")"
        printf 'binary-sha256 %s\n' "$(sha256sum "$bin" | cut -d' ' -f1)"
        printf 'gitid %s\n' "$(criu_gitid "$bin")"
        printf 'criu-version %s\n' "$(criu_version "$bin")"
        printf 'pin %s %s\n' "$CRIU_PIN" "$CRIU_PIN_SHA256"
        printf 'source %s %s debian %s %s\n' "$file" "$sum" "$suite" "$deb"
        printf 'series %s\n' "$SERIES"
        cat "$SRC_TREE/.jaula-applied"
    } >"$m.new.$$"
    chmod 0644 "$m.new.$$"
    mv -f "$m.new.$$" "$m"
}
# not_applied BIN: the names of the patches BIN's manifest says did not apply, one a line.
not_applied() { sed -n 's/^not-applied //p' "$(manifest_of "$1")"; }

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
    g=$(criu_gitid "$CRIU_BIN")
    if [ ! -e "$CRIU_BIN" ]; then
        :
    elif ! criu_good "$CRIU_BIN"; then
        say "criu: $CRIU_BIN ($(criu_version "$CRIU_BIN" || true)) fails the check; rebuilding"
    elif [ "$g" = "$BUILD_ID" ] || [ "$g" = "$BUILD_ID-partial" ]; then
        say "criu: $CRIU_BIN has no manifest made for it ($(manifest_of "$CRIU_BIN")); reinstalling"
    else
        say "criu: $CRIU_BIN is ${g:-another build}, not $BUILD_ID (scripts/criu-patches); rebuilding"
    fi
    ensure_source ""
    build_tree
    criu_good "$SRC_TREE/criu/criu" \
        || die "the freshly built criu fails 'criu check': $("$SRC_TREE/criu/criu" check 2>&1 | tail -n 5)"
    mkdir -p "$CRIU_PREFIX"
    install -m 0755 "$SRC_TREE/criu/criu" "$CRIU_BIN.new.$$"
    mv -f "$CRIU_BIN.new.$$" "$CRIU_BIN"    # atomic: a criu running now keeps its binary
    criu_good "$CRIU_BIN" || die "installed $CRIU_BIN but it fails 'criu check'"
    write_manifest "$CRIU_BIN"
    CRIU=$CRIU_BIN
    say "criu $(criu_version "$CRIU") ok (built from $(src_desc), installed as $CRIU)"
fi
CRIU_VER=$(criu_version "$CRIU")
[ "$CRIU_VER" = "$CRIU_PIN" ] || say "WARNING: $CRIU is CRIU $CRIU_VER, not the pinned $CRIU_PIN (no Debian suite served it when it was built)" >&2
missing_patches=$(not_applied "$CRIU" | tr '\n' ' ')
[ -z "$missing_patches" ] || say "WARNING: $CRIU lacks ${missing_patches% } (they did not apply to CRIU $CRIU_VER): jaula refuses the migration strategies that need them" >&2
say "criu: manifest $(manifest_of "$CRIU")"
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

# --- 3b. libseccomp's Python bindings --------------------------------------------------
# Debian's python3-seccomp installs one extension module for Debian's python3; the venv may
# run another build of the same minor version (pyenv): link just that module into the
# venv's site-packages (not the whole dist-packages, whose other modules would shadow or
# mix with the venv's), and check that it imports there.
if (cd / && "$PY" -I -c 'import seccomp' >/dev/null 2>&1); then
    say "seccomp bindings ok"
else
    tag=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    so=$(dpkg -L python3-seccomp 2>/dev/null | grep "/seccomp$tag\$" | head -n1 || true)
    [ -n "$so" ] && [ -f "$so" ] \
        || die "python3-seccomp has no module for the venv's python ($("$PY" -V 2>&1), suffix $tag)"
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    ln -sfn "$so" "$site/seccomp$tag"
    (cd / && "$PY" -I -c 'import seccomp' >/dev/null 2>&1) \
        || die "linked $so into $site but 'import seccomp' still fails in the venv"
    say "seccomp bindings ok (linked $so into the venv)"
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

# --- 5. what jaula sees of its CRIU ----------------------------------------------------
# migrate/criu.py reads the manifest as the node service will: the strategies it refuses
# are said here, and a manifest it cannot read for this binary stops setup.
seen=$(cd / && "$PY" -I - "$CRIU" 2>"$LOGS/criu-series.log" <<'EOF'
import sys
from migrate import criu
b = criu.build(sys.argv[1])
if not b.patches:
    sys.exit(f"migrate.criu finds no patch series for {b.binary} (manifest {criu.manifest_path(b.binary)})")
print(f"{len(b.patches)} patches, " + ", ".join(
    f"{s} refused (lacks {' '.join(m)})" if (m := b.missing(s)) else f"{s} ok"
    for s in criu.REQUIRED_PATCHES))
EOF
) || die "$(tail -n 3 "$LOGS/criu-series.log")"
say "criu: jaula sees $seen"

say "done"
