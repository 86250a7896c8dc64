#!/usr/bin/env bash
# Downloads the wheels that benchmarks/gpu_check.sh carries to a GPU machine without
# network (Python 3.12, x86-64) into .whl/ (ignored by git; name .whl in the device
# tool's carry): flash-linear-attention for the side-by-side, einops (its dependency),
# and setuptools>=77 (the pyproject's license field needs it; the image's may be older).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl fla-core==0.6.0 flash-linear-attention==0.6.0 einops==0.8.2 setuptools==84.2.1
ls -la .whl
