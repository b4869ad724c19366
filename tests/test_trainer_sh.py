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
