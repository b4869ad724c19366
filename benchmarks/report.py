"""Print the benchmark table from the runs that gpu_benchmarks.sh left in a results folder.

For each run: the card, processes, parameters, median tokens/s over the logged steps after the first
(the first includes start-up), MFU, peak memory per GPU (torch's max allocated) and preflight's
estimate of it; stock TRL's runs of the same shapes; then the ratios measured in the same call
(GPUs, NF4 against full, this pipeline against stock) and how closely the 1-GPU and 2-GPU loss
curves agree.
Usage: python3 benchmarks/report.py RESULTS_DIR
"""
from __future__ import annotations

import functools
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import config  # noqa: E402
import preflight  # noqa: E402

H100_DENSE_BF16 = 989e12  # FLOP/s, the H100 SXM datasheet's dense bf16 figure


def step_lines(log: str) -> list[tuple[int, float, float]]:
    """(step, loss, tokens/s) of the fixed-format step lines."""
    pattern = r"^step\s+(\d+)/\d+ \| loss\s+(\S+) \| lr \S+ \|\s+([\d,]+) tok/s"
    return [(int(s), float(l), float(t.replace(",", ""))) for s, l, t in re.findall(pattern, log, flags=re.M)]


def flops_per_token(summary: dict) -> float:
    """6·N for the weights that compute (the input embedding is a lookup) plus causal attention's
    score and value products, 6·layers·hidden·length forward and backward (PaLM's 12·L·h·T halved
    for the causal mask)."""
    topo = summary["topology"]
    hidden, layers = topo["hidden_size"], topo["num_layers"]
    vocab = summary["vocab_rows"]
    computing = summary["parameters"] - vocab * hidden
    return 6 * computing + 6 * layers * hidden * summary["max_length"]


def estimate_gib(summary: dict) -> float:
    topo = config.Topology(**summary["topology"])
    estimate = preflight.estimate_training_memory(
        topo, summary["vocab_rows"], summary["batch_size"], summary["max_length"], 2, summary["use_quant"],
        summary["gradient_checkpointing"], summary["zero_stage"], summary["world_size"],
        gradient_accumulation_steps=summary["gradient_accumulation_steps"],
        buckets=tuple(summary["deepspeed_buckets"]) if summary.get("deepspeed_buckets") else None)
    return estimate["allocated"] / 2**30


def run_row(name: str, folder: Path) -> tuple[str, dict, list]:
    summary = json.loads((folder / "summary.json").read_text())
    steps = step_lines((folder / "train.log").read_text())
    speed = median_speed(steps)
    per_gpu = speed / summary["world_size"]
    mfu = per_gpu * flops_per_token(summary) / H100_DENSE_BF16
    estimate = estimate_gib(summary)
    row = (f"| {name} | {summary.get('card', '?')} | {summary['world_size']} | {summary['parameters'] / 1e6:,.0f}M | "
           f"{summary['batch_size']}x{summary['max_length']}, GA {summary['gradient_accumulation_steps']} | "
           f"{'NF4+LoRA' if summary['use_quant'] else summary['precision']}"
           f"{', ckpt' if summary['gradient_checkpointing'] else ''} | {speed:,.0f} | "
           f"{100 * mfu:.1f}% | {summary['peak_memory_gib']:.2f} | {estimate:.2f} | "
           f"{estimate / summary['peak_memory_gib']:.2f} |")
    return row, summary, steps


def median_speed(steps: list[tuple[int, float, float]]) -> float:
    """The first logged interval includes start-up: leave it out when there are others."""
    return statistics.median([t for _, _, t in steps[1:]] or [t for _, _, t in steps])


def run_speed(results: Path, name: str) -> float | None:
    """tokens/s of a run: stock's from its JSON, ours the median of its step lines; None if absent."""
    folder = results / name
    if (folder / "stock.json").is_file():
        return json.loads((folder / "stock.json").read_text())["tokens_per_second"]
    return median_speed(step_lines((folder / "train.log").read_text())) if (folder / "summary.json").is_file() else None


def run_peak(results: Path, name: str) -> float | None:
    for path in (results / name / "summary.json", results / name / "stock.json"):
        if path.is_file():
            return json.loads(path.read_text())["peak_memory_gib"]
    return None


def fused_and_versus_pairs(results: Path) -> list[tuple[str, str, str]]:
    """(run, baseline, what) of the fused, zerochecks and versus suites."""
    pairs = []
    for folder in sorted(results.glob("fused-*-b*-l*")):
        variant, shape = re.fullmatch(r"fused-(.+)-(b\d+-l\d+)", folder.name).groups()
        pairs.append((folder.name, f"stock-fused-plain-{shape}", f"{shape}: tokens/s, this pipeline ({variant}) over stock"))
    for folder in sorted(results.glob("stock-fused-liger-b*-l*")):
        shape = folder.name.removeprefix("stock-fused-liger-")
        pairs.append((folder.name, f"stock-fused-plain-{shape}", f"{shape}: tokens/s, stock with Liger over stock"))
    for folder in sorted(results.glob("zerochecks-*-b*-l*-*")):
        variant, shape = re.fullmatch(r"zerochecks-(\w+)-(b\d+-l\d+)-\d+", folder.name).groups()
        for stock in sorted(results.glob(f"stock-zerochecks-{shape}-*")):
            pairs.append((folder.name, stock.name, f"{shape}: tokens/s, {variant} ZeRO checks over stock"))
    for folder in sorted(results.glob("versus-b*-l*-*")):
        shape = folder.name.removeprefix("versus-")
        pairs.append((folder.name, f"stock-versus-{shape}", f"{shape}: tokens/s, this pipeline over stock (round)"))
    return pairs


def print_alternating_rounds(results: Path) -> None:
    """The versus suite's ratio at each shape over its rounds: the mean and the spread."""
    rounds: dict[str, list[float]] = {}
    for folder in sorted(results.glob("versus-b*-l*-*")):
        ours, stock = run_speed(results, folder.name), run_speed(results, f"stock-{folder.name}")
        if ours and stock:
            rounds.setdefault(folder.name.removeprefix("versus-").rsplit("-", 1)[0], []).append(ours / stock)
    for shape, ratios in rounds.items():
        print(f"{shape}: tokens/s, this pipeline over stock in {len(ratios)} alternating rounds: mean "
              f"{statistics.mean(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}")


def print_curve_agreement(curves: dict) -> None:
    one, two = "scaling-1gpu", "scaling-2gpu"
    if one not in curves or two not in curves:
        return
    # Once the model memorises the small corpus the loss nears 0 and relative gaps mean nothing,
    # so the relative gap is taken while the loss is above 1.
    shared = sorted(set(curves[one]) & set(curves[two]))
    gaps = {s: abs(curves[one][s] - curves[two][s]) for s in shared}
    worst = max(shared, key=gaps.get)
    relative = max((gaps[s] / curves[one][s] for s in shared if curves[one][s] > 1), default=0.0)
    print(f"loss curves {one} vs {two}: {len(shared)} shared steps; largest gap {gaps[worst]:.4f} at step "
          f"{worst} ({curves[one][worst]:.4f}/{curves[two][worst]:.4f}); largest relative gap while the "
          f"loss is above 1: {100 * relative:.2f}%")


def print_comparisons(results: Path, curves: dict) -> None:
    """Ratios measured in the same call: GPUs, NF4 against full bf16, this pipeline against stock TRL."""
    speed, peak = functools.partial(run_speed, results), functools.partial(run_peak, results)

    pairs = [("scaling-2gpu", "scaling-1gpu", "tokens/s, 2 GPUs over 1"),
             ("1b-b4-l2048-quant-true-2gpu", "1b-b4-l2048-quant-true", "tokens/s, NF4 on 2 GPUs over 1"),
             ("scaling-1gpu", "stock-scaling", "tokens/s, this pipeline over stock TRL (bf16)")]
    for stage in (0, 2):
        pairs.append((f"zero{stage}-scaling", "stock-scaling", f"~200M bf16, ZeRO-{stage}: tokens/s over stock TRL"))
        pairs.append((f"zero{stage}-1b-b4-l2048-nf4", "stock-1b-b4-l2048-nf4", f"1B NF4 4x2048, ZeRO-{stage}: tokens/s over stock"))
        pairs.append((f"zero{stage}-1b-b1-l1024", "zero2-1b-b1-l1024", f"1B bf16 1x1024, ZeRO-{stage} over ZeRO-2"))
    for folder in sorted(results.glob("1b-b*-quant-true")):
        shape = folder.name.removesuffix("-quant-true")
        pairs.append((folder.name, f"{shape}-quant-false", f"{shape}: tokens/s, NF4 over full"))
        pairs.append((folder.name, f"stock-{shape}-nf4", f"{shape}: tokens/s, this pipeline's NF4 over stock"))
        if peak(folder.name) and peak(f"{shape}-quant-false"):
            print(f"{shape}: peak memory, NF4 over full: {peak(folder.name) / peak(f'{shape}-quant-false'):.3f}")
        if peak(folder.name) and peak(f"stock-{shape}-nf4"):
            print(f"{shape}: peak memory, this pipeline's NF4 over stock: "
                  f"{peak(folder.name) / peak(f'stock-{shape}-nf4'):.3f}")
    for top, bottom, what in pairs + fused_and_versus_pairs(results):
        if speed(top) and speed(bottom):
            print(f"{what}: {speed(top) / speed(bottom):.3f} ({speed(top):,.0f} / {speed(bottom):,.0f})")
    print_alternating_rounds(results)
    print_curve_agreement(curves)


def main() -> int:
    results = Path(sys.argv[1])
    print("| run | card | GPUs | parameters | batch | mode | tokens/s | MFU | peak GiB/GPU | estimate GiB | est/peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    curves = {}
    # A demo folder holds several stages' step lines; its wall time and accuracy are printed below.
    for folder in sorted(p for p in results.iterdir() if (p / "summary.json").is_file() and not p.name.startswith("demo")):
        row, summary, steps = run_row(folder.name, folder)
        curves[folder.name] = {s: loss for s, loss, _ in steps}
        print(row)
    for path in sorted(results.glob("stock-*/stock.json")):
        stock = json.loads(path.read_text())
        print(f"| {path.parent.name} | {stock['card']} | 1 | same shape | {stock['batch']}x{stock['length']}, "
              f"GA {stock['accumulation']} | {stock['mode']}{', ckpt' if stock['checkpointing'] else ''} | "
              f"{stock['tokens_per_second']:,.0f} | | {stock['peak_memory_gib']:.2f} | | |")
    print()
    for path in sorted(results.glob("*/wall.txt")):
        print(path.read_text().strip())
    for path in sorted(results.glob("*/profile.txt")):
        print(path.read_text().splitlines()[0])
    print()
    print_comparisons(results, curves)
    return 0


if __name__ == "__main__":
    sys.exit(main())
