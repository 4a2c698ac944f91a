#!/bin/bash
# session 19 (next device time), second call: GPU checks of the prompt path through the rotary + cache-write kernel, then the user
# figures it moves (chat TTFT, adapter switch, 64 replies, evaluation, the server's p99 TTFT), then the int4
# release's training under 6 GiB with the lean packed backward
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site GLMCHAT_CACHE_DIR=/tmp/glmcache
mkdir -p /tmp/glmcache; cp -r .carry/kernel-tuning /tmp/glmcache/
date -u
python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > $OUT/make.log 2>&1
s=$(date +%s)
timeout 100 python3 train_cli.py eval --model /tmp/glm6b --quantization 8bit --validation-file .carry/dev.json \
  --prompt-column content --response-column summary --max-target-length 128 --output-dir /tmp/eval > $OUT/eval.log 2>&1
echo "eval rc $? wall $(( $(date +%s) - s )) s"; grep -a "examples," $OUT/eval.log | tail -1
TIMEFORMAT='glmchat --prompt wall %R s'
for i in 1 2; do  # the second run has warm Triton and tuning caches
  time (timeout 120 python3 -m tui --model /tmp/glm6b --quantization 8bit --prompt "类型#裙*颜色#红色*风格#复古" \
    --max-new-tokens 128 > $OUT/prompt$i.txt 2> $OUT/prompt$i.err; echo "rc $?")
done
python3 bench/bench_load.py make-int4 /tmp/glm6b-int4 /tmp/glm6b > $OUT/make4.log 2>&1
timeout 200 python3 bench/bench_small_cards.py --model /tmp/glm6b-int4 --cap-gib 6 --dtype fp16 2> $OUT/small_int4.err | tee $OUT/small_int4.jsonl | cut -c1-500
timeout 150 python3 bench/bench_serve.py --model /tmp/glm6b --quantization 8bit --concurrency 1,64 --out $OUT/serve.json --trace $OUT/serve_trace.jsonl > $OUT/serve.log 2>&1
echo "serve rc $?"; tail -n 4 $OUT/serve.log
date -u
