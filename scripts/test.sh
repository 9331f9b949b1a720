#!/usr/bin/env bash
# Run the house checks (lint, format; Python with ruff, .proto with buf) and the whole test suite (real-traffic tests need
# root: they capture on loopback and make network namespaces). Extra arguments go to
# pytest, e.g. -m 'not slow'.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
if [ -x node_modules/.bin/buf ]; then
    node_modules/.bin/buf lint
    node_modules/.bin/buf format -d --exit-code
else
    echo "test: buf not installed (no npm): proto lint and format checks skipped" >&2
fi
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
