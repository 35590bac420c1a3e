#!/usr/bin/env bash
# Builds the real CRD API server (tools/crd-apiserver/build.sh) as its own step
# of `make test`, before pytest and under its own time bound, so that pytest's
# per-test timeout never lands on a compile: a cold build takes about 2.5
# minutes on 2 idle cores and several times that on a loaded CI machine, which
# used to make the first test that needed the server time out and every other
# one error. Exits at once when the binaries are current.
#
# Never fails `make test` on its own: when the server cannot be built (no
# mirror, no disk, a compile error, the time bound), the reason is left in
# OUTDIR/last-error and the tests that need the server skip naming it (they
# ask `build.sh --no-build`, which never builds).
#
# Environment: CRD_APISERVER_BUILD_TIMEOUT, seconds (default 1200).
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$ROOT/tools/crd-apiserver/build.sh
OUTDIR=${XDG_CACHE_HOME:-$HOME/.cache}/tolaria/crd-apiserver # build.sh's default
LIMIT=${CRD_APISERVER_BUILD_TIMEOUT:-1200}

"$BUILD" --no-build >/dev/null 2>&1 && exit 0

echo "crd-apiserver: building the CRD API server for the Kubernetes tests into $OUTDIR" \
    "(at most ${LIMIT} s; about 2.5 min on 2 idle cores; once, then cached)" >&2
log=$(mktemp)
# build.sh's progress goes to the terminal and to $log; its stdout (the path) is not needed.
timeout --kill-after=30 "$LIMIT" "$BUILD" 2>&1 >/dev/null | tee "$log" >&2
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 0 ]; then
    rm -f "$log"
    exit 0
fi
mkdir -p "$OUTDIR" 2>/dev/null
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "build.sh: error: the build did not finish within ${LIMIT} s (CRD_APISERVER_BUILD_TIMEOUT);" \
        "the next make test tries again" >"$OUTDIR/last-error"
elif [ ! -s "$OUTDIR/last-error" ]; then # a failure build.sh's die did not record
    last=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1)
    echo "${last:-build.sh: error: exited with status $rc and no message}" >"$OUTDIR/last-error"
fi
rm -f "$log"
echo "crd-apiserver: not built, the tests that need it will skip: $(cat "$OUTDIR/last-error" 2>/dev/null)" >&2
exit 0
