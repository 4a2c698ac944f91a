#!/bin/bash
# call C (session 17): NF4 under a 6 GiB cap (load, chat, 20 training steps, chat); the whole train.sh recipe
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site GLMCHAT_CACHE_DIR=/tmp/glmcache
mkdir -p /tmp/glmcache; cp -r .carry/kernel-tuning /tmp/glmcache/
S=$(date +%s); st(){ echo "[$(( $(date +%s)-S ))s] $*"; }
date -u
python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > $OUT/make.log 2>&1; st model
timeout 480 python3 bench/bench_train.py /tmp/glm6b 8bit --recipe-only --max-steps 3000 --variants default > $OUT/recipe_full.jsonl 2> $OUT/recipe_full.err; st recipe
cut -c1-900 $OUT/recipe_full.jsonl; tail -n 3 $OUT/recipe_full.err
timeout 90 python3 bench/bench_small_cards.py --model /tmp/glm6b --quantization 4bit --cap-gib 6 2> $OUT/small_nf4.err | tee $OUT/small_nf4.jsonl | cut -c1-400
st small; tail -n 3 $OUT/small_nf4.err
