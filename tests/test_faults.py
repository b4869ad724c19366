"""Guards the promise that a kill at any moment loses at most one save interval: trainer.sh runs are
killed (SIGKILL to the whole process group) at ten moments spread over preparation, training, a
checkpoint save, the final save, publishing and advancing, each rerun recovering from the previous kill;
the last one finishes, the published model loads and generates, the run state advanced exactly once
per stage, and no temporary folder is left."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pipeline import generate_text, step_losses

pytestmark = pytest.mark.slow

FAULTS = Path(__file__).resolve().parent / "faults"
# A small demo stage: 12 optimizer steps, a checkpoint every 4, a loss line every 2.
TINY = dict(
    RUN_ALL="false",
    FACTOR="384",
    MAX_LENGTH="64",
    BATCH_SIZE="4",
    MAX_STEPS="12",
    SAVE_STEPS="4",
    LOGGING_STEPS="2",
    NUM_PROCESSES="1",
)

# (what is killed, the pause point: script | event | path text, what the rerun must say)
MOMENTS = [
    ("prep reading the dataset", "prep.py|read|pretrain.jsonl", None),
    ("prep saving the model", "prep.py|write|/model/config.json", None),
    ("training starting", "train.py|replaced|checkpoints/stage.json", None),
    ("saving checkpoint-4", "train.py|write|checkpoint-4/", r"checkpoint-4 is incomplete"),
    (
        "just after checkpoint-8",
        "train.py|replaced|checkpoint-8/train-llama-complete.json",
        r"resuming from \S+checkpoint-8\b",
    ),
    (
        "saving the final checkpoint",
        "train.py|write|checkpoint-12/",
        r"checkpoint-12 is incomplete(?s:.*)resuming from \S+checkpoint-8\b",
    ),
    ("the final save", "train.py|write|.trained-staging/", r"resuming from \S+checkpoint-12\b"),
    ("publishing", "util.py publish|write|.train-llama.tmp-", r"already finished training"),
    (
        "advancing, before the state is written",
        "util.py advance|read|trained/summary.json",
        r"already finished training",
    ),
    ("advancing, after the state is written", "util.py advance|replaced|run_state.json", None),
]


def start_trainer(root: Path, env: dict, log_path: Path) -> subprocess.Popen:
    env = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    with open(log_path, "w") as log:
        return subprocess.Popen(
            ["bash", "trainer.sh"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def run_until_paused(root: Path, env: dict, log_path: Path, fault_dir: Path, timeout: float = 300) -> str:
    """Run trainer.sh until the fault hook freezes it, then SIGKILL its whole process group."""
    paused = fault_dir / "paused"
    paused.unlink(missing_ok=True)
    process = start_trainer(root, env, log_path)
    deadline = time.time() + timeout
    while not paused.exists():
        if process.poll() is not None:
            pytest.fail(
                f"trainer.sh ended (exit {process.returncode}) before the fault point "
                f"{env['FAULT_PAUSE']}:\n{log_path.read_text()[-4000:]}"
            )
        if time.time() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"the fault point {env['FAULT_PAUSE']} was not reached in {timeout}s")
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return paused.read_text()


def leftovers(*folders: Path) -> list[str]:
    """Temporary files and folders of an interrupted run."""
    patterns = (".tmp-", ".old-", ".trained-staging", "STOP")
    return [str(path) for folder in folders for path in folder.rglob("*") if any(p in path.name for p in patterns)]


def test_a_kill_at_any_moment_is_recovered_by_the_next_run(root, base_env, tmp_path):
    fault_dir = tmp_path / "faults"
    fault_dir.mkdir()
    env = {
        **base_env,
        **TINY,
        "FAULT_DIR": str(fault_dir),
        "PYTHONPATH": os.pathsep.join([str(FAULTS), base_env.get("PYTHONPATH", "")]),
    }
    output, work = Path(base_env["OUTPUT_DIR"]), Path(base_env["WORK_DIR"])
    expectation = None
    for number, (moment, point, next_run_says) in enumerate(MOMENTS):
        log_path = tmp_path / f"run-{number}.log"
        where = run_until_paused(root, {**env, "FAULT_PAUSE": point}, log_path, fault_dir)
        if expectation:
            assert re.search(expectation, log_path.read_text()), (moment, log_path.read_text()[-4000:])
        print(f"killed during {moment}: {where.strip()}")
        expectation = next_run_says

    log_path = tmp_path / "final.log"
    process = start_trainer(root, env, log_path)
    assert process.wait(timeout=600) == 0, log_path.read_text()[-6000:]
    log = log_path.read_text()
    assert "Traceback" not in log

    # The last kill came after the state was written: the rerun trained the next stage, from step 1.
    state = json.loads((output / "run_state.json").read_text())
    trained = [entry["trained"] for entry in state["history"]]
    assert trained == ["pretrain INIT=0 (shard 0)", "pretrain INIT=1 (shard 0)"], trained
    assert min(step_losses(log)) == 2 and max(step_losses(log)) == 12
    assert all(entry["final_loss"] > 0 for entry in state["history"])

    marker = json.loads((output / "train-llama" / "publish.json").read_text())
    assert marker["stage_key"]["init"] == 1 and marker["completed"] is True
    assert generate_text(output / "train-llama", "<|user|>Repeat: cat<|end|><|bot|>").strip() != ""
    assert leftovers(output, work) == []


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_last_complete_one(root, base_env, tmp_path):
    """WORK_DIR/checkpoints on a 20 MiB filesystem: checkpoint-4 (~14 MiB) fits, checkpoint-8 does not."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a private mount namespace (root) for a small filesystem")
    env = {**base_env, **TINY, "MAX_STEPS": "8", "PATH": f"{Path(sys.executable).parent}:{base_env['PATH']}"}
    prepared = subprocess.run([sys.executable, "prep.py"], cwd=root, env=env, capture_output=True, text=True)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    checkpoints, kept = Path(env["WORK_DIR"]) / "checkpoints", tmp_path / "kept"
    checkpoints.mkdir()
    full_disk_run = (
        f"mount -t tmpfs -o size=20m tmpfs {checkpoints} && deepspeed --num_gpus 1 train.py; "
        f"rc=$?; cp -a {checkpoints} {kept}; exit $rc"
    )
    result = subprocess.run(
        ["unshare", "-m", "bash", "-c", full_disk_run], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    log = result.stdout + result.stderr
    assert result.returncode != 0
    [line] = [line for line in log.splitlines() if line.startswith("train: the disk is full")]
    assert "the last complete checkpoint, checkpoint-4, is kept and nothing was published" in line, line
    assert "Traceback" not in log, log[-4000:]
    assert sorted(path.name for path in kept.glob("checkpoint-*")) == ["checkpoint-4"]
    assert (kept / "checkpoint-4" / "train-llama-complete.json").is_file()
    assert not (Path(env["WORK_DIR"]) / "trained").exists()

    # With space again (the kept checkpoints on the ordinary disk), training resumes from checkpoint-4.
    checkpoints.rmdir()
    kept.rename(checkpoints)
    resumed = subprocess.run(
        ["deepspeed", "--num_gpus", "1", "train.py"], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert re.search(r"resuming from \S+checkpoint-4\b", resumed.stdout)
    assert sorted(step_losses(resumed.stdout)) == [6, 8]
