#!/usr/bin/env bash
# The GPU checks docs/results.md lists as pending, in one run of about 10 minutes on one H100/H200, each
# step under its own time limit so one slow step cannot take the others with it. Prepare here first:
#     bash benchmarks/gpu_wheels.sh
# then copy the checkout with .gpu-wheels/ to the GPU machine (whose python3 holds a CUDA torch) and run there:
#     bash benchmarks/gpu_checks.sh OUT
# Logs land in the folder OUT. The step limits sum to 570 s, so a 10-minute slot holds the whole run. The steps:
#   1. tests/test_gpu.py (pytest -m gpu): fused loss on CUDA in bf16, RigL bf16 with fused AdamW, clipping and
#      compile, plain and under ZeRO-2;
#   2. the 124M RigL and SRigL mask update on the GPU (goal: RigL <= 100 ms), the one-process rules against the
#      block-wise sharded rules that ZeRO-3's partitioned masks run (identical masks checked);
#   3. ZeRO-2 RigL at delta_t = 100 against dense ZeRO-2: mean step time with the updates included (goal <= 1.03x);
#   4. dense MFU and RigL throughput of GPT-2 124M (benchmarks/gpu_throughput.py).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-checks}
mkdir -p "$out"
PY=${PY:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
if [ -d .gpu-wheels ]; then
    "$PY" -m pip install --quiet --no-index --no-deps --find-links .gpu-wheels .gpu-wheels/*.whl 2>&1 | tail -3
fi
step() {  # step NAME SECONDS COMMAND...: its output in $out/NAME.log, the end of it here
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 20 "$out/$name.log"
    echo "== $name: rc $rc in $((SECONDS - t0)) s"
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    "$PY" -c "import torch, lightning, deepspeed, transformers; print('torch', torch.__version__, 'lightning', \
lightning.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"
step gpu-tests 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
step update-time 90 "$PY" benchmarks/update_scale.py --device cuda --methods rigl,srigl --paths fast,sharded \
    --repeats 3
step dst-overhead 180 "$PY" benchmarks/dst_overhead.py --accelerator gpu --precision bf16-mixed \
    --strategy deepspeed_stage_2 --preset gpt2-124m --tokenizer gpt2 --block-size 1024 --batch-size 16 \
    --methods rigl --warmup 60 --steps 200 --delta-t 100
step mfu 150 "$PY" benchmarks/gpu_throughput.py --steps 200 --warmup 60 \
    --variants auto-dense-compile-fused,zero2-dense,zero2-rigl --out "$out/gpu_throughput.json"
