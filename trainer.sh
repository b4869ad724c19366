#!/usr/bin/env bash
# train-llama: run the next stage of the curriculum (or, with RUN_ALL=true, every remaining stage):
# checks, preparation, DeepSpeed training on every GPU (or CPU), publishing, run-state update.
# All configuration is environment variables; see README.md.
set -euo pipefail
cd "$(dirname "$0")"

export TRAINER_STARTED_AT=${TRAINER_STARTED_AT:-$(date +%s)}
export TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python3}
current_stage=setup

elapsed() { local s=$(( $(date +%s) - ${TRAINER_STARTED_AT%.*} )); printf '%dh%02dm%02ds' $((s/3600)) $((s%3600/60)) $((s%60)); }
on_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "trainer.sh: stage '$current_stage' failed (exit $rc) after $(elapsed); nothing after it ran" >&2
    # The other nodes stop waiting for this one (nodes.py); best effort: WORK_DIR may be the problem.
    if [ "${nnodes:-1}" -gt 1 ]; then "$PYTHON" nodes.py failed "$current_stage" "$rc" 2>/dev/null || true; fi
  fi
}
trap on_exit EXIT
section() { current_stage=$1; echo; echo "=== $1 ($(elapsed))"; }

# Runs the launcher in the background so that a SIGTERM (a Space or container being stopped) reaches
# this script at once; it asks train.py, through the stop file, to save a checkpoint and finish.
run_training() {
  local stop_file=$1; shift
  rm -f "$stop_file"
  "$@" &
  local pid=$! rc=0
  trap 'echo "trainer.sh: stop requested; training saves and stops"; touch "$stop_file"' TERM INT
  while true; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - TERM INT
  return "$rc"
}

# --- Checks: before any GPU time is spent -----------------------------------------------------
section "configuration"
"$PYTHON" config.py
section "preflight"
"$PYTHON" preflight.py
section "environment validation"
"$PYTHON" validate_setup.py --reuse

# One Python start for every setting the stages below need: name=value lines, read into these names only.
settings_lines=$("$PYTHON" util.py shell-settings)
while IFS='=' read -r name value; do
  case $name in
    work_dir|output_dir|run_all|processes|gpus|node_rank|nnodes|launcher_args)
      printf -v "$name" '%s' "$value" ;;
    *) echo "trainer.sh: util.py shell-settings printed an unknown name '$name'" >&2; exit 2 ;;
  esac
done <<< "$settings_lines"
read -r -a launcher_args <<< "$launcher_args"
launcher=(deepspeed "${launcher_args[@]}")
if [ "$gpus" -eq 0 ]; then
  # DeepSpeed's CPU accelerator: gloo communication, one BLAS thread pool per process.
  export DS_ACCELERATOR=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / processes > 0 ? $(nproc) / processes : 1 ))}
fi
nodes_note=$([ "$nnodes" -gt 1 ] && echo " on node $node_rank of $nnodes" || true)
echo "training on $processes process(es), $gpus GPU(s)$nodes_note"

# --- The curriculum: one stage, or all remaining ones ------------------------------------------
stage_round=0  # the stages of this run, counted alike on every node
while true; do
  stage_round=$((stage_round + 1))
  section "prepare (tokenizer, dataset, model)"
  if [ "$node_rank" -eq 0 ]; then
    "$PYTHON" prep.py
  else
    "$PYTHON" nodes.py wait-prep
  fi
  section "train"
  run_training "$work_dir/STOP" "${launcher[@]}" train.py
  # Exit 3 of advance (config.ExitCode.INCOMPLETE): the stage stopped early and stays current; rerun resumes.
  advance_rc=0
  if [ "$node_rank" -eq 0 ]; then
    section "publish"
    "$PYTHON" util.py publish
    section "advance run state"
    "$PYTHON" util.py advance || advance_rc=$?
    if [ "$nnodes" -gt 1 ]; then "$PYTHON" nodes.py advanced "$stage_round" "$advance_rc"; fi
  else
    section "wait for node 0 to publish"
    advance_rc=$("$PYTHON" nodes.py wait-advanced "$stage_round")
  fi
  [ "$advance_rc" -eq 3 ] && break
  [ "$advance_rc" -eq 0 ] || exit "$advance_rc"
  [ "$run_all" = true ] || break
  grep -q '"done": true' "$output_dir/run_state.json" && break
  # From here on the state file, not the first stage's INIT/INST, says what runs next.
  unset INIT INST
done

current_stage=finished
echo
echo "trainer.sh: finished in $(elapsed); models in $output_dir"
