#!/usr/bin/env bash
# bash bench/gpu.sh [sd15|sdxl|run|check|profile|session|all]: the benchmarks on one CUDA GPU.
#
# sd15 (the default, about 6 minutes): bench/anchor_bench.py --gpu: SD 1.5 shapes with random weights at
#   512 px in fp16, prior preservation with 8 given class images, text-encoder LoRA r16, batch 1, 300
#   steps: dbl (its defaults: cuda_graphs, compile and gradient checkpointing "auto"), dbl with both
#   cuda_graphs and compile off, dbl compiled instead of graphed, and diffusers' train_dreambooth_lora.py
#   with its defaults, each in its own process: whole wall time, steps/s
#   after the first 20, peak GPU memory (torch.cuda.max_memory_allocated in both) and time to the first
#   step. Needs the script: shared/anchors/ in the checkout, or ANCHOR=path. STEPS=n changes the steps.
#   VARIANTS="dbl anchor" runs those alone; VARIANT_TIMEOUT=s stops one that runs longer; MACHINE_WARMUP=n
#   sets the unmeasured steps each variant runs first (default 3; 0 on a machine that has trained already).
# sdxl (about 5 minutes): the same at SDXL shapes, 1024 px, bf16, 50 steps, gradient checkpointing in both,
#   against train_dreambooth_lora_sdxl.py.
# run: bench/run.py's table: train steps/s, peak CUDA memory and time to the first step for dbl and the
#   recipe's loop written out, class images/s, render images/s. PHOTOS=folder picks the instance photos.
# check (about a minute): the gpu tests (python -m pytest -m gpu tests/test_gpu.py): the flow in fp16 on
#   CUDA, and CUDA graphs against eager passes.
# profile (about two minutes): bench/startup_profile.py at SD 1.5 shapes: where the time before the first
#   optimizer step goes, in the train step alone and in a whole `dbl build` whose prior generates 8 class images,
#   and the base model read straight onto the GPU against read on the CPU and moved (3 loads each).
# session: every GPU figure of one session in one call, within SESSION_S seconds (default 480): dbl against
#   the script at SD 1.5 shapes (195-275 s on a fresh H200), the gpu tests (40-55 s), the start-up
#   profile (20-35 s), dbl eager (about 75 s), dbl compile (about 240 s with an empty compile cache: it
#   compiles for nearly 3 minutes), the load comparison (about 30 s), each under the time left; a part
#   that fails does not stop the next ones. All of them take about 650 s; 480 leaves out the last two.
# all: sd15, sdxl and run.
#
# Wheels in .whl/ (diffusers, peft, ...) are installed first when the machine lacks them. Results go
# to $OUT (default /tmp) as sd15-bench.json, sdxl-bench.json and gpu-bench.json.
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-sd15}"
case "$which" in
    sd15|sdxl|run|all|check|profile|session) ;;
    *) echo "usage: bash bench/gpu.sh [sd15|sdxl|run|check|profile|session|all]" >&2; exit 2 ;;
esac
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1
# REHEARSE=1: the same parts on the CPU with tiny models (anchor_bench --cpu-rehearsal), to try this script.
mode=--gpu device=cuda model=sd15-random size=512
if [ -n "${REHEARSE:-}" ]; then mode=--cpu-rehearsal device=cpu model=tiny-sd size=64; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || [ -n "${REHEARSE:-}" ]
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
out="${OUT:-/tmp}"

anchor() {  # the comparison with diffusers' script for one family: anchor FAMILY [JSON-NAME [VARIANT...]]
    local family="$1" name="${2:-$1-bench}" args=("$mode" --family "$1" --work "/tmp/dbl-$1-bench")
    shift; shift || true
    if [ "$#" -gt 0 ]; then args+=(--variants "$@");
    elif [ -n "${VARIANTS:-}" ]; then read -ra chosen <<<"$VARIANTS"; args+=(--variants "${chosen[@]}");
    elif [ "$family" = sd15 ]; then args+=(--variants dbl dbl-eager dbl-compile anchor); fi
    if [ -n "${ANCHOR:-}" ]; then args+=(--anchor "$ANCHOR"); fi
    if [ -n "${STEPS:-}" ]; then args+=(--steps "$STEPS"); fi
    if [ -n "${VARIANT_TIMEOUT:-}" ]; then args+=(--timeout "$VARIANT_TIMEOUT"); fi
    if [ -n "${MACHINE_WARMUP:-}" ]; then args+=(--machine-warmup "$MACHINE_WARMUP"); fi
    python3 bench/anchor_bench.py "${args[@]}" --out "$out/$name.json"
}

table() {  # bench/run.py's table
    local args=(--model sd15-random --resolution 512 --device cuda --mixed-precision fp16 --skip plan)
    if [ -n "${PHOTOS:-}" ]; then args+=(--photos "$PHOTOS"); fi
    if [ -n "${TRAIN_STEPS:-}" ]; then args+=(--train-steps "$TRAIN_STEPS"); fi
    python3 bench/run.py "${args[@]}" --out "$out/gpu-bench.json"
}

check() {
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
}

profile() {
    python3 bench/startup_profile.py --device cuda --model sd15-random --resolution 512 --mixed-precision fp16 \
        --json "$out/startup-profile.json"
    python3 bench/startup_profile.py --build --device cuda --model sd15-random --resolution 512 \
        --mixed-precision fp16 --class-images 8 --json "$out/startup-build-profile.json"
    python3 bench/startup_profile.py --compare-load 3 --device cuda --model sd15-random --mixed-precision fp16 \
        --json "$out/load-compare.json"
}

case "$which" in
    sd15|sdxl) anchor "$which" ;;
    run) table ;;
    check) check ;;
    profile) profile ;;
    all) anchor sd15; anchor sdxl; table ;;
    session)
        # The acceptance figures first, then the tests, then the rest, within SESSION_S seconds (default
        # 480) in all: each part gets what is left, runs whatever an earlier one did, and the failures and
        # the parts left out are listed last. Each dbl variant's and the script's log land in $out/logs.tgz.
        failed=() deadline=$((SECONDS + ${SESSION_S:-480}))
        left() { echo $((deadline - SECONDS)); }
        part() {  # part NAME COMMAND...: the command under what time is left
            local name="$1"; shift
            if [ "$(left)" -lt 20 ]; then failed+=("$name (no time left)"); return; fi
            echo "== $name ($(left) s left)"
            timeout -k 5 "$(left)" bash -c '"$@"' part "$@" || failed+=("$name")
        }
        export -f anchor check
        export out mode
        VARIANT_TIMEOUT="${VARIANT_TIMEOUT:-240}" part "sd15: dbl against the script" anchor sd15 sd15-bench dbl anchor
        part "gpu tests" check
        part "start-up profile" python3 bench/startup_profile.py --device "$device" --model "$model" \
            --resolution "$size" --mixed-precision fp16 --json "$out/startup-profile.json"
        # The comparison warmed the machine up (its CUDA libraries read): the later variants start as they are.
        MACHINE_WARMUP=0 VARIANT_TIMEOUT=120 part "sd15: dbl eager" anchor sd15 sd15-eager dbl-eager
        MACHINE_WARMUP=0 VARIANT_TIMEOUT=260 part "sd15: dbl compile" anchor sd15 sd15-compile dbl-compile
        part "load compare" python3 bench/startup_profile.py --compare-load 3 --device "$device" --model "$model" \
            --mixed-precision fp16 --json "$out/load-compare.json"
        (cd /tmp/dbl-sd15-bench && tar -czf "$out/logs.tgz" ./*.log) || true
        if [ "${#failed[@]}" -gt 0 ]; then printf 'failed: %s\n' "${failed[@]}" >&2; exit 1; fi
        ;;
esac
