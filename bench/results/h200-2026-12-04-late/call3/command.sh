#!/bin/bash
# session 20, call 3: where `glmchat --prompt` spends its 20 s (yappi, every thread), and eval cold then warm
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .carry/yappi/*.whl || exit 1
export PYTHONPATH=.:/tmp/site GLMCHAT_CACHE_DIR=/tmp/glmcache
mkdir -p /tmp/glmcache; cp -r .carry/kernel-tuning /tmp/glmcache/
date -u
s=$(date +%s); python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > /dev/null 2>&1; echo "make $(( $(date +%s) - s )) s"
TIMEFORMAT='%R s'
echo -n "import backend.engine: "; time python3 -c "import backend.engine"
echo -n "import backend.engine again: "; time python3 -c "import backend.engine"
P=(--model /tmp/glm6b --quantization 8bit --prompt "类型#裙*颜色#红色*风格#复古" --max-new-tokens 128)
for i in 1 2; do echo -n "glmchat --prompt run $i: "; time (timeout 120 python3 -m tui "${P[@]}" > /dev/null 2> $OUT/prompt$i.err); done
timeout 150 python3 .carry/probe_prompt.py "${P[@]}" > /dev/null 2> $OUT/prompt_probe.txt; head -c 300 $OUT/prompt_probe.txt | grep -a "load_engine"; grep -a "load_engine" $OUT/prompt_probe.txt
for i in 1 2; do
  s=$(date +%s)
  timeout 100 python3 train_cli.py eval --model /tmp/glm6b --quantization 8bit --validation-file .carry/dev.json \
    --prompt-column content --response-column summary --max-target-length 128 --output-dir /tmp/eval > $OUT/eval$i.log 2>&1
  echo "eval $i rc $? wall $(( $(date +%s) - s )) s"; grep -a "examples," $OUT/eval$i.log | tr '\r' '\n' | grep -a examples | tail -1
done
date -u
