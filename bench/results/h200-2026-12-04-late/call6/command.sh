#!/bin/bash
# session 20, call 6: the server at 64 streams with the GIL switch interval at 5 (CPython's default), 1 and
# 0.5 ms (trace of the 1 ms run), then the engine figures of the final tree
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site GLMCHAT_CACHE_DIR=/tmp/glmcache PYTHONPYCACHEPREFIX=/tmp/pyc
mkdir -p /tmp/glmcache; cp -r .carry/kernel-tuning /tmp/glmcache/
date -u
python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > /dev/null 2>&1
for ms in 5 1 0.5; do
  trace=(); [ "$ms" = 1 ] && trace=(--trace $OUT/serve_trace.jsonl)
  GLMCHAT_GIL_SWITCH_MS=$ms timeout 100 python3 bench/bench_serve.py --model /tmp/glm6b --quantization 8bit --concurrency 1,64 --rounds 3 --out $OUT/serve_$ms.json "${trace[@]}" > $OUT/serve_$ms.log 2>&1
  echo "switch $ms ms: rc $?"; tail -n 2 $OUT/serve_$ms.log
done
timeout 140 python3 bench/bench_engine.py --model /tmp/glm6b --quantization 8bit --rows 1,2,8,64 > $OUT/engine.jsonl 2> /dev/null
echo "engine rc $?"; cut -c1-260 $OUT/engine.jsonl | sed 's/"card.*"what"/"what"/'
date -u
