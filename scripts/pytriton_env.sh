#!/usr/bin/env bash
# Create .venv-pytriton (nvidia-pytriton: a real Triton Inference Server driven from Python, plus the
# TensorFlow and Keras the project uses) if it is missing; `pipeline bench --only colocation` serves the
# whole model from it beside the pipeline. Idempotent: exits 0 at once when the venv already imports
# pytriton and tensorflow. Exit 1 when it cannot be built (e.g. no network, or no wheel for this platform).
#
# Triton's Python backend loads libpython by name: the caller puts this venv's own interpreter's
# libpython first on LD_LIBRARY_PATH (`pipeline.bench.triton` does), or Debian's would be picked up.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PIPELINE_PYTRITON_VENV:-$ROOT/.venv-pytriton}"
PY="$VENV/bin/python"
BASE_PY="${PIPELINE_PYTRITON_PYTHON:-python3}"

if [ -x "$PY" ] && "$PY" -c "import pytriton.triton, tensorflow, keras" 2>/dev/null; then
    exit 0
fi

echo "pytriton_env: building $VENV" >&2
if [ ! -x "$PY" ]; then
    "$BASE_PY" -m venv "$VENV"
fi
"$PY" -m pip install --quiet --disable-pip-version-check "nvidia-pytriton==0.7.0" "tensorflow-cpu==2.21.0" "keras==3.15.1" numpy
"$PY" -c "import pytriton.triton, tensorflow, keras" >/dev/null
echo "pytriton_env: ready ($("$PY" -c 'import importlib.metadata as m; print("nvidia-pytriton", m.version("nvidia-pytriton"))'))" >&2
