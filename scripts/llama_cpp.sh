#!/usr/bin/env bash
# Install llama-cpp-python (pyproject.toml's `llama` extra) into .venv from a wheel built once.
#
#   bash scripts/llama_cpp.sh
#
# llama-cpp-python ships as source on PyPI and compiles llama.cpp for this CPU (about 9 minutes on 2
# cores). The wheel is kept in $MATHTUNE_WHEEL_CACHE (default ~/.cache/mathtune/wheels), outside
# the clone, keyed by the pinned version, the Python version and the CPU's instruction sets, so a
# fresh clone on the same machine installs it in seconds and another CPU kind gets its own build.
# On Windows: pip install "llama-cpp-python==<the pin>" (needs Visual Studio's C++ build tools).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
spec=$("$py" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["llama"][0])')
version=${spec#*==}
if "$py" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '$version')" 2>/dev/null; then
  exit 0
fi
cache=${MATHTUNE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mathtune/wheels}
cpu=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | sha256sum | cut -c1-12)
python_tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
folder="$cache/llama-cpp-python-$version-$python_tag-$cpu"
if ! compgen -G "$folder/llama_cpp_python-*.whl" >/dev/null; then
  echo "Building llama-cpp-python $version for this CPU (once; about 9 minutes on 2 cores) into $folder"
  mkdir -p "$cache"
  building=$(mktemp -d "$cache/.building-XXXXXX")
  trap 'rm -rf "$building"' EXIT
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$py" -m pip wheel --quiet --disable-pip-version-check --no-deps \
    --wheel-dir "$building" "$spec"
  # A finished wheel appears in one rename: an interrupted build leaves no half folder to reuse.
  mv -T "$building" "$folder" 2>/dev/null || rm -rf "$building"
  trap - EXIT
fi
"$py" -m pip install --quiet --disable-pip-version-check "$folder"/llama_cpp_python-*.whl
echo "llama-cpp-python $version installed from $folder"
