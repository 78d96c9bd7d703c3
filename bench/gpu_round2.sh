#!/usr/bin/env bash
# GPU speed, round 2 (issue 16) as one device job of at most ~9 minutes: several bench/gpu.py runs, each a
# labelled configuration appending its JSON lines to $OUT/gpu_results.jsonl as it goes (a run that fails
# or times out costs only itself). Order = most wanted first.
#
#   bash bench/gpu_round2.sh            # on the device (after the carried wheels are installed)
#   DRY=1 bash bench/gpu_round2.sh      # CPU dry run of every configuration with the tiny model
#
#   h200-zero0      the 141 GB card: conf/gpu (batch 32, no checkpointing, compiled) with ZeRO stage 0
#                   (training.single_process_zero_stage: 0) -- anchor in the same run for the ratio
#   h200-zero2      the same with today's ZeRO-2 (the control; SPLIT shows the optimizer step of each)
#   80g-zero0       an 80 GB card simulated on this one (MEM_GIB=79: same compute, memory capped):
#                   batch 32 with every 2nd / 3rd layer checkpointed, batch 24 every 2nd, batch 16 all
#   80g-zero1       the same first variant under ZeRO-1
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
rm -f "$OUT/gpu_results.jsonl"
PY="${PYTHON:-python3}"
if [ "${DRY:-0}" = 1 ]; then
  common=(DEV=cpu SIZE=tiny IMG=56 B=4 EVAL_BATCHES=4 STEPS=2 COMPILE=0 ANCHOR=)
  budget=120
else
  common=(EVAL_BATCHES=128,192 STEPS=8)
  budget=160
fi
run() {  # label, seconds, env...
  local label=$1 seconds=$2
  shift 2
  echo "== $label (at most ${seconds}s)"
  env "${common[@]}" RUN="$label" BUDGET_S=$((seconds - 30)) "$@" timeout "$seconds" "$PY" bench/gpu.py \
    > "$OUT/$label.log" 2>&1
  echo "   exit $?; $(grep -c '^[A-Z]* {' "$OUT/$label.log") result lines"
}
if [ "${DRY:-0}" = 1 ]; then
  run h200-zero0 "$budget" ZERO=0
  run 80g-zero0 "$budget" ZERO=0 GC=2 TRAIN_VARIANTS=4:3,4:1
  run 80g-zero1 "$budget" ZERO=1 GC=2
else
  run h200-zero0 160 ZERO=0 B=32 GC=0
  run h200-zero2 100 ZERO=2 B=32 GC=0 ANCHOR= EVAL_BATCHES=128
  run 80g-zero0 140 ZERO=0 MEM_GIB=79 B=32 GC=2 TRAIN_VARIANTS=32:3,24:2,16:1 ANCHOR= EVAL_BATCHES=128
  run 80g-zero1 80 ZERO=1 MEM_GIB=79 B=32 GC=2 ANCHOR= EVAL_BATCHES=128
fi
grep -h '"tag": "\(TRAIN\|EVAL\|SPLIT\|FAIL\|SUMMARY\|CHECK\)"' "$OUT/gpu_results.jsonl" | cut -c1-400
