"""Guards the benchmark scripts that BENCHMARKS.md's numbers come from, so that device time is not
lost to a broken script: the stock baseline and the step profiler run (on
CPU, tiny shapes), the profiler's switch to the stage as set reaches the DeepSpeed config, and the
report computes its ratios from a results folder, and benchmarks/speed.py runs the pipeline and stock TRL on
one shape and prints its table."""
import importlib.util
import json
import os
import subprocess
import sys

import config


def test_profiled_stock_baseline_runs_and_reports(root, tmp_path):
    out = tmp_path / "profile"
    result = subprocess.run(
        [sys.executable, "benchmarks/step_profile.py", "--out", str(out), "--first", "2", "--last", "4",
         "benchmarks/stock_trl.py", "--cpu", "--hidden", "64", "--vocab-rows", "512", "--batch", "1",
         "--length", "32", "--steps", "6", "--warmup", "2", "--json", str(tmp_path / "stock.json")],
        cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    first_line = out.with_suffix(".txt").read_text().splitlines()[0]
    assert first_line.startswith("profile profile: 2 steps, wall ")
    stock = json.loads((tmp_path / "stock.json").read_text())
    assert stock["steps"] == 6 and stock["tokens_per_second"] > 0 and stock["mode"] == "bf16 (stock)"


def test_zero_stage_as_set_keeps_zero2_for_a_quantized_single_process_run(root, monkeypatch):
    # The stages and zero suites compare ZeRO-2 with ZeRO-1 on one GPU through this switch.
    spec = importlib.util.spec_from_file_location("step_profile", root / "benchmarks" / "step_profile.py")
    step_profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_profile)
    settings = config.load_settings({"USE_QUANT": "true", "ZERO_STAGE": "2"})
    assert config.deepspeed_config(settings, "bf16", 1000, 1)["zero_optimization"]["stage"] == 1
    monkeypatch.setattr(config, "zero_stage_for", config.zero_stage_for)  # restored after the test
    monkeypatch.setattr(sys, "argv", ["step_profile.py", "--zero-stage-as-set", "train.py"])
    step_profile.change_pipeline_settings(step_profile.parse_args())
    assert config.deepspeed_config(settings, "bf16", 1000, 1)["zero_optimization"]["stage"] == 2


def test_unknown_suite_exits_2_with_the_list_of_suites(root, tmp_path):
    result = subprocess.run(["bash", "benchmarks/gpu_benchmarks.sh", "nonsense", str(tmp_path / "results")],
                            cwd=root, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SCRATCH": str(tmp_path / "scratch")})
    assert result.returncode == 2 and "nf4|qlora2|profile|buckets" in result.stderr


def write_run(folder, tokens_per_second: list[int], peak: float, use_quant: bool):
    folder.mkdir(parents=True)
    steps = [f"step {2 * (i + 1):>6}/10 | loss   5.0000 | lr 1.000e-04 | {t:>9,} tok/s | mem   1.00 GiB | eta 0:00:00"
             for i, t in enumerate(tokens_per_second)]
    (folder / "train.log").write_text("\n".join(steps) + "\n")
    topology = {"hidden_size": 128, "num_layers": 10, "num_heads": 2, "num_kv_heads": 2,
                "intermediate_size": 512, "vocab_size": 2048}
    (folder / "summary.json").write_text(json.dumps({
        "card": "test", "world_size": 1, "parameters": 3_000_000, "topology": topology, "vocab_rows": 2048,
        "batch_size": 4, "max_length": 2048, "gradient_accumulation_steps": 1, "use_quant": use_quant,
        "precision": "bf16", "gradient_checkpointing": True, "zero_stage": 2, "peak_memory_gib": peak}))


def test_report_compares_runs_of_one_call(root, tmp_path):
    # The first logged interval includes start-up and is left out of the median.
    write_run(tmp_path / "1b-b4-l2048-quant-true", [100, 900, 1000, 1100], 2.0, True)
    write_run(tmp_path / "1b-b4-l2048-quant-false", [100, 2000, 2000, 2000], 16.0, False)
    stock = tmp_path / "stock-1b-b4-l2048-nf4"
    stock.mkdir()
    (stock / "stock.json").write_text(json.dumps({
        "card": "test", "mode": "NF4+LoRA (stock)", "batch": 4, "length": 2048, "accumulation": 1,
        "checkpointing": True, "tokens_per_second": 800.0, "peak_memory_gib": 4.0}))
    result = subprocess.run([sys.executable, "benchmarks/report.py", str(tmp_path)], cwd=root,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1b-b4-l2048: tokens/s, this pipeline's NF4 over stock: 1.250 (1,000 / 800)" in result.stdout
    assert "1b-b4-l2048: tokens/s, NF4 over full: 0.500 (1,000 / 2,000)" in result.stdout
    assert "1b-b4-l2048: peak memory, NF4 over full: 0.125" in result.stdout
    assert "1b-b4-l2048: peak memory, this pipeline's NF4 over stock: 0.500" in result.stdout


def test_speed_benchmark_runs_the_pipeline_and_stock_on_one_shape_and_prints_the_table(root, tmp_path):
    out = tmp_path / "speed"
    result = subprocess.run([sys.executable, "benchmarks/speed.py", "--smoke", "--out", str(out),
                             "--runs", "1b,1b-stock-liger"], cwd=root, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    results = json.loads((out / "results.json").read_text())
    pipeline, stock = results["1b"], results["1b-stock-liger"]
    assert (stock["batch"], stock["accumulation"]) == (pipeline["batch"], pipeline["accumulation"])
    assert pipeline["tokens_per_second"] > 0 and pipeline["estimate_gib"] > 0 and len(pipeline["losses"]) == 2
    table = result.stdout.split("| run |")[1]
    assert "| 1b | 3M | this pipeline |" in table and "| 1b-stock-liger |" in table
