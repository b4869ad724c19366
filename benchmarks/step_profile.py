"""Where a training step's time goes: runs a Trainer-based script (train.py, benchmarks/stock_trl.py)
with a torch.profiler window over optimizer steps --first..--last and writes OUT.txt: wall time per
step, CUDA kernels launched per step, the time the GPU was busy per step, then the operator tables.

A step whose GPU is busy for much less than its wall time is bound by the host launching kernels,
and then the number of kernels per step is what to compare. `benchmarks/speed.py --profile` runs it.
Usage (alone, or after `deepspeed` whose --local_rank argument is dropped):
  python3 benchmarks/step_profile.py [--out DIR/name --first 8 --last 12] SCRIPT [SCRIPT ARGS]
Without --out nothing is profiled.
"""

from __future__ import annotations

import argparse
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="profile, and write OUT.txt")
    parser.add_argument("--first", type=int, default=8, help="optimizer step the window starts at")
    parser.add_argument("--last", type=int, default=12, help="optimizer step the window ends at")
    parser.add_argument("script", type=Path)
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    return parser.parse_args([a for a in sys.argv[1:] if not a.startswith("--local_rank")])


def profiler_callback(first: int, last: int, out: Path):
    import torch
    from transformers import TrainerCallback

    def synchronize():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepProfile(TrainerCallback):
        def __init__(self):
            self.profile = None
            self.started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first and self.profile is None:
                synchronize()
                self.started = time.perf_counter()
                activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                self.profile = torch.profiler.profile(activities=activities)
                self.profile.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profile is None or state.global_step != last:
                return
            synchronize()
            wall = time.perf_counter() - self.started
            self.profile.__exit__(None, None, None)
            write_profile(self.profile, last - first, wall, out)
            self.profile = None

    return StepProfile()


def write_profile(profile, steps: int, wall: float, out: Path) -> None:
    import torch

    kernels = [e for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.device_time for e in kernels) / 1e3
    line = (
        f"profile {out.name}: {steps} steps, wall {1e3 * wall / steps:.1f} ms/step, "
        f"{len(kernels) / steps:,.0f} kernels/step, GPU busy {busy_ms / steps:.1f} ms/step"
    )
    table = profile.key_averages()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text(
        line
        + "\n"
        + table.table(sort_by="self_device_time_total", row_limit=35, max_name_column_width=70)
        + table.table(sort_by="count", row_limit=35, max_name_column_width=70)
    )
    print(line, flush=True)


def add_profiler(args: argparse.Namespace) -> None:
    """Every Trainer the script creates gets the profiling callback."""
    import transformers

    callback = profiler_callback(args.first, args.last, args.out)
    trainer_init = transformers.Trainer.__init__

    def init_with_profiler(self, *positional, **keywords):
        trainer_init(self, *positional, **keywords)
        self.add_callback(callback)

    transformers.Trainer.__init__ = init_with_profiler


def main() -> int:
    args = parse_args()
    if args.out:
        add_profiler(args)
    sys.path.insert(0, str(REPO))
    sys.argv = [str(args.script), *args.script_args]
    runpy.run_path(str(args.script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
