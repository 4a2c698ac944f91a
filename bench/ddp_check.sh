#!/usr/bin/env bash
# Data-parallel P-Tuning check on a 2-GPU machine: the same global batch (1 x 4 micro-batches per step)
# on one GPU and under torchrun on two must give the same loss curve. Full 6B size, random weights, 8-bit.
# Usage (GPU machine, repo root, bitsandbytes importable): bash bench/ddp_check.sh OUT_DIR
set -euo pipefail
out=${1:-out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 bench/bench_load.py make /tmp/glm6b > /dev/null
common=(train --model /tmp/glm6b --train-file assets/sample/train.json --quantization 8bit --pre-seq-len 128
        --max-source-length 64 --max-target-length 128 --per-device-train-batch-size 1
        --gradient-accumulation-steps 4 --max-steps 8 --logging-steps 1 --save-steps 8 --seed 42)
start=$(date +%s)
python3 train_cli.py "${common[@]}" --output-dir /tmp/one_gpu > "$out/one_gpu.log" 2>&1
mid=$(date +%s)
torchrun --nproc-per-node 2 train_cli.py "${common[@]}" --output-dir /tmp/two_gpus > "$out/two_gpus.log" 2>&1
end=$(date +%s)
cp /tmp/one_gpu/progress.jsonl "$out/one_gpu.jsonl"; cp /tmp/two_gpus/progress.jsonl "$out/two_gpus.jsonl"
python3 - "$out" $((mid - start)) $((end - mid)) <<'PY'
import json, sys
out = sys.argv[1]
def losses(name):
    return {e["step"]: e["loss"] for e in map(json.loads, open(f"{out}/{name}.jsonl")) if e.get("loss") is not None and e.get("event") == "log"}
a, b = losses("one_gpu"), losses("two_gpus")
rows = [(s, a[s], b.get(s)) for s in sorted(a)]
for s, x, y in rows:
    print(f"step {s}: one GPU {x:.5f}  two GPUs {y:.5f}  diff {abs(x - y):.2e}")
print(json.dumps({"max_abs_diff": max(abs(x - y) for _, x, y in rows), "one_gpu_s": int(sys.argv[2]), "two_gpus_s": int(sys.argv[3])}))
PY
