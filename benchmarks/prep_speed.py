"""Preparation at scale, on CPU: a generated JSON Lines corpus of several GB through prep.py.

Writes --gb of generated text rows (a fixed seed, about 300 characters a row), then runs prep.py three
times as trainer.sh would: the first pretraining run (INIT 0: the tokenizer's sample and shard 0),
INIT 1 (shard 0 again, with the tokenizer and model of the first run) and INIT 51 (shard 50). Prints
one table: wall time, tokens/s of tokenization and peak memory (the child's maximum resident set) of
each run, the tokenizer's sample and the ratio of shard 50's time to shard 0's.

    python3 benchmarks/prep_speed.py --out /tmp/prep-speed            # 2 GB, SHARD_SIZE 131072
    python3 benchmarks/prep_speed.py --gb 0.01 --shard-size 200       # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/train-llama-prep-speed"))
    parser.add_argument("--gb", type=float, default=2.0, help="size of the generated corpus")
    parser.add_argument("--shard-size", type=int, default=131072, help="SHARD_SIZE (rows)")
    parser.add_argument("--late-shard", type=int, default=50, help="the shard compared with shard 0")
    return parser.parse_args()


def write_corpus(path: Path, gigabytes: float, rows_needed: int) -> int:
    """Rows of generated sentences until the file holds `gigabytes` and at least `rows_needed` rows. The
    words are 80,000 made-up ones drawn with Zipf-like frequencies, so that a 52,000-token vocabulary
    has real words to learn, as with natural text."""
    if path.is_file():
        return sum(1 for _ in path.open("rb"))
    generator = random.Random(0)
    words = list(
        dict.fromkeys("".join(generator.choices(SYLLABLES, k=generator.randint(1, 4))) for _ in range(100_000))
    )[:80_000]
    weights = [1 / rank for rank in range(1, len(words) + 1)]
    sentences = [
        " ".join(generator.choices(words, weights, k=generator.randint(6, 14))).capitalize() + "."
        for _ in range(50_000)
    ]
    budget, rows = int(gigabytes * 1e9), 0
    with path.open("w") as out:
        while budget > 0 or rows < rows_needed:
            text = f"Note {rows}. " + " ".join(generator.choices(sentences, k=4))
            line = json.dumps({"text": text}) + "\n"
            out.write(line)
            budget -= len(line)
            rows += 1
    return rows


def run_prep(env: dict[str, str], log: Path) -> tuple[float, int]:
    """prep.py in a child process: (seconds, the child's peak resident memory in bytes)."""
    started = time.time()
    with log.open("w") as handle:
        child = subprocess.Popen(
            [sys.executable, "prep.py"], cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"prep.py failed; see {log}:\n{log.read_text()[-2000:]}")
    return time.time() - started, usage.ru_maxrss * 1024


def publish_preparation(work: Path, output: Path) -> None:
    """What `util.py publish` leaves for the next run: the model and tokenizer in OUTPUT_DIR/bench."""
    target = output / "bench"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for folder in ("model", "tokenizer"):
        for file in (work / "prep" / folder).iterdir():
            shutil.copy(file, target / file.name)


def logged(pattern: str, log: Path) -> str:
    match = re.search(pattern, log.read_text())
    return match.group(1) if match else "?"


def main() -> int:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.out / "corpus.jsonl"
    started = time.time()
    rows = write_corpus(corpus, args.gb, (args.late_shard + 1) * args.shard_size)
    print(f"corpus: {rows:,} rows, {corpus.stat().st_size / 1e9:.2f} GB ({time.time() - started:.0f}s)", flush=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("INIT", "INST"))}
    env.update(
        PRESET="full",
        INPUT_DATASET=str(corpus),
        OUTPUT_REPO="bench",
        FACTOR="768",
        SHARD_SIZE=str(args.shard_size),
        OUTPUT_DIR=str(args.out / "output"),
        TOKENIZERS_PARALLELISM="true",
        HF_HUB_OFFLINE="1",
    )
    results = []
    for init in (0, 1, args.late_shard + 1):
        work = args.out / f"work-{init}"
        shutil.rmtree(work, ignore_errors=True)
        log = args.out / f"prep-init{init}.log"
        seconds, peak = run_prep({**env, "INIT": str(init), "WORK_DIR": str(work)}, log)
        if init == 0:
            publish_preparation(work, args.out / "output")
        results.append((init, seconds, peak, logged(r"\(([\d,]+) tokens/s\)", log), log))
        shutil.rmtree(work, ignore_errors=True)
        print(f"INIT {init}: {seconds:.0f}s", flush=True)
    first_log = results[0][4]
    print(
        f"\n{rows:,} rows, {corpus.stat().st_size / 1e9:.2f} GB; SHARD_SIZE {args.shard_size:,}; "
        f"{os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}"
    )
    print(f"tokenizer: {logged(r'(tokenizer: trained .*)', first_log)}\n")
    print("| run | shard | wall s | tokenization tokens/s | peak memory GiB |\n|---|---|---|---|---|")
    for init, seconds, peak, speed, _ in results:
        shard = 0 if init < 2 else init - 1
        print(f"| INIT {init} | {shard} | {seconds:.1f} | {speed} | {peak / 2**30:.2f} |")
    print(f"\nshard {args.late_shard} / shard 0 (INIT {results[2][0]} / INIT 1): {results[2][1] / results[1][1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
