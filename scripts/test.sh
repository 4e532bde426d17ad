#!/usr/bin/env bash
# Lint, then run the test suite (sets up .venv first if needed). Extra arguments go to pytest, e.g.
#   bash scripts/test.sh tests/train/test_recipe.py -x      bash scripts/test.sh -m slow
# The lint is ruff with pyproject.toml's settings (line length, import order, pyflakes); fix what it
# reports with `.venv/bin/ruff check --fix .` (import order) or by hand. Then lint-imports checks the
# layers written in pyproject.toml ([tool.importlinter]): an import circle or an import that runs up
# a layer fails here, before any test runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --quiet .
.venv/bin/lint-imports --no-cache --no-logo
exec .venv/bin/python -m pytest "$@"
