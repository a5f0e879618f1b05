#!/usr/bin/env bash
# One device call that runs a session's GPU work in order of importance while time is left, and
# prints a short summary last (the device tool lends ~30 min a session, <= 10 min a call).
#
#   device tool, carry [".whl"] (lark + mlcommons-loadgen wheels, see tools/device_setup.sh):
#     bash tools/device_run_all.sh COMMIT DEADLINE_S [STEPS]
#   STEPS (comma list, default all): tests,rows,int8,rownorm,conv,loadgen,rnn,attn
#   (rows at batch 32 also build nnc with the fusion passes off: issue 7's fused/unfused ratio)
#
# Each step is skipped when less than its minimum time is left. Results go under $OUT: the
# bench_vs_torch rows (h200.jsonl, to append to benchmarks/), and one log per step.
set -u
T0=$(date +%s); COMMIT=${1:-?}; DEADLINE=${2:-540}; STEPS=${3:-tests,rows,int8,rownorm,conv,loadgen,rnn,attn}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
want() { [[ ",$STEPS," == *",$1,"* ]] && [ "$(left)" -ge "$2" ]; }
source tools/device_setup.sh > "$OUT/setup.log" 2>&1 || { tail -5 "$OUT/setup.log"; exit 1; }
export NNC_CACHE_DIR=/tmp/nnccache
if want tests 200; then
  NNC_TUNE=0 timeout 230 python3 -m pytest -q --no-header -p no:cacheprovider -m gpu -n 14 tests > "$OUT/tests.log" 2>&1
  grep -E "^FAILED|^ERROR|passed|failed" "$OUT/tests.log" | head -20
fi
if want rows 75; then
  for spec in "resnet50 32" "bert_base 32" "resnet50 1" "bert_base 1" "mobilenet_v2 1" "mobilenet_v2 32"; do
    set -- $spec; L=$(left); PEERS=eager,reduce_overhead; [ "$2" = 32 ] && PEERS=$PEERS,nnc_unfused
    [ "$L" -lt 75 ] && { echo "SKIP row $spec: ${L}s left"; continue; }
    timeout $((L - 5)) python3 tools/bench_vs_torch.py --model "$1" --batches "$2" --precisions fp16 \
      --peers $PEERS --tune-budget 25 --results "$OUT/h200.jsonl" --commit "$COMMIT" \
      > "$OUT/row_$1_$2.log" 2>&1
    grep -E "^ROW" "$OUT/row_$1_$2.log" | python3 -c "import json,sys
for l in sys.stdin:
    r = json.loads(l[4:]); n, p, u = r.get('nnc_ms'), r.get('reduce_overhead_ms'), r.get('nnc_unfused_ms')
    print(f\"row {r['model']} b{r['batch']}: nnc {n} ms, torch.compile+graphs {p} ms, x{p / n:.2f}\" if n and p else r,
          f\"(unfused {u} ms, fused x{u / n:.2f})\" if n and u else '')"
  done
fi
if want int8 150; then timeout 140 python3 tools/bench_int8.py > "$OUT/int8.log" 2>&1; tail -14 "$OUT/int8.log"; fi
if want rownorm 60; then timeout 50 python3 tools/bench_rownorm.py --op AddLayerNormalization --shapes 4096x768,4096x3072 --dtypes f16 > "$OUT/rownorm.log" 2>&1; tail -8 "$OUT/rownorm.log"; fi
if want conv 120; then timeout 110 python3 tools/bench_conv_wgmma.py > "$OUT/conv.log" 2>&1; tail -24 "$OUT/conv.log"; fi
if want loadgen 150; then timeout 200 python3 -u tools/loadgen_vs_torch.py --model resnet50 --batch 32 --scenario offline --duration-s 10 --out "$OUT/lg" > "$OUT/loadgen.log" 2>&1; tail -12 "$OUT/loadgen.log"; fi
if want rnn 120; then timeout 110 python3 tools/bench_rnn.py --models lstm2x512 --batches 32 --kperm --stage-batch --out "$OUT" > "$OUT/rnn.log" 2>&1; tail -10 "$OUT/rnn.log"; fi
if want attn 90; then timeout 120 python3 tools/bench_attention.py --cases 1x128,1x512,32x128,32x512 --sweep --out "$OUT/attn" > "$OUT/attn.log" 2>&1; tail -12 "$OUT/attn.log"; fi
echo "total $(( $(date +%s) - T0 ))s of ${DEADLINE}s"
