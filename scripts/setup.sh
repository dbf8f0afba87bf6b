#!/usr/bin/env bash
# Create .venv and install spine-fl with its test extras.
# torch is installed first on its own: on a machine without CUDA a plain `pip install torch` can pull
# a multi-GB CUDA build. SPINE_FL_TORCH overrides the torch requirement (e.g. a CUDA build on a GPU host).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet "${SPINE_FL_TORCH:-torch==2.13.0}"
fi
.venv/bin/python -m pip install --quiet -e ".[test]"
