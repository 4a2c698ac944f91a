#!/bin/bash
# call B (session 17): linears (widen kernel, decode configs), recipe default vs triton-only, eval, ChatEngine decode
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site GLMCHAT_CACHE_DIR=/tmp/glmcache
mkdir -p /tmp/glmcache; cp -r .carry/kernel-tuning /tmp/glmcache/
S=$(date +%s); st(){ echo "[$(( $(date +%s)-S ))s] $*"; }
date -u
python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > $OUT/make.log 2>&1 &
timeout 170 python3 bench/bench_linears.py > $OUT/linears.jsonl 2> $OUT/linears.err; st linears; tail -n 2 $OUT/linears.err
wait; st model
timeout 130 python3 bench/bench_train.py /tmp/glm6b 8bit --recipe-only --max-steps 60 --variants default,default-triton-only > $OUT/train.jsonl 2> $OUT/train.err; st train
cut -c300-700 $OUT/train.jsonl
s=$(date +%s)
timeout 120 python3 train_cli.py eval --model /tmp/glm6b --quantization 8bit --validation-file .carry/dev.json \
  --prompt-column content --response-column summary --max-target-length 128 --output-dir /tmp/eval > $OUT/eval.log 2>&1
echo "{\"what\": \"eval\", \"rc\": $?, \"seconds\": $(( $(date +%s) - s )), \"examples\": $(wc -l < .carry/dev.json)}" | tee $OUT/eval.json
tail -n 4 $OUT/eval.log; st eval
timeout 150 python3 bench/bench_engine.py --model /tmp/glm6b --quantization 8bit --rows 1,2,8,64 > $OUT/engine_8bit.jsonl 2> $OUT/engine_8bit.err
st engine; cut -c1-330 $OUT/engine_8bit.jsonl | grep -v '"load"'; tail -n 2 $OUT/engine_8bit.err
cp -r /tmp/glmcache/kernel-tuning $OUT/ 2>/dev/null
