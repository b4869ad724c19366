"""The Trainer callbacks that train.py trains with, and the step and eval lines they print.

- StepLog: one fixed-format line per logging step on rank 0 (step/total, loss, lr, tokens/s, MFU,
  memory, ETA), an eval line per evaluation, and a stop when the loss is no longer finite.
- TimeAndSignalStop: every rank stops at the same step at the time limit, on SIGTERM, or when
  trainer.sh leaves the stop file, and saves a checkpoint.
- MarkCheckpointComplete: a checkpoint folder gets its completion marker only once it is on disk.
- PerplexitySFTTrainer: TRL's SFTTrainer that logs the perplexity beside every eval loss.

train.py imports this module when training starts: transformers and TRL take seconds to import.
"""

from __future__ import annotations

import math
import resource
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from trl import SFTTrainer

from util import is_main_process, log, sync_tree, world_size, write_json_atomic


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def perplexity(loss: float) -> float:
    """exp(loss), inf where that overflows a float (NaN stays NaN)."""
    return math.inf if loss > 700 else math.exp(loss)


def eval_line(step: int, max_steps: int, logs: dict) -> str:
    return (
        f"eval {step:>6}/{max_steps} | loss {float(logs['eval_loss']):8.4f} | "
        f"perplexity {perplexity(float(logs['eval_loss'])):10.3f} | {logs['eval_runtime']:.1f}s"
    )


class StepLog(TrainerCallback):
    """One fixed-format line per logging step on rank 0; the last step is always logged, so a stage
    shorter than LOGGING_STEPS still has a final loss. `mfu_per_token_per_second`: flops per token over
    the processes' combined peak, which turns tokens/s into MFU (None: not shown)."""

    def __init__(self, mfu_per_token_per_second: float | None):
        self.mfu_per_token_per_second = mfu_per_token_per_second
        self.start_time = self.start_step = self.last_time = None
        self.last_tokens = self.start_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_time = self.last_time = time.time()
        self.start_step, self.last_tokens = state.global_step, state.num_input_tokens_seen
        self.start_tokens = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "eval_loss" in logs:
            log(eval_line(state.global_step, state.max_steps, logs))
        if not logs or "loss" not in logs:
            return
        loss, step = float(logs["loss"]), state.global_step
        now = time.time()
        tokens_per_s = (state.num_input_tokens_seen - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, state.num_input_tokens_seen
        per_step = (now - self.start_time) / max(step - self.start_step, 1)
        mfu = (
            f"mfu {100 * tokens_per_s * self.mfu_per_token_per_second:5.1f}% | "
            if self.mfu_per_token_per_second
            else ""
        )
        log(
            f"step {step:>6}/{state.max_steps} | loss {loss:8.4f} | lr {logs.get('learning_rate', 0):.3e} | "
            f"{tokens_per_s:>9,.0f} tok/s | {mfu}mem {peak_memory_gib():6.2f} GiB | "
            f"eta {format_duration(per_step * (state.max_steps - step))}"
        )
        if not math.isfinite(loss):
            # Stop before this step's checkpoint is written: the last good checkpoint stays.
            control.should_save = False
            control.should_training_stop = True


class TimeAndSignalStop(TrainerCallback):
    """Stops every rank at the same step when `deadline` (a time.time()) passes, on SIGTERM, or when
    `stop_file` appears (trainer.sh traps the container's SIGTERM and leaves it); logs the loss so far
    and saves a checkpoint. Installs its own SIGTERM handler."""

    SIGNAL, TIMER = 2, 1  # the reasons, as numbers that an all-reduce MAX combines across ranks

    def __init__(self, deadline: float, stop_file: Path):
        self.deadline, self.stop_file = deadline, stop_file
        self.signalled = False
        self.stopped_by: str | None = None
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self.signalled = True

    def _local_reason(self) -> int:
        if self.signalled or self.stop_file.exists():
            return self.SIGNAL
        return self.TIMER if time.time() >= self.deadline else 0

    def on_step_end(self, args, state, control, **kwargs):
        reason = torch.tensor([self._local_reason()], device=args.device)
        if distributed():
            dist.all_reduce(reason, op=dist.ReduceOp.MAX)
        if reason.item() and state.global_step < state.max_steps:
            self.stopped_by = "signal" if reason.item() == self.SIGNAL else "timer"
            log(f"Timer stop at step {state.global_step} ({self.stopped_by}): saving a checkpoint")
            control.should_training_stop = True
            control.should_save = True
            control.should_log = True


class MarkCheckpointComplete(TrainerCallback):
    """After every rank has written its part of a checkpoint, rank 0 flushes the folder to disk and
    writes the completion marker (`marker`, a file name) last: a folder without it was cut short and
    is never resumed."""

    def __init__(self, marker: str):
        self.marker = marker

    def on_save(self, args, state, control, **kwargs):
        if distributed():
            dist.barrier()
        if is_main_process():
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            started = time.time()
            sync_tree(folder)
            write_json_atomic(folder / self.marker, {"step": state.global_step, "processes": world_size()})
            log(f"checkpoint: {folder.name} complete (flushed to disk in {time.time() - started:.1f}s)")


class PerplexitySFTTrainer(SFTTrainer):
    """TRL's SFTTrainer that logs the perplexity beside every eval loss, for the tracker and the log."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = perplexity(float(logs["eval_loss"]))
        super().log(logs, start_time)
