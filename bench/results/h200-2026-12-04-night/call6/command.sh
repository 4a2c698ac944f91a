#!/bin/bash
# session 18, call 6: K splits for the int8 matmul at decode rows: the graph-timed grid, then ChatEngine with the
# first guess (small_rows_split: 2, or 4 for fc2)
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site GLMCHAT_CACHE_DIR=/tmp/glmcache
mkdir -p /tmp/glmcache; cp -r .carry/kernel-tuning /tmp/glmcache/
date -u
python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > $OUT/make.log 2>&1 &
timeout 240 python3 bench/bench_linears.py --decode-graphs > $OUT/decode_graphs.jsonl 2> $OUT/decode_graphs.err
echo "linears rc $?"; cut -c1-330 $OUT/decode_graphs.jsonl; tail -n 2 $OUT/decode_graphs.err
wait
timeout 150 python3 bench/bench_engine.py --model /tmp/glm6b --quantization 8bit --rows 1,2,8,64 > $OUT/engine.jsonl 2> $OUT/engine.err
echo "engine rc $?"; cut -c1-300 $OUT/engine.jsonl | sed 's/"card.*"what"/"what"/' | grep -v "load\|memory"; tail -n 3 $OUT/engine.err
date -u
