#!/bin/bash
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site GLMCHAT_CACHE_DIR=/tmp/glmcache
mkdir -p /tmp/glmcache; cp -r .carry/kernel-tuning /tmp/glmcache/
[ -d /tmp/glm6b ] || python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > $OUT/make.log 2>&1
timeout 120 python3 .carry/probe_sdpa.py 2>&1 | tee $OUT/sdpa.log | grep -v "^-\|^ *$" | cut -c1-200 | head -60
timeout 150 python3 .carry/probe_prefill.py > $OUT/prefill.log 2>&1; cut -c1-200 $OUT/prefill.log | grep -v "^ *$" | tail -60
