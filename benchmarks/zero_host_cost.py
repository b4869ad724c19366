"""What an optimizer step of DeepSpeed ZeRO costs the host, against stock's torch optimizer, for the
LoRA adapters of a LLaMA shape alone (no base model): an NF4 + LoRA step is bound by the host launching
kernels (BENCHMARKS.md), so per-step host work decides its speed.

Each variant runs in its own process on the same adapter tensors (r=16 on q/k/v/o/gate/up/down of every
layer) with a trivial forward through them, and prints the median wall time of a whole step, the device
synchronised at its end (as the Trainer's per-step `.item()` calls do):
  backward         forward and backward only: the part every variant shares
  stock            + clip_grad_norm_ (foreach) and torch AdamW (fused on a GPU), fp32 adapters, bf16 autocast
  zero2            + DeepSpeed ZeRO-2 as train.py configures it (config.deepspeed_config, one process,
                   bf16, util.fuse_zero_gradient_checks), wrapping the same torch AdamW
  zero2-deepspeed  the same with DeepSpeed's own per-tensor gradient checks
  zero1            ZeRO-1 with the fused checks
Usage: python3 benchmarks/zero_host_cost.py [--hidden 2048 --steps 60 --variants "backward stock zero2"]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VARIANTS = ("backward", "stock", "zero2", "zero2-deepspeed", "zero1")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size; config.py picks the rest (2048: ~1B)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--steps", type=int, default=60, help="timed steps, after 10 untimed")
    parser.add_argument("--variants", default=" ".join(VARIANTS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in this process
    return parser.parse_args()


def adapter_shapes(hidden: int) -> list[tuple[int, int]]:
    """(in, out) of every adapted projection of the topology config.py gives this hidden size."""
    import config

    topology = config.topology_for_hidden(hidden, 32000)
    kv, inter = topology.num_kv_heads * topology.head_dim, topology.intermediate_size
    layer = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
             (hidden, inter), (hidden, inter), (inter, hidden)]
    return layer * topology.num_layers


def adapters(shapes: list[tuple[int, int]], rank: int, device, dtype):
    """LoRA's A and B of every projection, with a forward that runs an input through each pair."""
    import torch

    class Adapters(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(rank, i) * i ** -0.5) for i, _ in shapes])
            self.b = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(o, rank) * 0.01) for _, o in shapes])
            self.inputs = [torch.randn(1, i) for i, _ in shapes]

        def forward(self):
            return sum((x @ a.t() @ b.t()).float().square().mean() for x, a, b in zip(self.inputs, self.a, self.b))

    module = Adapters().to(device=device, dtype=dtype)
    module.inputs = [x.to(device=device, dtype=torch.bfloat16) for x in module.inputs]
    return module


def step_function(variant: str, module, device):
    """One training step of `variant` as a function without arguments."""
    import torch

    def adamw(parameters):
        return torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")

    if variant == "backward":
        def step():
            module.zero_grad(set_to_none=True)
            module().backward()
        return step
    if variant == "stock":
        optimizer = adamw(module.parameters())

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = module()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step
    return zero_step_function(variant, module, adamw(module.parameters()))


def zero_step_function(variant: str, module, optimizer):
    import deepspeed

    import config
    import util

    if variant != "zero2-deepspeed":
        util.fuse_zero_gradient_checks()
    stage = 1 if variant == "zero1" else 2
    trainable = sum(p.numel() for p in module.parameters())
    # use_quant=False: the stage as named, not zero_stage_for's choice for 4-bit + LoRA on one process.
    ds_config = config.deepspeed_config(types.SimpleNamespace(zero_stage=stage, use_quant=False), "bf16",
                                        trainable, 1)
    ds_config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=1,
                     gradient_clipping=1.0)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)

    def step():
        engine.backward(engine())
        engine.step()
    return step


def time_variant(args: argparse.Namespace) -> dict:
    """Median milliseconds per step of args.variant, in this process, and the device's name."""
    import torch

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if args.variant.startswith("zero"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(0)
    dtype = torch.float32 if args.variant == "stock" else torch.bfloat16
    step = step_function(args.variant, adapters(adapter_shapes(args.hidden), args.rank, device, dtype),
                         device)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    durations = []
    for index in range(10 + args.steps):
        synchronize()
        started = time.perf_counter()
        step()
        synchronize()
        if index >= 10:
            durations.append(time.perf_counter() - started)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    return {"ms": 1e3 * statistics.median(durations), "device": name}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variants(args: argparse.Namespace) -> tuple[dict[str, float], str]:
    results, device = {}, ""
    for variant in args.variants.split():
        command = [sys.executable, __file__, "--variant", variant, "--hidden", str(args.hidden),
                   "--rank", str(args.rank), "--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{variant} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            raise SystemExit(1)
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        results[variant], device = measured["ms"], measured["device"]
    return results, device


def main() -> int:
    args = parse_args()
    if args.variant:
        print(json.dumps(time_variant(args)))
        return 0
    results, device = run_variants(args)
    shared = results.get("backward")
    tensors = 2 * len(adapter_shapes(args.hidden))
    print(f"{device}: time per step, {tensors} LoRA tensors (hidden {args.hidden}, r {args.rank}), "
          f"median of {args.steps} steps")
    for variant, ms in results.items():
        extra = f" ({ms - shared:+.2f} ms over forward and backward)" if shared is not None and variant != "backward" else ""
        print(f"  {variant:<16} {ms:8.2f} ms/step{extra}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device, "hidden": args.hidden, "tensors": tensors,
                                         "ms_per_step": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
