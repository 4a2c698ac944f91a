#!/usr/bin/env bash
# session 25's device calls (kept in bench/results afterwards): bash s25.sh c1|c2|c3
set -o pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GLMCHAT_CACHE_DIR=/tmp/glmcache
mkdir -p /tmp/glmcache
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/bitsandbytes ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=.:/tmp/site
START=$(date +%s); stamp() { echo "[$(( $(date +%s) - START )) s] $*"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
make6b() { [ -d /tmp/glm6b ] || python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > /dev/null; stamp made; }
engine() { local name=$1 t=$2; shift 2
  timeout $t python3 bench/bench_engine.py "$@" > "$OUT/engine_$name.jsonl" 2> "$OUT/engine_$name.err"
  stamp "engine $name rc=$?"; grep -a '"chat"\|"compare"\|"batch"\|tuning\|"load"' "$OUT/engine_$name.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-230
  grep -a -i "warn\|error\|different result" "$OUT/engine_$name.err" | head -5 | cut -c1-300; }
case "$1" in
c1)
  timeout 170 python3 bench/check_fast_batch.py > "$OUT/check_fast_batch.log" 2>&1
  stamp "check rc=$?"; grep -a "^ok\|FAIL\|Error\|passed" "$OUT/check_fast_batch.log" | cut -c1-170
  timeout 150 python3 bench/check_kernels_batch.py --formats nf4 int4 --m 1 2 --no-attention --candidates > "$OUT/kernels_4bit.log" 2>&1
  stamp "kernels rc=$?"; grep -a "^cand\|FAIL\|failed;\|PASSED" "$OUT/kernels_4bit.log" | cut -c1-150 | head -80
  make6b
  engine nf4 200 --model /tmp/glm6b --quantization 4bit --rows 1,2
  ;;
c2)
  make6b
  engine all1 240 --model /tmp/glm6b --quantization 8bit --rows 1,2,64
  rm -rf /tmp/glmcache-nowords; cp -r /tmp/glmcache /tmp/glmcache-nowords
  GLMCHAT_WORDS_GEMV=0 GLMCHAT_CACHE_DIR=/tmp/glmcache-nowords engine words0 150 --model /tmp/glm6b --quantization 8bit --rows 2
  [ -d /tmp/glm6b-int4 ] || python3 bench/bench_load.py make-int4 /tmp/glm6b-int4 /tmp/glm6b > /dev/null
  engine int4 150 --model /tmp/glm6b-int4 --rows 1,2
  ;;
c3)
  make6b
  bash bench/run_device.sh prompt-newest
  s=$(date +%s)
  timeout 150 python3 train_cli.py eval --model /tmp/glm6b --quantization 8bit --validation-file .carry/dev.json \
      --prompt-column content --response-column summary --max-target-length 128 --output-dir /tmp/eval > "$OUT/eval.log" 2>&1
  echo "eval rc=$? wall $(( $(date +%s) - s )) s: $(grep -ao 'examples, [0-9.]* s' "$OUT/eval.log")"
  ;;
esac
cp -r "$GLMCHAT_CACHE_DIR/kernel-tuning" "$OUT/" 2>/dev/null || true
stamp done
