#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that benchmarks/gpu_check.sh installs on the GPU
# machine (Python 3.12, x86-64, no network; torch, accelerate, huggingface_hub, pandas, pyarrow, xxhash,
# fsspec, pillow, regex, requests, safetensors, zipp are already there). Writes ./.whl (git-ignored).
#   bash benchmarks/fetch_gpu_wheels.sh && ls .whl
# Then on the device: carry .whl and run `bash benchmarks/gpu_check.sh` (it installs .whl/*.whl first).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
PY=${PYTHON:-python3}
# diffusers 0.42.1 (+ importlib_metadata and its lazy-importer) for the models/pipelines;
# datasets 5.2.0 (+ dill, multiprocess) because training/train.py imports ddpm_plus.data, which imports datasets.
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -l .whl
