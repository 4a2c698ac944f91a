#!/bin/bash
# session 18, call 3: decoding attention off cuDNN, host-made prefill indices, sampled rows on the device, the next
# step queued before the tokens are handed out
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site GLMCHAT_CACHE_DIR=/tmp/glmcache
mkdir -p /tmp/glmcache; cp -r .carry/kernel-tuning /tmp/glmcache/
date -u
python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > $OUT/make.log 2>&1
timeout 120 python3 bench/check_fast_batch.py > $OUT/check.log 2>&1; grep -a "PASS\|FAIL\|Error" $OUT/check.log | cut -c1-200
timeout 150 python3 bench/bench_engine.py --model /tmp/glm6b --quantization 8bit --rows 1,2,8,64 > $OUT/engine.jsonl 2> $OUT/engine.err
echo "engine rc $?"; cut -c1-420 $OUT/engine.jsonl | sed 's/"card.*"what"/"what"/'; tail -n 3 $OUT/engine.err
timeout 120 python3 bench/trace_engine.py --model /tmp/glm6b --quantization 8bit --rows 64 > $OUT/trace.jsonl 2> $OUT/trace.err
echo "trace rc $?"; cut -c1-900 $OUT/trace.jsonl | sed 's/"card.*"what"/"what"/'
s=$(date +%s)
timeout 200 python3 train_cli.py eval --model /tmp/glm6b --quantization 8bit --validation-file .carry/dev.json \
  --prompt-column content --response-column summary --max-target-length 128 --output-dir /tmp/eval > $OUT/eval.log 2>&1
echo "eval rc $? wall $(( $(date +%s) - s )) s"; grep -a "examples," $OUT/eval.log | tail -2
timeout 200 python3 bench/bench_serve.py --model /tmp/glm6b --quantization 8bit --concurrency 1,8,64 --out $OUT/serve.json > $OUT/serve.log 2>&1
echo "serve rc $?"; tail -n 6 $OUT/serve.log
date -u
