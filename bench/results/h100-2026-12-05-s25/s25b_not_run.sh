#!/usr/bin/env bash
# session 25, call 5: what `import backend.engine` spends on the newest transformers; NF4 with and without the words GEMV
set -o pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-newest .whl-newest/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl-newest/bitsandbytes-*.whl .whl-newest/platformdirs-*.whl
for i in 1 2; do PYTHONPATH=.:/tmp/site-newest:/tmp/site python3 -X importtime -c "import backend.engine" 2> "$OUT/importtime_newest$i.txt"; done
PYTHONPATH=.:/tmp/site python3 -X importtime -c "import torch" 2> "$OUT/importtime_torch.txt"
echo "torch alone: $(tail -1 "$OUT/importtime_torch.txt")"
sort -t'|' -k2 -n -r "$OUT/importtime_newest2.txt" | head -60 | cut -c1-110
export PYTHONPATH=.:/tmp/site
python3 bench/bench_load.py make /tmp/glm6b .carry/tokenizer.model > /dev/null
for w in 1 0; do
  GLMCHAT_WORDS_GEMV=$w GLMCHAT_CACHE_DIR=/tmp/gc$w timeout 150 python3 bench/bench_engine.py --model /tmp/glm6b --quantization 4bit --rows 1,2 > "$OUT/engine_nf4_words$w.jsonl" 2> "$OUT/engine_nf4_words$w.err"
  echo "words=$w rc=$?"; grep -a '"chat"\|"compare"\|tuning' "$OUT/engine_nf4_words$w.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-200
done
