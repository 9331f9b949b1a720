#!/usr/bin/env bash
# Run the house checks (lint, format) and the whole test suite (real-traffic tests need
# root: they capture on loopback and make network namespaces). Extra arguments go to
# pytest, e.g. -m 'not slow'.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
