#!/bin/bash
# session 20, call 5: the server at 64 streams with submit/admit times in its trace (tokens handed to the event
# loop once a step), then the 8-bit load under cProfile
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site GLMCHAT_CACHE_DIR=/tmp/glmcache PYTHONPYCACHEPREFIX=/tmp/pyc
mkdir -p /tmp/glmcache; cp -r .carry/kernel-tuning /tmp/glmcache/
date -u
python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > /dev/null 2>&1
timeout 150 python3 bench/bench_serve.py --model /tmp/glm6b --quantization 8bit --concurrency 1,64 --rounds 3 --out $OUT/serve.json --trace $OUT/serve_trace.jsonl > $OUT/serve.log 2>&1
echo "serve rc $?"; tail -n 3 $OUT/serve.log
timeout 100 python3 .carry/probe_load.py /tmp/glm6b > $OUT/load_profile.txt 2>&1; head -n 3 $OUT/load_profile.txt
date -u
