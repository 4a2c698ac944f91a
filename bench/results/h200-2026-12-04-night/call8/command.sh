#!/bin/bash
# session 18, call 8: evaluation twice on one machine (the second with Triton's compile cache warm)
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site GLMCHAT_CACHE_DIR=/tmp/glmcache
mkdir -p /tmp/glmcache; cp -r .carry/kernel-tuning /tmp/glmcache/
python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > $OUT/make.log 2>&1
for i in 1 2; do s=$(date +%s)
timeout 70 python3 train_cli.py eval --model /tmp/glm6b --quantization 8bit --validation-file .carry/dev.json \
  --prompt-column content --response-column summary --max-target-length 128 --output-dir /tmp/eval > $OUT/eval$i.log 2>&1
echo "eval $i rc $? wall $(( $(date +%s) - s )) s"; grep -a "examples," $OUT/eval$i.log | tail -1; done
