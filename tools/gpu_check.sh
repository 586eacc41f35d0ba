#!/usr/bin/env bash
# Run the GPU benchmark (benchmarks/gpu.py) and leave gpu.json, gpu.md and gpu.log in OUT.
# Wheels in .cache/gpu-wheels (tools/fetch_gpu_wheels.sh) are installed first into a private
# folder, for machines without a package registry. Usage: bash tools/gpu_check.sh [OUT] [ARGS...]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-${OUT:-.cache/gpu-check}}
shift || true
SITE=${VIDSSL_GPU_SITE:-/tmp/vidssl-gpu-site}
if compgen -G ".cache/gpu-wheels/*.whl" >/dev/null; then
  for whl in .cache/gpu-wheels/*.whl; do  # one at a time: a wheel for another Python skips alone
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$whl" 2>&1 | grep -v "WARNING: Target directory" \
      || true
  done
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
  "cuda", torch.cuda.is_available())'
exec "$PY" benchmarks/gpu.py --out "$OUT" "$@"
