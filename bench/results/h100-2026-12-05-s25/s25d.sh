#!/usr/bin/env bash
# session 25, call 5: run 20 (tuning by GPU time) on NF4; 8-bit (loaded without bitsandbytes) under a 10 GiB cap
set -o pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GLMCHAT_CACHE_DIR=/tmp/glmcache
nvidia-smi --query-gpu=name --format=csv,noheader
[ -d /tmp/site/bitsandbytes ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site
START=$(date +%s); stamp() { echo "[$(( $(date +%s) - START )) s] $*"; }
[ -d /tmp/glm6b ] || python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > /dev/null; stamp made
timeout 170 python3 bench/bench_engine.py --model /tmp/glm6b --quantization 4bit --rows 1,2 > "$OUT/engine_nf4.jsonl" 2> "$OUT/engine_nf4.err"
stamp "nf4 rc=$?"; grep -a '"chat"\|"compare"\|tuning' "$OUT/engine_nf4.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-200
grep -a -i "different result\|error" "$OUT/engine_nf4.err" | head -3 | cut -c1-300
timeout 90 python3 bench/profile_batch_step.py --model /tmp/glm6b --quantization 4bit --rows 1 > "$OUT/profile_nf4.jsonl" 2> "$OUT/profile_nf4.err"
stamp "profile rc=$?"; grep -a '"decoder"\|"kernels"' "$OUT/profile_nf4.jsonl" | cut -c150-700
timeout 200 python3 bench/bench_small_cards.py --model /tmp/glm6b --quantization 8bit --cap-gib 10 2> "$OUT/small_8bit.err" | tee "$OUT/small_8bit.jsonl" | cut -c1-300
stamp "small rc=$?"; grep -a -i "error\|out of memory" "$OUT/small_8bit.err" | head -3 | cut -c1-300
cp -r "$GLMCHAT_CACHE_DIR/kernel-tuning" "$OUT/" 2>/dev/null || true
