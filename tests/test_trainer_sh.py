"""Guards trainer.sh's contract: valid shell, and a bad setup stops at the checks with a non-zero
exit that names the failed stage and the variable, before any preparation or training runs."""
import subprocess
import sys
from pathlib import Path


def test_shell_syntax(root):
    assert subprocess.run(["bash", "-n", "trainer.sh"], cwd=root).returncode == 0


def run(root, env):
    env = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    return subprocess.run(["bash", "trainer.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_bad_configuration_stops_first_with_the_variable(base_env, root):
    result = run(root, {**base_env, "BATCH_SIZE": "lots"})
    assert result.returncode == 2
    assert "BATCH_SIZE='lots'" in result.stderr
    assert "stage 'configuration' failed" in result.stderr
    assert not Path(base_env["WORK_DIR"]).exists()


def test_missing_dataset_stops_at_preflight(base_env, root, tmp_path):
    result = run(root, {**base_env, "INPUT_DATASET": str(tmp_path / "nowhere.jsonl")})
    assert result.returncode == 1
    assert "INPUT_DATASET" in result.stdout + result.stderr
    assert "stage 'preflight' failed" in result.stderr
    assert not (Path(base_env["WORK_DIR"]) / "prep").exists()


def test_launcher_keeps_the_gpus_that_cuda_visible_devices_names(root):
    """DeepSpeed's launcher drops CUDA_VISIBLE_DEVICES when given --num_gpus (and would use GPUs 0..N-1),
    so trainer.sh names the visible GPUs with --include."""
    import util

    assert util.launcher_devices(2, 0, None) == ["--num_gpus", "2"]
    assert util.launcher_devices(2, 4, None) == ["--num_gpus", "2"]
    assert util.launcher_devices(1, 1, "3") == ["--include", "localhost:3"]
    assert util.launcher_devices(2, 3, "2, 5,7") == ["--include", "localhost:2,5"]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "GPU-8f2c"}
    result = subprocess.run([sys.executable, "util.py", "launcher-devices", "--processes", "1", "--gpus", "1"],
                            cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "CUDA_VISIBLE_DEVICES='GPU-8f2c'" in result.stderr and "by number" in result.stderr
