#!/usr/bin/env bash
# bash bench/gpu.sh [sd15|sdxl|all]: the benchmarks on one CUDA GPU.
#
# sd15 (the default, a few minutes): the SD 1.5-shaped benchmark at 512 px in fp16. Prints the card,
#   then bench/run.py's table: train steps/s, peak CUDA memory and time to the first step for dbl and the
#   recipe's loop, class images/s, render images/s. PHOTOS=folder picks the instance photos.
# sdxl (about 5 minutes): bench/sdxl_bench.py --gpu: SDXL shapes at 1024 px in bf16, dbl's train step
#   against diffusers' train_dreambooth_lora_sdxl.py on the same job: steps/s, peak GPU memory, time to
#   the first step, wall time. Needs that script: shared/anchors/ in the checkout, or ANCHOR=path.
#   STEPS=n sets the optimizer steps (default 50).
# all: both.
#
# Wheels in .whl/ (diffusers, peft, ...) are installed first when the machine lacks them. Results go
# to $OUT (default /tmp) as gpu-bench.json and sdxl-bench.json.
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-sd15}"
case "$which" in sd15|sdxl|all) ;; *) echo "usage: bash bench/gpu.sh [sd15|sdxl|all]" >&2; exit 2 ;; esac
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
if [ "$which" = sd15 ] || [ "$which" = all ]; then
    args=(--model sd15-random --resolution 512 --device cuda --mixed-precision fp16 --skip plan)
    if [ -n "${PHOTOS:-}" ]; then args+=(--photos "$PHOTOS"); fi
    if [ -n "${TRAIN_STEPS:-}" ]; then args+=(--train-steps "$TRAIN_STEPS"); fi
    python3 bench/run.py "${args[@]}" --out "${OUT:-/tmp}/gpu-bench.json"
fi
if [ "$which" = sdxl ] || [ "$which" = all ]; then
    args=(--gpu --work /tmp/dbl-sdxl-bench)
    if [ -n "${ANCHOR:-}" ]; then args+=(--anchor "$ANCHOR"); fi
    if [ -n "${STEPS:-}" ]; then args+=(--steps "$STEPS"); fi
    python3 bench/sdxl_bench.py "${args[@]}" --out "${OUT:-/tmp}/sdxl-bench.json"
fi
