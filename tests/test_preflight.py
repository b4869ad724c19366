"""Guards preflight.py: its verdicts on good and bad set-ups (dataset, input model and its files,
INPUT_REPO as a path, quantization, Hub token, Hub outage, a token inside HF_ENDPOINT, output folders,
disk, GPU memory and RAM on CPU) and the memory estimator's arithmetic and advice. The table of bad
inputs and their one-line messages is tests/test_bad_inputs.py."""

import collections
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hub_server import HubStandIn, Repo

import config
import memory
import preflight

TOKEN = "hf_PREFLIGHTsecret0123456789"
GIB = 2**30


def run_preflight(root, env, *, blocked_module=None):
    """preflight.py in a subprocess; with `blocked_module`, importing that module raises ImportError."""
    if blocked_module is None:
        command = [sys.executable, "preflight.py"]
    else:
        command = [
            sys.executable,
            "-c",
            (
                "import sys, runpy\n"
                "class Block:\n"
                "    def find_spec(self, name, path=None, target=None):\n"
                f"        if name.split('.')[0] == {blocked_module!r}:\n"
                "            raise ImportError(f'No module named {name!r} (blocked by the test)')\n"
                "sys.meta_path.insert(0, Block())\n"
                "runpy.run_path('preflight.py', run_name='__main__')\n"
            ),
        ]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)


def lines_with(output, symbol):
    return [line for line in output.splitlines() if symbol in line]


def settings_for(base_env, **variables):
    return config.load_settings({**base_env, **{k: str(v) for k, v in variables.items()}})


def topology_1b():
    return config.topology_for_factor(12288, 52000)


def estimate(**overrides):
    kwargs = dict(
        topology=topology_1b(),
        vocab_size=52000,
        batch_size=4,
        max_length=2048,
        precision_bytes=2,
        use_quant=False,
        gradient_checkpointing=True,
        zero_stage=2,
        world_size=1,
    )
    return memory.estimate_training_memory(**{**kwargs, **overrides}), {**kwargs, **overrides}


# The whole script.


def test_demo_passes_quickly(root, base_env):
    started = time.monotonic()
    result = run_preflight(root, base_env)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert "✗" not in result.stdout
    assert "[1/9] ✓ configuration" in result.stdout
    assert "[3/9] ✓ memory: training on CPU (1 process(es) at 32-bit) needs an estimated" in result.stdout
    assert "[4/9] ✓ output folders: " in result.stdout
    assert "preflight: 6 passed, 0 failed, 3 skipped" in result.stdout
    assert elapsed < 15, f"preflight took {elapsed:.1f} s"


def test_configuration_errors_exit_2_with_every_problem(root, base_env):
    result = run_preflight(root, {**base_env, "BATCH_SIZE": "0", "ZERO_STAGE": "7"})
    assert result.returncode == 2
    failed = lines_with(result.stdout, "✗")
    assert any("BATCH_SIZE='0'" in line for line in failed)
    assert any("ZERO_STAGE='7'" in line for line in failed)
    assert "Traceback" not in result.stderr


def test_quantization_without_bitsandbytes_fails_with_the_fix(root, base_env):
    result = run_preflight(root, {**base_env, "USE_QUANT": "true"}, blocked_module="bitsandbytes")
    assert result.returncode == 1
    [line] = [text for text in lines_with(result.stdout, "✗") if "quantization" in text]
    assert "bitsandbytes cannot be imported" in line
    assert "pip install -r requirements.txt -c constraints.txt" in line and "USE_QUANT=false" in line
    assert "Traceback" not in result.stderr


def test_quantization_round_trip_passes_with_bitsandbytes(base_env):
    result = preflight.check_quantization(settings_for(base_env, USE_QUANT="true"))
    assert result.status == preflight.PASS
    error = float(result.detail.rsplit(" ", 1)[1])
    assert 0.0 < error < 0.15


# The Hub.


@pytest.fixture
def hub():
    with HubStandIn(token=TOKEN, user="tester") as server:
        yield server


def online_env(base_env, endpoint, **variables):
    env = {
        k: v for k, v in base_env.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    return {**env, "HF_ENDPOINT": endpoint, "PRESET": "demo", **variables}


def test_rejected_token_fails_and_is_never_printed(root, base_env, hub):
    hub.reject_token()
    env = online_env(base_env, hub.endpoint, HF_TOKEN=TOKEN, OUTPUT_REPO="tester/tiny")
    result = run_preflight(root, env)
    assert result.returncode == 1
    [line] = [text for text in lines_with(result.stdout, "✗") if "Hugging Face token" in text]
    assert f"HF_TOKEN was rejected by {hub.endpoint} (401 Unauthorized)" in line
    assert TOKEN not in result.stdout + result.stderr
    assert hub.requests_to("GET", "/api/whoami-v2")


def test_accepted_token_passes_and_read_only_token_fails(base_env, hub):
    settings = settings_for(online_env(base_env, hub.endpoint), HF_TOKEN=TOKEN, OUTPUT_REPO="tester/tiny")
    accepted = preflight.check_hub_token(settings)
    assert accepted.status == preflight.PASS and "as user tester (write token)" in accepted.detail
    hub.role = "read"
    refused = preflight.check_hub_token(settings)
    assert refused.status == preflight.FAIL and "read-only" in refused.detail
    assert TOKEN not in accepted.detail + refused.detail


def test_a_token_inside_hf_endpoint_is_never_printed(base_env):
    settings = settings_for(online_env(base_env, f"http://user:{TOKEN}@127.0.0.1:9"), HF_TOKEN=TOKEN)
    assert preflight.hub_unreachable(settings, "connection refused") == (
        "Hub unreachable at http://<credentials>@127.0.0.1:9 (connection refused)"
    )
    other = settings_for(online_env(base_env, "http://hf_othersecret@127.0.0.1:9"))
    assert "hf_othersecret" not in preflight.hub_unreachable(other, "timed out")


def test_unreachable_hub_is_one_line_without_traceback(root, base_env):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"  # nothing listens there once the probe is closed
    env = online_env(base_env, endpoint, HF_TOKEN=TOKEN, OUTPUT_REPO="tester/tiny", INIT="2")
    result = run_preflight(root, env)
    assert result.returncode == 1
    unreachable = [text for text in result.stdout.splitlines() if "Hub unreachable" in text]
    assert len(unreachable) == 2  # the token check and the input model check, one line each
    assert all(f"Hub unreachable at {endpoint} (connection refused)" in text for text in unreachable)
    assert "Traceback" not in result.stdout + result.stderr
    assert TOKEN not in result.stdout + result.stderr


def test_input_model_on_the_hub_is_found(base_env, hub):
    hub.repos["tester/tiny"] = Repo(files={"config.json": b"{}", "tokenizer.json": b"{}", "model.safetensors": b""})
    settings = settings_for(online_env(base_env, hub.endpoint), HF_TOKEN=TOKEN, INPUT_REPO="tester/tiny", INIT=2)
    result = preflight.check_input_model(settings)
    assert result.status == preflight.PASS and "model tester/tiny on" in result.detail


# The input model.


def test_missing_input_repo_after_the_first_run_names_input_repo(base_env):
    result = preflight.check_input_model(settings_for(base_env, PRESET="demo", INIT=2))
    assert result.status == preflight.FAIL
    assert result.detail.startswith("INPUT_REPO=train-llama: no folder")


def test_first_run_skips_the_input_model(base_env):
    assert preflight.check_input_model(settings_for(base_env, PRESET="demo")).status == preflight.SKIP


LLAMA_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 256}


def write_model_folder(folder, model_config=LLAMA_CONFIG):
    """What check_input_model reads: a LLaMA config.json, a tokenizer and whole safetensors weights."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model_config))
    (folder / "tokenizer.json").write_text("{}")
    save_file({"w": np.zeros(4, dtype=np.float32)}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_local_input_model_must_be_complete(base_env, tmp_path):
    folder = tmp_path / "output" / "train-llama-it"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    settings = settings_for(base_env, PRESET="demo", INST="true", INIT=3)
    incomplete = preflight.check_input_model(settings)
    assert incomplete.status == preflight.FAIL
    assert "lacks model weights (*.safetensors), tokenizer (tokenizer.json)" in incomplete.detail
    assert "this instruct run reads train-llama-it" in incomplete.detail
    write_model_folder(folder)
    assert preflight.check_input_model(settings).status == preflight.PASS


@pytest.mark.parametrize("spelling", ["absolute", "./"])
def test_input_repo_as_a_path_is_read_there_and_never_on_the_hub(base_env, tmp_path, monkeypatch, spelling):
    folder = write_model_folder(tmp_path / "models" / "base")
    write_model_folder(tmp_path / "output" / "base", {**LLAMA_CONFIG, "model_type": "gpt2"})  # same name: not used
    monkeypatch.chdir(tmp_path)
    raw = str(folder) if spelling == "absolute" else "./models/base"
    result = preflight.check_input_model(settings_for(base_env, PRESET="demo", INIT=1, INPUT_REPO=raw))
    assert result.status == preflight.PASS
    assert result.detail == f"INPUT_REPO={folder}: local model and tokenizer in {folder}"
    instruct = preflight.check_input_model(settings_for(base_env, PRESET="demo", INST="true", INIT=1, INPUT_REPO=raw))
    assert instruct.status == preflight.FAIL
    assert instruct.detail == (
        f"INPUT_REPO={folder} (this instruct run reads {folder}-it): no folder {folder}-it; "
        "point INPUT_REPO at a model folder (instruction runs after the first read "
        "INPUT_REPO-it)"
    )


def test_safetensors_framing_is_checked_from_the_header(tmp_path):
    import prep

    path = write_model_folder(tmp_path / "m") / "model.safetensors"
    whole = path.read_bytes()
    assert prep.safetensors_problem(path) is None
    path.write_bytes(whole[:-1])
    assert prep.safetensors_problem(path) == (
        f"is truncated: {len(whole) - 1:,} bytes, its header describes {len(whole):,}"
    )
    path.write_bytes(whole[:20])
    assert prep.safetensors_problem(path) == "is not a safetensors file (no valid header), or is truncated to 20 bytes"
    path.write_bytes((2).to_bytes(8, "little") + b"[]")
    assert prep.safetensors_problem(path) == "is not a safetensors file (no valid header)"


# The dataset.


def test_missing_dataset_file_names_input_dataset(base_env, tmp_path):
    missing = tmp_path / "nowhere" / "corpus.jsonl"
    result = preflight.check_dataset(settings_for(base_env, PRESET="demo", INPUT_DATASET=missing))
    assert result.status == preflight.FAIL
    assert result.detail.startswith(f"INPUT_DATASET={missing}: no such file or folder")


def test_missing_text_column_lists_the_columns(base_env, tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text("\n".join(json.dumps({"content": f"row {i}", "id": i}) for i in range(3)) + "\n")
    result = preflight.check_dataset(settings_for(base_env, PRESET="demo", INPUT_DATASET=data))
    assert result.status == preflight.FAIL
    assert "has no `text` column (columns: content, id)" in result.detail


def test_embedded_instruct_corpus_passes(base_env):
    result = preflight.check_dataset(settings_for(base_env, PRESET="demo", INST="true"))
    assert result.status == preflight.PASS and result.detail.startswith("INSTRUCT_DATASET=")


def test_instruct_rows_must_be_conversations(base_env, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"text": "just prose, no turns"}) + "\n")
    result = preflight.check_dataset(settings_for(base_env, PRESET="demo", INST="true", INSTRUCT_DATASET=data))
    assert result.status == preflight.FAIL and "INSTRUCT_DATASET=" in result.detail
    assert "row 1: not in the <|user|>PROMPT<|end|><|bot|>ANSWER<|end|> format" in result.detail


def test_messages_column_is_accepted_and_checked(base_env, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ]
            }
        )
        + "\n"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "beep"}]}) + "\n")
    for path, status in ((good, preflight.PASS), (bad, preflight.FAIL)):
        settings = settings_for(base_env, PRESET="demo", INST="true", INSTRUCT_DATASET=path)
        assert preflight.check_dataset(settings).status == status


def test_unsupported_file_type_and_broken_json_fail(base_env, tmp_path):
    odd = tmp_path / "corpus.xlsx"
    odd.write_bytes(b"PK")
    result = preflight.check_dataset(settings_for(base_env, PRESET="demo", INPUT_DATASET=odd))
    assert result.status == preflight.FAIL and "unsupported file type '.xlsx'" in result.detail
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    result = preflight.check_dataset(settings_for(base_env, PRESET="demo", INPUT_DATASET=broken))
    assert result.status == preflight.FAIL and "line 2: not valid JSON" in result.detail


# Memory.


def test_not_enough_memory_fails_with_advice_including_quantization():
    _, kwargs = estimate(topology=config.topology_for_factor(24576, 52000))  # ~4B parameters
    result = preflight.judge_memory(kwargs, {"GPU 0 (test card)": 24 * GIB})
    assert result.status == preflight.FAIL
    assert "> 24.0 GiB free on GPU 0 (test card)" in result.detail
    assert any("USE_QUANT=true" in note for note in result.notes)


def test_enough_memory_passes_and_tight_memory_warns():
    total, kwargs = estimate()
    roomy = preflight.judge_memory(kwargs, {"GPU 0": 2 * total["total"]})
    assert roomy.status == preflight.PASS and not roomy.warnings
    tight = preflight.judge_memory(kwargs, {"GPU 0": 1.05 * total["total"]})
    assert tight.status == preflight.PASS and "out-of-memory error is possible" in tight.warnings[0]


def test_advice_prefers_checkpointing_then_smaller_batches():
    full, kwargs = estimate(gradient_checkpointing=False, batch_size=8, gradient_accumulation_steps=2)
    checkpointed, _ = estimate(gradient_checkpointing=True, batch_size=8, gradient_accumulation_steps=2)
    advice = memory.advice_to_fit(kwargs, (full["total"] + checkpointed["total"]) / 2)
    assert advice[0].startswith("GRADIENT_CHECKPOINTING=true")
    batch_advice = [a for a in advice if a.startswith("BATCH_SIZE=")]
    assert batch_advice and "GRADIENT_ACCUMULATION_STEPS=" in batch_advice[0]
    batch, accumulation = (int(part.split("=")[1]) for part in batch_advice[0].split()[:2])
    assert batch * accumulation == 8 * 2  # the effective batch is kept


def test_advice_is_empty_when_nothing_fits():
    _, kwargs = estimate()
    assert memory.advice_to_fit(kwargs, 1 * GIB) == []


def test_zero_stages_shard_what_they_promise():
    # Two micro-steps: gradients persist through backward, so sharding them shows in the peak too.
    stages = [estimate(zero_stage=s, world_size=4, gradient_accumulation_steps=2)[0] for s in range(4)]
    params = stages[0]["parameters"]
    assert stages[0]["optimizer_states"] == pytest.approx(12 * params)
    assert stages[1]["optimizer_states"] == pytest.approx(12 * params / 4)
    assert stages[1]["gradients"] == pytest.approx(2 * params)
    assert stages[2]["gradients"] == pytest.approx(2 * params / 4)
    assert stages[2]["weights"] == pytest.approx(2 * params)
    assert stages[3]["weights"] == pytest.approx(2 * params / 4)
    static = [s["weights"] + s["gradients"] + s["optimizer_states"] for s in stages]
    assert static[0] > static[1] > static[2] > static[3]
    assert stages[3]["total"] < stages[2]["total"] < stages[1]["total"]


def test_checkpointing_cuts_activations():
    with_ckpt, _ = estimate(gradient_checkpointing=True)
    without, _ = estimate(gradient_checkpointing=False)
    assert with_ckpt["activations"] == with_ckpt["activations_with_checkpointing"]
    assert without["activations"] == without["activations_without_checkpointing"]
    assert without["activations"] > 4 * with_ckpt["activations"]
    # Activations grow linearly with the tokens of a micro-batch.
    double, _ = estimate(gradient_checkpointing=False, batch_size=8)
    assert 1.8 < double["activations"] / without["activations"] <= 2.0


def test_four_bit_lora_is_far_below_full_training():
    full, _ = estimate(use_quant=False)
    quant, _ = estimate(use_quant=True)
    full_states = full["weights"] + full["gradients"] + full["optimizer_states"]
    quant_states = quant["weights"] + quant["lora"]
    assert quant_states < full_states / 5
    assert quant["trainable_parameters"] == preflight.lora_parameter_count(topology_1b())
    assert quant["trainable_parameters"] < 0.02 * quant["parameters"]


def test_trained_chat_rows_cost_a_head_copy_and_gradient_only_in_quantized_instruction_runs(base_env):
    quant, _ = estimate(use_quant=True)
    rows, _ = estimate(use_quant=True, trains_token_rows=True)
    head = config.padded_vocab(52000) * topology_1b().hidden_size
    assert rows["activations"] - quant["activations"] >= 4 * head  # the fp32 copy, kept for backward
    assert rows["loss_head"] - quant["loss_head"] >= head * (4 + 2)  # the head's fp32 and bf16 gradients
    assert rows["allocated"] < estimate(use_quant=False)[0]["allocated"] / 4
    for inst, expected in (("false", False), ("true", True)):
        settings = settings_for(base_env, USE_QUANT="true", INST=inst)
        assert gpu_estimate_kwargs(settings)["trains_token_rows"] is expected
    assert not gpu_estimate_kwargs(settings_for(base_env, INST="true"))["trains_token_rows"]


def gpu_estimate_kwargs(settings):
    machine = memory.Machine(1, True, 2, False, 80 * GIB, "test")
    return memory.estimate_kwargs(settings, machine, 4, 2, True)


def test_one_billion_parameter_numbers_are_plausible():
    result, _ = estimate()  # the full preset: ~1B, bf16, ZeRO-2 on one GPU, batch 4 x 2048, checkpointing
    assert 1.0e9 < result["parameters"] < 1.5e9
    per_param = (result["weights"] + result["gradients"] + result["optimizer_states"]) / result["parameters"]
    assert per_param == pytest.approx(16)  # 2 + 2 + 12 bytes: mixed-precision AdamW
    assert 18 * GIB < result["total"] < 40 * GIB
    assert result["cuda_overhead"] > 0.4 * GIB and result["total"] > result["allocated"]


# Peaks measured on an NVIDIA H200 (2026-11-28): train.py's set-up (TRL SFTTrainer under DeepSpeed with
# config.deepspeed_config, bf16, one GPU, random tokens, 4 steps), torch.cuda.max_memory_allocated().
# These ran with the original's untrimmed buckets (two of 5e8 elements), so the estimate is asked for those.
# (FACTOR, VOCAB_SIZE, BATCH_SIZE, MAX_LENGTH, ZERO_STAGE, GRADIENT_CHECKPOINTING, USE_QUANT, GiB)
MEASURED_PEAKS = [
    (768, 2048, 16, 256, 2, False, False, 2.252),
    (12288, 52000, 4, 2048, 2, True, False, 21.059),
    (12288, 52000, 2, 2048, 2, False, False, 21.601),
    (12288, 52000, 4, 2048, 0, True, False, 19.151),
    (6144, 52000, 8, 1024, 1, False, False, 11.238),
    (12288, 52000, 4, 2048, 2, True, True, 4.497),
]


# The same, measured through train.py with the buckets that config.deepspeed_buckets trims (H200,
# 2026-11-28, `gpu_benchmarks.sh nf4` at commit 6ca8aff; the embedded corpus gives 1,344 embedding rows).
MEASURED_PEAKS_TRIMMED_BUCKETS = [
    (12288, 1344, 1, 1024, 2, True, True, 0.848),
    (12288, 1344, 1, 2048, 2, True, True, 1.047),
    (12288, 1344, 4, 1024, 2, True, True, 1.458),
    (12288, 1344, 4, 2048, 2, True, True, 2.294),
    (12288, 1344, 4, 2048, 2, True, False, 16.809),
]


@pytest.mark.parametrize(
    "factor, vocab, batch, length, zero, ckpt, quant, measured_gib, buckets",
    [(*row, (config.ORIGINAL_BUCKET_ELEMENTS, True)) for row in MEASURED_PEAKS]
    + [(*row, None) for row in MEASURED_PEAKS_TRIMMED_BUCKETS],
)
def test_estimate_matches_measured_gpu_peaks(factor, vocab, batch, length, zero, ckpt, quant, measured_gib, buckets):
    result = memory.estimate_training_memory(
        config.topology_for_factor(factor, vocab), vocab, batch, length, 2, quant, ckpt, zero, 1, buckets=buckets
    )
    assert result["allocated"] / GIB == pytest.approx(measured_gib, rel=0.10)


def test_layer_activations_match_what_autograd_saves():
    """The per-layer formula against the storages autograd really keeps for a bf16 LLaMA on CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    topology = config.Topology(
        hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=384, vocab_size=512
    )
    model = LlamaForCausalLM(LlamaConfig(**topology.llama_kwargs(), attn_implementation="sdpa")).to(torch.bfloat16)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch, length = 2, 64
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model.model(input_ids=torch.randint(0, 512, (batch, length)))
    tokens = batch * length
    shared = tokens * 8 + 2 * length * topology.head_dim * 2  # input ids; rotary cos and sin
    final_norm = tokens * (4 * 128 + 4 + 2 * 128)
    per_layer = (sum(saved.values()) - shared - final_norm) / topology.num_layers
    assert per_layer == pytest.approx(memory.layer_activation_bytes(topology, 2, False) * tokens, rel=0.01)


# Sanity warnings and disk.


def test_sanity_warnings_flag_odd_settings(base_env):
    settings = settings_for(
        base_env, PRESET="demo", LEARNING_RATE="0.5", MAX_LENGTH="1000", EPOCHS="20", BATCH_SIZE="1"
    )
    warnings = " | ".join(preflight.sanity_warnings(settings, world_size=1))
    for expected in (
        "LEARNING_RATE=0.5 is outside",
        "MAX_LENGTH=1000 is not a power of two",
        "EPOCHS=20 > 10",
        "the global batch is 1 sequences",
    ):
        assert expected in warnings
    assert preflight.check_sanity(settings).status == preflight.PASS  # warnings do not fail


def test_disk_check_counts_checkpoints_and_fails_when_full(base_env, monkeypatch):
    settings = settings_for(base_env, OUTPUT_REPO="me/model", INPUT_DATASET="me/data")
    params = settings.topology.parameter_count()
    on_gpu = preflight.disk_needs(settings, on_gpu=True)
    # Per checkpoint: 16-bit weights in the HF and the DeepSpeed files, fp32 master weights and two moments.
    assert on_gpu[str(settings.work_dir)]["checkpoints"] == 3 * (2 + 2 + 12) * params  # 2 kept + 1 being written
    assert on_gpu[str(settings.output_dir)] == {"published model": 2 * params}
    on_cpu = preflight.disk_needs(settings, on_gpu=False)  # training in fp32
    assert on_cpu[str(settings.work_dir)]["checkpoints"] == 3 * (4 + 4 + 12) * params
    assert on_cpu[str(settings.output_dir)] == {"published model": 4 * params}
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(100 * GIB, 99 * GIB, 1 * GIB))
    result = preflight.check_disk(settings)
    assert result.status == preflight.FAIL and "needs ~" in result.detail and "1.0 GiB is free" in result.detail


def test_disk_check_counts_the_adapter_only_when_it_is_published(base_env):
    quant = settings_for(base_env, OUTPUT_REPO="me/model", INPUT_DATASET="me/data", USE_QUANT="true")
    adapter = settings_for(
        base_env, OUTPUT_REPO="me/model", INPUT_DATASET="me/data", USE_QUANT="true", SAVE_ADAPTER="true"
    )
    lora, params = preflight.lora_parameter_count(quant.topology), quant.topology.parameter_count()
    assert preflight.disk_needs(quant, on_gpu=True)[str(quant.output_dir)] == {"published model": 2 * params}
    needs = preflight.disk_needs(adapter, on_gpu=True)
    assert needs[str(adapter.output_dir)] == {"published model": 2 * params, "published adapter": 4 * lora}
    assert needs[str(adapter.work_dir)]["trained adapter"] == 4 * lora


def test_output_folders_must_be_folders_this_user_can_write(base_env, tmp_path, monkeypatch):
    settings = settings_for(base_env, PRESET="demo")
    assert preflight.check_folders(settings).status == preflight.PASS  # missing folders are created later
    (tmp_path / "output").write_text("a file")
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: Path(path) != tmp_path)
    result = preflight.check_folders(settings)
    assert result.status == preflight.FAIL
    assert result.detail == (
        f"OUTPUT_DIR={tmp_path / 'output'}: is a file, not a folder; set OUTPUT_DIR to a folder (created if missing)"
    )
    assert result.notes == [
        f"WORK_DIR={tmp_path / 'work'}: {tmp_path} is not writable by this user; set WORK_DIR "
        "to a writable folder or change its permissions"
    ]


# Memory on CPU.


def cpu_estimate_kwargs(settings, processes):
    """The estimate's arguments for a CPU run of the original's shape (micro-batch 4 x 2, checkpointing)."""
    machine = memory.Machine(processes, False, memory.cpu_precision_bytes(settings), False, 0.0, "test")
    return memory.estimate_kwargs(settings, machine, 4, 2, True)


def test_cpu_memory_counts_every_process_and_advises(base_env):
    settings = settings_for(base_env, OUTPUT_REPO="me/model", INPUT_DATASET="me/data")  # the 1.02B full preset
    one = cpu_estimate_kwargs(settings, 1)
    assert one["precision_bytes"] == 4 and not one["include_cuda_overhead"]  # fp32: what train.py trains in on CPU
    per_process = memory.estimate_training_memory(**one)["total"]
    need = per_process + memory.CPU_PROCESS_BYTES
    short = preflight.judge_cpu_memory(one, 23 * GIB)
    assert need > 23 * GIB and short.status == preflight.FAIL
    assert short.detail == (
        f"training on CPU (1 process(es) at 32-bit) needs an estimated {memory.gib(need)} of RAM > 23.0 GiB available"
    )
    assert short.notes and all(note.startswith("would fit: ") for note in short.notes)
    assert preflight.judge_cpu_memory(one, 2 * need).status == preflight.PASS
    two = cpu_estimate_kwargs(settings, 2)  # each process holds its own copy of the model
    need_two = 2 * (memory.estimate_training_memory(**two)["total"] + memory.CPU_PROCESS_BYTES)
    assert need_two > need  # ZeRO-2 shards the optimizer states, but weights and activations are per process
    assert preflight.judge_cpu_memory(two, 0.95 * need_two).status == preflight.FAIL
    assert preflight.judge_cpu_memory(two, 1.2 * need_two).detail.startswith(
        f"training on CPU (2 process(es) at 32-bit) needs an estimated {memory.gib(need_two)} of RAM;"
    )
    tight = preflight.judge_cpu_memory(one, 1.05 * need)
    assert tight.status == preflight.PASS and "an out-of-memory kill is possible" in tight.warnings[0]


def test_cpu_memory_check_reads_the_available_ram(base_env, monkeypatch):
    import psutil
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(memory, "GPU_DEVICE_FILES", ())  # no GPU driver either
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=4 * GIB, total=4 * GIB))
    demo = preflight.check_gpu_memory(settings_for(base_env, PRESET="demo"))
    assert demo.status == preflight.PASS and demo.detail.endswith("; 4.0 GiB available")
    huge = preflight.check_gpu_memory(settings_for(base_env, PRESET="demo", FACTOR=98304))
    assert (
        huge.notes[0].startswith("batch: 16 sequences (4,096 tokens) per optimizer step")
        and "(as set)" in huge.notes[0]
    )
    assert huge.status == preflight.FAIL and huge.notes[1:] == [
        "no single setting change fits: train on a GPU, or a smaller model (lower FACTOR or TARGET_PARAMETERS)"
    ]


def fake_gpus(monkeypatch, free_gib, bf16=True):
    """Make torch report GPUs with the given free memory (the GPU check's code path, on CPU)."""
    import torch

    monkeypatch.setattr(memory, "GPU_DEVICE_FILES", ("/",))  # a driver's device file, as far as it knows
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(free_gib))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: f"Fake GPU {index}")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (free_gib[index] * GIB, 80 * GIB))
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda index=0: SimpleNamespace(name=f"Fake GPU {index}", total_memory=80 * GIB),
    )


def test_gpu_check_uses_every_gpus_free_memory(monkeypatch, base_env):
    settings = settings_for(base_env, OUTPUT_REPO="me/model", INPUT_DATASET="me/data")  # ~1B, ZeRO-2
    fake_gpus(monkeypatch, [79.0, 79.0])
    roomy = preflight.check_gpu_memory(settings)
    assert roomy.status == preflight.PASS and "free on GPU 0 (Fake GPU 0)" in roomy.detail
    fake_gpus(monkeypatch, [79.0, 6.0])
    short = preflight.check_gpu_memory(settings)
    assert short.status == preflight.FAIL and "> 6.0 GiB free on GPU 1 (Fake GPU 1)" in short.detail
    assert any(note.startswith("would fit: ") for note in short.notes)


def test_gpu_check_rejects_bf16_without_support_and_too_many_processes(monkeypatch, base_env):
    fake_gpus(monkeypatch, [15.0], bf16=False)
    bf16 = preflight.check_gpu_memory(settings_for(base_env, PRESET="demo", PRECISION="bf16"))
    assert bf16.status == preflight.FAIL and "has no bf16 support; use PRECISION=auto" in bf16.detail
    processes = preflight.check_gpu_memory(settings_for(base_env, PRESET="demo", NUM_PROCESSES=2))
    assert processes.status == preflight.FAIL and "only 1 GPU(s) are visible" in processes.detail
