#!/usr/bin/env bash
# Create .venv and install spine-fl with its test extras, quietly: pip's output goes to
# .venv/install.log and is shown only when an install fails.
# torch is installed first on its own: on a machine without CUDA a plain `pip install torch` can pull
# a multi-GB CUDA build. SPINE_FL_TORCH overrides the torch requirement (e.g. a CUDA build on a GPU host).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
LOG=.venv/install.log
: > "$LOG"
pip_install() {
  if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" >>"$LOG" 2>&1; then
    echo "pip install $* failed; its output:" >&2
    cat "$LOG" >&2
    exit 1
  fi
}
echo "installing spine-fl into .venv (pip's log: $LOG) ..."
pip_install --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip_install "${SPINE_FL_TORCH:-torch==2.13.0}"
fi
pip_install -e ".[test]"
echo "installed."
