#!/bin/bash
# session 20, call 4: `glmchat --prompt` stage by stage (warm .pyc and Triton caches), the engine figures with
# every prompt graph captured at warm-up, and the server at 64 streams with its step trace
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# the image's packages have no .pyc and a read-only tree: a user's install has them, so keep them under /tmp
export PYTHONPATH=.:/tmp/site GLMCHAT_CACHE_DIR=/tmp/glmcache PYTHONPYCACHEPREFIX=/tmp/pyc
mkdir -p /tmp/glmcache; cp -r .carry/kernel-tuning /tmp/glmcache/
date -u
python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > /dev/null 2>&1
TIMEFORMAT='%R s'
P=(--model /tmp/glm6b --quantization 8bit --prompt "类型#裙*颜色#红色*风格#复古" --max-new-tokens 128)
for i in 1 2; do echo -n "glmchat --prompt run $i: "; time (timeout 120 python3 -m tui "${P[@]}" > /dev/null 2> /dev/null); done
T0=$(date +%s.%N) timeout 120 python3 .carry/probe_prompt.py "${P[@]}" 2>&1 >/dev/null | grep -a "^mark"
python3 -X importtime -c "import backend.engine" 2> $OUT/importtime.txt; sort -t'|' -k2 -n $OUT/importtime.txt | tail -n 25 | cut -c1-120
timeout 170 python3 bench/bench_engine.py --model /tmp/glm6b --quantization 8bit --rows 1,2,8,64 > $OUT/engine.jsonl 2> $OUT/engine.err
echo "engine rc $?"; cut -c1-300 $OUT/engine.jsonl | sed 's/"card.*"what"/"what"/' | grep -v "memory"; tail -n 2 $OUT/engine.err
timeout 150 python3 bench/bench_serve.py --model /tmp/glm6b --quantization 8bit --concurrency 1,64 --out $OUT/serve.json --trace $OUT/serve_trace.jsonl > $OUT/serve.log 2>&1
echo "serve rc $?"; tail -n 4 $OUT/serve.log
date -u
