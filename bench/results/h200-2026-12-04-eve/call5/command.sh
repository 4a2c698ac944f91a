#!/bin/bash
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.:/tmp/site GLMCHAT_CACHE_DIR=/tmp/glmcache
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
[ -d /tmp/glm6b ] || python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > $OUT/make.log 2>&1
timeout 100 python3 bench/bench_engine.py --model /tmp/glm6b --quantization 8bit --rows 1,2,8 > $OUT/engine_8bit.jsonl 2> $OUT/engine_8bit.err
cut -c150-330 $OUT/engine_8bit.jsonl; tail -n 2 $OUT/engine_8bit.err
