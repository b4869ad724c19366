"""Guards the benchmark scripts that BENCHMARKS.md's numbers come from, so that device time is not
lost to a broken script: the stock baseline runs under the step profiler (on CPU, tiny shapes), and
benchmarks/speed.py runs the pipeline and stock TRL on one shape and prints its table."""

import json
import os
import subprocess
import sys


def test_profiled_stock_baseline_runs_and_reports(root, tmp_path):
    out = tmp_path / "profile"
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/step_profile.py",
            "--out",
            str(out),
            "--first",
            "2",
            "--last",
            "4",
            "benchmarks/stock_trl.py",
            "--cpu",
            "--hidden",
            "64",
            "--vocab-rows",
            "512",
            "--batch",
            "1",
            "--length",
            "32",
            "--steps",
            "6",
            "--warmup",
            "2",
            "--json",
            str(tmp_path / "stock.json"),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    first_line = out.with_suffix(".txt").read_text().splitlines()[0]
    assert first_line.startswith("profile profile: 2 steps, wall ")
    stock = json.loads((tmp_path / "stock.json").read_text())
    assert stock["steps"] == 6 and stock["tokens_per_second"] > 0 and stock["mode"] == "bf16 (stock)"


def test_speed_benchmark_runs_the_pipeline_and_stock_on_one_shape_and_prints_the_table(root, tmp_path):
    out = tmp_path / "speed"
    result = subprocess.run(
        [sys.executable, "benchmarks/speed.py", "--smoke", "--out", str(out), "--runs", "1b,1b-stock-liger"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    results = json.loads((out / "results.json").read_text())
    pipeline, stock = results["1b"], results["1b-stock-liger"]
    assert (stock["batch"], stock["accumulation"]) == (pipeline["batch"], pipeline["accumulation"])
    assert pipeline["tokens_per_second"] > 0 and pipeline["estimate_gib"] > 0 and len(pipeline["losses"]) == 2
    table = result.stdout.split("| run |")[1]
    assert "| 1b | 3M | this pipeline |" in table and "| 1b-stock-liger |" in table
