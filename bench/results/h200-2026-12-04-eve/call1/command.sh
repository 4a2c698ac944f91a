#!/bin/bash
# call A (session 17): linears, fast-batch checks (incl. 200 rows), the train.sh recipe variants
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site GLMCHAT_CACHE_DIR=/tmp/glmcache
mkdir -p /tmp/glmcache; [ -d .carry/kernel-tuning ] && cp -r .carry/kernel-tuning /tmp/glmcache/
S=$(date +%s); st(){ echo "[$(( $(date +%s)-S ))s] $*"; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader; date -u
python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > $OUT/make.log 2>&1 &
timeout 200 python3 bench/bench_linears.py > $OUT/linears.jsonl 2> $OUT/linears.err; st linears; tail -n 2 $OUT/linears.err
wait; st model
timeout 100 python3 bench/check_fast_batch.py > $OUT/check_fast_batch.log 2>&1; tail -n 5 $OUT/check_fast_batch.log; st check
timeout 300 python3 bench/bench_train.py /tmp/glm6b 8bit --recipe-only --max-steps 60 > $OUT/train.jsonl 2> $OUT/train.err; st train
cut -c1-600 $OUT/train.jsonl; tail -n 3 $OUT/train.err
cp -r /tmp/glmcache/kernel-tuning $OUT/ 2>/dev/null; ls $OUT
