#!/usr/bin/env bash
# bash bench/gpu.sh: the SD 1.5-shaped benchmark at 512 px in fp16 on one CUDA GPU (a few minutes).
#
# Prints the card, then bench/run.py's table: train steps/s, peak CUDA memory and time to the first
# step for dbl and the recipe's loop, class images/s, render images/s. Wheels in .whl/ (diffusers,
# peft, ...) are installed first when the machine lacks them. PHOTOS=folder picks the instance photos.
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
args=(--model sd15-random --resolution 512 --device cuda --mixed-precision fp16 --skip plan)
if [ -n "${PHOTOS:-}" ]; then args+=(--photos "$PHOTOS"); fi
if [ -n "${TRAIN_STEPS:-}" ]; then args+=(--train-steps "$TRAIN_STEPS"); fi
python3 bench/run.py "${args[@]}" --out "${OUT:-/tmp}/gpu-bench.json"
