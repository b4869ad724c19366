#!/usr/bin/env bash
# GPU benchmarks recorded in BENCHMARKS.md. From the repo root, on a machine with 2 GPUs:
#   bash benchmarks/gpu_benchmarks.sh SUITE RESULTS_DIR && python3 benchmarks/report.py RESULTS_DIR
# Suites:
#   scaling  ~200M pretraining through trainer.sh on 1 GPU and on 2, at the same global batch
#   quant    ~1B (FACTOR 12288) on 1 GPU: full bf16 and NF4 + LoRA through prep.py and train.py, and
#            stock TRL + peft + bitsandbytes (benchmarks/stock_trl.py), at each of
#            QUANT_SHAPES="BATCH LENGTH,..." (default all four)
#   nf4      ~1B NF4 + LoRA against stock TRL at the four quant shapes, then full bf16 at 4x2048: the
#            quant suite's comparisons in about 9 minutes of one GPU
#   qlora2   ~1B NF4 + LoRA under ZeRO-2 on 2 GPUs (compare with quant's 1-GPU 4x2048 run)
#   profile  kernels launched and GPU busy time per step, NF4 + LoRA against stock (step_profile.py);
#            PROFILE_SHAPES ("1 1024,4 2048") and PROFILE_VARIANTS ("zero2 zero2-no-overflow-check zero0")
#   checks2  ~1B NF4 + LoRA on 2 GPUs, 10 steps with the fused ZeRO checks and 10 with DeepSpeed's own
#   stages   ~1B NF4 + LoRA on one GPU under ZeRO-2 and ZeRO-1 against stock TRL, alternating, at
#            STAGES_SHAPE_GPU0 ("1 1024") and STAGES_SHAPE_GPU1 ("4 2048") side by side
#   buckets  NF4 + LoRA with the trimmed gradient buckets against the original's two of 5e8 elements
#   fused    NF4 + LoRA with and without Liger's fused kernels, against stock TRL with and without
#            them; FUSED_SHAPES_GPU0/1 on two GPUs side by side
#   zerochecks  NF4 + LoRA with util.fuse_zero_gradient_checks against DeepSpeed's own per-tensor
#            checks and stock TRL, at 1x1024 on GPU 0 and 4x1024 on GPU 1
#   versus   ~1B NF4 + LoRA against stock TRL, alternating, VERSUS_ROUNDS (3) rounds at each shape,
#            30 steps in windows of 5; VERSUS_SHAPES_GPU0/1 on two GPUs side by side
#   demo     the demo curriculum through trainer.sh on 1 GPU and on 2
#   zero     one GPU, ZeRO stages 0 and 2 against stock TRL: the ~200M bf16 shape, the ~1B at 1x1024
#            (bound by per-step work) and NF4 at 4x2048 (where DeepSpeed's per-step work costs time)
#   all      scaling, quant, qlora2 and demo: the 1-GPU runs on GPU 0 and GPU 1 side by side, then
#            the 2-GPU runs
# Side-by-side lists run on separate halves of the host's cores (pin_to_half_of_cores).
# NF4 + LoRA on one GPU runs ZERO_STAGE=2 as ZeRO-1 (config.zero_stage_for): `stages` and `zero` run
# the stages as named (step_profile.py --zero-stage-as-set); elsewhere, as in the profile suite's
# `zero2` variants, a one-GPU NF4 run is the pipeline's default.
# Each run keeps its log and summary.json in RESULTS_DIR/<run name>/; RESULTS_DIR/done marks the end.
set -euo pipefail
cd "$(dirname "$0")/.."
suite=$1
results=$(realpath -m "$2")
scratch=${SCRATCH:-/tmp/train-llama-bench}
mkdir -p "$results" "$scratch"
export TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1

train_wrapper=()  # a script that train.py runs under (benchmarks/step_profile.py in the profile and buckets suites)
# Binds this shell and what it starts to GPU $1's half of the host's cores. The side-by-side suites run
# host-bound steps: without it, one GPU's CPU-heavy phases (loading, quantizing, saving) take cores
# from the other GPU's kernel-launching thread.
pin_to_half_of_cores() {
  local cores
  command -v taskset > /dev/null || { echo "taskset not found: runs are not pinned to cores"; return 0; }
  # Halves of the cores this process may use, which need not start at core 0 in a container.
  cores=$(python3 -c 'import os, sys; c = sorted(os.sched_getaffinity(0)); h = len(c) // 2; g = int(sys.argv[1])
print(",".join(map(str, c[g * h:(g + 1) * h])))' "$1")
  taskset -cp "$cores" "$BASHPID" > /dev/null && echo "GPU $1's runs on cores $cores"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# One stage through prep.py and train.py on the listed GPUs ("0" or "0,1"); the rest is settings.
# With PREP_KEY set, runs of one key train from one prepared folder (train.py only reads
# WORK_DIR/prep; a ~1B model takes ~25 s to prepare, and prep.py reuses a finished preparation).
train_stage() {
  local name=$1 gpus=$2; shift 2
  local work=$scratch/$name shared=$scratch/prepared-${PREP_KEY:-}
  rm -rf "$work" && mkdir -p "$results/$name"
  (
    export "$@" WORK_DIR="$work/work" OUTPUT_DIR="$work/output" CUDA_VISIBLE_DEVICES="$gpus"
    if [ -z "${PREP_KEY:-}" ]; then
      python3 prep.py > "$results/$name/prep.log" 2>&1
    else
      WORK_DIR="$shared" python3 prep.py > "$results/$name/prep.log" 2>&1
      mkdir -p "$work/work" && ln -s "$shared/prep" "$work/work/prep"
    fi
    # Without --num_gpus the launcher turns CUDA_VISIBLE_DEVICES into its list of GPUs.
    deepspeed --master_port "$(free_port)" "${train_wrapper[@]}" train.py > "$results/$name/train.log" 2>&1
    cp "$work/work/trained/summary.json" "$results/$name/summary.json"
    # The last checkpoint's log history has every logged step's loss and gradient norm.
    last_checkpoint=$(ls -d "$work/work/checkpoints/checkpoint-"* 2>/dev/null | sort -V | tail -1 || true)
    [ -z "$last_checkpoint" ] || cp "$last_checkpoint/trainer_state.json" "$results/$name/"
  ) || echo "benchmark $name failed: see $results/$name/"
  rm -rf "$work"
  grep -E "^step" "$results/$name/train.log" | tail -1 || true
}

# One trainer.sh run (every stage it runs) on the listed GPUs; the rest is settings.
trainer_run() {
  local name=$1 gpus=$2; shift 2
  local work=$scratch/$name start=$SECONDS
  rm -rf "$work" && mkdir -p "$results/$name"
  (
    export "$@" WORK_DIR="$work/work" OUTPUT_DIR="$work/output" CUDA_VISIBLE_DEVICES="$gpus"
    bash trainer.sh > "$results/$name/train.log" 2>&1
    cp "$work/work/trained/summary.json" "$results/$name/summary.json"
  ) || echo "benchmark $name failed: see $results/$name/"
  echo "$name: trainer.sh took $((SECONDS - start)) s" | tee "$results/$name/wall.txt"
}

# ~200M parameters (the corpus vocabulary), packed 2048-token rows, bf16, no activation
# checkpointing, the same global batch (16 sequences); 300 steps are a few minutes on one GPU.
scaling_settings=(PRESET=full INPUT_DATASET=data/pretrain.jsonl OUTPUT_REPO=bench TARGET_PARAMETERS=200M
  VOCAB_SIZE=2048 MAX_LENGTH=2048 EPOCHS=40 MAX_STEPS=300 LOGGING_STEPS=10 SAVE_STEPS=1000
  GRADIENT_CHECKPOINTING=false LEARNING_RATE=6e-4 BATCH_SIZE=8)
# ~1B (FACTOR 12288) with activation checkpointing: full bf16 against NF4 + LoRA at equal batch.
quant_settings=(PRESET=full INPUT_DATASET=data/pretrain.jsonl OUTPUT_REPO=bench FACTOR=12288
  VOCAB_SIZE=52000 GRADIENT_ACCUMULATION_STEPS=1 EPOCHS=40 MAX_STEPS=${QUANT_STEPS:-12} LOGGING_STEPS=2 SAVE_STEPS=1000
  GRADIENT_CHECKPOINTING=true)

scaling_1gpu() { trainer_run scaling-1gpu "$1" "${scaling_settings[@]}" GRADIENT_ACCUMULATION_STEPS=2; }
scaling_2gpu() { trainer_run scaling-2gpu 0,1 "${scaling_settings[@]}" GRADIENT_ACCUMULATION_STEPS=1; }
demo_run() {
  trainer_run "$1" "$2"
  { python3 evaluate.py "$scratch/$1/output/train-llama-it" 2>&1 || true; } | tail -2 | tee -a "$results/$1/wall.txt"
  rm -rf "${scratch:?}/$1"
}

# The quant comparison at "BATCH LENGTH" shapes on one GPU: USE_QUANT for each of QUANT_MODES
# (default "false true"), then stock TRL unless QUANT_STOCK=0. The 1B model's embedding has the rows
# of the corpus vocabulary; the stock baseline gets the same number (read from a run of the shape).
quant_shapes() {
  local gpu=$1 shape batch length quant
  IFS=, read -r -a shapes <<< "$2"
  for shape in "${shapes[@]}"; do
    read -r batch length <<< "$shape"
    for quant in ${QUANT_MODES-false true}; do
      PREP_KEY="1b-l${length}-quant-${quant}" train_stage "1b-b${batch}-l${length}-quant-${quant}" "$gpu" \
        "${quant_settings[@]}" MAX_LENGTH="$length" BATCH_SIZE="$batch" USE_QUANT="$quant"
    done
    [ "${QUANT_STOCK:-1}" = 0 ] && continue
    local rows
    rows=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["vocab_rows"])' \
      "$(ls "$results/1b-b${batch}-l${length}"-quant-*/summary.json 2>/dev/null | head -1)" 2>/dev/null || echo 1344)
    mkdir -p "$results/stock-1b-b${batch}-l${length}-nf4"
    CUDA_VISIBLE_DEVICES=$gpu python3 benchmarks/stock_trl.py --hidden 2048 --vocab-rows "$rows" \
      --batch "$batch" --length "$length" --quant --checkpointing \
      --json "$results/stock-1b-b${batch}-l${length}-nf4/stock.json" \
      > "$results/stock-1b-b${batch}-l${length}-nf4/train.log" 2>&1 || echo "stock $shape failed"
    tail -1 "$results/stock-1b-b${batch}-l${length}-nf4/train.log"
  done
}

# Stock TRL full bf16 training of the scaling suite's shape, on one GPU.
stock_scaling() {
  mkdir -p "$results/stock-scaling"
  CUDA_VISIBLE_DEVICES=$1 python3 benchmarks/stock_trl.py --hidden 1024 --vocab-rows 1216 --batch 8 \
    --length 2048 --accumulation 2 --steps 20 --warmup 4 --json "$results/stock-scaling/stock.json" \
    > "$results/stock-scaling/train.log" 2>&1 || echo "stock scaling failed"
  tail -1 "$results/stock-scaling/train.log"
}

qlora_2gpu() {
  train_stage 1b-b4-l2048-quant-true-2gpu 0,1 "${quant_settings[@]}" MAX_LENGTH=2048 BATCH_SIZE=4 USE_QUANT=true
}

zero_stages() {
  local stage
  for stage in 0 2; do
    train_stage "zero${stage}-scaling" 0 "${scaling_settings[@]}" GRADIENT_ACCUMULATION_STEPS=2 MAX_STEPS=40 ZERO_STAGE=$stage
    train_stage "zero${stage}-1b-b1-l1024" 0 "${quant_settings[@]}" MAX_LENGTH=1024 BATCH_SIZE=1 USE_QUANT=false ZERO_STAGE=$stage
    train_wrapper=(benchmarks/step_profile.py --zero-stage-as-set)
    train_stage "zero${stage}-1b-b4-l2048-nf4" 0 "${quant_settings[@]}" MAX_LENGTH=2048 BATCH_SIZE=4 USE_QUANT=true ZERO_STAGE=$stage
    train_wrapper=()
  done
  stock_scaling 0
  QUANT_MODES="" quant_shapes 0 "4 2048"
}

# torch.profiler over steps 8-12 of ~1B NF4 + LoRA (1x1024 and 4x2048): this pipeline under ZeRO-2,
# ZeRO-2 without DeepSpeed's bf16 overflow check, ZeRO-0, and stock TRL; OUT.txt in each run's folder.
profile_runs() {
  local shape batch length name variant
  IFS=, read -r -a shapes <<< "${PROFILE_SHAPES:-1 1024,4 2048}"
  for shape in "${shapes[@]}"; do
    read -r batch length <<< "$shape"
    name=profile-stock-b${batch}-l${length}
    mkdir -p "$results/$name"
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/step_profile.py --out "$results/$name/profile" benchmarks/stock_trl.py \
      --hidden 2048 --vocab-rows 1344 --batch "$batch" --length "$length" --quant --checkpointing --steps 16 \
      --warmup 4 > "$results/$name/train.log" 2>&1 || echo "$name failed"
    for variant in ${PROFILE_VARIANTS:-zero2 zero2-no-overflow-check zero0}; do
      [ "$shape" = "4 2048" ] && [ "$variant" != zero2 ] && continue
      name=profile-${variant}-b${batch}-l${length}
      train_wrapper=(benchmarks/step_profile.py --out "$results/$name/profile")
      [ "$variant" = zero2-no-overflow-check ] && train_wrapper+=(--no-bf16-overflow-check)
      PREP_KEY="1b-l${length}-quant-true" train_stage "$name" 0 "${quant_settings[@]}" MAX_STEPS=16 \
        MAX_LENGTH="$length" BATCH_SIZE="$batch" USE_QUANT=true ZERO_STAGE="$([ "$variant" = zero0 ] && echo 0 || echo 2)"
    done
    train_wrapper=()
  done
}

# ~1B NF4 + LoRA on one GPU, the trimmed gradient buckets (config.deepspeed_buckets) against the
# original's two of 5e8 elements, alternating, twice each, at 1x1024 and 4x2048.
bucket_runs() {
  local shape batch length round variant
  for shape in "1 1024" "4 2048"; do
    read -r batch length <<< "$shape"
    for round in 1 2; do
      for variant in trimmed original; do
        train_wrapper=(benchmarks/step_profile.py)
        [ "$variant" = original ] && train_wrapper+=(--original-buckets)
        PREP_KEY="1b-l${length}-quant-true" train_stage "buckets-${variant}-b${batch}-l${length}-${round}" 0 \
          "${quant_settings[@]}" MAX_STEPS=20 MAX_LENGTH="$length" BATCH_SIZE="$batch" USE_QUANT=true ZERO_STAGE=2
      done
    done
  done
  train_wrapper=()
}

# ~1B NF4 + LoRA on one GPU at "BATCH LENGTH" shapes: this pipeline plain and with Liger's kernels
# (FUSED_VARIANTS), then stock TRL plain and with Liger (FUSED_STOCK).
fused_runs() {
  local gpu=$1 shape batch length variant name
  IFS=, read -r -a shapes <<< "$2"
  for shape in "${shapes[@]}"; do
    read -r batch length <<< "$shape"
    for variant in ${FUSED_VARIANTS:-plain liger}; do
      train_wrapper=(benchmarks/step_profile.py)
      [ "$variant" = liger ] && train_wrapper+=(--liger)
      PREP_KEY="1b-l${length}-gpu${gpu}" train_stage "fused-${variant}-b${batch}-l${length}" "$gpu" \
        "${quant_settings[@]}" MAX_LENGTH="$length" BATCH_SIZE="$batch" USE_QUANT=true
    done
    train_wrapper=()
    for variant in ${FUSED_STOCK:-plain liger}; do
      name=stock-fused-${variant}-b${batch}-l${length}
      mkdir -p "$results/$name"
      CUDA_VISIBLE_DEVICES=$gpu python3 benchmarks/step_profile.py $([ "$variant" = liger ] && echo --liger) \
        benchmarks/stock_trl.py --hidden 2048 --vocab-rows 1344 --batch "$batch" --length "$length" --quant \
        --checkpointing --json "$results/$name/stock.json" > "$results/$name/train.log" 2>&1 || echo "$name failed"
      tail -1 "$results/$name/train.log"
    done
  done
}

# Stock TRL's ~1B NF4 + LoRA as RESULTS/NAME on one GPU: 30 steps, tokens/s over 5-step windows.
stock_windows() {
  local name=$1 gpu=$2 batch=$3 length=$4
  mkdir -p "$results/$name"
  CUDA_VISIBLE_DEVICES=$gpu python3 benchmarks/stock_trl.py --hidden 2048 --vocab-rows 1344 --batch "$batch" \
    --length "$length" --quant --checkpointing --steps 30 --logging-steps 5 --warmup 5 \
    --json "$results/$name/stock.json" > "$results/$name/train.log" 2>&1 || echo "$name failed"
  tail -1 "$results/$name/train.log"
}

# ~1B NF4 + LoRA against stock TRL at "BATCH LENGTH" shapes on one GPU, alternating, so that a slow
# spell of the host falls on both; each run's tokens/s is the median of five 5-step windows.
versus_runs() {
  local gpu=$1 shape batch length round
  IFS=, read -r -a shapes <<< "$2"
  for shape in "${shapes[@]}"; do
    read -r batch length <<< "$shape"
    for round in $(seq "${VERSUS_ROUNDS:-3}"); do
      PREP_KEY="1b-l${length}-gpu${gpu}" train_stage "versus-b${batch}-l${length}-${round}" "$gpu" \
        "${quant_settings[@]}" MAX_STEPS=30 LOGGING_STEPS=5 MAX_LENGTH="$length" BATCH_SIZE="$batch" USE_QUANT=true
      stock_windows "stock-versus-b${batch}-l${length}-${round}" "$gpu" "$batch" "$length"
    done
  done
}

# ~1B NF4 + LoRA at one "BATCH LENGTH" shape on one GPU: the pipeline's fused ZeRO checks, DeepSpeed's
# own, stock TRL, DeepSpeed's, fused (symmetric, so that a drift of the host's speed falls on both alike).
zerocheck_runs() {
  local gpu=$1 batch length variant round=0 name
  read -r batch length <<< "$2"
  for variant in fused deepspeed stock deepspeed fused; do
    round=$((round + 1))
    name=zerochecks-${variant}-b${batch}-l${length}-${round}
    if [ "$variant" = stock ]; then
      stock_windows "stock-zerochecks-b${batch}-l${length}-${round}" "$gpu" "$batch" "$length"
      continue
    fi
    train_wrapper=(benchmarks/step_profile.py)
    [ "$variant" = deepspeed ] && train_wrapper+=(--deepspeed-zero-checks)
    PREP_KEY="1b-l${length}-gpu${gpu}" train_stage "$name" "$gpu" "${quant_settings[@]}" MAX_STEPS=30 \
      LOGGING_STEPS=5 MAX_LENGTH="$length" BATCH_SIZE="$batch" USE_QUANT=true
  done
  train_wrapper=()
}

# ~1B NF4 + LoRA at one "BATCH LENGTH" shape on one GPU: ZeRO-2, ZeRO-1, stock TRL, ZeRO-1, ZeRO-2
# (symmetric, like zerocheck_runs). One process partitions nothing at either stage; ZeRO-1 without
# overlapped communication has no per-parameter gradient hooks.
stage_runs() {
  local gpu=$1 batch length variant round=0
  read -r batch length <<< "$2"
  for variant in 2 1 stock 1 2; do
    round=$((round + 1))
    if [ "$variant" = stock ]; then
      stock_windows "stock-stages-b${batch}-l${length}-${round}" "$gpu" "$batch" "$length"
      continue
    fi
    train_wrapper=(benchmarks/step_profile.py --zero-stage-as-set)
    PREP_KEY="1b-l${length}-gpu${gpu}" train_stage "stages-zero${variant}-b${batch}-l${length}-${round}" "$gpu" \
      "${quant_settings[@]}" MAX_STEPS=30 LOGGING_STEPS=5 MAX_LENGTH="$length" BATCH_SIZE="$batch" USE_QUANT=true \
      ZERO_STAGE="$variant"
  done
  train_wrapper=()
}

# ~1B NF4 + LoRA under ZeRO-2 on two GPUs, 10 steps with util.fuse_zero_gradient_checks and 10 with
# DeepSpeed's own checks; each run's trainer_state.json has every step's loss and gradient norm.
two_gpu_check_runs() {
  local variant
  for variant in fused deepspeed; do
    train_wrapper=(benchmarks/step_profile.py)
    [ "$variant" = deepspeed ] && train_wrapper+=(--deepspeed-zero-checks)
    PREP_KEY=1b-l1024-2gpu train_stage "checks2-${variant}" 0,1 "${quant_settings[@]}" MAX_STEPS=10 \
      LOGGING_STEPS=1 SAVE_STEPS=10 MAX_LENGTH=1024 BATCH_SIZE=4 USE_QUANT=true
  done
  train_wrapper=()
}

case "$suite" in
  scaling) scaling_1gpu 0; scaling_2gpu ;;
  quant) quant_shapes 0 "${QUANT_SHAPES:-1 1024,4 1024,1 2048,4 2048}" ;;
  nf4)
    QUANT_MODES=true quant_shapes 0 "4 2048,1 1024,4 1024,1 2048"
    QUANT_MODES=false QUANT_STOCK=0 quant_shapes 0 "4 2048"
    ;;
  qlora2) qlora_2gpu ;;
  profile) profile_runs ;;
  buckets) bucket_runs ;;
  demo) demo_run demo-1gpu 0; demo_run demo-2gpu 0,1 ;;
  zero) zero_stages ;;
  checks2) two_gpu_check_runs ;;
  stages)
    { pin_to_half_of_cores 0; stage_runs 0 "${STAGES_SHAPE_GPU0:-1 1024}"; } > "$results/gpu0.log" 2>&1 &
    { pin_to_half_of_cores 1; stage_runs 1 "${STAGES_SHAPE_GPU1:-4 2048}"; } > "$results/gpu1.log" 2>&1 &
    wait
    ;;
  versus)
    { pin_to_half_of_cores 0; versus_runs 0 "${VERSUS_SHAPES_GPU0:-4 2048,1 1024}"; } > "$results/gpu0.log" 2>&1 &
    { pin_to_half_of_cores 1; versus_runs 1 "${VERSUS_SHAPES_GPU1:-4 1024,1 2048}"; } > "$results/gpu1.log" 2>&1 &
    wait
    ;;
  zerochecks)
    { pin_to_half_of_cores 0; zerocheck_runs 0 "1 1024"; } > "$results/gpu0.log" 2>&1 &
    { pin_to_half_of_cores 1; zerocheck_runs 1 "4 1024"; } > "$results/gpu1.log" 2>&1 &
    wait
    ;;
  fused)
    { pin_to_half_of_cores 0; fused_runs 0 "${FUSED_SHAPES_GPU0:-4 1024,4 2048}"; } > "$results/gpu0.log" 2>&1 &
    { pin_to_half_of_cores 1; fused_runs 1 "${FUSED_SHAPES_GPU1:-1 1024,1 2048}"; } > "$results/gpu1.log" 2>&1 &
    wait
    ;;
  all)
    # Side by side: the two GPUs share nothing but the host (32 cores), so neither waits on the other.
    { pin_to_half_of_cores 0; scaling_1gpu 0; quant_shapes 0 "4 2048,1 2048"; stock_scaling 0; } > "$results/gpu0.log" 2>&1 &
    { pin_to_half_of_cores 1; demo_run demo-1gpu 1; quant_shapes 1 "1 1024,4 1024"; } > "$results/gpu1.log" 2>&1 &
    wait
    scaling_2gpu
    qlora_2gpu
    demo_run demo-2gpu 0,1
    ;;
  *) echo "usage: $0 scaling|quant|nf4|qlora2|profile|buckets|fused|zerochecks|versus|checks2|stages|demo|zero|all RESULTS_DIR" >&2; exit 2 ;;
esac
touch "$results/done"
