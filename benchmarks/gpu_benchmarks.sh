#!/usr/bin/env bash
# GPU benchmarks recorded in BENCHMARKS.md. Run from the repo root on a machine with 2 GPUs:
#   bash benchmarks/gpu_benchmarks.sh scaling RESULTS_DIR   # ~200M on 1 and 2 GPUs, same global batch
#   bash benchmarks/gpu_benchmarks.sh quant RESULTS_DIR     # ~1B: full bf16 vs NF4 + LoRA
#   bash benchmarks/gpu_benchmarks.sh demo RESULTS_DIR      # the demo curriculum through trainer.sh
# QUANT_SHAPES="BATCH LENGTH,..." picks the quant suite's shapes (default all four).
#   python3 benchmarks/report.py RESULTS_DIR                # the table
# Each run keeps its training log and summary.json in RESULTS_DIR/<run name>/.
set -euo pipefail
cd "$(dirname "$0")/.."
suite=$1
results=$(realpath -m "$2")
scratch=${SCRATCH:-/tmp/train-llama-bench}
mkdir -p "$results" "$scratch"
export TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1

# One training stage (prep + train) with its own work folder; keeps the log and summary.
train_stage() {
  local name=$1 gpus=$2; shift 2
  local work=$scratch/$name
  rm -rf "$work"
  mkdir -p "$results/$name"
  (
    export "$@" WORK_DIR="$work/work" OUTPUT_DIR="$work/output"
    python3 prep.py > "$results/$name/prep.log" 2>&1
    deepspeed --master_port $((29500 + RANDOM % 1000)) --num_gpus "$gpus" train.py > "$results/$name/train.log" 2>&1
    cp "$work/work/trained/summary.json" "$results/$name/summary.json"
  ) || echo "benchmark $name failed: see $results/$name/"
  grep -E "^step|tok/s\)" "$results/$name/train.log" | tail -3 || true
}

demo_run() {
  local name=$1 gpus=$2
  mkdir -p "$results/$name"
  local start=$SECONDS
  CUDA_VISIBLE_DEVICES=$gpus WORK_DIR="$scratch/$name/work" OUTPUT_DIR="$scratch/$name/output" \
    bash trainer.sh > "$results/$name/trainer.log" 2>&1 || echo "benchmark $name failed"
  echo "$name: whole demo curriculum in $((SECONDS - start)) s" | tee -a "$results/$name/trainer.log"
  python3 evaluate.py "$scratch/$name/output/train-llama-it" 2>&1 | tail -3 | tee -a "$results/$name/trainer.log"
}

# ~200M parameters (vocabulary 2048 trained on the embedded corpus), packed 2048-token rows, bf16,
# no activation checkpointing; the same global batch (16 sequences) on one and on two GPUs.
scaling_settings=(PRESET=full INPUT_DATASET=data/pretrain.jsonl OUTPUT_REPO=bench TARGET_PARAMETERS=200M
  VOCAB_SIZE=2048 MAX_LENGTH=2048 EPOCHS=40 MAX_STEPS=60 LOGGING_STEPS=5 SAVE_STEPS=1000
  GRADIENT_CHECKPOINTING=false LEARNING_RATE=6e-4 BATCH_SIZE=8)

case "$suite" in
  demo)
    demo_run demo-1gpu 0
    ;;
  scaling)
    CUDA_VISIBLE_DEVICES=0 train_stage scaling-1gpu 1 "${scaling_settings[@]}" GRADIENT_ACCUMULATION_STEPS=2
    train_stage scaling-2gpu 2 "${scaling_settings[@]}" GRADIENT_ACCUMULATION_STEPS=1
    ;;
  quant)
    # ~1B (FACTOR 12288), activation checkpointing on, full bf16 against NF4 + LoRA at equal batch.
    IFS=, read -r -a shapes <<< "${QUANT_SHAPES:-1 1024,4 2048,4 1024,1 2048}"
    for shape in "${shapes[@]}"; do
      read -r batch length <<< "$shape"
      for quant in false true; do
        CUDA_VISIBLE_DEVICES=0 train_stage "1b-b${batch}-l${length}-quant-${quant}" 1 PRESET=full \
          INPUT_DATASET=data/pretrain.jsonl OUTPUT_REPO=bench FACTOR=12288 VOCAB_SIZE=52000 \
          MAX_LENGTH="$length" BATCH_SIZE="$batch" GRADIENT_ACCUMULATION_STEPS=1 EPOCHS=40 MAX_STEPS=10 \
          LOGGING_STEPS=2 SAVE_STEPS=1000 GRADIENT_CHECKPOINTING=true USE_QUANT="$quant"
      done
    done
    ;;
  *) echo "usage: $0 scaling|quant|demo RESULTS_DIR" >&2; exit 2 ;;
esac
