#!/usr/bin/env bash
# Installs the Debian packages the test suite runs for real (Prometheus and
# promtool, etcd for the CRD API server) when they are missing and we may
# (root with apt). Otherwise says which tests will skip and why; never fails
# the build on its own, because those tests skip with that reason.
set -u
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || echo "system-deps: apt-get install ${need[*]} failed; the tests that need them will skip" >&2
else
  echo "system-deps: missing ${need[*]} (not root or no apt); the tests that need them will skip" >&2
fi
exit 0
