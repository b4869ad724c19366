"""Guards trainer.sh's contract: valid shell, a bad setup stops at the checks with a non-zero exit
that names the failed stage and the variable, before any preparation or training runs, and the
DeepSpeed launcher gets the GPUs, port and nodes the settings name; the stopped-early status it tests is
config.ExitCode.INCOMPLETE."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest


def test_shell_syntax(root):
    assert subprocess.run(["bash", "-n", "trainer.sh"], cwd=root).returncode == 0


def test_stopped_early_status_is_config_exit_code_incomplete(root):
    """trainer.sh tests advance's status by its number (no Python start for a constant)."""
    import config

    tested = re.findall(r'\[ "\$advance_rc" -eq (\d+) \] && break', (root / "trainer.sh").read_text())
    assert tested == [str(int(config.ExitCode.INCOMPLETE))] == ["3"]


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


def test_a_node_stops_with_node_failed_when_another_node_failed(base_env, root, tmp_path):
    """nodes.py, which trainer.sh runs on nodes other than 0, ends with config.ExitCode.NODE_FAILED
    when failed.json names this run's token, and with CONFIG for a call it does not know."""
    import config

    nodes = Path(base_env["WORK_DIR"]) / "nodes"
    nodes.mkdir(parents=True)
    (nodes / "ack-1.json").write_text(json.dumps({"token": "run-7"}))
    failure = {"token": "run-7", "node": 0, "stage": "train", "status": 4}
    (nodes / "failed.json").write_text(json.dumps(failure))
    env = {**base_env, "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1"}

    def call(*args):
        return subprocess.run(
            [sys.executable, "nodes.py", *args], cwd=root, env=env, capture_output=True, text=True, timeout=60
        )

    waited = call("wait-advanced", "1")
    assert waited.returncode == config.ExitCode.NODE_FAILED == 5, waited.stderr
    assert waited.stderr == (
        "nodes: node 0 failed in its stage 'train' (exit 4); this node stops too: see that node's log\n"
    )
    assert call("wait").returncode == config.ExitCode.CONFIG


def test_launcher_keeps_the_gpus_that_cuda_visible_devices_names(root):
    """DeepSpeed's launcher drops CUDA_VISIBLE_DEVICES when given --num_gpus (and would use GPUs 0..N-1),
    so trainer.sh names the visible GPUs with --include."""
    import util

    assert util.launcher_devices(2, 0, None) == ["--num_gpus", "2"]
    assert util.launcher_devices(2, 4, None) == ["--num_gpus", "2"]
    assert util.launcher_devices(1, 1, "3") == ["--include", "localhost:3"]
    assert util.launcher_devices(2, 3, "2, 5,7") == ["--include", "localhost:2,5"]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "GPU-8f2c"}
    result = subprocess.run(
        [sys.executable, "util.py", "launcher-devices", "--processes", "1", "--gpus", "1"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "CUDA_VISIBLE_DEVICES='GPU-8f2c'" in result.stderr and "by number" in result.stderr


def test_launcher_arguments_for_one_node_a_hostfile_and_nodes_started_one_by_one(tmp_path):
    import config
    import util

    def settings(**env):
        folders = {"WORK_DIR": str(tmp_path / "work"), "OUTPUT_DIR": str(tmp_path / "out")}
        return config.load_settings({**folders, **env})

    assert util.launcher_arguments(settings(MASTER_PORT="12345"), 2, 0, None) == [
        "--master_port",
        "12345",
        "--num_gpus",
        "2",
    ]
    nodes = settings(NNODES="3", NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    no_ssh = util.launcher_arguments(nodes, 4, 4, "0,1,2,3")
    hostfile = tmp_path / "work" / "nodes" / "hostfile-node1"
    assert no_ssh == [
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--node_rank",
        "1",
        "--num_nodes",
        "3",
        "--num_gpus",
        "4",
        "--master_port",
        "29500",
        "--master_addr",
        "10.0.0.1",
    ]
    assert hostfile.read_text() == "node-0 slots=4\nnode-1 slots=4\nnode-2 slots=4\n"
    (tmp_path / "hosts").write_text("gpu-a slots=8\ngpu-b slots=8\n")
    with_hostfile = settings(HOSTFILE=str(tmp_path / "hosts"), MASTER_PORT="29600")
    assert util.launcher_arguments(with_hostfile, 8, 8, None) == [
        "--hostfile",
        str(tmp_path / "hosts"),
        "--num_gpus",
        "8",
        "--master_port",
        "29600",
    ]


def test_shell_settings_are_one_line_each_with_processes_resolved(tmp_path):
    import config
    import util

    work = tmp_path / "work=1"  # a `=` in a value stays in the value
    settings = config.load_settings(
        {
            "WORK_DIR": str(work),
            "OUTPUT_DIR": str(tmp_path / "out"),
            "MASTER_PORT": "12345",
            "NUM_PROCESSES": "auto",
            "RUN_ALL": "true",
        }
    )
    assert util.shell_settings(settings) == {
        "work_dir": str(work),
        "output_dir": str(tmp_path / "out"),
        "run_all": "true",
        "processes": "1",
        "gpus": "0",
        "node_rank": "0",
        "nnodes": "1",
        "launcher_args": "--master_port 12345 --num_gpus 1",
    }
    assert tuple(util.shell_settings(settings)) == util.SHELL_SETTINGS
    broken = config.load_settings({"WORK_DIR": str(tmp_path / "a\nb"), "OUTPUT_DIR": str(tmp_path / "out")})
    with pytest.raises(util.StageError, match=r"^work_dir=.* holds a line break"):
        util.shell_settings(broken)
