"""Guards validate_setup.py: on this CPU machine the stack passes (exit 0) with the tiny LLaMA's
forward/backward check; missing packages,
version drift and broken settings are reported; `--reuse` skips the checks only after they all passed
for the same machine boot, software, checking code and settings."""

import json
import subprocess
import sys

import pytest

import config
import validate_setup


def test_cpu_machine_passes_with_forward_backward(root, base_env):
    env = {**base_env, "PATH": f"{sys.prefix}/bin:{base_env.get('PATH', '')}"}  # the venv's `deepspeed`
    result = subprocess.run(
        [sys.executable, "validate_setup.py"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "[2/8] ⊘ CUDA: skipped (CPU only" in result.stdout
    [step] = [line for line in lines if "training step" in line]
    assert step.startswith("[8/8] ✓ training step: forward/backward of a tiny LLaMA on cpu")
    assert "gradients finite" in step
    assert "validate_setup: 7 passed, 0 failed, 1 skipped" in result.stdout
    assert "Traceback" not in result.stderr

    # trainer.sh's --reuse: the same machine, software and settings need no second round of checks.
    again = subprocess.run(
        [sys.executable, "validate_setup.py", "--reuse"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0 and "not repeated" in again.stdout and "[1/8]" not in again.stdout


def test_a_changed_setting_or_package_repeats_the_checks(base_env, monkeypatch):
    settings = config.load_settings(base_env)
    record = validate_setup.validation_record(settings)
    record.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = validate_setup.environment_fingerprint(settings)
    record.write_text(json.dumps({"passed_at": "then", "fingerprint": fingerprint}))
    assert validate_setup.passed_before(settings) == "then"
    assert validate_setup.passed_before(config.load_settings({**base_env, "ZERO_STAGE": "1"})) is None
    monkeypatch.setattr(validate_setup, "installed_version", lambda name: "9.9" if name == "torch" else "1.0")
    assert validate_setup.passed_before(settings) is None


def test_requirement_ranges_are_read_from_requirements_txt():
    ranges = validate_setup.required_ranges()
    assert set(validate_setup.STACK.values()) <= set(ranges)
    assert ranges["torch"].startswith(">=")


def test_missing_package_fails_and_bitsandbytes_only_with_quant(monkeypatch):
    real_version = validate_setup.stack_version

    def without(*names):
        def fake(name):
            if name in names:
                raise ImportError(f"No module named '{name}'")
            return real_version(name)

        return fake

    monkeypatch.setattr(validate_setup, "stack_version", without("bitsandbytes"))
    assert validate_setup.check_packages(use_quant=False).status == validate_setup.PASS
    quant = validate_setup.check_packages(use_quant=True)
    assert quant.status == validate_setup.FAIL and "bitsandbytes cannot be imported" in quant.detail
    monkeypatch.setattr(validate_setup, "stack_version", without("trl", "peft"))
    missing = validate_setup.check_packages(use_quant=False)
    assert missing.status == validate_setup.FAIL
    assert "trl cannot be imported" in missing.detail and any("peft" in note for note in missing.notes)
    assert any("pip install -r requirements.txt -c constraints.txt" in note for note in missing.notes)


def test_versions_outside_requirements_are_warnings():
    result = validate_setup.check_packages(use_quant=False, ranges={"torch": ">=99"})
    assert result.status == validate_setup.PASS
    assert any(w.startswith("torch ") and "outside requirements.txt's >=99" in w for w in result.warnings)


def test_configuration_problems_fail_the_configuration_check(base_env):
    with pytest.raises(config.ConfigError) as err:
        config.load_settings({**base_env, "BATCH_SIZE": "zero"})
    result = validate_setup.check_configuration(None, err.value.problems)
    assert result.status == validate_setup.FAIL and result.detail.startswith("BATCH_SIZE='zero'")


def test_configuration_builds_the_model_config_py_counts(base_env):
    settings = config.load_settings({**base_env, "PRESET": "full", "INPUT_DATASET": "x", "FACTOR": "6144"})
    result = validate_setup.check_configuration(settings, [])
    assert result.status == validate_setup.PASS
    assert f"{settings.topology.parameter_count():,} parameters" in result.detail


def test_lora_and_quantization_checks_pass_on_cpu():
    assert validate_setup.check_lora().status == validate_setup.PASS
    quant = validate_setup.check_quantization(use_quant=True)
    assert quant.status == validate_setup.PASS and "on cpu" in quant.detail
