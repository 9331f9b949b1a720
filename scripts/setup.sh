#!/usr/bin/env bash
# Install pfsyncd into ./.venv (idempotent): Python packages from PyPI; iproute2, conntrack,
# nftables and tcpreplay if missing (the real-traffic tests make network namespaces, the oracle
# test reads nf_conntrack, bench/bench_capture.py sends with tcpreplay). Sourced by demo.sh and
# test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# The oracle test enables the kernel's nf_conntrack in a namespace with an nft rule and reads its
# table with conntrack. Each Debian package is installed only when its command is missing.
missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v conntrack >/dev/null 2>&1 || missing+=(conntrack)
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v tcpreplay >/dev/null 2>&1 || missing+=(tcpreplay)
log=$(mktemp)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # apt's notes (debconf without apt-utils) go to stderr; shown only when the install fails.
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        "${missing[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2; rm -f "$log"; exit 1
    fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; exit 1
fi
rm -f "$log"
# Development tools from npm into ./node_modules (package.json, package-lock.json): buf, which
# lints, formats and checks the .proto files for breaking changes, and the Node.js gRPC
# packages of the API test client (tests/node_client/). Installs Node.js itself if missing.
if ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
fi
if command -v npm >/dev/null 2>&1; then
    # npm ci reinstalls everything; only run it when the lock file is newer than the install.
    if [ ! -x node_modules/.bin/buf ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
        npm ci --no-audit --no-fund --loglevel=error >/dev/null
    fi
else
    echo "setup: npm not available; buf checks and the Node.js API test will be skipped" >&2
fi
