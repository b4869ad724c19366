"""Guards the bad-input table: every input a user can get wrong (variables, datasets, input models,
paths, the run-state file, memory on CPU, disk, the Hub) is caught before any training by the stage
meant to catch it (config: exit 2; preflight or prep: exit 1), with exactly one line that holds the
message's fixed part and names the variable or file, no traceback, and never the token.

This file is the one place that lists the cases (`CASES`). Each runs the stage's entry point
in-process (config.settings_or_exit, preflight.main, prep.main) with the environment set; the cases
marked `script` run `python3 preflight.py` / `python3 prep.py` instead, to check the real scripts."""

from __future__ import annotations

import collections
import json
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from hub_server import HubStandIn, Repo

import config
import memory
import nodes
import preflight
import prep

TOKEN = "hf_BADINPUTSsecret0123456789"
GIB = 2**30
RAM_GIB = 23  # the machine of the fault campaign: the full preset must not pass on it
DEMO_CORPUS = str(config.DEMO_PRETRAIN)
LLAMA_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 256}
EXIT_STATUS = {"config": 2, "preflight": 1, "prep": 1}


@dataclass(frozen=True)
class Case:
    id: str
    stage: str  # who must catch it: config, preflight or prep
    env: dict[str, str]  # over PRESET=demo; {tmp}, {hub}, {closed} and {token} are filled in
    fragment: str  # the message's fixed part, verbatim
    names: tuple[str, ...]  # what the line must name (the variable or file), placeholders as in env
    setup: Callable[[Path], None] | None = None  # writes files under the test's folder first
    patch: Callable[[pytest.MonkeyPatch, Path], None] | None = None  # fakes the machine (RAM, disk, access)
    hub: Callable[[HubStandIn], None] | None = None  # prepares the Hub stand-in ({hub})
    script: bool = False  # run the real script in a subprocess


# ---- what the cases write ----


def safetensors_bytes(values: int = 8) -> bytes:
    """A well-formed safetensors file of one float32 tensor."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [values], "data_offsets": [0, 4 * values]}}).encode()
    return len(header).to_bytes(8, "little") + header + bytes(4 * values)


def model_folder(
    weights: bytes | None = None, model_config: dict | None = LLAMA_CONFIG, name: str = "model"
) -> Callable[[Path], None]:
    """A model folder {tmp}/<name>: config.json (None: left out), tokenizer.json and model.safetensors."""

    def write(tmp: Path) -> None:
        folder = tmp / name
        folder.mkdir(parents=True)
        if model_config is not None:
            (folder / "config.json").write_text(json.dumps(model_config))
        (folder / "tokenizer.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(safetensors_bytes() if weights is None else weights)

    return write


def nan_weight_model(tmp: Path) -> None:
    """A real tiny LLaMA and tokenizer whose down_proj of layer 0 holds a NaN."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(
        ["a small corpus for a tiny tokenizer"] * 4,
        trainers.BpeTrainer(vocab_size=300, special_tokens=list(config.SPECIAL_TOKENS)),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=320,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    )
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")


def write(relative: str, content: bytes | str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode("latin-1") if isinstance(content, str) else content)

    return setup


def published(name: str, phase: str, init: int) -> Callable[[Path], None]:
    """A model published by `util.py publish` for that stage (only its record matters here)."""
    return write(f"output/{name}/publish.json", json.dumps({"stage_key": {"phase": phase, "init": init}}))


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for one in setups:
            one(tmp)

    return setup


def free_disk(n_bytes: int) -> Callable[[pytest.MonkeyPatch, Path], None]:
    usage = collections.namedtuple("usage", "total used free")
    return lambda monkeypatch, tmp: monkeypatch.setattr(
        preflight.shutil, "disk_usage", lambda path: usage(100 * GIB, 100 * GIB - n_bytes, n_bytes)
    )


def not_writable(folder_name: str) -> Callable[[pytest.MonkeyPatch, Path], None]:
    return lambda monkeypatch, tmp: monkeypatch.setattr(
        preflight.os, "access", lambda path, mode: Path(path).name != folder_name
    )


def variable(name: str, raw: str, fragment: str, **env: str) -> Case:
    """A variable whose value config rejects."""
    return Case(f"{name}={raw[:20]}", "config", {name: raw, **env}, fragment, (f"{name}=",))


LONG_NAME = "n" * 250
INPUT_MODEL = {"INIT": "1", "INPUT_REPO": "{tmp}/model"}  # a pretraining run that continues from {tmp}/model
ON_THE_HUB = {"HF_ENDPOINT": "{hub}", "HF_TOKEN": "{token}"}

CASES = [
    # ---- variables ----
    variable("BATCH_SIZE", "four", "must be auto or a whole number from 1 to 4096"),
    variable("BATCH_SIZE", "0", "must be auto or a whole number from 1 to 4096"),
    variable("BATCH_SIZE", "-2", "must be auto or a whole number from 1 to 4096"),
    variable("GLOBAL_BATCH_SIZE", "0", "must be a whole number from 1 to 1000000"),
    variable("GRADIENT_CHECKPOINTING", "sometimes", "must be auto or true or false"),
    variable("USE_LIGER", "yes please", "must be auto or true or false"),
    Case(
        "BATCH_SIZE not dividing the global batch",
        "preflight",
        {"BATCH_SIZE": "5", "GRADIENT_ACCUMULATION_STEPS": "auto"},
        "must divide the 16 sequences per process (GLOBAL_BATCH_SIZE=16 over 1 process(es))",
        ("BATCH_SIZE=5",),
    ),
    Case(
        "GLOBAL_BATCH_SIZE against BATCH_SIZE x GRADIENT_ACCUMULATION_STEPS",
        "preflight",
        {"GLOBAL_BATCH_SIZE": "64"},
        "BATCH_SIZE=16 x GRADIENT_ACCUMULATION_STEPS=1 x 1 process(es) is 16",
        ("GLOBAL_BATCH_SIZE=64",),
    ),
    Case(
        "USE_LIGER without a GPU",
        "preflight",
        {"USE_LIGER": "true"},
        "needs a CUDA GPU (Liger's kernels have no CPU path)",
        ("USE_LIGER=true",),
    ),
    variable("EPOCHS", "0", "must be a number > 0 and <= 1000"),
    variable("EPOCHS", "nan", "must be a number > 0 and <= 1000"),
    variable("LEARNING_RATE", "fast", "must be a number > 0 and <= 1"),
    variable("LEARNING_RATE", "2", "must be a number > 0 and <= 1"),
    variable("MAX_LENGTH", "8", "must be a whole number from 16 to 131072"),
    variable("VOCAB_SIZE", "100", "must be a whole number from 512 to 1000000"),
    variable("TOKENIZER_SAMPLE", "a lot", "must be a number of characters from 100k to 1000G"),
    variable(
        "INPUT_DATASET",
        "me/corpus?lang=en",
        "must be a dataset, optionally followed by ?option=value&... with "
        "the options config, split, column, data_dir, data_files",
    ),
    variable(
        "INPUT_DATASET", DEMO_CORPUS + "?config=en", "must be only ?column= and ?weight= for a local file or folder"
    ),
    Case(
        "dataset column named with ?column= missing",
        "preflight",
        {"INPUT_DATASET": DEMO_CORPUS + "?column=body"},
        "no column 'body' (columns found: text); name one of them with ?column=",
        ("INPUT_DATASET=",),
    ),
    variable("VOCAB_SIZE", "300", "must be a whole number from 512 to 1000000"),
    variable("WEIGHT_DECAY", "-0.1", "must be a number >= 0 and <= 1"),
    variable("GRADIENT_ACCUMULATION_STEPS", "0", "must be auto or a whole number from 1 to 4096"),
    variable("SHARD_SIZE", "0", "must be a whole number from 1 to 10000000000"),
    variable("INIT", "-1", "must be a whole number from 0 to 100000"),
    variable("INST", "maybe", "must be true or false (also 1/0, yes/no, on/off)"),
    variable("USE_QUANT", "2", "must be true or false (also 1/0, yes/no, on/off)"),
    variable("PRECISION", "fp8", "must be one of auto, bf16, fp16, fp32"),
    variable("FACTOR", "10", "must be a whole number from 384 to 98304"),
    variable("FACTOR", "1000000", "must be a whole number from 384 to 98304"),
    variable("TARGET_PARAMETERS", "lots", "must be a parameter count from 1M to 100B"),
    variable("TARGET_PARAMETERS", "10", "must be a parameter count from 1M to 100B"),
    variable("ZERO_STAGE", "4", "must be a whole number from 0 to 3"),
    variable("STARTUP_DURATION_TIMEOUT", "soon", "must be a positive duration such as 350m, 6h"),
    variable("TIMEOUT_BUFFER", "400", "must be below STARTUP_DURATION_TIMEOUT"),
    variable("SAVE_STEPS", "15", "must be a multiple of LOGGING_STEPS"),
    variable("PRESET", "tiny", "must be one of auto, demo, full", INPUT_DATASET=DEMO_CORPUS),
    variable("MAX_RETRIES", "0", "must be a whole number from 1 to 20"),
    variable("GGUF_TYPES", "f16,q4_k", "must be none, or GGUF types from f32, f16, bf16, q8_0"),
    variable("NUM_PROCESSES", "0", "must be a whole number from 1 to 64"),
    variable("SEED", "-5", "must be a whole number from 0 to 4294967295"),
    # ---- several nodes ----
    variable("NNODES", "0", "must be a whole number from 1 to 4096"),
    variable("NODE_RANK", "2", "must be below NNODES=2 (nodes count from 0)", NNODES="2", MASTER_ADDR="10.0.0.1"),
    variable("MASTER_PORT", "80", "must be auto or a whole number from 1024 to 65535"),
    Case(
        "MASTER_ADDR unset on several nodes",
        "config",
        {"NNODES": "2", "NODE_RANK": "1"},
        "not set, but NNODES=2; set it to node 0's address",
        ("MASTER_ADDR",),
    ),
    Case(
        "HOSTFILE missing",
        "config",
        {"HOSTFILE": "{tmp}/hosts"},
        "no such file; write one `<host> slots=<GPUs>` line per node",
        ("HOSTFILE={tmp}/hosts",),
    ),
    Case(
        "HOSTFILE on a node other than 0",
        "config",
        {"HOSTFILE": "{tmp}/hosts", "NNODES": "2", "NODE_RANK": "1"},
        "with HOSTFILE only node 0 runs trainer.sh",
        ("NODE_RANK=1",),
        setup=write("hosts", "a slots=1\nb slots=1\n"),
    ),
    Case(
        "MASTER_ADDR not resolvable",
        "preflight",
        {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "no-such-host.invalid"},
        "cannot be resolved from this node",
        ("MASTER_ADDR=no-such-host.invalid",),
        script=True,
    ),
    Case(
        "WORK_DIR not shared with node 0",
        "preflight",
        {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"},
        "node 0's token did not appear here within 1s: WORK_DIR is not shared with node 0",
        ("WORK_DIR=",),
        patch=lambda monkeypatch, tmp: monkeypatch.setattr(nodes, "SHARE_TIMEOUT_SECONDS", 1),
    ),
    variable("HF_TOKEN", "hf_bad token", "contains whitespace; paste the token alone"),
    variable("SPACE_ID", "me/", "must be a repository name 'name' or 'owner/name'"),
    variable("USE_QUANT", "true", "USE_QUANT=true trains in bf16", PRECISION="fp16"),
    Case(
        "INSTRUCT_DATASET unset with INST",
        "config",
        {"PRESET": "full", "INPUT_DATASET": DEMO_CORPUS, "INST": "true"},
        "not set, but INST=true; name the instruction data",
        ("INSTRUCT_DATASET",),
    ),
    Case("INPUT_DATASET unset", "config", {"PRESET": "full"}, "not set; name a Hub dataset id", ("INPUT_DATASET",)),
    # ---- names and paths ----
    variable("OUTPUT_REPO", "a/b/c", "must be a repository name 'name' or 'owner/name'"),
    variable("OUTPUT_REPO", "me/a--b", "no '--' or '..'; not ending in '-' or '.'"),
    Case(
        "OUTPUT_REPO of 250 characters",
        "config",
        {"OUTPUT_REPO": LONG_NAME},
        "must be a name of at most 85 characters, not 250: the Hub allows 96",
        ("OUTPUT_REPO=",),
        script=True,
    ),
    variable("OUTPUT_REPO", "me/" + "n" * 86, "must be a name of at most 85 characters, not 86"),
    variable("INPUT_REPO", "./no-such-model", "must be an existing model folder when given as a path"),
    variable("INPUT_REPO", "/no/such/model", "must be an existing model folder when given as a path"),
    Case(
        "OUTPUT_DIR is a file",
        "preflight",
        {"OUTPUT_DIR": "{tmp}/taken"},
        "a file, not a folder; set OUTPUT_DIR",
        ("OUTPUT_DIR={tmp}/taken",),
        setup=write("taken", "x"),
    ),
    Case(
        "WORK_DIR is a file",
        "preflight",
        {"WORK_DIR": "{tmp}/taken"},
        "a file, not a folder; set WORK_DIR",
        ("WORK_DIR={tmp}/taken",),
        setup=write("taken", "x"),
    ),
    Case(
        "WORK_DIR under a file",
        "preflight",
        {"WORK_DIR": "{tmp}/taken/work"},
        "which is a file, not a folder; set WORK_DIR",
        ("WORK_DIR={tmp}/taken/work",),
        setup=write("taken", "x"),
    ),
    Case(
        "OUTPUT_DIR not writable",
        "preflight",
        {"OUTPUT_DIR": "{tmp}/locked"},
        "is not writable by this user",
        ("OUTPUT_DIR={tmp}/locked",),
        setup=write("locked/keep", "x"),
        patch=not_writable("locked"),
    ),
    # ---- the run-state file ----
    Case(
        "run_state.json empty",
        "config",
        {},
        "the run-state file is damaged (unreadable",
        ("{tmp}/output/run_state.json",),
        setup=write("output/run_state.json", ""),
        script=True,
    ),
    Case(
        "run_state.json {}",
        "config",
        {},
        "the run-state file is damaged (needs",
        ("{tmp}/output/run_state.json",),
        setup=write("output/run_state.json", "{}"),
    ),
    Case(
        "run_state.json wrong types",
        "config",
        {},
        "the run-state file is damaged (needs",
        ("{tmp}/output/run_state.json",),
        setup=write("output/run_state.json", '{"init": "2", "inst": "no"}'),
    ),
    Case(
        "run_state.json binary junk",
        "config",
        {"INIT": "2"},
        "the run-state file is damaged (unreadable",
        ("{tmp}/output/run_state.json",),
        setup=write("output/run_state.json", b"\xff\xfe\x00junk"),
    ),
    Case(
        "run_state.json missing, later stages published",
        "config",
        {},
        "no run_state.json, but it holds published models of later stages",
        ("OUTPUT_DIR={tmp}/output",),
        setup=both(published("train-llama", "pretrain", 3), published("train-llama-it", "instruct", 1)),
    ),
    Case(
        "curriculum done",
        "config",
        {},
        "the run state says every stage is done",
        ("OUTPUT_DIR={tmp}/output",),
        setup=write("output/run_state.json", '{"init": 1, "inst": true, "done": true}'),
    ),
    # ---- datasets ----
    Case(
        "dataset missing",
        "preflight",
        {"INPUT_DATASET": "{tmp}/missing.jsonl"},
        ": no such file or folder; allowed: ",
        ("INPUT_DATASET={tmp}/missing.jsonl",),
    ),
    Case(
        "dataset of an unsupported type",
        "preflight",
        {"INPUT_DATASET": "{tmp}/corpus.xlsx"},
        "unsupported file type '.xlsx'; allowed:",
        ("INPUT_DATASET={tmp}/corpus.xlsx",),
        setup=write("corpus.xlsx", "PK"),
    ),
    Case(
        "dataset without a text column",
        "preflight",
        {"INPUT_DATASET": "{tmp}/c.jsonl"},
        "has no `text` column (columns: content, id)",
        ("INPUT_DATASET={tmp}/c.jsonl",),
        setup=write("c.jsonl", '{"content": "x", "id": 1}\n'),
    ),
    Case(
        "dataset with broken JSON",
        "preflight",
        {"INPUT_DATASET": "{tmp}/c.jsonl"},
        "line 2: not valid JSON",
        ("INPUT_DATASET", "{tmp}/c.jsonl"),
        setup=write("c.jsonl", '{"text": "ok"}\n{"text": \n'),
    ),
    Case(
        "dataset empty",
        "preflight",
        {"INPUT_DATASET": "{tmp}/c.jsonl"},
        "has no rows",
        ("INPUT_DATASET={tmp}/c.jsonl",),
        setup=write("c.jsonl", ""),
    ),
    Case(
        "dataset not UTF-8",
        "preflight",
        {"INPUT_DATASET": "{tmp}/c.txt"},
        "not UTF-8 text",
        ("INPUT_DATASET", "{tmp}/c.txt"),
        setup=write("c.txt", "caf\xe9\n"),
    ),
    Case(
        "dataset damaged Parquet",
        "preflight",
        {"INPUT_DATASET": "{tmp}/c.parquet"},
        "not a readable Parquet file",
        ("INPUT_DATASET", "{tmp}/c.parquet"),
        setup=write("c.parquet", "not parquet"),
    ),
    Case(
        "dataset folder without data",
        "preflight",
        {"INPUT_DATASET": "{tmp}/data"},
        "the folder holds no data files",
        ("INPUT_DATASET={tmp}/data",),
        setup=write("data/notes.md", "x"),
    ),
    Case(
        "instruction rows not conversations",
        "preflight",
        {"INST": "true", "INSTRUCT_DATASET": "{tmp}/c.jsonl"},
        "format from character",
        ("INSTRUCT_DATASET={tmp}/c.jsonl",),
        setup=write("c.jsonl", '{"text": "prose"}\n'),
    ),
    Case(
        "instruction messages with a bad role",
        "preflight",
        {"INST": "true", "INSTRUCT_DATASET": "{tmp}/c.jsonl"},
        "has role 'robot'; allowed: system (first only), user, assistant",
        ("INSTRUCT_DATASET={tmp}/c.jsonl",),
        setup=write("c.jsonl", '{"messages": [{"role": "robot", "content": "beep"}]}\n'),
    ),
    # ---- input models ----
    Case(
        "model.safetensors garbage",
        "preflight",
        INPUT_MODEL,
        "is not a safetensors file (no valid header)",
        ("INPUT_REPO={tmp}/model", "{tmp}/model/model.safetensors"),
        setup=model_folder(b"this is not a model, just text " * 64),
        script=True,
    ),
    Case(
        "model.safetensors truncated",
        "preflight",
        INPUT_MODEL,
        "is truncated: ",
        ("INPUT_REPO={tmp}/model", "{tmp}/model/model.safetensors"),
        setup=model_folder(safetensors_bytes()[:-5]),
    ),
    Case(
        "model.safetensors of 3 bytes",
        "preflight",
        INPUT_MODEL,
        "is not a safetensors file (no valid header)",
        ("INPUT_REPO={tmp}/model", "{tmp}/model/model.safetensors"),
        setup=model_folder(b"abc"),
    ),
    Case(
        "model header of bad JSON",
        "preflight",
        INPUT_MODEL,
        "is not a safetensors file (no valid header)",
        ("INPUT_REPO={tmp}/model", "{tmp}/model/model.safetensors"),
        setup=model_folder((5).to_bytes(8, "little") + b"{oops" + bytes(8)),
    ),
    Case(
        "model without config.json",
        "preflight",
        INPUT_MODEL,
        "lacks config.json",
        ("INPUT_REPO={tmp}/model", "{tmp}/model"),
        setup=model_folder(model_config=None),
    ),
    Case(
        "model config.json not JSON",
        "preflight",
        INPUT_MODEL,
        "is unreadable (",
        ("INPUT_REPO={tmp}/model", "{tmp}/model/config.json"),
        setup=both(model_folder(), write("model/config.json", "{half")),
    ),
    Case(
        "GPT-2 model",
        "preflight",
        INPUT_MODEL,
        "is not a LLaMA model (model_type 'gpt2'",
        ("INPUT_REPO={tmp}/model", "{tmp}/model/config.json"),
        setup=model_folder(model_config={"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}),
    ),
    Case(
        "MAX_LENGTH beyond the model's context",
        "preflight",
        INPUT_MODEL,
        "is longer than the model's context (max_position_embeddings 128 in",
        ("INPUT_REPO={tmp}/model", "MAX_LENGTH=256", "{tmp}/model/config.json"),
        setup=model_folder(model_config={**LLAMA_CONFIG, "max_position_embeddings": 128}),
    ),
    Case(
        "model folder of an instruct run missing",
        "preflight",
        {"INIT": "1", "INST": "true", "INPUT_REPO": "{tmp}/model"},
        "no folder {tmp}/model-it; point INPUT_REPO at a model folder",
        ("INPUT_REPO={tmp}/model",),
        setup=model_folder(),
    ),
    Case(
        "prep: the time limit passes while preparing",
        "prep",
        {"TRAINER_STARTED_AT": "1000"},
        "passed while reading shard 0; lower TOKENIZER_SAMPLE or SHARD_SIZE",
        ("STARTUP_DURATION_TIMEOUT=350m",),
    ),
    Case(
        "prep: model.safetensors garbage",
        "prep",
        INPUT_MODEL,
        "is not a safetensors file (no valid header)",
        ("INPUT_REPO={tmp}/model", "{tmp}/model/model.safetensors"),
        setup=model_folder(b"\x00" * 8 + b"garbage"),
        script=True,
    ),
    Case(
        "prep: model without config.json",
        "prep",
        INPUT_MODEL,
        "lacks config.json",
        ("INPUT_REPO={tmp}/model",),
        setup=model_folder(model_config=None),
    ),
    Case(
        "prep: GPT-2 model",
        "prep",
        INPUT_MODEL,
        "is not a LLaMA model (model_type 'gpt2'",
        ("INPUT_REPO={tmp}/model", "{tmp}/model/config.json"),
        setup=model_folder(model_config={"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}),
    ),
    Case(
        "prep: NaN weights",
        "prep",
        INPUT_MODEL,
        "has non-finite values; the checkpoint is damaged",
        ("INPUT_REPO={tmp}/model", "model.layers.0.mlp.down_proj.weight"),
        setup=nan_weight_model,
    ),
    # ---- memory on CPU, disk ----
    Case(
        "1B full preset on a 23 GiB CPU machine",
        "preflight",
        {"PRESET": "full", "INPUT_DATASET": DEMO_CORPUS},
        "training on CPU (1 process(es) at 32-bit) needs an estimated",
        ("GiB of RAM >", f"{RAM_GIB}.0 GiB available"),
    ),
    Case(
        "a 4B model on CPU",
        "preflight",
        {"PRESET": "full", "INPUT_DATASET": DEMO_CORPUS, "FACTOR": "24576", "NUM_PROCESSES": "4"},
        "training on CPU (4 process(es) at 32-bit) needs an estimated",
        ("GiB of RAM >",),
    ),
    Case(
        "disk too small",
        "preflight",
        {},
        "free space or set WORK_DIR/OUTPUT_DIR to a larger disk",
        ("{tmp}/work", "10 MiB is free"),
        patch=free_disk(10 * 2**20),
    ),
    # ---- the Hub ----
    Case(
        "HF_ENDPOINT with a token, unreachable",
        "preflight",
        {"HF_ENDPOINT": "http://{token}@{closed}", "HF_TOKEN": "{token}", "OUTPUT_REPO": "me/model"},
        "Hub unreachable at http://<credentials>@",
        ("(connection refused)",),
        script=True,
    ),
    Case(
        "HF_ENDPOINT with user:token, unreachable",
        "preflight",
        {"HF_ENDPOINT": "http://user:{token}@{closed}", "HF_TOKEN": "{token}", "OUTPUT_REPO": "me/model"},
        "Hub unreachable at http://<credentials>@",
        ("(connection refused)",),
    ),
    Case(
        "HF_TOKEN rejected",
        "preflight",
        {**ON_THE_HUB, "OUTPUT_REPO": "tester/model"},
        "was rejected by",
        ("HF_TOKEN",),
        hub=lambda hub: hub.reject_token(),
    ),
    Case(
        "HF_TOKEN read-only",
        "preflight",
        {**ON_THE_HUB, "OUTPUT_REPO": "tester/model"},
        "is read-only; pushing tester/model needs a token with write access",
        ("HF_TOKEN",),
        hub=lambda hub: setattr(hub, "role", "read"),
    ),
    Case(
        "INPUT_REPO not on the Hub",
        "preflight",
        {**ON_THE_HUB, "INIT": "2", "INPUT_REPO": "tester/absent"},
        "(or it is private and HF_TOKEN has no access); run the earlier stage first or fix INPUT_REPO",
        ("INPUT_REPO=tester/absent",),
    ),
    Case(
        "INPUT_REPO on the Hub without config.json",
        "preflight",
        {**ON_THE_HUB, "INIT": "2", "INPUT_REPO": "tester/bare"},
        "the Hub repo tester/bare lacks config.json",
        ("INPUT_REPO=tester/bare",),
        hub=lambda hub: hub.repos.update({"tester/bare": Repo(files={"tokenizer.json": b"{}"})}),
    ),
    Case(
        "SPACE_ID without HF_TOKEN",
        "preflight",
        {"SPACE_ID": "tester/space"},
        "is set but HF_TOKEN is not",
        ("SPACE_ID=tester/space",),
    ),
]


def test_the_table_is_large_and_its_ids_unique():
    assert len(CASES) >= 40 and len({case.id for case in CASES}) == len(CASES)
    assert {case.stage for case in CASES} == set(EXIT_STATUS)


# ---- running a case ----


@pytest.fixture
def hub():
    with HubStandIn(token=TOKEN, user="tester") as server:
        yield server


def closed_port_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"  # nothing listens there once the probe is closed


def fill(text: str, places: dict[str, str]) -> str:
    return re.sub(r"\{(tmp|hub|closed|token)\}", lambda match: places[match.group(1)], text)


def case_environment(case: Case, places: dict[str, str]) -> dict[str, str]:
    tmp = places["tmp"]
    return {
        "PRESET": "demo",
        "OUTPUT_DIR": f"{tmp}/output",
        "WORK_DIR": f"{tmp}/work",
        **{name: fill(value, places) for name, value in case.env.items()},
    }


def run_script(case: Case, env: dict[str, str], root: Path, base_env: dict[str, str]) -> tuple[int, str]:
    script = "prep.py" if case.stage == "prep" else "preflight.py"
    if "HF_ENDPOINT" in env:  # huggingface_hub refuses every request while these are set
        base_env = {k: v for k, v in base_env.items() if not k.endswith("_OFFLINE")}
    result = subprocess.run(
        [sys.executable, script], cwd=root, env={**base_env, **env}, capture_output=True, text=True, timeout=120
    )
    return result.returncode, result.stdout + result.stderr


def run_in_process(case: Case, env: dict[str, str], monkeypatch, capsys) -> tuple[int, str]:
    for name in config.VARIABLE_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if case.stage == "config":
        with pytest.raises(SystemExit) as exited:
            config.settings_or_exit()
        status = exited.value.code
    else:
        status = preflight.main() if case.stage == "preflight" else prep.main()
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def fake_cpu_machine(monkeypatch) -> None:
    """No GPU and 23 GiB of available RAM, whatever the machine running the tests has."""
    import psutil
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(memory, "GPU_DEVICE_FILES", ())  # no GPU driver either
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=RAM_GIB * GIB, total=RAM_GIB * GIB))


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_stops_with_one_line(case, tmp_path, monkeypatch, capsys, root, base_env, request):
    places = {"tmp": str(tmp_path), "closed": closed_port_address(), "token": TOKEN}
    if "{hub}" in json.dumps(case.env):
        server = request.getfixturevalue("hub")
        places["hub"] = server.endpoint
        if case.hub:
            case.hub(server)
    if case.setup:
        case.setup(tmp_path)
    env = case_environment(case, places)
    if case.script:
        status, output = run_script(case, env, root, base_env)
    else:
        fake_cpu_machine(monkeypatch)
        if case.patch:
            case.patch(monkeypatch, tmp_path)
        status, output = run_in_process(case, env, monkeypatch, capsys)
    assert status == EXIT_STATUS[case.stage], output[-3000:]
    lines = [line for line in output.splitlines() if fill(case.fragment, places) in line]
    assert len(lines) == 1, output[-3000:]
    for name in case.names:
        assert fill(name, places) in lines[0], lines[0]
    assert "Traceback" not in output and "the check itself failed" not in output
    assert TOKEN not in output
    if case.stage == "config" and not case.script:
        assert len([line for line in output.splitlines() if line.startswith("config error:")]) == 1, output
