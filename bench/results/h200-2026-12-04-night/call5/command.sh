#!/bin/bash
# session 18, call 5: small cards after the sampler graph and the attention change (NF4 and the int4 release in fp16
# under 6 GiB), then the server again (a second sample of its 64-stream TTFT)
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site GLMCHAT_CACHE_DIR=/tmp/glmcache
mkdir -p /tmp/glmcache; cp -r .carry/kernel-tuning /tmp/glmcache/
date -u
python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > $OUT/make.log 2>&1
python3 bench/bench_load.py make-int4 /tmp/glm6b-int4 /tmp/glm6b > $OUT/make4.log 2>&1
timeout 200 python3 bench/bench_small_cards.py --model /tmp/glm6b --quantization 4bit --cap-gib 6 2> $OUT/small_nf4.err | tee $OUT/small_nf4.jsonl | cut -c1-400
timeout 200 python3 bench/bench_small_cards.py --model /tmp/glm6b-int4 --cap-gib 6 --dtype fp16 2> $OUT/small_int4.err | tee $OUT/small_int4.jsonl | cut -c1-400
timeout 150 python3 bench/bench_serve.py --model /tmp/glm6b --quantization 8bit --concurrency 1,64 --out $OUT/serve.json > $OUT/serve.log 2>&1
echo "serve rc $?"; tail -n 4 $OUT/serve.log
date -u
