"""Speed at the user's scale: this pipeline's defaults against stock TRL, one GPU, one table.

On a GPU machine with no network: writes the Python sources installed on the machine as a JSONL corpus,
lets prep.py train a 52,000-token tokenizer on it and prepare each shape (FACTOR 6144 and 12288, full
and USE_QUANT), trains each run for --steps optimizer steps through the DeepSpeed launcher as
trainer.sh does (no settings but FACTOR, the data and the step count), trains stock TRL
(benchmarks/stock_trl.py) on the same shape in the same call, and prints one table: tokens/s, MFU,
peak memory against preflight's estimate, and the ratio to stock (or, for a run on two GPUs, to its
run on one). Runs and logs stay in --out.

    python3 benchmarks/speed.py --out /tmp/speed                  # every run below
    python3 benchmarks/speed.py --runs 1b,1b-stock-liger           # some of them
    python3 benchmarks/speed.py --runs 300m,300m-2gpu,1b,1b-2gpu   # scaling: one GPU against two, same global batch
    python3 benchmarks/speed.py --loss-check                       # fast path against plain (and the noise), 200 steps
    python3 benchmarks/speed.py --smoke                            # CPU, tiny shapes: the script itself

A stock run copies the micro-batch, accumulation and checkpointing that its pipeline run chose (the
`of` column below), so both train the same shape.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import config  # noqa: E402
import train  # noqa: E402
import util  # noqa: E402


@dataclass(frozen=True)
class Run:
    factor: int
    settings: dict[str, str] = field(default_factory=dict)  # pipeline settings beyond the defaults
    stock_of: str | None = None  # a stock TRL run on the shape that this pipeline run chose
    stock_shape: tuple[int, int, bool] | None = None  # or on (micro-batch, accumulation, checkpointing)
    liger: bool = False  # stock only
    quant: bool = False  # stock only
    gpus: int = 1  # pipeline only: training processes, one per GPU, at the same global batch

    @property
    def is_stock(self) -> bool:
        return self.stock_of is not None or self.stock_shape is not None


RUNS = {
    "1b": Run(12288),
    "1b-stock-liger": Run(12288, stock_of="1b", liger=True),
    "1b-no-liger": Run(12288, {"USE_LIGER": "false"}),
    "1b-stock": Run(12288, stock_of="1b-no-liger"),
    "300m": Run(6144),
    "300m-stock-liger": Run(6144, stock_of="300m", liger=True),
    "300m-zero1": Run(6144, {"ZERO_STAGE": "1"}),
    "1b-zero1": Run(12288, {"ZERO_STAGE": "1"}),
    "1b-nf4": Run(12288, {"USE_QUANT": "true"}),
    "1b-nf4-b4": Run(12288, {"USE_QUANT": "true", "BATCH_SIZE": "4", "GRADIENT_CHECKPOINTING": "true"}),
    "1b-nf4-b8": Run(12288, {"USE_QUANT": "true", "BATCH_SIZE": "8", "GRADIENT_CHECKPOINTING": "true"}),
    "1b-nf4-stock": Run(12288, stock_shape=(4, 1, True), quant=True),
    "1b-nf4-stock-liger": Run(12288, stock_shape=(4, 1, True), quant=True, liger=True),
    "300m-2gpu": Run(6144, gpus=2),
    "1b-2gpu": Run(12288, gpus=2),
}
DEFAULT_RUNS = [name for name, run in RUNS.items() if run.gpus == 1]  # a machine with one GPU
LOSS_RUNS = ("fast", "plain", "plain-whole", "fast-again")
# Each run is compared with the stock run of its own shape, and a run on two GPUs with its run on one.
PAIR = {
    "1b": "1b-stock-liger",
    "1b-no-liger": "1b-stock",
    "300m": "300m-stock-liger",
    "300m-zero1": "300m-stock-liger",
    "1b-zero1": "1b-stock-liger",
    "1b-nf4": "1b-nf4-stock",
    "1b-nf4-b4": "1b-nf4-stock",
    "1b-nf4-b8": "1b-nf4-stock",
    "300m-2gpu": "300m",
    "1b-2gpu": "1b",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/train-llama-speed"))
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--logging-steps", type=int, default=5, help="steps per measured window")
    parser.add_argument("--corpus-mb", type=float, default=30.0, help="megabytes of Python sources to train on")
    parser.add_argument("--vocab-size", type=int, default=52000)
    parser.add_argument(
        "--loss-check",
        action="store_true",
        help="instead: FACTOR 6144 for 200 steps with the defaults, the plain path (no Liger, "
        "checkpointing, micro-batch 4; and at micro-batch 32) and the defaults again, at the "
        "same global batch and seed",
    )
    parser.add_argument(
        "--loss-runs",
        default=",".join(LOSS_RUNS),
        help=f"with --loss-check, comma-separated, of {', '.join(LOSS_RUNS)}",
    )
    parser.add_argument(
        "--curves",
        type=Path,
        help="with --loss-check, loss curves of runs trained before (OUT/loss_curves.json of an "
        "earlier call on the same corpus), compared with this call's",
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, a few steps: checks this script")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile optimizer steps 8-12 of each run (benchmarks/step_profile.py): OUT/RUN/profile.txt",
    )
    return parser.parse_args()


def write_corpus(path: Path, megabytes: float) -> int:
    """The machine's own Python sources (standard library, then installed packages), one file per
    JSONL row, in a fixed order; returns the rows written."""
    if path.is_file():
        return sum(1 for _ in path.open())
    budget, rows = int(megabytes * 2**20), 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for folder in dict.fromkeys((sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"])):
            for source in sorted(Path(folder).rglob("*.py")):
                try:
                    text = source.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                if len(text) < 200:
                    continue
                out.write(json.dumps({"text": text}) + "\n")
                rows, budget = rows + 1, budget - len(text)
                if budget <= 0:
                    return rows
    return rows


def run_logged(command: list[str], env: dict[str, str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{' '.join(command[:3])} failed ({result.returncode}); {log}:\n{tail}")


def pipeline_env(args: argparse.Namespace, run: Run, corpus: Path, work: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in config.VARIABLE_NAMES}
    env.update(
        PRESET="full",
        INPUT_DATASET=str(corpus),
        OUTPUT_REPO="bench",
        FACTOR=str(run.factor),
        VOCAB_SIZE=str(args.vocab_size),
        MAX_STEPS=str(args.steps),
        LOGGING_STEPS=str(args.logging_steps),
        SAVE_STEPS=str(args.logging_steps * 1000),
        WORK_DIR=str(work),
        OUTPUT_DIR=str(work.parent / "output"),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        **run.settings,
    )
    if args.smoke:
        env.update(MAX_LENGTH="128", GLOBAL_BATCH_SIZE="4", DS_ACCELERATOR="cpu")
    return env


def prepared_folder(args: argparse.Namespace, run: Run, corpus: Path) -> Path:
    """prep.py's output for the run's shape, shared by the runs of that shape (prepared once)."""
    key = f"f{run.factor}" + ("-quant" if run.settings.get("USE_QUANT") == "true" else "")
    shared = args.out / "prepared" / key
    env = pipeline_env(args, run, corpus, shared)
    if not (shared / "prep" / "manifest.json").is_file():
        started = time.time()
        run_logged([sys.executable, "prep.py"], env, args.out / "prepared" / f"{key}.log")
        print(f"prepared {key} in {time.time() - started:.0f}s", flush=True)
    return shared / "prep"


def window_speeds(log_text: str) -> list[float]:
    return [float(m.group(1).replace(",", "")) for m in re.finditer(r"\|\s+([\d,]+) tok/s \|", log_text)]


def measured_speed(speeds: list[float]) -> float:
    """The median window after the first (which holds the start-up: kernel compilation, allocator growth)."""
    return statistics.median(speeds[1:] or speeds)


def profiled(args: argparse.Namespace, name: str) -> list[str]:
    """The profiler in front of a run's script, with --profile."""
    if not args.profile:
        return []
    return ["benchmarks/step_profile.py", "--out", str(args.out / name / "profile"), "--first", "8", "--last", "12"]


def run_pipeline(args: argparse.Namespace, name: str, run: Run, corpus: Path) -> dict:
    prepared = prepared_folder(args, run, corpus)
    work = args.out / name / "work"
    subprocess.run(["rm", "-rf", str(work.parent)], check=True)
    work.mkdir(parents=True)
    (work / "prep").symlink_to(prepared)
    env = pipeline_env(args, run, corpus, work)
    gpus = "0" if args.smoke else str(run.gpus)
    devices = subprocess.run(
        [sys.executable, "util.py", "launcher-devices", "--processes", str(run.gpus), "--gpus", gpus],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    log = args.out / name / "train.log"
    run_logged(
        ["deepspeed", "--master_port", str(util.free_port()), *devices, *profiled(args, name), "train.py"], env, log
    )
    summary = json.loads((work / "trained" / "summary.json").read_text())
    subprocess.run(["rm", "-rf", str(work / "checkpoints"), str(work / "trained" / "model")], check=True)
    speed = measured_speed(window_speeds(log.read_text()))
    flops = train.peak_flops(summary["card"])
    return {
        "name": name,
        "kind": "pipeline",
        "card": summary["card"],
        "factor": run.factor,
        "parameters": summary["parameters"],
        "vocab_rows": summary["vocab_rows"],
        "batch": summary["batch_size"],
        "accumulation": summary["gradient_accumulation_steps"],
        "checkpointing": summary["gradient_checkpointing"],
        "liger": summary["fused_kernels"],
        "quant": summary["use_quant"],
        "settings": run.settings,
        "tokens_per_second": speed,
        "mfu": speed * summary["flops_per_token"] / flops if flops else None,
        "peak_gib": summary["peak_memory_gib"],
        "estimate_gib": summary["estimated_peak_gib"],
        "losses": summary["losses"],
        "max_length": summary["max_length"],
        "processes": summary["world_size"],
    }


def run_stock(args: argparse.Namespace, name: str, run: Run, results: dict[str, dict]) -> dict:
    if run.stock_of is not None:
        if run.stock_of not in results:
            raise SystemExit(f"speed.py: {name} trains the shape of {run.stock_of}; add {run.stock_of} to --runs")
        base = results[run.stock_of]
        batch, accumulation, checkpointing = base["batch"], base["accumulation"], base["checkpointing"]
        vocab_rows, length = base["vocab_rows"], base["max_length"]
    else:
        batch, accumulation, checkpointing = run.stock_shape
        vocab_rows, length = config.padded_vocab(args.vocab_size), 128 if args.smoke else 2048
    topology = config.topology_for_factor(run.factor, args.vocab_size)
    out = args.out / name
    command = [
        sys.executable,
        *profiled(args, name),
        "benchmarks/stock_trl.py",
        "--hidden",
        str(topology.hidden_size),
        "--vocab-rows",
        str(vocab_rows),
        "--batch",
        str(batch),
        "--length",
        str(length),
        "--accumulation",
        str(accumulation),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.logging_steps),
        "--logging-steps",
        str(args.logging_steps),
        "--json",
        str(out / "stock.json"),
    ]
    command += ["--checkpointing"] * checkpointing + ["--quant"] * run.quant
    command += ["--liger"] * (run.liger and not args.smoke) + ["--cpu"] * args.smoke
    run_logged(command, {**os.environ, "PYTHONUNBUFFERED": "1"}, out / "train.log")
    stock = json.loads((out / "stock.json").read_text())
    token_flops = train.flops_per_token(topology, vocab_rows, length)
    flops = train.peak_flops(stock["card"])
    return {
        "name": name,
        "kind": "stock",
        "card": stock["card"],
        "factor": run.factor,
        "parameters": topology.parameter_count(vocab_rows),
        "batch": batch,
        "accumulation": accumulation,
        "checkpointing": checkpointing,
        "liger": run.liger and not args.smoke,
        "quant": run.quant,
        "settings": {},
        "tokens_per_second": stock["tokens_per_second"],
        "mfu": stock["tokens_per_second"] * token_flops / flops if flops else None,
        "peak_gib": stock["peak_memory_gib"],
        "estimate_gib": None,
    }


def table(results: dict[str, dict]) -> str:
    lines = [
        "| run | model | what | micro-batch x accumulation | tokens/s | MFU | peak GiB (estimate) | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        what = ("stock TRL" if r["kind"] == "stock" else "this pipeline") + (", NF4 + LoRA" if r["quant"] else "")
        what += ", Liger" if r["liger"] else ""
        what += "".join(f", {k}={v}" for k, v in r["settings"].items() if k not in ("USE_QUANT", "USE_LIGER"))
        what += f", {r['processes']} GPUs" if r.get("processes", 1) > 1 else ""
        shape = f"{r['batch']} x {r['accumulation']}{', checkpointing' if r['checkpointing'] else ''}"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        peak = f"{r['peak_gib']:.1f}" + (f" ({r['estimate_gib']:.1f})" if r["estimate_gib"] is not None else "")
        pair = results.get(PAIR.get(name, ""))
        ratio = f"{r['tokens_per_second'] / pair['tokens_per_second']:.2f}x {pair['name']}" if pair else ""
        lines.append(
            f"| {name} | {r['parameters'] / 1e6:,.0f}M | {what} | {shape} | {r['tokens_per_second']:,.0f} | "
            f"{mfu} | {peak} | {ratio} |"
        )
    return "\n".join(lines)


def loss_check(args: argparse.Namespace, corpus: Path) -> int:
    """The defaults (fast path) against the plain path on the same data, seed and global batch; a third
    run that separates the two differences: the plain path's kernels at the fast path's micro-batch
    (so fast against it is Liger and recomputation alone, it against plain is the accumulation of
    micro-batches alone); and the fast path again, whose difference from the first is the GPU's own
    run-to-run noise, the floor under the others. --loss-runs and --curves split the four runs over
    calls that are each shorter than a time limit; the curves are in OUT/loss_curves.json."""
    factor, batch, whole = (384, "1", "4") if args.smoke else (6144, "4", "32")
    plain = {"USE_LIGER": "false", "GRADIENT_CHECKPOINTING": "true"}
    runs = {
        "fast": Run(factor),
        "plain": Run(factor, {**plain, "BATCH_SIZE": batch}),
        "plain-whole": Run(factor, {**plain, "BATCH_SIZE": whole}),
        "fast-again": Run(factor),
    }
    curves = json.loads(args.curves.read_text()) if args.curves else {}
    for name in args.loss_runs.split(","):
        if name not in runs:
            raise SystemExit(f"speed.py: no loss run {name!r}; choose from {', '.join(runs)}")
        result = run_pipeline(args, f"loss-{name}", runs[name], corpus)
        curves[name] = {str(step): loss for step, loss in result["losses"]}
        (args.out / "loss_curves.json").write_text(json.dumps(curves, indent=1))
        print(
            f"{name}: {result['batch']} x {result['accumulation']}, checkpointing {result['checkpointing']}, "
            f"Liger {result['liger']}: {result['tokens_per_second']:,.0f} tok/s",
            flush=True,
        )
    print(loss_table(curves))
    return 0


def loss_table(curves: dict[str, dict[str, float]]) -> str:
    """Each logged step's loss per run, and the relative difference of each pair of runs that is present."""
    names = [name for name in LOSS_RUNS if name in curves]
    steps = sorted(set.intersection(*(set(curves[name]) for name in names)), key=int)
    pairs = [
        (a, b)
        for a, b in [("fast", "plain"), ("fast", "plain-whole"), ("plain-whole", "plain"), ("fast-again", "fast")]
        if a in curves and b in curves
    ]
    lines = [
        "| step | " + " | ".join(names) + " | " + " | ".join(f"{a} vs {b}" for a, b in pairs) + " |",
        "|---" * (1 + len(names) + len(pairs)) + "|",
    ]
    largest = dict.fromkeys(pairs, 0.0)
    for step in steps:
        differences = [abs(curves[a][step] - curves[b][step]) / curves[b][step] for a, b in pairs]
        largest = {pair: max(largest[pair], d) for pair, d in zip(pairs, differences)}
        lines.append(
            f"| {step} | "
            + " | ".join(f"{curves[n][step]:.4f}" for n in names)
            + " | "
            + " | ".join(f"{100 * d:.2f}%" for d in differences)
            + " |"
        )
    for (a, b), value in largest.items():
        mean = statistics.mean(abs(curves[a][s] - curves[b][s]) / curves[b][s] for s in steps) if steps else 0.0
        lines.append(f"{a} vs {b}, over {len(steps)} logged steps: largest {100 * value:.2f}%, mean {100 * mean:.2f}%")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    if args.smoke:
        args.vocab_size, args.corpus_mb = 600, min(args.corpus_mb, 0.3)
        args.steps, args.logging_steps = min(args.steps, 4), 2
        global RUNS
        RUNS = {
            name: Run(
                384 if run.factor == 6144 else 768,
                run.settings,
                run.stock_of,
                run.stock_shape and (1, 2, True),
                False,
                run.quant,
            )
            for name, run in RUNS.items()
        }
    corpus = args.out / "corpus.jsonl"
    print(f"corpus: {write_corpus(corpus, args.corpus_mb):,} files of Python source in {corpus}", flush=True)
    if args.loss_check:
        args.steps, args.logging_steps = (8 if args.smoke else 200), (2 if args.smoke else 10)
        return loss_check(args, corpus)
    results: dict[str, dict] = {}
    for name in args.runs.split(","):
        if name not in RUNS:
            raise SystemExit(f"speed.py: no run {name!r}; choose from {', '.join(RUNS)}")
        run = RUNS[name]
        started = time.time()
        results[name] = run_stock(args, name, run, results) if run.is_stock else run_pipeline(args, name, run, corpus)
        print(f"{name}: {results[name]['tokens_per_second']:,.0f} tok/s ({time.time() - started:.0f}s)", flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    card = next(iter(results.values()))["card"] if results else "?"
    print(
        f"\n{card}, {time.strftime('%Y-%m-%d')}, {args.steps} steps a run, median of {args.logging_steps}-step "
        f"windows after the first, vocabulary {args.vocab_size:,}\n"
    )
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
