#!/usr/bin/env bash
# One device call: install the carried bitsandbytes wheel, check the kernels, run the benchmark.
# Usage on the GPU machine (run tool, carry ".whl"):  bash bench/run_device.sh [bench args]
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
python3 bench/check_kernels.py 2>&1 | tee "$OUT/check.log" || echo "kernel checks failed (see check.log)"
TRITON_CACHE_DIR=/tmp/triton_bench_cache python3 bench/bench_decode.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
