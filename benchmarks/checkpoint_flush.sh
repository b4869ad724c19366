#!/usr/bin/env bash
# What a durable checkpoint costs at the ~1B shape on one GPU: train.py saves a checkpoint every 2 of 4
# steps and logs how long flushing each one to disk (fsync of every file) took before it was marked
# complete; then checkpoint-4 loses its completion marker (a save cut short) and a rerun must resume
# from checkpoint-2; a third run finds the stage finished and trains nothing.
# From the repo root, with the packages installed:  bash benchmarks/checkpoint_flush.sh RESULTS_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
results=$(realpath -m "$1")
scratch=${SCRATCH:-/tmp/train-llama-flush}
mkdir -p "$results" && rm -rf "$scratch"
export OUTPUT_DIR=$scratch/output WORK_DIR=$scratch/work HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PRESET=full INPUT_DATASET=data/pretrain.jsonl OUTPUT_REPO=bench FACTOR=12288 VOCAB_SIZE=52000
export MAX_STEPS=4 SAVE_STEPS=2 LOGGING_STEPS=2 BATCH_SIZE=4 GRADIENT_ACCUMULATION_STEPS=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$results/card.txt"
df -h "$(dirname "$scratch")" | tail -1

timed() {  # NAME COMMAND...: run with its log in RESULTS_DIR/NAME.log, print the exit status and seconds
  local name=$1 start=$SECONDS rc=0; shift
  "$@" > "$results/$name.log" 2>&1 || rc=$?
  echo "$name: exit $rc, $((SECONDS - start)) s"
}
timed prep python3 prep.py
timed train deepspeed --num_gpus 1 train.py
grep -E "^step|^checkpoint:" "$results/train.log" || true
du -sh "$WORK_DIR"/checkpoints/checkpoint-*
rm "$WORK_DIR/checkpoints/checkpoint-4/train-llama-complete.json"
rm -rf "$WORK_DIR/trained"
timed resume deepspeed --num_gpus 1 train.py
grep -E "^step|^checkpoint:|^train:|resuming" "$results/resume.log" || true
timed finished deepspeed --num_gpus 1 train.py
grep -E "^train:" "$results/finished.log" || true
rm -rf "$scratch"
