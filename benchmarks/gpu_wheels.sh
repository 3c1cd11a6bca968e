#!/usr/bin/env bash
# Download, on a machine with network, the wheels the GPU image lacks, into benchmarks/wheels/
# (gitignored); the device run carries that folder and gpu_check.sh installs from it with
# --no-index. The image has Python 3.12, torch 2.11 (so sympy, numpy), transformers; it lacks
# vector-quantize-pytorch and its small dependencies. The MiniLM weights package (~80 MB) is
# over what a device run carries (64 MiB in all): its tests skip there.
#
#   bash benchmarks/gpu_wheels.sh          # versions pinned in requirements.txt
set -euo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
DEST=benchmarks/wheels
PACKAGES=(vector-quantize-pytorch einx einops frozendict loguru torch-einops-utils)
pins=()
for name in "${PACKAGES[@]}"; do
  pin=$(grep -i "^${name}==" requirements.txt) || { echo "no pin for $name in requirements.txt"; exit 2; }
  pins+=("$pin")
done
mkdir -p "$DEST"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --platform manylinux2014_x86_64 --implementation cp \
  --dest "$DEST" "${pins[@]}"
ls -l "$DEST"
du -sh "$DEST"
