"""Guards config.py: parsing of every variable, all problems reported at once (exit 2), INPUT_REPO's
local paths and equivalent dataset paths giving one stage, OUTPUT_REPO's length budget, the run-state
rules (a damaged file, published models without one), HF_ENDPOINT's credentials kept out of logs, the
model topologies the README promises, and the README's variable table staying equal to the code's.
The table of bad inputs and their messages is tests/test_bad_inputs.py."""

import json
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


def test_full_preset_uses_original_defaults_and_chooses_the_batch_at_run_time():
    s = load(INPUT_DATASET="some/dataset")
    assert s.preset == "full"
    assert (s.epochs, s.learning_rate, s.max_length, s.vocab_size) == (3.0, 3e-4, 2048, 52000)
    assert (s.weight_decay, s.shard_size, s.factor) == (0.01, 131072, 12288)
    assert (s.batch_size, s.gradient_accumulation_steps, s.gradient_checkpointing, s.use_liger) == (None,) * 4
    assert s.global_batch_size == 32 and s.public_dict()["BATCH_SIZE"] == "auto"
    assert (s.startup_duration_timeout, s.timeout_buffer, s.init, s.inst, s.use_quant) == (350, 20, 0, False, False)
    assert s.output_repo == "train-llama" and s.input_repo == "train-llama"


def test_auto_is_accepted_where_the_run_chooses_and_refused_elsewhere():
    s = load(PRESET="demo", BATCH_SIZE="auto", GRADIENT_CHECKPOINTING="AUTO", USE_LIGER="false")
    assert (s.batch_size, s.gradient_checkpointing, s.use_liger) == (None, None, False)
    with pytest.raises(config.ConfigError) as err:
        load(BATCH_SIZE="lots", EPOCHS="auto")
    assert err.value.problems[0] == "BATCH_SIZE='lots': must be auto or a whole number from 1 to 4096 (default auto)"
    assert err.value.problems[1].startswith("EPOCHS='auto': must be a number > 0")


def test_explicit_variable_wins_over_demo():
    s = load(BATCH_SIZE=3)
    assert s.preset == "demo" and s.batch_size == 3 and s.sources["BATCH_SIZE"] == "environment"


@pytest.mark.parametrize(
    "name,raw,attr,expected",
    [
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
        ("NNODES", "1", "nnodes", 1),
        ("MASTER_PORT", "auto", "master_port", None),
        ("MASTER_PORT", "29600", "master_port", 29600),
        ("ZERO_STAGE", "3", "zero_stage", 3),
        ("INPUT_DATASET", "me/corpus", "input_dataset", "me/corpus"),
    ],
)
def test_parsing(name, raw, attr, expected):
    assert getattr(load(**{name: raw}), attr) == expected


def test_aliases_are_read():
    s = load(INPUT_DS="a/b", INST_DS="c/d")
    assert (s.input_dataset, s.instruct_dataset) == ("a/b", "c/d")
    assert s.sources["INPUT_DATASET"] == "environment (INPUT_DS)"


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


def test_report_to_names_the_missing_package_and_its_values(monkeypatch):
    assert load(INPUT_DATASET="d").report_to == "tensorboard"
    assert load(REPORT_TO="None", INPUT_DATASET="d").report_to == "none"
    monkeypatch.setitem(config.REPORT_TARGETS, "wandb", "surely_not_installed_package")
    with pytest.raises(config.ConfigError) as err:
        load(REPORT_TO="wandb", INPUT_DATASET="d")
    assert err.value.problems == [
        "REPORT_TO=wandb: the Python package `surely_not_installed_package` is not "
        "installed; install it (pip install surely_not_installed_package) or set "
        "REPORT_TO=tensorboard or none"
    ]
    with pytest.raises(config.ConfigError) as err:
        load(REPORT_TO="mlflow", EVAL_STEPS="0", MODEL_LICENSE="MIT License", INPUT_DATASET="d")
    assert [line.split(":")[0] for line in err.value.problems] == [
        "EVAL_STEPS='0'",
        "REPORT_TO='mlflow'",
        "MODEL_LICENSE='MIT License'",
    ]
    assert "must be one of tensorboard, trackio, wandb, none" in err.value.problems[1]


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
    for hidden in sizes[max(index - 1, 0) : index + 2]:
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


def test_a_damaged_state_file_is_not_read_when_init_and_inst_are_both_set(tmp_path):
    (tmp_path / "run_state.json").write_text("")
    with pytest.raises(config.ConfigError, match="set INIT and INST to the stage to run next"):
        load(OUTPUT_DIR=tmp_path, INIT=2)
    s = load(OUTPUT_DIR=tmp_path, INIT=2, INST="false")
    assert (s.init, s.inst, s.sources["INIT"], s.sources["INST"]) == (2, False, "environment", "environment")


def publish_record(output_dir, name, phase, init):
    (output_dir / name).mkdir(parents=True)
    (output_dir / name / "publish.json").write_text(json.dumps({"stage_key": {"phase": phase, "init": init}}))


def test_published_models_without_a_state_file_are_not_trained_over(tmp_path):
    """The rule: no run_state.json and no INIT/INST set means pretraining INIT 0, which replaces
    OUTPUT_DIR/<name>. That is refused when a later stage published there (the state was lost, the
    curriculum is not new); pretraining INIT 0's own model (stopped by the timer, or killed before
    advancing) is resumed; setting INIT or INST says which stage to run."""
    publish_record(tmp_path, "train-llama", "pretrain", 0)
    assert load(OUTPUT_DIR=tmp_path).init == 0  # the stage's own model: a rerun of that stage
    publish_record(tmp_path, "train-llama-it", "instruct", 1)
    with pytest.raises(config.ConfigError) as err:
        load(OUTPUT_DIR=tmp_path)
    assert err.value.problems == [
        f"OUTPUT_DIR={tmp_path}: no run_state.json, but it holds published models of later stages: "
        "train-llama-it (instruct INIT=1); set INIT and INST to the stage to run next (INIT=0 INST=false starts "
        "over and replaces them), or use another OUTPUT_DIR"
    ]
    assert load(OUTPUT_DIR=tmp_path, INIT=0).init == 0  # asked for explicitly
    assert load(OUTPUT_DIR=tmp_path, INST="true", INIT=2).inst is True
    assert load(OUTPUT_DIR=tmp_path, OUTPUT_REPO="other", PRESET="demo").init == 0  # not this model's folders
    (tmp_path / "train-llama-it" / "publish.json").write_text("{damaged")
    with pytest.raises(config.ConfigError, match=r"train-llama-it \(unknown\)"):
        load(OUTPUT_DIR=tmp_path)


@pytest.mark.parametrize("spelling", ["absolute", "./", "../", "~"])
def test_input_repo_takes_a_local_folder_in_every_spelling(tmp_path, monkeypatch, spelling):
    folder = tmp_path / "models" / "base"
    folder.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "models")
    raw = {"absolute": str(folder), "./": "./base", "../": "../models/base", "~": "~/models/base"}[spelling]
    s = load(INPUT_REPO=raw, INIT=1)
    assert s.input_repo == str(folder) and s.input_repo_is_path
    assert s.stage_key()["source_repo"] == str(folder)


def test_input_repo_hub_ids_and_names_stay_as_they_are():
    for raw in ("someone/base", "base", "me/my.model_v2"):
        s = load(INPUT_REPO=raw)
        assert s.input_repo == raw and not s.input_repo_is_path


def test_equivalent_dataset_paths_give_one_stage(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.jsonl").write_text('{"text": "a"}\n')
    monkeypatch.chdir(tmp_path)
    spellings = ["data/x.jsonl", "./data/x.jsonl", str(tmp_path / "data" / "x.jsonl"), "data/../data/x.jsonl"]
    keys = [load(INPUT_DATASET=value).stage_key() for value in spellings]
    assert all(key == keys[0] for key in keys) and keys[0]["dataset"] == str(tmp_path / "data" / "x.jsonl")
    instruct = [load(INPUT_DATASET="d/x", INSTRUCT_DATASET=value, INST="true").stage_key() for value in spellings[:2]]
    assert instruct[0] == instruct[1]
    assert load(INPUT_DATASET="someone/corpus").input_dataset == "someone/corpus"  # a Hub id


def test_output_repo_leaves_room_for_every_published_suffix():
    limit = config.HUB_NAME_LIMIT - len("-it-adapter")
    assert limit == 85
    assert load(OUTPUT_REPO="o" * 96 + "/" + "n" * limit, PRESET="demo").repo_name == "n" * limit
    with pytest.raises(config.ConfigError, match="at most 85 characters, not 86"):
        load(OUTPUT_REPO="n" * 86)
    with pytest.raises(config.ConfigError, match="at most 96 characters each, not 97"):
        load(OUTPUT_REPO="o" * 97 + "/name")
    for bad in ("me/name-", "me/name.", "me/a--b", "-me/name"):
        with pytest.raises(config.ConfigError, match="OUTPUT_REPO="):
            load(OUTPUT_REPO=bad)


def test_credentials_in_hf_endpoint_are_never_shown():
    for endpoint in ("http://hf_secretvalue123@host:8080", "http://user:hf_secretvalue123@host:8080"):
        s = load(HF_ENDPOINT=endpoint, HF_TOKEN="hf_secretvalue123")
        assert s.hf_endpoint == endpoint  # used as given
        assert "hf_secretvalue123" not in config.describe(s)
        assert s.public_dict()["HF_ENDPOINT"] == "http://<credentials>@host:8080"


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


def test_get_prints_one_setting_and_names_an_unknown_one_in_one_line(root, base_env):
    def get(name):
        return subprocess.run(
            [sys.executable, "config.py", "--get", name], cwd=root, env=base_env, capture_output=True, text=True
        )

    assert get("batch_size").stdout.strip() == "16" and get("run_all").stdout.strip() == "true"
    unknown = get("batchsize")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert unknown.stderr.startswith("config.py: --get batchsize: no such setting; did you mean batch_size?")
