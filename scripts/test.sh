#!/usr/bin/env bash
# README's test command: set up (reusing the cached virtualenv) and run the whole offline test-suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
