#!/usr/bin/env bash
# Create /work/main/.venv-triton (tritonclient[grpc] + numpy) if it is missing.
#
# tritonclient pins protobuf<7 and ml-dtypes<=0.5.4, which clash with the main
# venv, so the interoperability test runs tritonclient from this separate venv
# in a subprocess. Idempotent: exits 0 at once when the venv already imports
# tritonclient.grpc. Exit 1 when the venv cannot be built (e.g. no network).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PIPELINE_TRITON_VENV:-$ROOT/.venv-triton}"
PY="$VENV/bin/python"

if [ -x "$PY" ] && "$PY" -c "import tritonclient.grpc, numpy" 2>/dev/null; then
    exit 0
fi

echo "triton_env: building $VENV" >&2
if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi
"$PY" -m pip install --quiet --disable-pip-version-check "tritonclient[grpc]" numpy
"$PY" -c "import tritonclient.grpc, numpy" >/dev/null
echo "triton_env: ready ($("$PY" -c 'import tritonclient, importlib.metadata as m; print("tritonclient", m.version("tritonclient"))'))" >&2
