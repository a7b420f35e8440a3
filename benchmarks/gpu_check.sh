#!/usr/bin/env bash
# Every GPU measurement of issue 5 in one script, within 8 minutes on a fresh device machine
# (H100/H200, Python 3.12, torch/accelerate/huggingface_hub installed; diffusers and datasets are not).
#
# 1. Here, once (PyPI access), fetch the wheels it installs there (benchmarks/fetch_gpu_wheels.sh does this):
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#        diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#    (.whl/ is git-ignored; about 7 MB.)
# 2. On the device: run tool, command `bash benchmarks/gpu_check.sh`, carry [".whl"], timeout_s 540.
#    Results: $OUT/gpu_results.json (./gpu_results.json if OUT is unset), the log and nvidia-smi's view.
# 3. On a CPU, to test this script's code paths with tiny sizes: `bash benchmarks/gpu_check.sh --tiny`.
#
# Time budget: training section first (its torch.compile variant, ~60-120 s of compiling, is the one the
# 4,000 images/s target needs), then sampling (one compiled variant), then the CPU scheduler section;
# run.py skips a compile variant that would end past --budget_s, and the JSON is rewritten after each
# section, so a timeout still leaves the finished sections.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TINY=0
if [[ "${1:-}" == "--tiny" || "${GPU_CHECK_TINY:-0}" == "1" ]]; then TINY=1; fi
DEST=${OUT:-$ROOT}
mkdir -p "$DEST"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import diffusers" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: diffusers is not installed and .whl/ holds no wheels: run benchmarks/fetch_gpu_wheels.sh and carry .whl" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# `python -m benchmarks.run` from the repository root imports ddpm_plus and benchmarks from here (not installed there).
command -v nvidia-smi >/dev/null && nvidia-smi > "$DEST/nvidia-smi.txt" 2>&1

if [[ $TINY == 1 ]]; then
  ARGS=(--device cpu --tiny --threads 1 --rounds 2 --compile --budget_s 600 --only training,sampling,scheduler)
  LIMIT=900
else
  ARGS=(--device cuda --compile --budget_s 400 --rounds 5 --only training,sampling,scheduler)
  LIMIT=470
fi
start=$(date +%s)
timeout "$LIMIT" "$PY" -m benchmarks.run "${ARGS[@]}" --json "$DEST/gpu_results.json" 2>&1 | tee "$DEST/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "gpu_check: exit $rc after $(( $(date +%s) - start )) s; results in $DEST/gpu_results.json"
# Training engines (issue "Scale out"): FSDP2 and DeepSpeed ZeRO-2 through accelerate configs, 20 steps + resume.
ENGINE_ARGS=(--json "$DEST/engines.json")
[[ $TINY == 1 ]] && ENGINE_ARGS+=(--tiny)
timeout 300 "$PY" -m benchmarks.engine_check "${ENGINE_ARGS[@]}" 2>&1 | tee -a "$DEST/gpu_check.log"
echo "gpu_check: engines exit ${PIPESTATUS[0]}; results in $DEST/engines.json"
# ADM forward (issue "ADM"): ours, and against the original UNetModel on the same weights when a local checkout of
# openai/guided-diffusion is carried as .original/guided-diffusion (git-ignored, never committed).
ADM_ARGS=(--model guided-64 --rounds 5)
if [[ $TINY == 1 ]]; then ADM_ARGS+=(--device cpu --width 64 --batch_size 1 --rounds 2); else ADM_ARGS+=(--device cuda --width 192 --batch_size 64); fi
[[ -d .original/guided-diffusion ]] && ADM_ARGS+=(--original_repo .original/guided-diffusion)
timeout 240 "$PY" -m benchmarks.adm_forward "${ADM_ARGS[@]}" 2>&1 | tee "$DEST/adm_forward.txt" | tee -a "$DEST/gpu_check.log"
exit "$rc"
