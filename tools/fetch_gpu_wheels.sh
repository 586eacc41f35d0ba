#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that `tools/gpu_check.sh` installs on a GPU
# machine without a package registry (Python 3.12, Linux x86-64, CUDA 13 torch already there):
#   PyAV (FFmpeg 8, also the FFmpeg libraries torchcodec loads), kornia + kornia_rs,
#   torchcodec 0.15 (CUDA 13 build: NVDEC decoding), decord (the CPU baseline).
# Also copies one real UCF101-style AVI for the frame-accuracy check when it is at hand.
# Everything lands in ignored folders (.cache/gpu-wheels, .cache/gpu-videos); a device run carries
# them: run(command="bash tools/gpu_check.sh $OUT", carry=[".cache/gpu-wheels", ".cache/gpu-videos"]).
# Usage: bash tools/fetch_gpu_wheels.sh [PYTHON_VERSION]   (default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
DEST=.cache/gpu-wheels
PY=${PYTHON:-python3}
# Pinned: torchcodec 0.15.0+cu130 needs torch >= 2.11 and FFmpeg 4-8 (av 18.1 bundles FFmpeg 8);
# 0.16 adds 6 MiB that do not fit beside PyAV and decord in the 64 MiB a device call carries.
WHEELS=(av==18.1.0 kornia==0.9.0 kornia_rs==0.2.0 torchcodec==0.15.0 decord==0.6.0)
rm -rf "$DEST" && mkdir -p "$DEST" .cache/gpu-videos
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux2010_x86_64 --index-url https://pypi.org/simple -d "$DEST" "${WHEELS[@]}"
REAL=../shared/data/real-videos/Megamind.avi
if [ -f "$REAL" ] && [ ! -f .cache/gpu-videos/Megamind.avi ]; then cp "$REAL" .cache/gpu-videos/; fi
ls -la "$DEST" .cache/gpu-videos
TRACKED=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
CARRY=$(du -cb "$DEST" .cache/gpu-videos | tail -1 | cut -f1)
echo "carried: $((CARRY / 1048576)) MiB + tracked files $((TRACKED / 1048576)) MiB (limit 64 MiB)"
