#!/bin/bash
# call D (session 17): ChatEngine 8-bit decode (new matmul configs, warm-up, prefill attention), eval, glmchat serve
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site GLMCHAT_CACHE_DIR=/tmp/glmcache
mkdir -p /tmp/glmcache; cp -r .carry/kernel-tuning /tmp/glmcache/
S=$(date +%s); st(){ echo "[$(( $(date +%s)-S ))s] $*"; }
date -u
python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > $OUT/make.log 2>&1; st model
timeout 110 python3 bench/bench_engine.py --model /tmp/glm6b --quantization 8bit --rows 1,2,8,64 > $OUT/engine_8bit.jsonl 2> $OUT/engine_8bit.err
st engine; cut -c150-330 $OUT/engine_8bit.jsonl; tail -n 2 $OUT/engine_8bit.err
s=$(date +%s)
timeout 100 python3 train_cli.py eval --model /tmp/glm6b --quantization 8bit --validation-file .carry/dev.json \
  --prompt-column content --response-column summary --max-target-length 128 --output-dir /tmp/eval > $OUT/eval.log 2>&1
echo "{\"what\": \"eval\", \"rc\": $?, \"seconds\": $(( $(date +%s) - s )), \"examples\": $(wc -l < .carry/dev.json)}" | tee $OUT/eval.json
grep -a "examples," $OUT/eval.log; st eval
timeout 170 python3 bench/bench_serve.py --model /tmp/glm6b --quantization 8bit --concurrency 1,8,64 --out $OUT/serve.json > $OUT/serve.log 2>&1
st serve; tail -n 6 $OUT/serve.log
