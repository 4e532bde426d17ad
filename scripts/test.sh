#!/usr/bin/env bash
# Run the test suite (sets up .venv first if needed). Extra arguments go to pytest, e.g.
#   bash scripts/test.sh tests/test_train.py -x      bash scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
