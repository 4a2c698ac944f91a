#!/bin/bash
# session 19 (next device time): GPU checks of the prompt path through the rotary + cache-write kernel, then the user
# figures it moves (chat TTFT, adapter switch, 64 replies, evaluation, the server's p99 TTFT), then the int4
# release's training under 6 GiB with the lean packed backward
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site GLMCHAT_CACHE_DIR=/tmp/glmcache
mkdir -p /tmp/glmcache; cp -r .carry/kernel-tuning /tmp/glmcache/
date -u
python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > $OUT/make.log 2>&1 &
timeout 100 python3 bench/check_fast_batch.py > $OUT/check.log 2>&1; timeout 60 python3 bench/check_fast_batch.py --long >> $OUT/check.log 2>&1
grep -a "^ok\|FAIL\|Error\|passed" $OUT/check.log | cut -c1-160
wait
timeout 150 python3 bench/bench_engine.py --model /tmp/glm6b --quantization 8bit --rows 1,2,8,64 > $OUT/engine.jsonl 2> $OUT/engine.err
echo "engine rc $?"; cut -c1-300 $OUT/engine.jsonl | sed 's/"card.*"what"/"what"/' | grep -v "load\|memory"; tail -n 2 $OUT/engine.err
# A/B on this machine: one-row prompts from graphs (default) against eager prompts, chat rows only
for graphs in 1 0; do
  GLMCHAT_PROMPT_GRAPHS=$graphs timeout 100 python3 bench/bench_engine.py --model /tmp/glm6b --quantization 8bit --rows 1,2 \
    > $OUT/engine_graphs$graphs.jsonl 2>> $OUT/engine.err
  echo "prompt graphs $graphs:"; grep -a '"chat"\|ttft_1600\|adapter_switch' $OUT/engine_graphs$graphs.jsonl | sed 's/.*"what"/"what"/' | cut -c1-200
done
date -u
