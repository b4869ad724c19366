"""Guards config.py: parsing of every variable, one clear error per bad input (exit 2), the model
topologies the README promises, and the README's variable table staying equal to the code's."""
import re
import subprocess
import sys

import pytest

import config


def load(**env):
    return config.load_settings({k: str(v) for k, v in env.items()})


def test_demo_preset_when_no_data_is_named():
    s = load()
    assert s.preset == "demo" and s.sources["FACTOR"] == "demo"
    assert s.input_dataset == str(config.DEMO_PRETRAIN)
    assert 1e6 < s.topology.parameter_count() < 10e6


def test_full_preset_uses_original_defaults():
    s = load(INPUT_DATASET="some/dataset")
    assert s.preset == "full"
    assert (s.batch_size, s.epochs, s.learning_rate, s.max_length, s.vocab_size) == (4, 3.0, 3e-4, 2048, 52000)
    assert (s.weight_decay, s.gradient_accumulation_steps, s.shard_size, s.factor) == (0.01, 2, 131072, 12288)
    assert (s.startup_duration_timeout, s.timeout_buffer, s.init, s.inst, s.use_quant) == (350, 20, 0, False, False)
    assert s.output_repo == "train-llama" and s.input_repo == "train-llama"


def test_explicit_variable_wins_over_demo():
    s = load(BATCH_SIZE=3)
    assert s.preset == "demo" and s.batch_size == 3 and s.sources["BATCH_SIZE"] == "environment"


@pytest.mark.parametrize("name,raw,attr,expected", [
    ("BATCH_SIZE", "8", "batch_size", 8),
    ("EPOCHS", "1.5", "epochs", 1.5),
    ("LEARNING_RATE", "1e-4", "learning_rate", 1e-4),
    ("USE_QUANT", "YES", "use_quant", True),
    ("INST", "0", "inst", False),
    ("PRECISION", "BF16", "precision", "bf16"),
    ("STARTUP_DURATION_TIMEOUT", "6h", "startup_duration_timeout", 360.0),
    ("STARTUP_DURATION_TIMEOUT", "1d", "startup_duration_timeout", 1440.0),
    ("TIMEOUT_BUFFER", "5", "timeout_buffer", 5.0),
    ("TARGET_PARAMETERS", "300M", "target_parameters", 300_000_000),
    ("NUM_PROCESSES", "auto", "num_processes", 0),
    ("ZERO_STAGE", "3", "zero_stage", 3),
    ("INPUT_DATASET", "me/corpus", "input_dataset", "me/corpus"),
])
def test_parsing(name, raw, attr, expected):
    assert getattr(load(**{name: raw}), attr) == expected


def test_aliases_are_read():
    s = load(INPUT_DS="a/b", INST_DS="c/d")
    assert (s.input_dataset, s.instruct_dataset) == ("a/b", "c/d")
    assert s.sources["INPUT_DATASET"] == "environment (INPUT_DS)"


BAD_INPUTS = [
    ("BATCH_SIZE", "four"), ("BATCH_SIZE", "0"), ("BATCH_SIZE", "-2"), ("EPOCHS", "0"),
    ("EPOCHS", "nan"), ("LEARNING_RATE", "fast"), ("LEARNING_RATE", "2"), ("MAX_LENGTH", "8"),
    ("VOCAB_SIZE", "100"), ("VOCAB_SIZE", "300"), ("WEIGHT_DECAY", "-0.1"), ("GRADIENT_ACCUMULATION_STEPS", "0"),
    ("SHARD_SIZE", "0"), ("INIT", "-1"), ("INST", "maybe"), ("USE_QUANT", "2"), ("PRECISION", "fp8"),
    ("FACTOR", "10"), ("FACTOR", "1000000"), ("TARGET_PARAMETERS", "lots"), ("TARGET_PARAMETERS", "10"),
    ("ZERO_STAGE", "4"), ("STARTUP_DURATION_TIMEOUT", "soon"), ("TIMEOUT_BUFFER", "400"),
    ("SAVE_STEPS", "15"), ("OUTPUT_REPO", "a/b/c"), ("PRESET", "tiny"), ("MAX_RETRIES", "0"),
    ("NUM_PROCESSES", "0"), ("SEED", "-5"),
]


@pytest.mark.parametrize("name,raw", BAD_INPUTS)
def test_bad_input_names_the_variable(name, raw):
    with pytest.raises(config.ConfigError) as err:
        load(**{name: raw})
    assert any(problem.startswith(name) for problem in err.value.problems), err.value.problems


def test_every_problem_is_reported_at_once_with_exit_2(base_env, root):
    env = {**base_env, "BATCH_SIZE": "x", "EPOCHS": "-1", "PRECISION": "f8", "LEARNING_RATES": "1e-3"}
    result = subprocess.run([sys.executable, "config.py"], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 3
    for name in ("BATCH_SIZE='x'", "EPOCHS='-1'", "PRECISION='f8'"):
        assert any(name in line for line in errors)
    assert "LEARNING_RATES is set but not used; did you mean LEARNING_RATE?" in result.stderr


def test_misspellings_warn_and_unrelated_variables_do_not():
    warnings = config.misspelling_warnings({"BATCHSIZE": "1", "PATH": "/bin", "HOME": "/root", "HF_HOME": "x"})
    assert warnings == ["warning: BATCHSIZE is set but not used; did you mean BATCH_SIZE?"]


def test_quantization_needs_bf16():
    with pytest.raises(config.ConfigError, match="PRECISION=fp16"):
        load(USE_QUANT="true", PRECISION="fp16")


def test_quantization_refuses_zero3():
    with pytest.raises(config.ConfigError, match="ZERO_STAGE=3"):
        load(USE_QUANT="true", ZERO_STAGE=3)


def test_token_is_hidden_everywhere():
    s = load(HF_TOKEN="hf_secretvalue123", OUTPUT_REPO="me/model", INPUT_DATASET="d")
    assert "hf_secretvalue123" not in repr(s)
    assert "hf_secretvalue123" not in config.describe(s)
    assert "hf_secretvalue123" not in str(s.public_dict())
    with pytest.raises(config.ConfigError) as err:
        load(HF_TOKEN="hf_bad token", OUTPUT_REPO="me/model", INPUT_DATASET="d")
    assert "hf_bad" not in str(err.value)


# The README promises: 6144 -> ~300M, 12288 -> ~1B, 24576 -> ~4B parameters (within 25%).
@pytest.mark.parametrize("factor,params", [(6144, 300e6), (12288, 1e9), (24576, 4e9)])
def test_factor_gives_promised_size(factor, params):
    topo = config.topology_for_factor(factor, 52000)
    assert abs(topo.parameter_count() / params - 1) <= 0.25
    assert topo.head_dim in (64, 128) and topo.num_heads % topo.num_kv_heads == 0
    assert topo.intermediate_size % 256 == 0 and abs(topo.intermediate_size / topo.hidden_size - 8 / 3) < 0.2


@pytest.mark.parametrize("target", ["50M", "200M", "700M", "2B", "7B"])
def test_every_chosen_shape_has_whole_heads(target):
    topo = config.topology_for_parameters(config.parse_parameter_count(target), 52000)
    assert topo.head_dim * topo.num_heads == topo.hidden_size and topo.head_dim in (64, 128)


def test_depth_grows_with_width():
    depths = [config.topology_for_factor(f, 52000).num_layers for f in (768, 3072, 6144, 12288, 24576)]
    assert depths == sorted(depths) and len(set(depths)) == len(depths)


@pytest.mark.parametrize("target", [50e6, 300e6, 1e9])
def test_target_parameters_picks_the_closest(target):
    topo = config.topology_for_parameters(int(target), 52000)
    count = topo.parameter_count()
    sizes = config.valid_hidden_sizes()
    index = sizes.index(topo.hidden_size)
    for hidden in sizes[max(index - 1, 0):index + 2]:
        other = config.topology_for_hidden(hidden, 52000).parameter_count()
        assert abs(count - target) <= abs(other - target)


@pytest.mark.parametrize("factor,vocab", [(768, 2048), (1536, 3000), (3072, 5003)])
def test_predicted_parameter_count_equals_built_model(factor, vocab):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    topo = config.topology_for_factor(factor, vocab)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**topo.llama_kwargs()))
    assert sum(p.numel() for p in model.parameters()) == topo.parameter_count()


def test_curriculum_arithmetic():
    assert [load(INIT=i).shard_index for i in range(5)] == [0, 0, 1, 2, 3]
    assert [load(INIT=i, EPOCHS=3).run_epochs for i in range(3)] == [1.5, 1.5, 3]
    assert load(INST="true", INIT=1).source_repo == "train-llama-it"
    assert load(INST="true", INIT=0).source_repo == "train-llama"
    assert load(INST="true", OUTPUT_REPO="me/m", INPUT_DATASET="d", INSTRUCT_DATASET="i").published_name == "m-it"


def test_state_file_is_read_and_environment_overrides_it(tmp_path):
    (tmp_path / "run_state.json").write_text('{"init": 2, "inst": true, "done": false}')
    s = load(OUTPUT_DIR=tmp_path)
    assert (s.init, s.inst, s.sources["INIT"]) == (2, True, "state file")
    s = load(OUTPUT_DIR=tmp_path, INIT=0)
    assert (s.init, s.inst, s.sources["INIT"]) == (0, True, "environment")


def test_corrupt_state_file_is_a_clear_error(tmp_path):
    (tmp_path / "run_state.json").write_text("{not json")
    with pytest.raises(config.ConfigError, match="run-state file is unreadable"):
        load(OUTPUT_DIR=tmp_path)


def test_readme_table_lists_exactly_the_variables(root):
    readme = (root / "README.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z_]+)`", readme, flags=re.M))
    documented |= set(re.findall(r"^\| `[A-Z_]+` / `([A-Z_]+)`", readme, flags=re.M))
    assert documented == set(config.VARIABLE_NAMES)


def test_no_other_module_reads_the_environment(root):
    offenders = []
    for path in root.glob("*.py"):
        if path.name in ("config.py", "util.py"):
            continue
        text = path.read_text()
        if re.search(r"os\.environ\[|os\.environ\.get|os\.getenv", text):
            offenders.append(path.name)
    assert offenders == []
