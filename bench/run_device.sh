#!/usr/bin/env bash
# The device figures of BENCHMARKS.md, through the entry points users run, one section per device call
# (each fits the 10-minute limit). On the GPU machine (run tool, carry ".whl" and ".carry", both made here by
# bench/prepare_carry.sh: wheels, and the tokenizer and dev set from ../shared/reference):
#
#   bash bench/run_device.sh decode   # fast-batch GPU checks; ChatEngine decode: 8-bit (batched and one-row),
#                                     # NF4, the int4 release, bf16 (bench_engine.py)
#   bash bench/run_device.sh serving  # train_cli.py eval on 1070 examples; glmchat serve under 1/8/64 streams
#   bash bench/run_device.sh cards    # small cards under memory caps: NF4 and the int4 release in 6 GiB, 8-bit in 10
#   bash bench/run_device.sh card-8bit  # the 8-bit row of cards alone
#   bash bench/run_device.sh card-nf4   # the NF4 row of cards alone
#   bash bench/run_device.sh eval-rows  # train_cli.py eval and 64 concurrent replies, 8-bit
#   bash bench/run_device.sh train-variants  # the 32k-context check; the train.sh recipe, 60 steps of each variant
#   bash bench/run_device.sh profile-4bit    # where a 4-bit step's time goes at 1 and 2 rows (NF4, the int4 release)
#   bash bench/run_device.sh recipe   # the whole train.sh recipe (3000 steps, ~7.5 min on an H200)
#   bash bench/run_device.sh linears  # int8 linears at 1-4 rows (both GEMVs, both matmul forms) and the decode
#                                     # rows' matmul grid, in CUDA graphs
#   bash bench/run_device.sh linears-train  # int8 linears at training rows: Triton against cuBLAS on the widened weight
#   bash bench/run_device.sh profile  # where a batched step's time goes at 1/2/8/64 rows (profile_batch_step.py)
#   bash bench/run_device.sh ab-decode  # A/B in one call: the few-rows GEMV, its words tiles, the swapped matmul
#   bash bench/run_device.sh ab-check   # GPU checks (greedy rows against eager); eval twice; --prompt by stages
#   bash bench/run_device.sh ab-serve   # the server at 64 streams with 4 client processes and with 1
#   bash bench/run_device.sh ab-4bit    # 4-bit GEMVs side by side (every tile config, 1 and 2 rows); NF4 and int4
#                                       # chat/compare with the words GEMV, NF4 without it
#   bash bench/run_device.sh ab-table   # NF4 with the register-table words GEMV and without, where its time goes
#   bash bench/run_device.sh ab-table2  # 8-bit with packed fp16 products and without, the int4 release, GPU checks
#   bash bench/run_device.sh ab-packed  # ab-table and ab-table2's 8-bit and NF4 runs in one call, then the GPU checks
#   bash bench/run_device.sh long-prompt  # a cold 1600-token prompt profiled (8-bit, NF4); the 8-bit table; eval
#   bash bench/run_device.sh fused-steps  # int8 decode rows with RMSNorm and the residual in the matmul: checks, the
#                                         # 8-bit table, the two-row step's kernels, eval, the cold long prompt
#   bash bench/run_device.sh nf4-words  # the words GEMV with K compiled in: NF4 linears at 1-2 rows against
#                                       # bitsandbytes', ChatEngine NF4 and int4 at 1-2 rows, the 4-bit GPU checks
#   bash bench/run_device.sh quantized-check  # after a change to a kernel reading packed weights: the 8-bit and
#                                             # 4-bit GPU checks, 8-bit chat and compare (ChatEngine)
#   bash bench/run_device.sh ablate   # one row's captured step with each part left out (attention, each linear kind,
#                                     # the pick) and its attention at 1-16 splits: 8-bit, bf16, NF4 (ABLATE_Q: some)
#   bash bench/run_device.sh ab-tree   # a kernel change A/B: 8-bit and NF4 chat and compare (ChatEngine) from an
#                                      # earlier tree's backend (carried in .carry/before) and this one, alternately
#   bash bench/run_device.sh persistent  # NF4 chat and compare with the persistent one-row GEMV among the tiles and
#                                        # without, alternately; the tiles picked, the step, 4-bit GPU checks
#   bash bench/run_device.sh one-row-persistent  # the persistent GEMV for int8 and 16-bit weights at one and two rows
#                                        # (Q=8bit or Q=none) tuned in and without, alternately; its tiles; GPU checks
#                                        # (PART=all, then PART=rest on the same machine: two calls of <600 s)
#   bash bench/run_device.sh ab-env    # a switch A/B (AB_ENV=NAME=VALUE, e.g. GLMCHAT_SPLIT_LAST_SUMS=0): 8-bit and
#                                      # NF4 chat and compare as the tree runs them and with it, alternately; then
#                                      # the quantized GPU checks
#   bash bench/run_device.sh attention-tiles  # the one-row step's attention at other slot tiles, warps and splits;
#                                             # its launch alone; every GPU check
#   bash bench/run_device.sh prefetch  # one-row tiles (int8, 4-bit) that load their first weight tile before the
#                                      # wait on the kernel ahead: tuned in, the step with and without, 8-bit and
#                                      # NF4 chat; the quantized GPU checks
#   bash bench/run_device.sh step-check  # after a change to one row's step: the GPU checks (bf16, 8-bit, 4-bit), then
#                                       # ablate's parts for each precision
#   bash bench/run_device.sh chat-table  # ChatEngine chat and compare: 8-bit, NF4, the int4 release; bf16 chat
#   bash bench/run_device.sh feed-bf16   # bf16's few rows through gemv_rows and the step ahead fed by its own first
#                                        # launch, each against before in the same call (bf16, 8-bit); GPU checks
#   bash bench/run_device.sh nf4-one-row  # NF4 linears at 1-4 rows: ours against bitsandbytes 0.50's fused kernel,
#                                         # alone and 8 layers back to back; ncu's stall reasons for both at one row
#   bash bench/run_device.sh cold-prompt  # the cold 1600-token prompt alone: GPU idle or busy, other lengths, on the
#                                         # main thread; then without the warm-up's pasted documents, profiled
#   bash bench/run_device.sh ab-4bit-rows  # 4-bit at 16-256 rows: quant_linear against the widened weight
#   bash bench/run_device.sh ab-ahead   # decode-ahead on and off at many rows: evaluation twice each, 64 replies x4
#   bash bench/run_device.sh ab-chat    # the app's engine (two rows): the one-row step's fusions on and off, the
#                                       # older one-row decoder, bf16
#   bash bench/run_device.sh prompt-newest  # `glmchat --prompt` on the newest transformers (a README install) and on
#                                           # the image's 5.17 (carry .whl-newest and .carry, not .whl)
#
# .whl holds the packages the GPU image lacks (bitsandbytes with only its CUDA 13 library, jieba, datasets,
# dill, multiprocess, fastapi, starlette, pydantic, pydantic-core, annotated-types, typing-inspection,
# opentelemetry-api (FastAPI imports it), uvicorn, platformdirs, nltk, rouge-chinese); README of the device
# tool says how to download them.
#
# Full-size random weights in the release layout are made once per machine in /tmp (bench_load.py).
set -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=.:/tmp/site
# kernel tuning results of an earlier call on the same card (its OUT/kernel-tuning, put in .carry/) spare the
# first-run tuning (~1 min); this call's come back in OUT/kernel-tuning
export GLMCHAT_CACHE_DIR=${GLMCHAT_CACHE_DIR:-/tmp/glmcache}
mkdir -p "$GLMCHAT_CACHE_DIR"
[ -d .carry/kernel-tuning ] && cp -r .carry/kernel-tuning "$GLMCHAT_CACHE_DIR/"
TOKENIZER=${TOKENIZER:-.carry/tokenizer.model}
DEV=${DEV:-.carry/dev.json}
START=$(date +%s)
stamp() { echo "[$(( $(date +%s) - START )) s] $*"; }
[ -d /tmp/glm6b ] || python3 bench/bench_load.py make /tmp/glm6b "$TOKENIZER" > /dev/null
case "$1" in models|attention-tiles|persistent|one-row-persistent|ab-env|ab-tree|prefetch|feed-bf16|quantized-check|ablate|step-check|nf4-one-row|ab-4bit-rows|long-prompt|fused-steps|card-8bit|card-nf4|eval-rows|cold-prompt|ab-packed|ab-table|serving|profile|recipe|linears|linears-train|ab-decode|ab-check|ab-serve|ab-chat|ab-ahead|train-variants|prompt-newest) ;; *) [ -d /tmp/glm6b-int4 ] || python3 bench/bench_load.py make-int4 /tmp/glm6b-int4 /tmp/glm6b > /dev/null ;; esac
stamp "models ready"

engine() {  # NAME ARGS...: one bench_engine.py run, its JSON lines in OUT/engine_NAME.jsonl
  local name=$1; shift
  timeout "${ENGINE_TIMEOUT:-200}" python3 bench/bench_engine.py "$@" > "$OUT/engine_$name.jsonl" 2> "$OUT/engine_$name.err"
  stamp "engine $name: $(wc -l < "$OUT/engine_$name.jsonl") lines"
}

carried_tuning() {  # an earlier call's tuning (.carry/kernel-tuning) as /tmp/glmcache-old, the "off" runs' cache;
  # true when it holds this card's file (those runs then tune nothing)
  mkdir -p /tmp/glmcache-old; [ -d .carry/kernel-tuning ] && cp -r .carry/kernel-tuning /tmp/glmcache-old/
  [ -f "/tmp/glmcache-old/kernel-tuning/$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-').json" ]
}

small_card() {  # NAME ARGS...: bench_small_cards.py under a cap
  local name=$1; shift
  timeout 240 python3 bench/bench_small_cards.py "$@" 2> "$OUT/small_$name.err" | tee -a "$OUT/small_cards.jsonl"
  stamp "small card $name"
}

case "$1" in
decode)
  python3 bench/check_fast_batch.py > "$OUT/check_fast_batch.log" 2>&1; tail -n 1 "$OUT/check_fast_batch.log"
  engine 8bit --model /tmp/glm6b --quantization 8bit --rows 1,2,8,64
  engine serial8 --model /tmp/glm6b --quantization 8bit --engine serial --rows 1
  engine nf4 --model /tmp/glm6b --quantization 4bit --rows 1,2,64
  engine int4 --model /tmp/glm6b-int4 --rows 1,2,64
  engine bf16 --model /tmp/glm6b --quantization none --rows 1,2,64
  ;;
serving)
  # evaluation as users run it: 1070 AdvertiseGen dev examples, 128 new tokens each (random weights never stop early)
  s=$(date +%s)
  timeout 300 python3 train_cli.py eval --model /tmp/glm6b --quantization 8bit --validation-file "$DEV" \
      --prompt-column content --response-column summary --max-target-length 128 --output-dir /tmp/eval \
      > "$OUT/eval.log" 2>&1
  echo "{\"what\": \"eval\", \"rc\": $?, \"seconds\": $(( $(date +%s) - s )), \"examples\": $(wc -l < "$DEV")}" | tee "$OUT/eval.json"
  tail -n 3 "$OUT/eval.log"
  timeout 240 python3 bench/bench_serve.py --model /tmp/glm6b --quantization 8bit --concurrency 1,8,64 \
      --out "$OUT/serve.json" > "$OUT/serve.log" 2>&1
  stamp "serve"; tail -n 6 "$OUT/serve.log"
  ;;
cards)
  # ~2 min a row on a cold tuning cache (the NF4 row's background warm-up alone took 61 s in run 17)
  small_card nf4-6gib --model /tmp/glm6b --quantization 4bit --cap-gib 6
  small_card int4-6gib-fp16 --model /tmp/glm6b-int4 --cap-gib 6
  small_card 8bit-10gib --model /tmp/glm6b --quantization 8bit --cap-gib 10
  ;;
nf4-words)
  # the words GEMV with K a compile-time constant (rows at immediate offsets): each NF4 linear at 1 and 2 rows
  # against bitsandbytes' kernel in the same run and 8 layers chained, then what users get (ChatEngine: NF4 and the
  # int4 release, chat and compare), then the 4-bit GPU checks (greedy rows against eager)
  timeout 200 python3 bench/ab_nf4_one_row.py --rows 1,2 > "$OUT/ab_nf4_one_row.jsonl" 2> "$OUT/ab_nf4_one_row.err"
  stamp "a/b"; cut -c1-330 "$OUT/ab_nf4_one_row.jsonl"; tail -n 3 "$OUT/ab_nf4_one_row.err"
  engine nf4 --model /tmp/glm6b --quantization 4bit --rows 1,2
  engine int4 --model /tmp/glm6b-int4 --rows 1,2
  for f in nf4 int4; do echo "$f:"; grep -a '"chat"\|"compare"\|tuning' "$OUT/engine_$f.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-220; done
  timeout 120 python3 bench/check_fast_batch.py --quantized 4bit > "$OUT/check_fast_batch.log" 2>&1
  stamp "check_fast_batch --quantized 4bit"; grep -a "^ok\|FAIL\|Error" "$OUT/check_fast_batch.log" | cut -c1-150
  ;;
quantized-check)
  # the quantized GPU checks (greedy rows against eager, 8-bit and 4-bit), then 8-bit chat and compare as users run
  # them (the two-row step reads int8 through the words GEMV too)
  # (CHECK=8bit or 4bit: only that precision's checks)
  timeout 200 python3 bench/check_fast_batch.py --quantized ${CHECK:-} > "$OUT/check_fast_batch.log" 2>&1
  stamp "check_fast_batch --quantized ${CHECK:-}"; grep -a "^ok\|FAIL\|Error" "$OUT/check_fast_batch.log" | cut -c1-150
  engine int8 --model /tmp/glm6b --quantization 8bit --rows 1,2
  grep -a '"chat"\|"compare"\|tuning' "$OUT/engine_int8.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-220
  if [ -n "${AB_X_PASS:-}" ]; then  # the same with the fused norm's x pass a K tile at a time (kernels.WIDE_X_PASS)
    GLMCHAT_WIDE_X_PASS=0 engine int8-narrow --model /tmp/glm6b --quantization 8bit --rows 1,2
    grep -a '"chat"\|"compare"' "$OUT/engine_int8-narrow.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-220
  fi
  ;;
ablate)
  # where one row's step goes, part by part (bench/ablate_one_row_step.py), for each precision the app decodes
  for q in ${ABLATE_Q:-8bit none 4bit}; do
    timeout 200 python3 bench/ablate_one_row_step.py --model /tmp/glm6b --quantization $q \
        > "$OUT/ablate_$q.jsonl" 2> "$OUT/ablate_$q.err"
    stamp "ablate $q rc $?"; sed 's/.*"quantization"/"q"/' "$OUT/ablate_$q.jsonl" | cut -c1-260; tail -n 2 "$OUT/ablate_$q.err"
  done
  ;;
ab-tree)
  # a kernel change through ChatEngine: 8-bit and NF4 chat and compare from an earlier tree's backend
  # (.carry/before/backend: `git archive REV backend | tar -x -C .carry/before`) and from this one, alternately,
  # ROUNDS times (2; AB_Q: some of 8bit 4bit), on one tuning (carry this card's in .carry/kernel-tuning with the
  # same candidates, so neither tunes)
  [ -d .carry/before/backend ] || { echo "carry .carry/before/backend (the earlier tree's)"; exit 2; }
  OUT=$(cd "$OUT" && pwd); rm -rf /tmp/before && mkdir -p /tmp/before && cp -r bench .carry/before/backend /tmp/before/
  for round in $(seq "${ROUNDS:-2}"); do
    for q in ${AB_Q:-8bit 4bit}; do
      (cd /tmp/before && PYTHONPATH=/tmp/before:/tmp/site engine "before_${q}_$round" --model /tmp/glm6b \
          --quantization $q --rows 1,2 --repeat 1)
      engine "after_${q}_$round" --model /tmp/glm6b --quantization $q --rows 1,2 --repeat 1
    done
  done
  for f in "$OUT"/engine_before_*.jsonl "$OUT"/engine_after_*.jsonl; do
    grep -a '"chat", "greedy": true\|"compare"' "$f" | sed "s|.*\"what\"|$(basename "$f" .jsonl) \"what\"|" | cut -c1-170
  done
  ;;
models)
  # the wheels and the full-size bf16 model only (a call's later commands use them)
  ;;
persistent)
  # the persistent 4-bit one-row GEMV (kernels/quant_persistent.py) among the one-row step's tiles: NF4 chat and
  # compare with it ("on": tuned in, in this call's cache) and without (GLMCHAT_PERSISTENT_GEMV=0, the carried tuning
  # in a cache of its own), alternately ROUNDS times; the 4-bit tiles each arm picked; ablate's step and parts with
  # it; the 4-bit GPU checks
  # (PART=ab: the engines and the tiles; PART=step: ablate and the checks, on the tuning PART=ab left). First every
  # persistent tile against bitsandbytes' weight: a faulting kernel would take a tuning process's CUDA context
  timeout 120 python3 bench/check_persistent.py > "$OUT/check_persistent.log" 2>&1
  stamp "check_persistent rc $?"; tail -n 1 "$OUT/check_persistent.log"; grep -q "^ok" "$OUT/check_persistent.log" || exit 1
  [ "${PART:-ab}" = step ] || rm -rf /tmp/glmcache-off && cp -r "$GLMCHAT_CACHE_DIR" /tmp/glmcache-off
  [ "${PART:-ab}" = step ] || for round in $(seq "${ROUNDS:-2}"); do
    engine "on_$round" --model /tmp/glm6b --quantization 4bit --rows 1,2 --repeat 1
    (export GLMCHAT_PERSISTENT_GEMV=0 GLMCHAT_CACHE_DIR=/tmp/glmcache-off
     engine "off_$round" --model /tmp/glm6b --quantization 4bit --rows 1,2 --repeat 1)
  done
  for f in "$OUT"/engine_on_*.jsonl "$OUT"/engine_off_*.jsonl; do
    grep -a '"chat", "greedy": true\|"compare"' "$f" | sed "s|.*\"what\"|$(basename "$f" .jsonl) \"what\"|" | cut -c1-170
  done
  for d in "$GLMCHAT_CACHE_DIR" /tmp/glmcache-off; do
    python3 -c "import json,glob,sys; [print(sys.argv[1], k, {a: tuple(c.get(f) for f in ('kernel', 'block_n', 'block_p', 'block_k', 'num_warps', 'programs_per_sm', 'prefetch', 'l2_ahead')) for a, c in v.items() if a != '_among'}) for f in glob.glob(sys.argv[1] + '/kernel-tuning/*.json') for k, v in json.load(open(f))['configs'].items() if k.startswith('one_row_step:nf4')]" "$d"
  done
  [ "${PART:-ab}" = ab ] && exit 0
  timeout 240 python3 bench/ablate_one_row_step.py --model /tmp/glm6b --quantization 4bit --splits 16 \
      > "$OUT/ablate_4bit.jsonl" 2> "$OUT/ablate_4bit.err"
  stamp "ablate 4bit rc $?"; grep -a '"step"\|variant\|tiles\|left_out' "$OUT/ablate_4bit.jsonl" | cut -c1-420
  timeout 200 python3 bench/check_fast_batch.py --quantized 4bit > "$OUT/check_4bit.log" 2>&1
  stamp "check_fast_batch --quantized 4bit rc $?"; grep -a "^ok\|FAIL\|Error\|passed" "$OUT/check_4bit.log" | cut -c1-150
  ;;
one-row-persistent)
  # the persistent GEMV (kernels/persistent_gemv.py: int8 against fp16 rows, 16-bit weights) among the one-row
  # descent's tiles and gemv_rows' two-row ones (compare's) (GLMCHAT_PERSISTENT_GEMV=all, its own cache: tuned in
  # this call) and without (the
  # default candidates, the carried tuning in a cache of its own), alternately ROUNDS times, for Q (8bit or none);
  # the tiles each arm picked and what each candidate's step took (the engines' stderr); then the GPU checks of
  # that precision with it. First every persistent tile against the reference (check_persistent.py).
  # PART=all: the checks and the "all" arm only (it tunes: the longest part); PART=rest: the default arm and the GPU
  # checks, on the same machine (the "all" arm's cache in /tmp/glmcache-all); unset: both in one call
  [ "${PART:-}" = rest ] || {
    timeout 150 python3 bench/check_persistent.py > "$OUT/check_persistent.log" 2>&1
    stamp "check_persistent rc $?"; tail -n 1 "$OUT/check_persistent.log"; grep -q "^ok" "$OUT/check_persistent.log" || exit 1
  }
  Q=${Q:-8bit}
  [ "${PART:-}" = rest ] || { rm -rf /tmp/glmcache-all && cp -r "$GLMCHAT_CACHE_DIR" /tmp/glmcache-all; }
  for round in $(seq "${ROUNDS:-1}"); do
    [ "${PART:-}" = rest ] || (export GLMCHAT_PERSISTENT_GEMV=all GLMCHAT_CACHE_DIR=/tmp/glmcache-all
     engine "all_$round" --model /tmp/glm6b --quantization "$Q" --rows 1,2 --repeat 1)
    [ "${PART:-}" = all ] || engine "default_$round" --model /tmp/glm6b --quantization "$Q" --rows 1,2 --repeat 1
  done
  for f in "$OUT"/engine_all_*.jsonl "$OUT"/engine_default_*.jsonl; do
    grep -a '"chat", "greedy": true\|"compare"\|first_run' "$f" | sed "s|.*\"what\"|$(basename "$f" .jsonl) \"what\"|" | cut -c1-900
  done
  grep -a "programs_per_sm=[1-9]" "$OUT"/engine_all_1.err 2>/dev/null | cut -c1-240 | head -60
  mkdir -p "$OUT/kernel-tuning-all" && cp /tmp/glmcache-all/kernel-tuning/*.json "$OUT/kernel-tuning-all/" 2>/dev/null || true
  [ "${PART:-}" = all ] && exit 0
  [ "$Q" = none ] && check_q= || check_q="--quantized $Q"
  GLMCHAT_PERSISTENT_GEMV=all GLMCHAT_CACHE_DIR=/tmp/glmcache-all timeout 200 python3 bench/check_fast_batch.py $check_q \
      > "$OUT/check.log" 2>&1
  stamp "check_fast_batch $check_q rc $?"; grep -a "^ok\|FAIL\|Error\|passed" "$OUT/check.log" | cut -c1-150
  ;;
ab-env)
  # a switch through ChatEngine: 8-bit and NF4 chat and compare as the tree runs them ("default") and with AB_ENV
  # (an assignment, e.g. GLMCHAT_SPLIT_LAST_SUMS=0: "switched"), alternately, ROUNDS times (AB_Q: some of 8bit
  # 4bit; AB_ROWS: 1,2), one tuning; then the quantized GPU checks of AB_Q as the tree runs them
  [ -n "${AB_ENV:-}" ] || { echo "set AB_ENV, e.g. AB_ENV=GLMCHAT_SPLIT_LAST_SUMS=0"; exit 2; }
  for round in $(seq "${ROUNDS:-2}"); do
    for q in ${AB_Q:-8bit 4bit}; do
      engine "default_${q}_$round" --model /tmp/glm6b --quantization $q --rows "${AB_ROWS:-1,2}" --repeat 1
      (export "$AB_ENV"
       engine "switched_${q}_$round" --model /tmp/glm6b --quantization $q --rows "${AB_ROWS:-1,2}" --repeat 1)
    done
  done
  for f in "$OUT"/engine_default_*.jsonl "$OUT"/engine_switched_*.jsonl; do
    grep -a '"chat", "greedy": true\|"compare"\|"batch"' "$f" | sed "s|.*\"what\"|$(basename "$f" .jsonl) \"what\"|" | cut -c1-170
  done
  for q in ${AB_Q:-8bit 4bit}; do
    timeout 200 python3 bench/check_fast_batch.py --quantized $q > "$OUT/check_$q.log" 2>&1
    stamp "check_fast_batch --quantized $q rc $?"; grep -a "^ok\|FAIL\|Error\|passed" "$OUT/check_$q.log" | cut -c1-150
  done
  ;;
prefetch)
  # one-row tiles that ask for their first weight tile before waiting on the kernel ahead (int8 CVT 3 and the 4-bit
  # words kernel with prefetch: new tuner candidates, so 8-bit and NF4 tune again): the tiles picked, the step with
  # and without (ablate's variant lines) and each part's cost; ChatEngine's chat and compare; the quantized GPU checks
  # (PART=ablate or PART=engine: one half, for two calls on one machine)
  [ "${PART:-ablate}" = ablate ] && for q in ${ABLATE_Q:-8bit 4bit}; do
    timeout 240 python3 bench/ablate_one_row_step.py --model /tmp/glm6b --quantization $q --splits 16 \
        > "$OUT/ablate_$q.jsonl" 2> "$OUT/ablate_$q.err"
    stamp "ablate $q rc $?"; grep -a '"step"\|variant\|tiles\|left_out' "$OUT/ablate_$q.jsonl" | sed 's/.*"quantization"/"q"/' | cut -c1-420
    tail -n 2 "$OUT/ablate_$q.err"
  done
  [ "${PART:-engine}" = engine ] || exit 0
  engine int8 --model /tmp/glm6b --quantization 8bit --rows 1,2 --repeat 1
  grep -a '"chat"\|"compare"' "$OUT/engine_int8.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-200
  engine nf4 --model /tmp/glm6b --quantization 4bit --rows 1,2 --repeat 1
  grep -a '"chat"\|"compare"' "$OUT/engine_nf4.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-200
  timeout 200 python3 bench/check_fast_batch.py --quantized > "$OUT/check_fast_batch.log" 2>&1
  stamp "check_fast_batch rc $?"; grep -a "^ok\|FAIL\|Error\|passed" "$OUT/check_fast_batch.log" | cut -c1-150
  ;;
step-check)
  timeout 280 python3 bench/check_fast_batch.py > "$OUT/check_fast_batch.log" 2>&1  # every check, quantized included
  stamp "check_fast_batch rc $?"; grep -a "^ok\|FAIL\|Error\|passed" "$OUT/check_fast_batch.log" | cut -c1-150
  for q in 8bit none 4bit; do
    timeout 120 python3 bench/ablate_one_row_step.py --model /tmp/glm6b --quantization $q --splits 16 \
        > "$OUT/ablate_$q.jsonl" 2> "$OUT/ablate_$q.err"
    stamp "ablate $q rc $?"; grep -a '"step"\|attention\|rotary\|pick' "$OUT/ablate_$q.jsonl" | sed 's/.*"quantization"/"q"/' | cut -c1-200
    tail -n 2 "$OUT/ablate_$q.err"
  done
  ;;
chat-table)
  for spec in "int8 --quantization 8bit --rows 1,2" "nf4 --quantization 4bit --rows 1,2" "int4 --model /tmp/glm6b-int4 --rows 1,2" \
              "bf16 --quantization none --rows 1 --repeat 1"; do
    set -- $spec; name=$1; shift
    case " $* " in *" --model "*) engine "$name" "$@" ;; *) engine "$name" --model /tmp/glm6b "$@" ;; esac
    grep -a '"chat"\|"compare"\|ttft_1600_cold\|adapter_switch' "$OUT/engine_$name.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-230
  done
  ;;
feed-bf16)
  # ChatEngine chat and compare with this tree's defaults, then as before (GLMCHAT_FEED_IN_STEP=0: the step ahead
  # fed by torch launches between the replays; for bf16 also GLMCHAT_ROWS_GEMV=0: two rows through cuBLAS with
  # RMSNorm, SwiGLU and the residual as launches of their own); then every GPU check (fp32, bf16, 8-bit, NF4)
  show() { grep -a '"chat"\|"compare"' "$OUT/engine_$1.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-230; }
  engine bf16 --model /tmp/glm6b --quantization none --rows 1,2 --repeat 1; show bf16
  (export GLMCHAT_FEED_IN_STEP=0 GLMCHAT_ROWS_GEMV=0
   engine bf16-before --model /tmp/glm6b --quantization none --rows 1,2 --repeat 1); show bf16-before
  engine int8 --model /tmp/glm6b --quantization 8bit --rows 1,2 --repeat 1; show int8
  (export GLMCHAT_FEED_IN_STEP=0; engine int8-before --model /tmp/glm6b --quantization 8bit --rows 1,2 --repeat 1)
  show int8-before
  timeout 240 python3 bench/check_fast_batch.py > "$OUT/check_fast_batch.log" 2>&1
  stamp "check_fast_batch rc $?"; grep -a "^ok\|FAIL\|Error\|passed" "$OUT/check_fast_batch.log" | cut -c1-150
  ;;
nf4-one-row)
  # is bitsandbytes' own fused 4-bit kernel (0.50: SIMT below 8 rows, nested absmax inside) faster than ours at
  # one row? Then where each spends its time (ncu: warp stall reasons, memory throughput, occupancy)
  timeout 240 python3 bench/ab_nf4_one_row.py > "$OUT/ab_nf4_one_row.jsonl" 2> "$OUT/ab_nf4_one_row.err"
  stamp "a/b"; cut -c1-330 "$OUT/ab_nf4_one_row.jsonl"; tail -n 3 "$OUT/ab_nf4_one_row.err"
  timeout 240 ncu --clock-control none --profile-from-start off --set full --import-source no \
      --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio" \
      python3 bench/ab_nf4_one_row.py --profile > "$OUT/ncu_nf4.txt" 2>&1
  stamp "ncu rc $?"; grep -a -E "^  [_a-zA-Z].*\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Issue Slots Busy|No Eligible|L1/TEX Hit|stall|Stall" "$OUT/ncu_nf4.txt" | cut -c1-160 | head -150
  ;;
eval-rows)
  # evaluation (requests queued together) and 64 concurrent replies, 8-bit
  s=$(date +%s)
  timeout 90 python3 train_cli.py eval --model /tmp/glm6b --quantization 8bit --validation-file "$DEV" \
      --prompt-column content --response-column summary --max-target-length 128 --output-dir /tmp/eval \
      > /tmp/eval.log 2>&1
  echo "{\"what\": \"eval\", \"rc\": $?, \"seconds\": $(( $(date +%s) - s )), \"inside\": \"$(grep -a -o '[0-9]* examples, [0-9.]* s' /tmp/eval.log)\"}" | tee "$OUT/eval.json"
  ENGINE_TIMEOUT=100 engine 8bit64 --model /tmp/glm6b --quantization 8bit --rows 64
  grep -a '"batch"' "$OUT/engine_8bit64.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-260
  ;;
card-nf4)
  # the NF4 row of `cards` alone (a change to the 4-bit step: load, fast chat, 20 training steps, chat under 6 GiB)
  small_card nf4-6gib --model /tmp/glm6b --quantization 4bit --cap-gib 6
  ;;
card-8bit)
  # the 8-bit row of `cards` alone (a change to the int8 kernels: load, fast chat, 20 training steps, chat under 10 GiB)
  small_card 8bit-10gib --model /tmp/glm6b --quantization 8bit --cap-gib 10
  ;;
train-variants)
  python3 bench/check_fast_batch.py --long 2>&1 | grep -v Warn | tail -n 2 | tee "$OUT/check_long.log"
  timeout 300 python3 bench/bench_train.py /tmp/glm6b 8bit --recipe-only --max-steps 60 > "$OUT/train.jsonl" 2> "$OUT/train.err"
  stamp "train"; tail -n 4 "$OUT/train.jsonl"
  ;;
profile-4bit)
  # where a 4-bit step's ~10 ms goes at one and two rows (NF4, then the int4 release), before any gemv_4bit change
  timeout 200 python3 bench/profile_batch_step.py --model /tmp/glm6b --quantization 4bit --rows 1,2 \
      > "$OUT/profile_nf4.jsonl" 2> "$OUT/profile_nf4.err"
  stamp "profile nf4"; cut -c1-300 "$OUT/profile_nf4.jsonl"
  timeout 200 python3 bench/profile_batch_step.py --model /tmp/glm6b-int4 --rows 1,2 \
      > "$OUT/profile_int4.jsonl" 2> "$OUT/profile_int4.err"
  stamp "profile int4"; cut -c1-300 "$OUT/profile_int4.jsonl"
  ;;
recipe)
  timeout 560 python3 bench/bench_train.py /tmp/glm6b 8bit --recipe-only --max-steps 3000 --variants default \
      > "$OUT/recipe_full.jsonl" 2> "$OUT/recipe_full.err"
  stamp "recipe"; cut -c1-900 "$OUT/recipe_full.jsonl"
  ;;
linears)
  timeout 120 python3 bench/bench_linears.py --few-rows > "$OUT/few_rows.jsonl" 2> "$OUT/few_rows.err"
  stamp "few rows"; cut -c1-400 "$OUT/few_rows.jsonl"; tail -n 3 "$OUT/few_rows.err"
  timeout 150 python3 bench/bench_linears.py --swapped > "$OUT/swapped.jsonl" 2> "$OUT/swapped.err"
  stamp "swapped matmul"; cut -c1-400 "$OUT/swapped.jsonl"; tail -n 3 "$OUT/swapped.err"
  timeout 200 python3 bench/bench_linears.py --decode-graphs > "$OUT/decode_graphs.jsonl" 2> "$OUT/decode_graphs.err"
  stamp "decode rows in graphs"; cut -c1-400 "$OUT/decode_graphs.jsonl"; tail -n 3 "$OUT/decode_graphs.err"
  ;;
linears-train)
  timeout 300 python3 bench/bench_linears.py > "$OUT/linears.jsonl" 2> "$OUT/linears.err"
  stamp "linears"; tail -n 3 "$OUT/linears.err"
  ;;
ab-decode)
  # within one call (figures from different machines differ by more than these changes, and a machine idle for
  # 30 s is given back): the few-rows GEMV (and the words kernel among its tiles) and the swapped int8 matmul each
  # on and off (decode-ahead: ab-ahead). The first run tunes this card's kernels (cached in GLMCHAT_CACHE_DIR for
  # the runs after it: ~2 min more the first time); words0 tunes into a cache of its own
  engine all1 --model /tmp/glm6b --quantization 8bit --rows 1,2,64
  GLMCHAT_ROWS_GEMV=0 engine rows0 --model /tmp/glm6b --quantization 8bit --rows 2
  GLMCHAT_WORDS_GEMV=0 GLMCHAT_CACHE_DIR=/tmp/glmcache-nowords engine words0 --model /tmp/glm6b --quantization 8bit --rows 2
  GLMCHAT_MATMUL_SWAP=0 engine swap0 --model /tmp/glm6b --quantization 8bit --rows 64
  for f in all1 rows0 words0 swap0; do echo "$f:"; grep -a '"chat"\|"compare"\|"batch"\|tuning' "$OUT/engine_$f.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-200; done
  ;;
ab-4bit)
  # the words GEMV (backend/kernels/quant_words.py) against the earlier 4-bit GEMV: every tile config of each
  # linear timed side by side at one and two rows, then ChatEngine (chat and compare) with the tuner free to
  # pick it, NF4 and the int4 release; NF4 again without it (GLMCHAT_WORDS_GEMV=0, tuned into its own cache)
  timeout 240 python3 bench/check_kernels_batch.py --formats nf4 int4 --m 1 2 --no-attention --candidates \
      > "$OUT/kernels_4bit.log" 2>&1
  stamp "kernels"; grep -a "^cand\|FAIL\|failed;\|PASSED" "$OUT/kernels_4bit.log" | cut -c1-150 | head -200
  engine nf4 --model /tmp/glm6b --quantization 4bit --rows 1,2
  engine int4 --model /tmp/glm6b-int4 --rows 1,2
  GLMCHAT_WORDS_GEMV=0 GLMCHAT_CACHE_DIR=/tmp/glmcache-old engine nf4old --model /tmp/glm6b --quantization 4bit --rows 1,2
  for f in nf4 int4 nf4old; do echo "$f:"; grep -a '"chat"\|"compare"\|tuning' "$OUT/engine_$f.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-200; done
  ;;
ab-table|ab-table2)
  # packed_products's register-table words GEMV (lut 3: the 4-bit code in registers, products two at a time).
  # ab-table: NF4 chat/compare with it, then without it (GLMCHAT_PACKED_PRODUCTS=0, its own cache: carry an
  # earlier call's tuning of the same card in .carry/kernel-tuning and only the changed keys tune), where the
  # step's time goes. ab-table2: 8-bit chat and compare with the packed fp16 int8 products and without, the int4
  # release with the table, the GPU checks
  if [ "$1" = ab-table ]; then
    carried_tuning; old=$?
    ENGINE_TIMEOUT=270 engine nf4 --model /tmp/glm6b --quantization 4bit --rows 1,2
    # without the packed products: only where an earlier call's tuning of this card spares the first-run tuning
    [ "$old" = 0 ] && GLMCHAT_PACKED_PRODUCTS=0 GLMCHAT_CACHE_DIR=/tmp/glmcache-old engine nf4old --model /tmp/glm6b --quantization 4bit --rows 1,2
    for f in nf4 nf4old; do echo "$f:"; grep -a '"chat"\|"compare"\|tuning' "$OUT/engine_$f.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-200; done
    grep -a -i "different result\|failed" "$OUT/engine_nf4.err" | head -3 | cut -c1-400
    timeout 90 python3 bench/profile_batch_step.py --model /tmp/glm6b --quantization 4bit --rows 1 > "$OUT/profile_nf4.jsonl" 2> "$OUT/profile_nf4.err"
    stamp "profile"; grep -a '"decoder"\|"kernels"' "$OUT/profile_nf4.jsonl" | cut -c150-600
  else
    carried_tuning
    engine int8 --model /tmp/glm6b --quantization 8bit --rows 1,2,64
    GLMCHAT_PACKED_PRODUCTS=0 GLMCHAT_CACHE_DIR=/tmp/glmcache-old engine int8old --model /tmp/glm6b --quantization 8bit --rows 1,2,64
    engine int4 --model /tmp/glm6b-int4 --rows 1,2
    for f in int8 int8old int4; do echo "$f:"; grep -a '"chat"\|"compare"\|"batch"\|tuning' "$OUT/engine_$f.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-200; done
    grep -a -i "different result\|failed" "$OUT"/engine_int*.err | head -3 | cut -c1-400
    timeout 150 python3 bench/check_fast_batch.py > "$OUT/check_fast_batch.log" 2>&1
    stamp "check_fast_batch"; grep -a "^ok\|FAIL\|Error" "$OUT/check_fast_batch.log" | cut -c1-160
  fi
  ;;
ab-packed)
  # ab-table and ab-table2 in one call, for a session with one call's device time: the packed products on, for
  # 8-bit (one row, compare, 64 rows) and NF4 (one row, compare), and off where an earlier call's tuning of this
  # card was carried (.carry/kernel-tuning: the off runs then tune nothing); the GPU checks' quantized lines first
  carried_tuning; old=$?
  timeout 150 python3 bench/check_fast_batch.py --quantized > "$OUT/check_fast_batch.log" 2>&1
  stamp "check_fast_batch --quantized"; grep -a "^ok\|FAIL\|Error" "$OUT/check_fast_batch.log" | cut -c1-150
  engine int8 --model /tmp/glm6b --quantization 8bit --rows 1,2,64
  [ "$old" = 0 ] && GLMCHAT_PACKED_PRODUCTS=0 GLMCHAT_CACHE_DIR=/tmp/glmcache-old engine int8old --model /tmp/glm6b --quantization 8bit --rows 1,2,64
  ENGINE_TIMEOUT=240 engine nf4 --model /tmp/glm6b --quantization 4bit --rows 1,2
  [ "$old" = 0 ] && GLMCHAT_PACKED_PRODUCTS=0 GLMCHAT_CACHE_DIR=/tmp/glmcache-old engine nf4old --model /tmp/glm6b --quantization 4bit --rows 1,2
  for f in int8 int8old nf4 nf4old; do [ -f "$OUT/engine_$f.jsonl" ] || continue; echo "$f:"
    grep -a '"chat"\|"compare"\|"batch"\|tuning' "$OUT/engine_$f.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-170; done
  grep -a -i "different result\|failed\|Error" "$OUT"/engine_*.err | head -4 | cut -c1-300
  ;;
ab-4bit-rows)
  # 4-bit at 16-256 rows (batch_linear.WIDEN_4BIT_MIN_M): the GPU checks' NF4 lines (200 rows go through the widened
  # weight), quant_linear against the widened weight linear by linear (ab_4bit_rows.py), NF4 chat and 64 rows as the
  # tuner picks
  timeout 100 python3 bench/check_fast_batch.py --quantized 4bit > "$OUT/check_fast_batch.log" 2>&1
  stamp "check_fast_batch --quantized 4bit"; grep -a "^ok\|FAIL\|Error" "$OUT/check_fast_batch.log" | cut -c1-150
  timeout 100 python3 bench/ab_4bit_rows.py --rows 16,64,256 > "$OUT/ab_4bit_rows.jsonl" 2> "$OUT/ab_4bit_rows.err"
  stamp "ab_4bit_rows"; sed 's/.*"linear"/"linear"/' "$OUT/ab_4bit_rows.jsonl"; tail -n 3 "$OUT/ab_4bit_rows.err"
  ENGINE_TIMEOUT=120 engine nf4 --model /tmp/glm6b --quantization 4bit --rows 64
  grep -a '"chat"\|"compare"\|"batch"\|ttft_1600\|tuning' "$OUT/engine_nf4.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-170
  ;;
ab-ahead)
  # decode-ahead at many rows (run 17: -7% at 64 rows in one run; evaluation 19.4 s against 14.3-15.9 before it):
  # evaluation and 64 `ChatEngine` replies with the step ahead on and off, alternating, in one call
  export PYTHONPYCACHEPREFIX=/tmp/pyc
  for run in 1 2; do
    for ahead in 1 0; do
      s=$(date +%s)
      GLMCHAT_DECODE_AHEAD=$ahead timeout 120 python3 train_cli.py eval --model /tmp/glm6b --quantization 8bit \
          --validation-file "$DEV" --prompt-column content --response-column summary --max-target-length 128 \
          --output-dir /tmp/eval > "$OUT/eval_ahead${ahead}_$run.log" 2>&1
      echo "{\"what\": \"eval\", \"ahead\": $ahead, \"run\": $run, \"rc\": $?, \"wall_s\": $(( $(date +%s) - s )), \"printed\": \"$(grep -ao 'examples, [0-9.]* s' "$OUT/eval_ahead${ahead}_$run.log")\"}" | tee -a "$OUT/eval_ahead.jsonl"
    done
  done
  GLMCHAT_DECODE_AHEAD=1 engine rows64_ahead1 --model /tmp/glm6b --quantization 8bit --rows 64 --repeat 4
  GLMCHAT_DECODE_AHEAD=0 engine rows64_ahead0 --model /tmp/glm6b --quantization 8bit --rows 64 --repeat 4
  for f in rows64_ahead1 rows64_ahead0; do echo "$f:"; grep -a '"batch"' "$OUT/engine_$f.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-120; done
  ;;
ab-chat)
  # the app's and --prompt's engine holds two rows (a chat's reply; a compare's columns in one batch): --rows 1,2
  # gives bench_engine that engine. One call: the one-row step's fusions (decode/one_row_step.py) on and off, the
  # older one-row decoder (engine serial, what the app ran before), and bf16 (its >= 90% target)
  engine fused1 --model /tmp/glm6b --quantization 8bit --rows 1,2
  GLMCHAT_ONE_ROW_FUSED=0 engine fused0 --model /tmp/glm6b --quantization 8bit --rows 1,2
  engine serial --model /tmp/glm6b --quantization 8bit --rows 1 --engine serial
  engine bf16 --model /tmp/glm6b --quantization none --rows 1,2
  for f in fused1 fused0 serial bf16; do echo "$f:"; grep -a '"chat"\|"compare"\|"adapter_switch"\|"ttft_1600"' "$OUT/engine_$f.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-220; done
  ;;
ab-check)
  # the GPU checks (greedy rows against eager, through decode-ahead, the few-rows GEMV and the swapped matmul, in
  # graphs); evaluation twice (cold, then warm Triton cache); `glmchat --prompt` stage by stage (the image's
  # packages lack .pyc: they are kept under /tmp, as an install would keep them)
  timeout 240 python3 bench/check_fast_batch.py > "$OUT/check_fast_batch.log" 2>&1; grep -a "^ok\|FAIL\|Error" "$OUT/check_fast_batch.log" | cut -c1-160
  stamp "check_fast_batch"
  export PYTHONPYCACHEPREFIX=/tmp/pyc
  for run in 1 2; do
    s=$(date +%s)
    timeout 120 python3 train_cli.py eval --model /tmp/glm6b --quantization 8bit --validation-file "$DEV" \
        --prompt-column content --response-column summary --max-target-length 128 --output-dir /tmp/eval \
        > "$OUT/eval$run.log" 2>&1
    echo "{\"what\": \"eval\", \"run\": $run, \"rc\": $?, \"seconds\": $(( $(date +%s) - s ))}" | tee -a "$OUT/eval.jsonl"
  done
  P=(--model /tmp/glm6b --quantization 8bit --prompt "类型#裙*颜色#红色*风格#复古" --max-new-tokens 128)
  for run in 1 2; do
    T0=$(date +%s.%N) timeout 120 python3 bench/probe_prompt.py "${P[@]}" 2>&1 >/dev/null | grep -a "^mark" | tee "$OUT/prompt$run.txt"
  done
  ;;
ab-serve)
  # the server's 64 streams with the client in 4 processes and in 1 (is the TTFT tail the client's?)
  for clients in 4 1; do
    timeout 150 python3 bench/bench_serve.py --model /tmp/glm6b --quantization 8bit --concurrency 1,64 --clients $clients \
        --out "$OUT/serve_c$clients.json" > "$OUT/serve_c$clients.log" 2>&1
    stamp "serve, $clients client processes"; tail -n 2 "$OUT/serve_c$clients.log"
  done
  ;;
prompt-newest)
  # `glmchat --prompt` (8-bit, a 128-token reply) wall time as a README install runs it: the newest transformers
  # (with the hub and tokenizers it needs: .whl-newest, made by `bash bench/prepare_carry.sh newest`; carry
  # [".whl-newest", ".carry"] only, as .whl and .whl-newest together pass the 64 MiB) against the image's 5.17,
  # twice each (the first builds the .pyc files an install would have), stage by stage (probe_prompt.py)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-newest .whl-newest/*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-newest/platformdirs-*.whl
  export PYTHONPYCACHEPREFIX=/tmp/pyc
  P=(--model /tmp/glm6b --quantization 8bit --prompt "类型#裙*颜色#红色*风格#复古" --max-new-tokens 128)
  for stack in newest image newest image; do
    path=.:/tmp/site; [ $stack = newest ] && path=.:/tmp/site-newest:/tmp/site
    s=$(date +%s.%N)
    PYTHONPATH=$path T0=$s timeout 150 python3 bench/probe_prompt.py "${P[@]}" 2>&1 >/dev/null | grep -a "^mark" > "$OUT/prompt_$stack.txt"
    e=$(date +%s.%N)
    v=$(PYTHONPATH=$path python3 -c "import transformers; print(transformers.__version__)")
    echo "{\"what\": \"glmchat --prompt\", \"transformers\": \"$v\", \"seconds\": $(python3 -c "print(round($e - $s, 2))")}" | tee -a "$OUT/prompt.jsonl"
    tail -n 3 "$OUT/prompt_$stack.txt"
  done
  ;;
fused-steps)
  # run 25: the int8 matmul with RMSNorm and the residual inside its launches (compare's two rows, evaluation's
  # 64), and run 24's warm-up long prompt and graphed compare prompts: GPU checks, the 8-bit table as the app runs
  # it, the two-row step's kernels, evaluation, the cold long prompt profiled
  timeout 150 python3 bench/check_fast_batch.py --quantized 8bit > "$OUT/check.log" 2>&1
  timeout 60 python3 bench/check_fast_batch.py --one-row-prompt >> "$OUT/check.log" 2>&1
  stamp "checks"; grep -a "^ok\|FAIL\|Error" "$OUT/check.log" | cut -c1-160
  ENGINE_TIMEOUT=200 engine 8bit --model /tmp/glm6b --quantization 8bit --rows 1,2
  rm -f "$OUT/engine_8bit.err"
  grep -a '"chat"\|"compare"\|ttft_1600\|tuning' "$OUT/engine_8bit.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-260
  timeout 100 python3 bench/profile_batch_step.py --model /tmp/glm6b --quantization 8bit --rows 1,2 \
      > "$OUT/profile_steps.jsonl" 2> /tmp/profile.err
  stamp "steps"; grep -a '"kernels"' "$OUT/profile_steps.jsonl" | cut -c1-900
  s=$(date +%s)
  timeout 90 python3 train_cli.py eval --model /tmp/glm6b --quantization 8bit --validation-file "$DEV" \
      --prompt-column content --response-column summary --max-target-length 128 --output-dir /tmp/eval \
      > /tmp/eval.log 2>&1
  echo "{\"what\": \"eval\", \"rc\": $?, \"seconds\": $(( $(date +%s) - s )), \"inside\": \"$(grep -a -o '[0-9]* examples, [0-9.]* s' /tmp/eval.log)\"}" | tee "$OUT/eval.json"
  timeout 100 python3 bench/profile_long_prompt.py --model /tmp/glm6b --quantization 8bit > "$OUT/long_8bit.jsonl" 2> /tmp/long.err
  stamp "long prompt"; cut -c1-1200 "$OUT/long_8bit.jsonl" | sed 's/.*"what"/"what"/'; tail -n 2 /tmp/long.err
  ;;
cold-prompt)
  # the cold 1600-token prompt (8-bit) after this tree's warm-up: GPU idle or busy, other lengths, on the main
  # thread, profiled; then without the warm-up's pasted documents (GLMCHAT_WARM_PASTED_DOCUMENTS=0), the first
  # three under torch.profiler: where their GPU gaps go
  timeout 200 python3 bench/profile_long_prompt.py --model /tmp/glm6b --quantization 8bit --lengths 1200,1200,2000,2000 \
      > "$OUT/cold_8bit.jsonl" 2> /tmp/cold.err
  stamp "cold prompt"; cut -c1-2500 "$OUT/cold_8bit.jsonl" | sed 's/.*"what"/"what"/' | grep -v host_functions; tail -n 3 /tmp/cold.err
  GLMCHAT_WARM_PASTED_DOCUMENTS=0 timeout 200 python3 bench/profile_long_prompt.py --model /tmp/glm6b --quantization 8bit \
      --profile-first 3 > "$OUT/cold_8bit_before.jsonl" 2> /tmp/cold.err
  stamp "cold prompt without the pasted documents, first three profiled"
  grep -a '"cold_prompt"' "$OUT/cold_8bit_before.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-3000; tail -n 3 /tmp/cold.err
  ;;
long-prompt)
  # a cold 1600-token prompt (a pasted document, nothing cached): the GPU check of one row's unmasked prompt, the
  # prompt stage by stage for 8-bit and NF4 (profile_long_prompt.py), the 8-bit table as the app runs it
  # (bench_engine.py: chat, compare, the warm and cold 1600-token prompts), evaluation, and the one- and two-row
  # steps' kernels (compare's two rows against chat's one)
  timeout 60 python3 bench/check_fast_batch.py --one-row-prompt 2>&1 | grep -a "^ok\|FAIL\|Error" | tee "$OUT/check.log"
  for q in 8bit 4bit; do
    timeout 150 python3 bench/profile_long_prompt.py --model /tmp/glm6b --quantization $q > "$OUT/long_$q.jsonl" 2> /tmp/long_$q.err
    stamp "long prompt $q"; cut -c1-1500 "$OUT/long_$q.jsonl" | sed 's/.*"what"/"what"/'; tail -n 2 /tmp/long_$q.err
  done
  ENGINE_TIMEOUT=200 engine 8bit --model /tmp/glm6b --quantization 8bit --rows 1,2
  rm -f "$OUT/engine_8bit.err"
  grep -a '"chat"\|"compare"\|"batch"\|ttft_1600\|tuning' "$OUT/engine_8bit.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-200
  s=$(date +%s)
  timeout 120 python3 train_cli.py eval --model /tmp/glm6b --quantization 8bit --validation-file "$DEV" \
      --prompt-column content --response-column summary --max-target-length 128 --output-dir /tmp/eval \
      > /tmp/eval.log 2>&1
  echo "{\"what\": \"eval\", \"rc\": $?, \"seconds\": $(( $(date +%s) - s )), \"inside\": \"$(grep -a -o '[0-9]* examples, [0-9.]* s' /tmp/eval.log)\"}" | tee "$OUT/eval.json"
  [ "${PROFILE_STEPS:-1}" = 1 ] && timeout 150 python3 bench/profile_batch_step.py --model /tmp/glm6b --quantization 8bit \
      --rows 1,2 > "$OUT/profile_steps.jsonl" 2> /tmp/profile.err
  grep -a '"kernels"' "$OUT/profile_steps.jsonl" | cut -c1-1200
  ;;
attention-tiles)
  # the one-row step's attention at other slot tiles, warps and splits (8-bit, contexts 128 and 1024), its launch
  # alone (an empty kernel of its grid); then every GPU check (the fp32 one-row step against eager among them)
  # (TILES: the tiles to time; CHECK=0: no checks)
  timeout 200 python3 bench/ablate_one_row_step.py --model /tmp/glm6b --quantization 8bit --splits 1,4,16,32 \
      --attention-tiles "${TILES:-64x8,64x4,32x4,32x8,16x4}" > "$OUT/ablate_8bit.jsonl" 2> "$OUT/ablate_8bit.err"
  stamp "ablate rc $?"; grep -a '"step"\|attention\|splits' "$OUT/ablate_8bit.jsonl" | sed 's/.*"what"/"what"/' | cut -c1-150
  if [ "${CHECK:-1}" != 0 ]; then  # (not exit: the tuning is copied to OUT below)
    timeout 280 python3 bench/check_fast_batch.py > "$OUT/check_fast_batch.log" 2>&1
    stamp "check_fast_batch rc $?"; grep -a "^ok\|FAIL\|Error\|passed" "$OUT/check_fast_batch.log" | cut -c1-150
  fi
  ;;
profile)
  timeout 300 python3 bench/profile_batch_step.py --model /tmp/glm6b --quantization 8bit --rows 1,2,8,64 \
      > "$OUT/profile_8bit.jsonl" 2> "$OUT/profile_8bit.err"
  stamp "profile"; cut -c1-300 "$OUT/profile_8bit.jsonl"
  ;;
*)
  echo "usage: bash bench/run_device.sh models|persistent|one-row-persistent|attention-tiles|ab-env|decode|nf4-words|quantized-check|ablate|ab-tree|prefetch|step-check|chat-table|feed-bf16|nf4-one-row|serving|cards|recipe|linears|linears-train|profile|profile-4bit|train-variants|ab-decode|ab-check|ab-serve|ab-chat|ab-ahead|ab-4bit|ab-table|ab-table2|ab-packed|ab-4bit-rows|long-prompt|cold-prompt|fused-steps|card-8bit|card-nf4|eval-rows|prompt-newest" >&2
  exit 2
  ;;
esac
cp -r "$GLMCHAT_CACHE_DIR/kernel-tuning" "$OUT/" 2>/dev/null || true
