#!/usr/bin/env bash
# The CUDA path on one GPU: what CI (CPU only) cannot check. With tighter limits (below) it took
# 8.5 minutes on an H200 and cut three steps short; the defaults allow up to 25 minutes.
#
#   scripts/check_cuda.sh [OUT_DIR]            # default results/cuda
#
# 1. tests/test_cuda.py: the same weights give the same outputs and memories on GPU and CPU,
#    generate equals greedy full forwards, bf16 autocast stays finite over 2,000 segments with
#    float32 memories, train() and sleep() on the GPU start at the CPU's loss and learn.
# 2. scripts/bench_memory.py --device cuda: throughput and peak memory against the bare model,
#    to 131K tokens for all systems and to 1M tokens for memstack and the per-segment baseline.
# 3. scripts/train.py configs/tiny_passkey.py on the GPU (bf16 autocast), seeds 0, 1 and 2 at
#    once, each ending with the pass-key table (20 keys per cell, synthetic and real-text filler).
#
# Each step has its own time limit (seconds: CHECK_TESTS_S, CHECK_BENCH_S, CHECK_BENCH_1M_S,
# TRAIN_SECONDS), so one that hangs cannot eat the others' time; what a step wrote before its limit
# stays in OUT_DIR. Logs: OUT_DIR/*.log; figures: the JSON files. The limits by default leave each
# step room to finish; results/cuda_h200 ran with 120, 100, 70 and 270 to fit a 10-minute call.
set -u
out=${1:-results/cuda}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
phase() { echo "[$(($(date +%s) - start)) s] $*" | tee -a "$out/phases.log"; }

phase "environment"
{
    nvidia-smi -L
    python3 -c 'import sys, torch, transformers, peft, faiss; print(sys.version.split()[0], "torch", torch.__version__,
"transformers", transformers.__version__, "peft", peft.__version__, "faiss", faiss.__version__,
"cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")'
} >"$out/env.log" 2>&1
cat "$out/env.log"

phase "tests/test_cuda.py"
timeout -k 5 "${CHECK_TESTS_S:-300}" python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py >"$out/tests.log" 2>&1
phase "tests exit $? ($(tail -1 "$out/tests.log"))"

phase "bench_memory to 131K tokens"
timeout -k 5 "${CHECK_BENCH_S:-300}" python3 scripts/bench_memory.py --device cuda --lengths 16384 131072 \
    --train-lengths 16384 --repeats 3 --out "$out/bench_memory_cuda.json" >"$out/bench.log" 2>&1
phase "bench exit $?"
pkill -f bench_memory.py  # a measurement a time limit cut short must not share the GPU
phase "bench_memory at 1M tokens"
timeout -k 5 "${CHECK_BENCH_1M_S:-300}" python3 scripts/bench_memory.py --device cuda --systems memstack bare_segments \
    --lengths 1048576 --train-lengths 131072 --repeats 1 --out "$out/bench_memory_cuda_1m.json" \
    >"$out/bench_1m.log" 2>&1
phase "bench 1M exit $?"
pkill -f bench_memory.py

phase "train tiny_passkey, seeds 0 1 2 at once"
for seed in 0 1 2; do
    timeout -k 5 "${TRAIN_SECONDS:-600}" python3 scripts/train.py configs/tiny_passkey.py run.device=cuda \
        run.seed=$seed run.ckpt_every=0 eval.memory_off=false run.out_dir="$out/tiny_passkey_seed$seed" \
        >"$out/train_seed$seed.log" 2>&1 &
done
wait
phase "train done: $(ls "$out"/tiny_passkey_seed*/passkey.json 2>/dev/null | wc -l) of 3 with a pass-key table"
