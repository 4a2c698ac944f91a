#!/bin/bash
# session 18, call 1: where ChatEngine's concurrent replies wait (trace_engine), bench_engine with first-token times,
# the captured step vs decoder.step() at 2/64/128 rows
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site GLMCHAT_CACHE_DIR=/tmp/glmcache
mkdir -p /tmp/glmcache; cp -r .carry/kernel-tuning /tmp/glmcache/
date -u; nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > $OUT/make.log 2>&1
timeout 150 python3 bench/trace_engine.py --model /tmp/glm6b --quantization 8bit --rows 1,2,8,64 > $OUT/trace.jsonl 2> $OUT/trace.err
echo "trace rc $?"; cut -c1-700 $OUT/trace.jsonl | sed 's/"card.*"what"/"what"/'
timeout 150 python3 bench/bench_engine.py --model /tmp/glm6b --quantization 8bit --rows 1,2,8,64 > $OUT/engine.jsonl 2> $OUT/engine.err
echo "engine rc $?"; cut -c1-500 $OUT/engine.jsonl | sed 's/"card.*"what"/"what"/'
timeout 200 python3 bench/profile_batch_step.py --model /tmp/glm6b --quantization 8bit --rows 2,64,128 > $OUT/profile.jsonl 2> $OUT/profile.err
echo "profile rc $?"; grep -v kernels $OUT/profile.jsonl | cut -c1-400 | sed 's/"card.*"what"/"what"/'
cp -r /tmp/glmcache/kernel-tuning $OUT/ 2>/dev/null; date -u
