#!/bin/bash
# session 18, call 7: the final code (four K splits, BLOCK_N 64 for qkv/dense/fc2 at <= 64 rows): GPU checks, the
# captured step at 2 and 64 rows, ChatEngine, evaluation
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site GLMCHAT_CACHE_DIR=/tmp/glmcache
mkdir -p /tmp/glmcache; cp -r .carry/kernel-tuning /tmp/glmcache/
date -u
python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > $OUT/make.log 2>&1 &
timeout 100 python3 bench/check_fast_batch.py > $OUT/check.log 2>&1; grep -a "^ok\|FAIL\|Error\|passed" $OUT/check.log | cut -c1-160
wait
timeout 150 python3 bench/bench_engine.py --model /tmp/glm6b --quantization 8bit --rows 1,2,8,64 > $OUT/engine.jsonl 2> $OUT/engine.err
echo "engine rc $?"; cut -c1-300 $OUT/engine.jsonl | sed 's/"card.*"what"/"what"/' | grep -v "load\|memory"; tail -n 2 $OUT/engine.err
s=$(date +%s)
timeout 100 python3 train_cli.py eval --model /tmp/glm6b --quantization 8bit --validation-file .carry/dev.json \
  --prompt-column content --response-column summary --max-target-length 128 --output-dir /tmp/eval > $OUT/eval.log 2>&1
echo "eval rc $? wall $(( $(date +%s) - s )) s"; grep -a "examples," $OUT/eval.log | tail -1
timeout 100 python3 bench/profile_batch_step.py --model /tmp/glm6b --quantization 8bit --rows 2,64 > $OUT/profile.jsonl 2> $OUT/profile.err
grep '"decoder"' $OUT/profile.jsonl | cut -c1-400 | sed 's/"card.*"what"/"what"/'
date -u
