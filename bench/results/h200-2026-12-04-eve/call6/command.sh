#!/bin/bash
# call F (session 17): train_cli.py eval with scoring in the background (the time printed now includes scoring)
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site GLMCHAT_CACHE_DIR=/tmp/glmcache
mkdir -p /tmp/glmcache; cp -r .carry/kernel-tuning /tmp/glmcache/
date -u
python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > $OUT/make.log 2>&1
for i in 1 2; do
s=$(date +%s)
timeout 90 python3 train_cli.py eval --model /tmp/glm6b --quantization 8bit --validation-file .carry/dev.json \
  --prompt-column content --response-column summary --max-target-length 128 --output-dir /tmp/eval > $OUT/eval$i.log 2>&1
echo "{\"what\": \"eval\", \"rc\": $?, \"seconds\": $(( $(date +%s) - s )), \"examples\": $(wc -l < .carry/dev.json)}" | tee $OUT/eval$i.json
grep -a "examples," $OUT/eval$i.log; tail -n 3 $OUT/eval$i.log
done
