#!/usr/bin/env bash
# GPU speed, round 2 (issue 16) as one device job of at most TOTAL_S seconds (default 540): several
# bench/gpu.py runs, each a labelled configuration appending its JSON lines to $OUT/gpu_results.jsonl as
# it goes (a run that fails or times out costs only itself). Most wanted first; a run that no longer fits
# in what is left is skipped (SKIPPED line).
#
#   bash bench/gpu_round2.sh            # on the device (after the carried wheels are installed)
#   DRY=1 bash bench/gpu_round2.sh      # CPU dry run of every configuration with the tiny model
#
#   h200-zero0     the 141 GB card: conf/gpu (batch 32, no checkpointing, compiled) under ZeRO stage 0
#                  (training.single_process_zero_stage: 0); the bare-loop anchor in the same run
#   80g-zero0      an 80 GB card simulated on this one (MEM_GIB=79: same compute, memory capped): batch 32
#                  with every 2nd / 3rd layer checkpointed, batch 24 every 2nd, batch 16 every layer
#   h200-zero2     conf/gpu as today (ZeRO-2): the control, with its SPLIT line (optimizer step)
#   h200-autotune  ZeRO-0 with model.torch_compile_mode: max-autotune-no-cudagraphs (inductor's GEMM choice)
#   80g-zero1      80 GB, batch 32 every 2nd layer, ZeRO-1
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
rm -f "$OUT/gpu_results.jsonl"
PY="${PYTHON:-python3}"
TOTAL_S="${TOTAL_S:-540}"
if [ "${DRY:-0}" = 1 ]; then
  common=(DEV=cpu SIZE=tiny IMG=56 B=4 EVAL_BATCHES=4 STEPS=2 COMPILE=0 ANCHOR= TRAIN_VARIANTS=)
else
  common=(EVAL_BATCHES=128,192 STEPS=8)
fi
run() {  # label, seconds, env...
  local label=$1 seconds=$2 left=$((TOTAL_S - SECONDS))
  shift 2
  [ "$seconds" -gt "$left" ] && seconds=$left
  if [ "$seconds" -lt 60 ]; then
    echo "SKIPPED $label: ${left}s left of TOTAL_S=$TOTAL_S" | tee -a "$OUT/gpu_results.jsonl"
    return
  fi
  echo "== $label (at most ${seconds}s)"
  env "${common[@]}" RUN="$label" BUDGET_S=$((seconds - 40)) "$@" timeout "$seconds" "$PY" bench/gpu.py \
    > "$OUT/$label.log" 2>&1
  echo "   exit $?; $(grep -c '^[A-Z]* {' "$OUT/$label.log") result lines"
}
if [ "${DRY:-0}" = 1 ]; then
  run h200-zero0 120 ZERO=0
  run 80g-zero0 120 ZERO=0 GC=2 TRAIN_VARIANTS=4:3,4:1
  run h200-zero2 120 ZERO=2
  run h200-autotune 120 ZERO=0 COMPILE=1 COMPILE_MODE=max-autotune-no-cudagraphs
  run 80g-zero1 120 ZERO=1 GC=2
else
  run h200-zero0 160 ZERO=0 B=32 GC=0
  run 80g-zero0 140 ZERO=0 MEM_GIB=79 B=32 GC=2 TRAIN_VARIANTS=32:3,24:2,16:1 ANCHOR= EVAL_BATCHES=128
  run h200-zero2 90 ZERO=2 B=32 GC=0 ANCHOR= EVAL_BATCHES=128
  run h200-autotune 120 ZERO=0 B=32 GC=0 COMPILE_MODE=max-autotune-no-cudagraphs ANCHOR= EVAL_BATCHES=128
  run 80g-zero1 80 ZERO=1 MEM_GIB=79 B=32 GC=2 ANCHOR= EVAL_BATCHES=128
fi
grep -h '"tag": "\(TRAIN\|EVAL\|SPLIT\|FAIL\|SUMMARY\|CHECK\|ENV\|ANCHOR\)"\|^SKIPPED' "$OUT/gpu_results.jsonl" | cut -c1-400
