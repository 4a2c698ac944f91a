#!/usr/bin/env bash
# One device call for every figure of BENCHMARKS.md but loading and data parallel: install the
# carried bitsandbytes wheel, check the kernels, run the decode bench, then the training bench
# (8-bit: train.sh's recipe through train_cli.py at micro-batch 1, auto, 16 and auto under a 7.5 GB cap,
# step rows, evaluation; 4-bit step rows), and fold its figures into
# OUT/results.json and OUT/results.md.
# Usage on the GPU machine (run tool, carry ".whl"):  bash bench/run_device.sh [bench_decode args]
# Back here: copy OUT/results.* to bench/, then  python bench/collect_results.py --benchmarks BENCHMARKS.md bench
set -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=.:/tmp/site
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 bench/check_kernels.py > "$OUT/check.log" 2>&1 || echo "kernel checks failed (see check.log)"
tail -n 1 "$OUT/check.log"
python3 bench/check_grad_kernel.py 2>&1 | tee "$OUT/check_grad.log"
TRITON_CACHE_DIR=/tmp/triton_bench_cache python3 bench/bench_decode.py --out "$OUT" "$@" > "$OUT/bench.log" 2>&1 || exit 1
[ -d /tmp/glm6b ] || python3 bench/bench_load.py make /tmp/glm6b > /dev/null
python3 bench/bench_train.py /tmp/glm6b 8bit 2>/dev/null | tee "$OUT/train_8bit.jsonl"
python3 bench/bench_train.py /tmp/glm6b 4bit --step-only 2>/dev/null | tee "$OUT/train_4bit.jsonl"
python3 bench/collect_results.py "$OUT"
