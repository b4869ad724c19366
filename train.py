"""Stage 2: train the prepared model with TRL's SFTTrainer under DeepSpeed, on every GPU or on CPU.

Reads WORK_DIR/prep (tokenizer, model, tokenized dataset), writes checkpoints to WORK_DIR/checkpoints
(resumed after a crash) and the final model with its summary to WORK_DIR/trained. Launched by
trainer.sh as `deepspeed --num_gpus=N train.py`; the launcher's `--local_rank` argument is ignored
(the rank comes from the environment).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import config
import memory
import util
from util import is_main_process, local_rank, log, one_line, replace_directory, world_size, write_json_atomic

# Written into a checkpoint folder after every rank has saved its part: only such a folder is resumed.
COMPLETE_MARKER = "train-llama-complete.json"
# A failed save with less free space than this is taken for a full disk (see disk_full).
LOW_DISK_BYTES = 64 * 2**20


class TrainingStopped(RuntimeError):
    """The loss or the logits became NaN/inf: nothing is published from this run."""


def check_preparation(settings: config.Settings) -> dict:
    """The prep manifest, after checking it belongs to this stage."""
    manifest_path = settings.prep_dir / "manifest.json"
    if not manifest_path.is_file():
        raise SystemExit(f"train: {manifest_path} is missing; run `python3 prep.py` first (trainer.sh does)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("stage_key") != settings.stage_key():
        raise SystemExit(
            f"train: {settings.prep_dir} was prepared for another stage "
            f"({manifest.get('phase')} INIT={manifest.get('stage_key', {}).get('init')}); "
            "run `python3 prep.py` for this one"
        )
    return manifest


def checkpoint_world_size(checkpoint: Path) -> int | None:
    """How many processes wrote a Trainer checkpoint under DeepSpeed ZeRO: one optimizer-state shard
    per data-parallel rank; None where the state is not sharded (ZeRO-0) or there is none."""
    shards = checkpoint.glob("global_step*/*zero_pp_rank_*_optim_states.pt")
    ranks = {match.group(1) for path in shards if (match := re.search(r"zero_pp_rank_(\d+)_", path.name))}
    return len(ranks) or None


def needs_universal(checkpoint: Path, processes: int) -> bool:
    """Whether ZeRO's optimizer state in `checkpoint` is split for another number of processes, so that
    it must go through DeepSpeed's universal checkpoint (which holds every parameter's state whole)."""
    written_by = checkpoint_world_size(checkpoint)
    return written_by is not None and written_by != processes


def deepspeed_state(checkpoint: Path) -> Path:
    """The DeepSpeed state in a Trainer checkpoint: the folder its `latest` file names (global_step<N>)."""
    return checkpoint / (checkpoint / "latest").read_text().strip()


def convert_to_universal(checkpoint: Path, processes: int) -> str:
    """Convert the ZeRO state of `checkpoint` with DeepSpeed's ds_to_universal (rank 0 only), unless a
    finished conversion is there already, and point DeepSpeed's `latest_universal` at it; returns the
    log line. The conversion is written to a temporary folder and renamed when complete, so a kill
    leaves the original state untouched and the next run converts again."""
    import contextlib
    import io
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    written_by, state = checkpoint_world_size(checkpoint), deepspeed_state(checkpoint)
    target = state.with_name(f"{state.name}_universal")
    started = time.time()
    if target.is_dir():
        done = "reusing its universal form converted earlier"
    else:
        util.remove_stale_temporaries(checkpoint)  # a conversion that a kill cut short
        chatter = io.StringIO()  # ds_to_universal prints its progress; the log gets one line
        try:
            with (
                util.atomic_directory(target) as staging,
                contextlib.redirect_stdout(chatter),
                contextlib.redirect_stderr(chatter),
            ):
                # One worker each: forking a process that already runs torch's threads can hang.
                ds_to_universal.main(
                    Namespace(
                        input_folder=str(state),
                        output_folder=str(staging),
                        num_extract_workers=1,
                        num_merge_workers=1,
                        keep_temp_folder=False,
                        strict=True,
                        inject_missing_state=True,
                    )
                )
        except Exception as err:
            raise SystemExit(
                f"train: converting {checkpoint} (written by {written_by} process(es)) to "
                f"DeepSpeed's universal checkpoint failed: {one_line(err, 200)}; run on "
                f"{written_by} GPU(s) (NUM_PROCESSES={written_by}) to resume it as it is, or "
                f"delete {checkpoint.parent} to start this stage over"
            ) from err
        done = f"converted its ZeRO state to DeepSpeed's universal checkpoint in {time.time() - started:.1f}s"
    # ds_to_universal named its temporary folder in `latest_universal`; name the final one.
    util.write_text_atomic(checkpoint / "latest_universal", target.name)
    return (
        f"train: {checkpoint.name} was written by {written_by} training process(es) and this run has "
        f"{processes}: {done} ({target}); resuming from it"
    )


def resolve_precision(settings: config.Settings) -> str:
    import torch

    if not torch.cuda.is_available():
        # fp16 autocast is not supported on CPU; bf16 works when asked for explicitly.
        return "bf16" if settings.precision == "bf16" or settings.use_quant else "fp32"
    if settings.precision != "auto":
        return settings.precision
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def checkpoint_step(folder: Path) -> int | None:
    match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
    return int(match.group(1)) if match and folder.is_dir() else None


def stage_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The Trainer's checkpoint folders, oldest step first."""
    steps = {path: checkpoint_step(path) for path in checkpoint_dir.glob("checkpoint-*")}
    return sorted((path for path, step in steps.items() if step is not None), key=steps.__getitem__)


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_MARKER).is_file()


def discard_incomplete_checkpoints(checkpoint_dir: Path) -> None:
    """Remove the checkpoint folders a kill or a full disk left half written (no completion marker):
    the Trainer would resume from the newest folder whatever it holds, and rotate out a good one."""
    for checkpoint in stage_checkpoints(checkpoint_dir):
        if not is_complete(checkpoint):
            log(
                f"train: {checkpoint} is incomplete (its save was interrupted); removed, the run resumes "
                "from the last complete checkpoint"
            )
            shutil.rmtree(checkpoint)


def key_differences(old: Any, new: dict) -> str:
    if not isinstance(old, dict):
        return "no readable stage record"
    return ", ".join(f"{name} {old.get(name)!r} -> {new[name]!r}" for name in new if old.get(name) != new[name])


def trained_stage_key(settings: config.Settings) -> Any:
    """The stage whose training finished last (WORK_DIR/trained), or None."""
    summary = util.read_json(settings.trained_dir / "summary.json")
    return summary.get("stage_key") if isinstance(summary, dict) and summary.get("completed") else None


def clear_other_stage(settings: config.Settings, old_key: Any) -> None:
    """Make way for this stage's checkpoints, saying what happens to another stage's. Those of the
    stage that finished training last are spent (its model is in WORK_DIR/trained) and are removed;
    any others were cut short by a change of settings (SEED, dataset, size), so they are moved to
    WORK_DIR/checkpoints.set-aside (replacing an older set-aside) rather than lost without a word."""
    checkpoints = stage_checkpoints(settings.checkpoint_dir)
    if checkpoints and old_key is not None and old_key == trained_stage_key(settings):
        log(f"train: removing the checkpoints of {util.stage_text(old_key)}, which finished training")
    elif checkpoints:
        aside = settings.work_dir / "checkpoints.set-aside"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(settings.checkpoint_dir, aside)
        log(
            f"train: the checkpoints in {settings.checkpoint_dir} belong to another stage "
            f"({util.stage_text(old_key)}; {key_differences(old_key, settings.stage_key())}); moved to {aside}. "
            f"Restore that stage's settings and move them back to resume it, or delete {aside} to free the space"
        )
    shutil.rmtree(settings.checkpoint_dir, ignore_errors=True)


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    return [path for path in stage_checkpoints(checkpoint_dir) if is_complete(path)]


def resume_checkpoint(settings: config.Settings) -> str | None:
    """The newest complete checkpoint of this same stage, or None. Half-written checkpoints are removed,
    and the checkpoints of another stage set aside, by rank 0; every rank picks among complete ones."""
    stage_file = settings.checkpoint_dir / "stage.json"
    old_key = util.read_json(stage_file)
    if old_key == settings.stage_key():
        if is_main_process():
            discard_incomplete_checkpoints(settings.checkpoint_dir)
        complete = complete_checkpoints(settings.checkpoint_dir)
        return str(complete[-1]) if complete else None
    if is_main_process():
        # Clear before writing stage.json, so another rank never pairs the new key with old checkpoints.
        clear_other_stage(settings, old_key)
        write_json_atomic(stage_file, settings.stage_key())
    return None


def finished_summary(settings: config.Settings) -> dict | None:
    """The summary of this stage's completed training, when a run was stopped after it (while
    publishing, say): the rerun goes on to publish instead of training again."""
    summary = util.read_json(settings.trained_dir / "summary.json")
    same = isinstance(summary, dict) and summary.get("stage_key") == settings.stage_key()
    return summary if same and summary.get("completed") else None


def sanity_forward(model, dataset) -> None:
    """The original's check before spending compute: one forward pass must give finite logits."""
    import torch

    rows = [dataset[i]["input_ids"][:64] for i in range(min(2, len(dataset)))]
    length = min(len(r) for r in rows)
    batch = torch.tensor([r[:length] for r in rows], device=model.device)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch).logits
    model.train()
    if not torch.isfinite(logits).all():
        raise TrainingStopped(
            "sanity check failed: the model's logits are not finite before training; "
            "the prepared model is broken (delete WORK_DIR/prep and rerun prep.py)"
        )
    log(
        f"sanity check: forward pass on {tuple(batch.shape)} gives finite logits "
        f"(mean |logit| {logits.float().abs().mean().item():.3f})"
    )


# Dense 16-bit tensor-core peak of the cards MFU is reported for (FLOP/s; the vendors' data sheets).
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


def peak_flops(card: str) -> float | None:
    """The card's 16-bit peak, matched by name; None for a card not listed (no MFU is shown)."""
    return next((flops for name, flops in PEAK_FLOPS if name in card), None)


def flops_per_token(topology: config.Topology, vocab_rows: int, max_length: int) -> float:
    """What training must compute per token, forward and backward, not counting recomputation:
    6 x the non-embedding parameters (the matmuls), 6 x vocab x hidden (the LM head) and
    12 x layers x hidden x MAX_LENGTH (attention scores and their weighted sum, causal mask ignored),
    PaLM's accounting; the basis of the MFU in the step line and the summary."""
    non_embedding = topology.parameter_count(vocab_rows) - 2 * vocab_rows * topology.hidden_size
    return (
        6 * non_embedding
        + 6 * vocab_rows * topology.hidden_size
        + 12 * topology.num_layers * topology.hidden_size * max_length
    )


def logged_losses(log_history: list[dict]) -> list[tuple[int, float]]:
    """(step, loss) of every logged step of this stage. The Trainer keeps its log history in each
    checkpoint, so a resumed run, even one resumed at the final step, still has the whole curve."""
    return [(entry["step"], float(entry["loss"])) for entry in log_history if "loss" in entry and "step" in entry]


def logged_eval_losses(log_history: list[dict]) -> list[tuple[int, float]]:
    """(step, eval loss) of every evaluation of this stage, from the Trainer's log history."""
    return [(entry["step"], float(entry["eval_loss"])) for entry in log_history if "eval_loss" in entry]


def make_callbacks(settings: config.Settings, stop_file: Path, mfu_per_token_per_second: float | None):
    """The step logger (with the NaN guard), the time/signal stop and the checkpoint completion marker
    (callbacks.py). `mfu_per_token_per_second`: flops_per_token over the processes' combined peak."""
    import callbacks

    deadline = (settings.started_at or time.time()) + settings.time_limit_minutes * 60
    return (
        callbacks.StepLog(mfu_per_token_per_second),
        callbacks.TimeAndSignalStop(deadline, stop_file),
        callbacks.MarkCheckpointComplete(COMPLETE_MARKER),
    )


def training_arguments(
    settings: config.Settings,
    plan,
    precision: str,
    use_cpu: bool,
    fused_kernels: bool,
    trainable_parameters: int,
    eval_batch: int | None,
    universal: bool,
):
    """The Trainer's arguments. `eval_batch`: the per-process batch of the eval split (None: no
    evaluation); `universal`: the resumed checkpoint's ZeRO state is loaded from its universal form
    (written by another number of processes, see convert_to_universal)."""
    from trl import SFTConfig

    import quant_utils

    deepspeed = config.deepspeed_config(settings, precision, trainable_parameters, world_size())
    if universal:
        deepspeed["checkpoint"] = {"load_universal": True}

    return SFTConfig(
        output_dir=str(settings.checkpoint_dir),
        per_device_train_batch_size=plan.batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        num_train_epochs=settings.run_epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,  # a float below 1 is a fraction of the run's steps: the original's 10%
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=plan.gradient_checkpointing,
        gradient_checkpointing_kwargs=quant_utils.CHECKPOINTING_KWARGS,
        # Liger's RMSNorm, SwiGLU and RoPE kernels; TRL keeps its own fused LM head for the loss.
        use_liger_kernel=fused_kernels,
        deepspeed=deepspeed,
        use_cpu=use_cpu,
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=settings.logging_steps,
        save_steps=settings.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if eval_batch else "no",
        eval_steps=settings.eval_steps,
        per_device_eval_batch_size=eval_batch or plan.batch_size,
        # The loss only: gathering the logits of the whole split would cost vocabulary x length each.
        prediction_loss_only=True,
        report_to=settings.report_to,
        disable_tqdm=True,
        log_level="warning",
        include_num_input_tokens_seen="non_padding",
        max_length=settings.max_length,
        packing=False,  # pretraining rows are packed by prep.py; instruct rows are single conversations
        # On a GPU few distinct padded lengths (each new shape may cost an attention kernel a fresh
        # plan); on a CPU every padding token costs its full share of compute.
        pad_to_multiple_of=8 if use_cpu else 64,
        dataset_num_proc=None,
        dataloader_num_workers=0,
        # A partial last batch is split differently on 1 and on N processes; dropping it keeps every
        # step's batch the same at any world size (the same global batch gives the same loss curve).
        dataloader_drop_last=True,
    )


def load_eval_split(settings: config.Settings):
    """prep.py's held-out sequences (WORK_DIR/prep/eval_dataset), or None where it held none out."""
    import datasets

    folder = settings.prep_dir / "eval_dataset"
    return datasets.load_from_disk(str(folder)) if folder.is_dir() else None


def eval_batch_size(rows: int, batch_size: int, processes: int) -> int | None:
    """The per-process batch of the eval split: the training micro-batch, smaller where the split
    holds less than one such batch for every process (the Trainer drops a partial last batch, as in
    training); None where the split cannot give every process a row."""
    return min(batch_size, rows // processes) if rows >= processes else None


def plan_evaluation(settings: config.Settings, eval_split, batch_size: int) -> tuple[int | None, int]:
    """The eval batch (None: no evaluation) and the sequences each evaluation measures (whole batches
    on every process), with a log line saying so."""
    if eval_split is None:
        log("eval: no held-out split in the preparation (EVAL_ROWS=0, or too small a shard); no eval loss")
        return None, 0
    batch = eval_batch_size(len(eval_split), batch_size, world_size())
    if batch is None:
        log(
            f"eval: the held-out split's {len(eval_split)} sequence(s) cannot give each of the "
            f"{world_size()} processes one; no eval loss for this stage"
        )
        return None, 0
    measured = len(eval_split) // (batch * world_size()) * batch * world_size()
    log(
        f"eval: loss and perplexity on {measured:,} held-out sequences every {settings.eval_steps} steps and at the end"
    )
    return batch, measured


def prepare_tracker(settings: config.Settings, trainer, resume: str | None) -> None:
    """Point the Trainer's TensorBoard callback (REPORT_TO=tensorboard) at settings.tensorboard_dir, not
    at a folder inside the rotated checkpoints; a stage that starts over starts with an empty folder.
    The callback writes on rank 0 only."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(settings.tensorboard_dir)
            if is_main_process() and resume is None:
                shutil.rmtree(settings.tensorboard_dir, ignore_errors=True)
            log(
                f"tracking: TensorBoard events in {settings.tensorboard_dir} "
                f"(tensorboard --logdir {settings.tensorboard_dir.parent})"
            )


def final_evaluation(trainer, evaluates: bool, stopped_early: bool) -> list[tuple[int, float]]:
    """Every eval loss of the stage, after evaluating the final model unless the last step just was
    (or training was stopped early, when time is short)."""
    losses = logged_eval_losses(trainer.state.log_history)
    if evaluates and not stopped_early and (not losses or losses[-1][0] != trainer.state.global_step):
        trainer.evaluate()
        losses = logged_eval_losses(trainer.state.log_history)
    return losses


def batch_plan(settings: config.Settings):
    """The micro-batch, accumulation and checkpointing of this run (memory.plan_batch; every process
    computes the same), and the machine it was planned for."""
    machine = memory.machine_for(settings, world_size())
    try:
        return memory.plan_batch(settings, machine), machine
    except memory.BatchError as err:
        raise SystemExit(f"train: {err}") from None


def zero_setup(settings: config.Settings, trainable: int) -> tuple[int, tuple[int, bool] | None]:
    """The ZeRO stage and gradient buckets that deepspeed_config chose (ZeRO-0 has no buckets), for the
    log and the summary; logs what differs from the settings."""
    zero_stage = config.zero_stage_for(settings, world_size())
    if zero_stage != settings.zero_stage:
        log(
            f"note: ZERO_STAGE={settings.zero_stage} runs as ZeRO-{zero_stage}: one process has nothing to "
            "partition, and ZeRO-1's optimizer step costs less host time for LoRA's many small tensors"
        )
    return zero_stage, config.deepspeed_buckets(trainable, world_size()) if zero_stage else None


def bucket_note(buckets: tuple[int, bool] | None) -> str:
    if buckets is None:
        return ""
    elements, overlap = buckets
    return f" ({elements:,}-element gradient buckets{', overlapped' if overlap else ''})"


def chat_token_ids(tokenizer) -> list[int]:
    """The chat markers' ids (none before instruction tuning adds them)."""
    vocabulary = tokenizer.get_vocab()
    return sorted(vocabulary[token] for token in config.CHAT_TOKENS if token in vocabulary)


def load_model(settings: config.Settings, checkpointing: bool, local_rank: int, chat_tokens: list[int]):
    """The prepared model: full weights, or (USE_QUANT) an NF4-quantized base with LoRA adapters and
    trainable embedding and LM-head rows for the chat markers."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = settings.prep_dir / "model"
    if settings.use_quant:
        import quant_utils

        # Under DeepSpeed each rank holds its own quantized copy on its own GPU (never device_map="auto").
        device_map = {"": local_rank} if torch.cuda.is_available() else None
        model, trainable, total = quant_utils.load_for_training(
            model_dir,
            True,
            dtype=torch.bfloat16,
            device_map=device_map,
            gradient_checkpointing=checkpointing,
            trained_tokens=chat_tokens,
        )
    else:
        # fp32 weights: DeepSpeed keeps fp32 master weights and casts the model for bf16/fp16 itself.
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        total = trainable = sum(p.numel() for p in model.parameters())
    log(
        f"model: {total:,} parameters, {trainable:,} trained ({100 * trainable / total:.2f}%)"
        f"{', 4-bit NF4 base + LoRA' if settings.use_quant else ''}"
    )
    return model, trainable, total


def save_trained(settings, trainer, tokenizer, summary: dict) -> None:
    """Write WORK_DIR/trained atomically: the 16-bit model (LoRA merged) with the curriculum's loss
    history and plot (util.write_history), the adapter, the summary.

    Every rank calls this (gathering ZeRO-3 shards is collective); rank 0 writes and renames."""
    import quant_utils

    staging = settings.work_dir / ".trained-staging"
    trainer.save_model(str(staging / ("adapter" if settings.use_quant else "model")))
    trainer.accelerator.wait_for_everyone()
    if not is_main_process():
        return
    if settings.use_quant:
        quant_utils.merge_lora_to_16bit(trainer.accelerator.unwrap_model(trainer.model), staging / "model")
        if not settings.save_adapter:
            shutil.rmtree(staging / "adapter")
    tokenizer.save_pretrained(staging / "model")
    earlier = util.read_history(settings.prep_dir / util.HISTORY_FILE)
    util.write_history(staging / "model", util.extend_history(earlier, summary))
    write_json_atomic(staging / "summary.json", summary)
    replace_directory(staging, settings.trained_dir)


def print_summary(summary: dict) -> None:
    from callbacks import format_duration

    log("=" * 72)
    log(
        f"training {'complete' if summary['completed'] else 'stopped by ' + str(summary['stopped_by'])}: "
        f"{summary['phase']} INIT={summary['stage_key']['init']} shard {summary['stage_key']['shard_index']}"
    )
    log(f"  steps          {summary['steps']}/{summary['total_steps']}")
    log(f"  tokens seen    {summary['tokens_seen']:,}")
    log(f"  loss           {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}")
    if summary["eval_loss"] is not None:
        log(
            f"  eval loss      {summary['eval_loss']:.4f} (perplexity {summary['eval_perplexity']:.3f}, "
            f"{summary['eval_sequences']:,} held-out sequences)"
        )
    mfu = f", MFU {100 * summary['mfu']:.1f}%" if summary["mfu"] is not None else ""
    log(f"  wall time      {format_duration(summary['wall_seconds'])} ({summary['tokens_per_second']:,.0f} tok/s{mfu})")
    log(
        f"  peak memory    {summary['peak_memory_gib']:.2f} GiB per process "
        f"(estimated {summary['estimated_peak_gib']:.2f}), {summary['world_size']} process(es)"
    )
    log("=" * 72)


def quiet_libraries() -> None:
    """transformers' and datasets' progress bars and warnings off: StepLog's lines are the log."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def clear_leftovers(settings: config.Settings) -> None:
    """What an earlier, killed run of this stage left (rank 0): the stop file, a half-written
    WORK_DIR/trained, temporary files among the checkpoints. prep.py has cleaned WORK_DIR itself."""
    if is_main_process():
        (settings.work_dir / "STOP").unlink(missing_ok=True)
        shutil.rmtree(settings.work_dir / ".trained-staging", ignore_errors=True)
        util.remove_stale_temporaries(settings.checkpoint_dir)


@dataclass
class Inputs:
    """What prep.py prepared, loaded: the tokenizer, the training rows, the held-out rows (or None),
    and the model with its trainable and total parameter counts and embedding rows."""

    tokenizer: Any
    dataset: Any
    eval_split: Any
    model: Any
    trainable: int
    total: int
    vocab_rows: int


def load_inputs(settings: config.Settings, checkpointing: bool, use_cpu: bool) -> Inputs:
    import datasets
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.prep_dir / "tokenizer")
    dataset = datasets.load_from_disk(str(settings.prep_dir / "dataset"))
    eval_split = load_eval_split(settings)
    # LoRA's adapters are drawn when load_model attaches them, before the Trainer seeds, and torch
    # seeds itself randomly at start-up: without this SEED would not repeat a USE_QUANT run.
    transformers.set_seed(settings.seed)
    model, trainable, total = load_model(settings, checkpointing, local_rank(), chat_token_ids(tokenizer))
    if not use_cpu and not settings.use_quant:
        model.to(f"cuda:{local_rank()}")  # DeepSpeed would move it anyway; the sanity check then runs on the GPU
    if is_main_process():
        sanity_forward(model, dataset)
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    return Inputs(tokenizer, dataset, eval_split, model, trainable, total, vocab_rows)


def training_summary(settings: config.Settings, manifest: dict, trainer, inputs: Inputs, run: dict) -> dict:
    """summary.json: what was trained, how it went, and on what (`run`: the plan, the card, the
    callbacks, the eval losses and timings that run_training gathered)."""
    from callbacks import peak_memory_gib, perplexity

    state, plan, machine = trainer.state, run["plan"], run["machine"]
    losses, eval_losses, stopper = logged_losses(state.log_history), run["eval_losses"], run["stopper"]
    tokens_per_second = (state.num_input_tokens_seen - run["step_log"].start_tokens) / max(run["wall"], 1e-9)
    mfu = run["mfu_per_token_per_second"]
    return {
        "stage_key": settings.stage_key(),
        "phase": settings.phase,
        "completed": stopper.stopped_by is None,
        "stopped_by": stopper.stopped_by,
        "steps": state.global_step,
        "total_steps": state.max_steps,
        "tokens_seen": int(state.num_input_tokens_seen),
        "first_loss": losses[0][1] if losses else math.nan,
        "final_loss": losses[-1][1] if losses else math.nan,
        "losses": losses,
        "wall_seconds": run["wall"],
        "eval_losses": eval_losses,
        "eval_loss": eval_losses[-1][1] if eval_losses else None,
        "eval_perplexity": perplexity(eval_losses[-1][1]) if eval_losses else None,
        "eval_sequences": run["eval_sequences"],
        "report_to": settings.report_to,
        "tokens_per_second": tokens_per_second,
        "mfu": tokens_per_second * mfu if mfu else None,
        "flops_per_token": run["token_flops"],
        "peak_memory_gib": peak_memory_gib(),
        "estimated_peak_gib": plan.estimate["allocated"] / memory.GIB,
        "parameters": inputs.total,
        "trainable_parameters": inputs.trainable,
        "precision": run["precision"],
        "world_size": trainer.accelerator.num_processes,
        "use_quant": settings.use_quant,
        "is_last_shard": manifest["is_last_shard"],
        "topology": settings.stage_key()["topology"],
        "vocab_rows": inputs.vocab_rows,
        "batch_size": plan.batch_size,
        "max_length": settings.max_length,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "global_batch_size": plan.global_batch,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "zero_stage": run["zero_stage"],
        "deepspeed_buckets": run["buckets"],
        "fused_kernels": machine.fused_kernels,
        "card": run["card"],
    }


def run_training(settings: config.Settings, manifest: dict) -> int:
    import torch
    from transformers.trainer_callback import PrinterCallback

    from callbacks import PerplexitySFTTrainer

    quiet_libraries()
    use_cpu = not torch.cuda.is_available()
    if not use_cpu:
        torch.cuda.set_device(local_rank())
    precision = resolve_precision(settings)
    plan, machine = batch_plan(settings)
    resume = resume_checkpoint(settings)
    universal = bool(resume) and needs_universal(Path(resume), world_size())
    clear_leftovers(settings)
    inputs = load_inputs(settings, plan.gradient_checkpointing, use_cpu)

    eval_batch, eval_sequences = plan_evaluation(settings, inputs.eval_split, plan.batch_size)
    args = training_arguments(
        settings, plan, precision, use_cpu, machine.fused_kernels, inputs.trainable, eval_batch, universal
    )
    zero_stage, buckets = zero_setup(settings, inputs.trainable)
    card = "CPU" if use_cpu else torch.cuda.get_device_name()
    token_flops = flops_per_token(settings.topology, inputs.vocab_rows, settings.max_length)
    card_flops = peak_flops(card)
    # Tokens/s (of all processes) times this is the MFU; None where the card's peak is not known.
    mfu_per_token_per_second = token_flops / (card_flops * world_size()) if card_flops else None
    step_log, stopper, marker = make_callbacks(settings, settings.work_dir / "STOP", mfu_per_token_per_second)
    trainer = PerplexitySFTTrainer(
        model=inputs.model,
        args=args,
        train_dataset=inputs.dataset,
        eval_dataset=inputs.eval_split if eval_batch else None,
        processing_class=inputs.tokenizer,
        callbacks=[step_log, stopper, marker],
    )
    trainer.remove_callback(PrinterCallback)  # StepLog prints the one fixed-format line instead
    prepare_tracker(settings, trainer, resume)
    if universal:
        if is_main_process():
            log(convert_to_universal(Path(resume), world_size()))
        trainer.accelerator.wait_for_everyone()  # the other ranks load what rank 0 converted
    log(memory.describe_plan(plan, settings.max_length))
    log(
        f"training: {len(inputs.dataset):,} sequences, {settings.run_epochs:g} epochs, {precision}, "
        f"ZeRO-{zero_stage}{bucket_note(buckets)}, {'Liger kernels' if machine.fused_kernels else 'no fused kernels'}; "
        f"estimated peak {memory.gib(plan.estimate['allocated'])} allocated per process"
        + (f", resuming from {resume}" if resume else "")
    )
    started = time.time()
    trainer.train(resume_from_checkpoint=resume)
    losses = logged_losses(trainer.state.log_history)
    if losses and not math.isfinite(losses[-1][1]):
        raise TrainingStopped(
            f"training stopped: the loss became {losses[-1][1]} at step {losses[-1][0]}; "
            f"the last good checkpoint in {settings.checkpoint_dir} is kept and nothing is "
            "published (lower LEARNING_RATE, or use PRECISION=bf16 instead of fp16)"
        )
    wall = time.time() - started
    eval_losses = final_evaluation(trainer, eval_batch is not None, stopper.stopped_by is not None)
    summary = training_summary(
        settings,
        manifest,
        trainer,
        inputs,
        {
            "plan": plan,
            "machine": machine,
            "precision": precision,
            "card": card,
            "zero_stage": zero_stage,
            "buckets": buckets,
            "token_flops": token_flops,
            "mfu_per_token_per_second": mfu_per_token_per_second,
            "step_log": step_log,
            "stopper": stopper,
            "wall": wall,
            "eval_losses": eval_losses,
            "eval_sequences": eval_sequences,
        },
    )
    save_trained(settings, trainer, inputs.tokenizer, summary)
    print_summary(summary)
    return config.ExitCode.OK


def disk_full(err: BaseException) -> bool:
    """Whether a failed write ran out of space. torch.save reports a full disk as a RuntimeError
    without errno ("unexpected pos ..."), so a failure with almost no space left counts too."""
    chained: BaseException | None = err
    while chained is not None:
        if isinstance(chained, OSError) and chained.errno in util.DISK_FULL_ERRORS:
            return True
        if "No space left on device" in str(chained):
            return True
        chained = chained.__cause__ or chained.__context__
    return False


def free_bytes(settings: config.Settings) -> int:
    """Free space where training writes: the checkpoints' filesystem and WORK_DIR's (the final save)."""
    folders = [folder for folder in (settings.checkpoint_dir, settings.work_dir) if folder.is_dir()]
    return min((shutil.disk_usage(folder).free for folder in folders), default=0)


def stop_on_full_disk(settings: config.Settings, err: BaseException) -> str:
    """The one line for a checkpoint or final save that ran out of space; the half-written checkpoint
    is removed at once (to give the space back), the complete ones stay."""
    if is_main_process():
        discard_incomplete_checkpoints(settings.checkpoint_dir)
        shutil.rmtree(settings.work_dir / ".trained-staging", ignore_errors=True)
    complete = complete_checkpoints(settings.checkpoint_dir)
    kept = f"the last complete checkpoint, {complete[-1].name}, is kept" if complete else "no checkpoint is complete"
    return (
        f"train: the disk is full ({one_line(err, 160)}) while saving under WORK_DIR={settings.work_dir} "
        f"({free_bytes(settings) / 2**30:.2f} GiB free after removing what was half written); {kept} and "
        "nothing was published; free space there (or set WORK_DIR to a larger disk) and run again: "
        "training resumes from that checkpoint"
    )


def main() -> int:
    settings = config.settings_or_exit(quiet=not is_main_process())
    manifest = check_preparation(settings)
    finished = finished_summary(settings)
    if finished is not None:
        log(
            f"train: {util.stage_text(settings.stage_key())} already finished training ({finished.get('steps')} "
            f"steps, final loss {finished.get('final_loss')}; {settings.trained_dir}); nothing to train, "
            "publishing comes next"
        )
        return config.ExitCode.OK
    try:
        return run_training(settings, manifest)
    except TrainingStopped as err:
        print(f"train: {err}", file=sys.stderr)
        return config.ExitCode.NOT_FINITE
    except Exception as err:
        if not disk_full(err) and free_bytes(settings) > LOW_DISK_BYTES:
            raise
        message = stop_on_full_disk(settings, err)
        if is_main_process():
            print(message, file=sys.stderr, flush=True)
        return config.ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(main())
