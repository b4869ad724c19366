"""The one place that reads the environment: a frozen, typed `Settings` built once and validated.

Every variable is declared once in `VARIABLES` (name, aliases, default, demo default, meaning, parser).
`load_settings()` parses them all, collects every problem, and raises one `ConfigError` listing them;
scripts call `settings_or_exit()` which prints the problems and exits with status 2 (`ExitCode.CONFIG`,
the table of every script's exit statuses) before any heavy import. `python3 config.py` prints the
resolved configuration; `python3 config.py --markdown` prints the README's variable table.

This module imports only the standard library, so validation costs milliseconds.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib.util
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "data"
DEMO_PRETRAIN = DATA_DIR / "pretrain.jsonl"
DEMO_INSTRUCT = DATA_DIR / "instruct.jsonl"
DEMO_HELDOUT = DATA_DIR / "instruct_heldout.jsonl"

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
CHAT_TOKENS = ("<|user|>", "<|bot|>", "<|end|>")
# Embedding rows are padded to a multiple of this (tensor-core friendly shapes, as nanoGPT does).
VOCAB_MULTIPLE = 64
# LoRA settings of the original pipeline (r, alpha, dropout, target projections).
LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.05
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ExitCode(enum.IntEnum):
    """The exit status of every script, one number per meaning. Defined here, not in util, because
    config.py exits with CONFIG itself and cannot import util (util imports config). trainer.sh ends with
    the status of the stage that failed and tests INCOMPLETE by its number (a test keeps the two equal).
    Each comment is that code's row of TROUBLESHOOTING.md's 'Exit codes' table, `meaning | what to do`:
    tests/test_docker_and_docs.py compares them."""

    # the stage did its work, or found it done already | nothing
    OK = 0
    # a check failed or an input is bad (data, model, Hub, disk) | fix what stderr names and run again
    FAILED = 1
    # a variable or a command-line argument is invalid, named on stderr | correct what is named
    CONFIG = 2
    # training stopped early (time limit or SIGTERM); the stage stays current | run again: training resumes
    INCOMPLETE = 3
    # the loss or the logits became NaN or infinite; nothing was published | lower LEARNING_RATE or use bf16
    NOT_FINITE = 4
    # another node failed, or node 0 did not get there in time | read that node's log, start every node again
    NODE_FAILED = 5


class ConfigError(ValueError):
    """Every configuration problem found, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# ---------------------------------------------------------------------------------------------
# Parsers: each takes the raw string and returns the value or raises ValueError("what is allowed").


def parse_int(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip().replace("_", ""))
        except ValueError:
            raise ValueError(_range_text("a whole number", minimum, maximum)) from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise ValueError(_range_text("a whole number", minimum, maximum))
        return value

    return parse


def parse_float(minimum: float, maximum: float, exclusive_min: bool = True) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            value = math.nan
        too_low = value <= minimum if exclusive_min else value < minimum
        if not math.isfinite(value) or too_low or value > maximum:
            low = f"> {minimum:g}" if exclusive_min else f">= {minimum:g}"
            raise ValueError(f"a number {low} and <= {maximum:g}")
        return value

    return parse


def _range_text(kind: str, minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"{kind} from {minimum} to {maximum}"
    if minimum is not None:
        return f"{kind} >= {minimum}"
    return kind


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("true or false (also 1/0, yes/no, on/off)")


def parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        lowered = raw.strip().lower()
        if lowered not in choices:
            raise ValueError("one of " + ", ".join(choices))
        return lowered

    return parse


def parse_text(raw: str) -> str:
    return raw.strip()


# The Hub's rules for a repository id (huggingface_hub's validate_repo_id): owner and name of at most
# 96 characters each, no '--' or '..', and neither starting nor ending with '-' or '.'.
HUB_NAME_LIMIT = 96
# OUTPUT_REPO's name is published with these suffixes: `<name>-it`, `<name>-adapter`, `<name>-it-adapter`.
LONGEST_PUBLISHED_SUFFIX = "-it-adapter"
OUTPUT_NAME_LIMIT = HUB_NAME_LIMIT - len(LONGEST_PUBLISHED_SUFFIX)
_HUB_PART = r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9_])?"
# INPUT_REPO values of these forms name a local folder, never a Hub id.
LOCAL_PATH_PREFIXES = ("/", "./", "../", "~")


def parse_repo(raw: str) -> str:
    value = raw.strip()
    too_long = [len(part) for part in value.split("/") if len(part) > HUB_NAME_LIMIT]
    if too_long:
        raise ValueError(f"a name and owner of at most {HUB_NAME_LIMIT} characters each, not {too_long[0]}")
    if not re.fullmatch(rf"(?:{_HUB_PART}/)?{_HUB_PART}", value) or ".." in value or "--" in value:
        raise ValueError(
            "a repository name 'name' or 'owner/name' (letters, digits, '-', '_', '.'; no '--' "
            "or '..'; not ending in '-' or '.')"
        )
    return value


def parse_output_repo(raw: str) -> str:
    """A repository name short enough for every name published from it (`<name>-it-adapter` the longest)."""
    name = raw.strip().split("/")[-1]
    if len(name) > OUTPUT_NAME_LIMIT:
        raise ValueError(
            f"a name of at most {OUTPUT_NAME_LIMIT} characters, not {len(name)}: the Hub allows "
            f"{HUB_NAME_LIMIT} and runs publish `<name>{LONGEST_PUBLISHED_SUFFIX}`"
        )
    return parse_repo(raw)


def parse_model_source(raw: str) -> str:
    """A Hub id or a name (see parse_repo), or an existing local folder given as an absolute, ./, ../ or ~
    path; a folder is returned resolved, so that equivalent spellings are the same stage."""
    value = raw.strip()
    if not value.startswith(LOCAL_PATH_PREFIXES):
        return parse_repo(value)
    folder = Path(value).expanduser().resolve()
    if not folder.is_dir():
        raise ValueError(
            f"an existing model folder when given as a path ({folder} is not a folder), or a Hub id 'owner/name'"
        )
    return str(folder)


_DURATION_UNITS = {"s": 1 / 60, "m": 1.0, "h": 60.0, "d": 1440.0}


def parse_minutes(raw: str) -> float:
    """'350m', '6h', '90s', '1d' or a bare number of minutes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", raw.lower())
    if not match or float(match.group(1)) <= 0:
        raise ValueError("a positive duration such as 350m, 6h, 90s or a number of minutes")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "m"]


def parse_buffer_minutes(raw: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*m?\s*", raw.lower())
    if not match:
        raise ValueError("a number of minutes >= 0, such as 20")
    return float(match.group(1))


_COUNT_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def scaled_number(raw: str, suffixes: Mapping[str, float]) -> float:
    """'300M' as 3e8 with the given suffixes (any case; '_' separators allowed); NaN for no number."""
    text = raw.strip().lower().replace("_", "")
    scale = suffixes.get(text[-1:], 1.0)
    try:
        return float(text[:-1] if text[-1:] in suffixes else text) * scale
    except ValueError:
        return math.nan


def parse_parameter_count(raw: str) -> int:
    """'1B', '300M', '2.5e8' or a plain number of parameters."""
    value = scaled_number(raw, _COUNT_SUFFIX)
    if not math.isfinite(value) or value < 1e6 or value > 1e11:
        raise ValueError("a parameter count from 1M to 100B, such as 300M, 1B or 2.5e9")
    return int(value)


def parse_or_auto(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`auto` (None: chosen at run time, see memory.plan_batch) or what `parse` accepts."""

    def parse_auto(raw: str) -> Any:
        if raw.strip().lower() == "auto":
            return None
        try:
            return parse(raw)
        except ValueError as err:
            raise ValueError(f"auto or {err}") from None

    return parse_auto


# What a dataset value may add after '?': `owner/name?config=en&split=train&column=content`.
DATASET_OPTIONS = ("config", "split", "column", "data_dir", "data_files", "weight")
LOCAL_DATASET_OPTIONS = ("column", "weight")  # the others select among a Hub dataset's files
MIXTURE_SEPARATOR = "|"  # `a/b?weight=3|./more.jsonl`: rows drawn from both, 3 to 1


def split_dataset_spec(value: str) -> tuple[str, dict[str, str]]:
    """'owner/name?config=en&split=train' as ('owner/name', {'config': 'en', 'split': 'train'});
    a value without '?' as (value, {}). Raises ValueError saying what is allowed."""
    base, marked, query = value.partition("?")
    options: dict[str, str] = {}
    for part in query.split("&") if marked else []:
        key, equals, option = part.partition("=")
        if key not in DATASET_OPTIONS or not equals or not option.strip() or key in options:
            raise ValueError(
                f"a dataset, optionally followed by ?option=value&... with the options "
                f"{', '.join(DATASET_OPTIONS)} (e.g. owner/name?config=en&split=train); "
                f"{part!r} is not one of them, empty or repeated"
            )
        options[key] = option.strip()
    return base.strip(), options


def parse_dataset(raw: str) -> str:
    """A local file or folder, or a Hub dataset id, each with the options split_dataset_spec reads (a
    local path takes only `column` and `weight`); several joined by '|' are a mixture."""
    for part in raw.split(MIXTURE_SEPARATOR):
        base, options = split_dataset_spec(part)
        if not base:
            raise ValueError(
                "a local file or folder, or a Hub dataset id such as owner/name (several "
                f"joined by {MIXTURE_SEPARATOR!r})"
            )
        hub_only = sorted(set(options) - set(LOCAL_DATASET_OPTIONS))
        if hub_only and Path(base).expanduser().exists():
            raise ValueError(
                f"only ?column= and ?weight= for a local file or folder ({', '.join(hub_only)} "
                "select a Hub dataset's files)"
            )
        if "weight" in options:
            try:
                parse_float(0, 1e6)(options["weight"])
            except ValueError:
                raise ValueError(f"a ?weight= above 0, not {options['weight']!r}") from None
    return raw.strip()


def parse_character_count(raw: str) -> int:
    """'200M', '1G', '5e8' or a plain number of characters."""
    value = scaled_number(raw, {"k": 1e3, "m": 1e6, "g": 1e9})
    if not math.isfinite(value) or value < 1e5 or value > 1e12:
        raise ValueError("a number of characters from 100k to 1000G, such as 200M or 1G")
    return int(value)


# What `util.py gguf` and GGUF_TYPES can write (gguf_export maps them to llama.cpp's tensor types).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def parse_gguf_types(raw: str) -> tuple[str, ...]:
    """'f16,q8_0' as ('f16', 'q8_0'); 'none' or nothing as ()."""
    names = [part.strip().lower() for part in raw.split(",") if part.strip()]
    if names == ["none"]:
        return ()
    if not set(names) <= set(GGUF_TYPES) or len(set(names)) != len(names):
        raise ValueError(
            f"none, or GGUF types from {', '.join(GGUF_TYPES)} separated by commas, each once (e.g. f16,q8_0)"
        )
    return tuple(names)


def parse_license(raw: str) -> str:
    value = raw.strip().lower()
    if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", value):
        raise ValueError("a license id of lowercase letters, digits, '.', '+' and '-' (e.g. mit, apache-2.0)")
    return value


# REPORT_TO's values and the Python package each one needs (none for `none`).
REPORT_TARGETS = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "none": None}


def parse_process_count(raw: str) -> int:
    if raw.strip().lower() == "auto":
        return 0
    return parse_int(1, 64)(raw)


# ---------------------------------------------------------------------------------------------
# The variables.


@dataclass(frozen=True)
class Variable:
    name: str  # environment variable
    attr: str  # Settings field
    default: Any  # the full preset's value (None: unset)
    meaning: str
    parse: Callable[[str], Any] = parse_text
    demo: Any = None  # the demo preset's value, where it differs
    aliases: tuple[str, ...] = ()
    secret: bool = False
    shown_default: str | None = None  # how the README table shows a computed default
    automatic: bool = False  # None means `auto`: chosen when the run starts


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "PRESET",
        "preset",
        "auto",
        "`demo` trains on the embedded corpora with a tiny model; `full` uses the defaults below; "
        "`auto` is `demo` when neither a dataset nor `OUTPUT_REPO` is named",
        parse_choice("auto", "demo", "full"),
    ),
    Variable(
        "INPUT_DATASET",
        "input_dataset",
        None,
        "Pretraining data: a Hub dataset id (streamed) or a local "
        "`.txt`/`.jsonl`/`.json`/`.parquet`/`.csv` file or folder, with a `text` column; options after `?`: "
        "`config`, `split` (default `train`), `column` (read as `text`), `data_dir`, `data_files`, e.g. "
        "`owner/name?config=en&split=train&column=content`; several joined by `|` are mixed, each with an "
        "optional `weight` (default 1), e.g. `a/b?weight=3|./more.jsonl`",
        parse_dataset,
        aliases=("INPUT_DS",),
        shown_default="embedded demo corpus (demo)",
    ),
    Variable(
        "INSTRUCT_DATASET",
        "instruct_dataset",
        None,
        "Instruction data, same forms, in any of these formats, detected per row by its columns: `messages` "
        "(`{role, content}` turns), ShareGPT `conversations` (`{from, value}`), Alpaca `instruction`/`input`/`output`, "
        "`prompt`/`completion` (text or message lists), or `text` in the `<|user|>…<|end|><|bot|>…<|end|>` format; "
        "only the answers are trained on",
        parse_dataset,
        aliases=("INST_DS",),
        shown_default="embedded demo corpus (demo)",
    ),
    Variable(
        "OUTPUT_REPO",
        "output_repo",
        "train-llama",
        "Name of the published model: `name` (local only) or `owner/name` (also pushed to the Hub when "
        "`HF_TOKEN` is set); instruction runs publish `<name>-it`; the name has at most "
        f"{OUTPUT_NAME_LIMIT} characters (the Hub's {HUB_NAME_LIMIT} less `{LONGEST_PUBLISHED_SUFFIX}`)",
        parse_output_repo,
        shown_default="`train-llama` (local)",
    ),
    Variable(
        "INPUT_REPO",
        "input_repo",
        None,
        "Model and tokenizer to continue from: a folder under `OUTPUT_DIR`, a local path (absolute, `./`, "
        "`../` or `~`) or a Hub id",
        parse_model_source,
        shown_default="`OUTPUT_REPO`",
    ),
    Variable(
        "INIT",
        "init",
        0,
        "Run counter within the phase: shard index is 0 for INIT 0 and 1, then INIT−1; epochs are halved for INIT < 2",
        parse_int(0, 100_000),
        shown_default="0 (or the state file)",
    ),
    Variable(
        "INST",
        "inst",
        False,
        "Instruction-tuning phase instead of pretraining",
        parse_bool,
        shown_default="false (or the state file)",
    ),
    Variable("RUN_ALL", "run_all", False, "Run every remaining curriculum stage back to back", parse_bool, demo=True),
    Variable(
        "USE_QUANT",
        "use_quant",
        False,
        "Train 4-bit NF4 base weights with LoRA adapters (merged before publishing); "
        "instruction tuning also trains the chat markers' embedding and output rows",
        parse_bool,
    ),
    Variable(
        "FACTOR",
        "factor",
        12288,
        "Model size knob: hidden size = FACTOR/6 (6144 ≈ 300M, 12288 ≈ 1B, 24576 ≈ 4B parameters)",
        parse_int(384, 98_304),
        demo=768,
    ),
    Variable(
        "TARGET_PARAMETERS",
        "target_parameters",
        None,
        "Alternative to FACTOR: the topology whose parameter count is closest (e.g. `300M`, `1B`)",
        parse_parameter_count,
    ),
    Variable(
        "VOCAB_SIZE",
        "vocab_size",
        52000,
        "Tokenizer vocabulary size (byte-level BPE)",
        parse_int(512, 1_000_000),
        demo=2048,
    ),
    Variable(
        "TOKENIZER_SAMPLE",
        "tokenizer_sample",
        200_000_000,
        "Characters at the start of `INPUT_DATASET` that the "
        "first run trains the tokenizer on (e.g. `200M`, `1G`); 200M took 32 s on 2 cores (BENCHMARKS.md)",
        parse_character_count,
        shown_default="`200M`",
    ),
    Variable("MAX_LENGTH", "max_length", 2048, "Tokens per training sequence", parse_int(16, 131_072), demo=256),
    Variable(
        "GLOBAL_BATCH_SIZE",
        "global_batch_size",
        32,
        "Sequences per optimizer step over all processes (each `MAX_LENGTH` tokens): what the loss curve "
        "depends on, so `auto` micro-batches never change it; with `BATCH_SIZE` and "
        "`GRADIENT_ACCUMULATION_STEPS` both set it is their product times the processes",
        parse_int(1, 1_000_000),
        demo=16,
    ),
    Variable(
        "BATCH_SIZE",
        "batch_size",
        None,
        "Sequences per GPU per micro-step; `auto`: the largest that fits "
        "the GPU's memory (by the memory estimate) and divides the global batch, at most 4 on CPU",
        parse_or_auto(parse_int(1, 4096)),
        demo=16,
        automatic=True,
    ),
    Variable(
        "GRADIENT_ACCUMULATION_STEPS",
        "gradient_accumulation_steps",
        None,
        "Micro-steps per optimizer step; `auto`: what makes up `GLOBAL_BATCH_SIZE`",
        parse_or_auto(parse_int(1, 4096)),
        demo=1,
        automatic=True,
    ),
    Variable("EPOCHS", "epochs", 3.0, "Passes over each shard (halved for INIT < 2)", parse_float(0, 1000), demo=1.0),
    Variable(
        "INSTRUCT_EPOCHS",
        "instruct_epochs",
        None,
        "Passes over each instruction shard (halved for INIT < 2)",
        parse_float(0, 1000),
        demo=3.0,
        shown_default="`EPOCHS`",
    ),
    Variable(
        "MAX_STEPS", "max_steps", -1, "Stop after this many optimizer steps (-1: run the epochs)", parse_int(-1, 10**9)
    ),
    Variable(
        "LEARNING_RATE",
        "learning_rate",
        3e-4,
        "Peak learning rate (AdamW, cosine schedule, 10% warm-up)",
        parse_float(0, 1.0),
        demo=2e-3,
    ),
    Variable("WEIGHT_DECAY", "weight_decay", 0.01, "AdamW weight decay", parse_float(0, 1.0, exclusive_min=False)),
    Variable(
        "SHARD_SIZE", "shard_size", 131072, "Rows of the dataset per run (shard)", parse_int(1, 10**10), demo=100_000
    ),
    Variable(
        "PRECISION",
        "precision",
        "auto",
        "`auto` (bf16 where the GPU supports it, else fp16; fp32 on CPU), `bf16`, `fp16`, `fp32`",
        parse_choice("auto", "bf16", "fp16", "fp32"),
    ),
    Variable(
        "ZERO_STAGE",
        "zero_stage",
        2,
        "DeepSpeed ZeRO stage (2 runs as 1 with `USE_QUANT` on one process: same memory, a cheaper optimizer step)",
        parse_int(0, 3),
    ),
    Variable(
        "GRADIENT_CHECKPOINTING",
        "gradient_checkpointing",
        None,
        "Recompute activations in the backward pass to save memory; `auto`: only where no micro-batch fits without it",
        parse_or_auto(parse_bool),
        demo=False,
        automatic=True,
    ),
    Variable(
        "USE_LIGER",
        "use_liger",
        None,
        "Liger's fused GPU kernels for RMSNorm, SwiGLU and rotary embeddings "
        "(less memory, faster steps); `auto`: on a GPU",
        parse_or_auto(parse_bool),
        automatic=True,
    ),
    Variable(
        "SAVE_STEPS",
        "save_steps",
        500,
        "Checkpoint every this many optimizer steps (the last two are kept)",
        parse_int(1, 10**9),
        demo=50,
    ),
    Variable(
        "LOGGING_STEPS",
        "logging_steps",
        10,
        "Log one line every this many optimizer steps",
        parse_int(1, 10**9),
        demo=10,
    ),
    Variable(
        "EVAL_ROWS",
        "eval_rows",
        256,
        "Sequences of each shard held out from training for the eval "
        "loss and perplexity (at most a tenth of the shard; none below 10 sequences; 0: no eval split)",
        parse_int(0, 1_000_000),
        demo=64,
    ),
    Variable(
        "EVAL_STEPS",
        "eval_steps",
        500,
        "Eval loss and perplexity on the held-out split every this many optimizer steps, and at the end of each stage",
        parse_int(1, 10**9),
        demo=100,
    ),
    Variable(
        "REPORT_TO",
        "report_to",
        "tensorboard",
        "Where the Trainer reports losses: `tensorboard` (in "
        "`WORK_DIR/tensorboard/<phase>-init<INIT>`), `trackio` or `wandb` (when installed), or `none`",
        parse_choice(*REPORT_TARGETS),
    ),
    Variable(
        "MODEL_LICENSE",
        "model_license",
        "mit",
        "License id in the published model cards' metadata (a Hub license id such as `mit`, `apache-2.0`, `other`)",
        parse_license,
    ),
    Variable(
        "SEED",
        "seed",
        42,
        "Random seed (model and LoRA adapter initialisation, data order, dropout)",
        parse_int(0, 2**32 - 1),
    ),
    Variable(
        "NUM_PROCESSES",
        "num_processes",
        0,
        "Training processes on each node: `auto` is one per GPU, or 1 on CPU",
        parse_process_count,
        shown_default="auto",
    ),
    Variable(
        "NNODES",
        "nnodes",
        1,
        "Machines (nodes) training together; without `HOSTFILE` each runs "
        "`trainer.sh` with its own `NODE_RANK` (README: Several machines)",
        parse_int(1, 4096),
    ),
    Variable(
        "NODE_RANK",
        "node_rank",
        0,
        "This node's number, from 0 to `NNODES`-1; node 0 prepares, publishes and advances the run state",
        parse_int(0, 4095),
    ),
    Variable(
        "MASTER_ADDR",
        "master_addr",
        None,
        "Address of node 0 that every node reaches; required when `NNODES` > 1 without `HOSTFILE`",
        parse_text,
    ),
    Variable(
        "MASTER_PORT",
        "master_port",
        None,
        "Port on node 0 for the processes' rendezvous; the same on "
        "every node (`auto`: a free port on one node, 29500 on several)",
        parse_or_auto(parse_int(1024, 65535)),
        automatic=True,
    ),
    Variable(
        "HOSTFILE",
        "hostfile",
        None,
        "DeepSpeed hostfile (`host slots=N` lines): node 0 starts the "
        "other nodes over ssh (pdsh); the other nodes do not run `trainer.sh`",
        parse_text,
    ),
    Variable("OUTPUT_DIR", "output_dir", "./output", "Local copy of every published model, and the run-state file"),
    Variable("WORK_DIR", "work_dir", "./work", "Prepared data, model and checkpoints passed between stages"),
    Variable(
        "CACHE_DIR",
        "cache_dir",
        "~/.cache/train-llama",
        "What outlives a WORK_DIR: the record that the "
        "software checks passed on this machine, so that restarts skip them",
    ),
    Variable(
        "STARTUP_DURATION_TIMEOUT",
        "startup_duration_timeout",
        350.0,
        "Time the job may run (e.g. `350m`, `6h`); training stops, saves and publishes before it",
        parse_minutes,
        shown_default="350m",
    ),
    Variable(
        "TIMEOUT_BUFFER",
        "timeout_buffer",
        20.0,
        "Minutes kept free at the end of the timeout for saving and publishing",
        parse_buffer_minutes,
    ),
    Variable(
        "SAVE_ADAPTER",
        "save_adapter",
        False,
        "With USE_QUANT, also publish the LoRA adapter alone (`<name>-adapter`)",
        parse_bool,
    ),
    Variable(
        "GGUF_TYPES",
        "gguf_types",
        (),
        "GGUF files (for llama.cpp, Ollama, LM Studio) that publishing "
        "also writes into the published folder, e.g. `f16,q8_0`; types: " + ", ".join(f"`{t}`" for t in GGUF_TYPES),
        parse_gguf_types,
        shown_default="none",
    ),
    Variable("MAX_RETRIES", "max_retries", 5, "Attempts for each Hub call (exponential backoff)", parse_int(1, 20)),
    Variable(
        "HF_TOKEN", "hf_token", None, "Hugging Face token for pushing and Space variables (never logged)", secret=True
    ),
    Variable("HF_ENDPOINT", "hf_endpoint", "https://huggingface.co", "Hub address (a mirror, or a local test server)"),
    Variable(
        "SPACE_ID",
        "space_id",
        None,
        "Set by Hugging Face Spaces: the run state is kept in the Space's variables and the Space pauses when done",
        parse_repo,
    ),
    Variable(
        "TRAINER_STARTED_AT",
        "started_at",
        None,
        "Set by `trainer.sh`: Unix time the job started, for the timeout",
        parse_float(0, 1e11),
        shown_default="now",
    ),
)

VARIABLE_NAMES = frozenset(n for v in VARIABLES for n in (v.name, *v.aliases))


# ---------------------------------------------------------------------------------------------
# Model topology.


@dataclass(frozen=True)
class Topology:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def parameter_count(self, vocab_size: int | None = None) -> int:
        """Exact count of a LlamaForCausalLM with untied embeddings and padded vocabulary."""
        vocab = padded_vocab(vocab_size or self.vocab_size)
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = 2 * h * h + 2 * h * kv
        mlp = 3 * h * self.intermediate_size
        per_layer = attention + mlp + 2 * h
        return 2 * vocab * h + self.num_layers * per_layer + h

    def llama_kwargs(self, vocab_size: int | None = None) -> dict[str, Any]:
        return dict(
            vocab_size=padded_vocab(vocab_size or self.vocab_size),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            tie_word_embeddings=False,
        )

    def describe(self) -> str:
        return (
            f"{self.num_layers} layers, hidden {self.hidden_size}, {self.num_heads} heads "
            f"({self.num_kv_heads} key/value) of {self.head_dim}, MLP {self.intermediate_size}"
        )


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def topology_for_hidden(hidden_size: int, vocab_size: int) -> Topology:
    """A LLaMA shape for a width: head_dim 64 up to 1024 wide, else 128; grouped-query attention with
    4 query heads per key/value head where the heads allow; MLP ≈ 8/3·hidden rounded up to 256;
    depth 2·log2(hidden) − 4 (1024 → 16, 2048 → 18, 4096 → 20 layers)."""
    head_dim = 64 if hidden_size <= 1024 else 128
    heads = hidden_size // head_dim
    kv_heads = heads // 4 if heads % 4 == 0 and heads >= 8 else heads
    intermediate = -(-(8 * hidden_size) // (3 * 256)) * 256
    layers = max(2, round(2 * math.log2(hidden_size)) - 4)
    return Topology(hidden_size, layers, heads, kv_heads, intermediate, vocab_size)


def valid_hidden_sizes() -> list[int]:
    """Widths that are whole multiples of their head dimension (64 up to 1024, then 128)."""
    return list(range(64, 1024 + 1, 64)) + list(range(1152, 16_384 + 1, 128))


def topology_for_factor(factor: int, vocab_size: int) -> Topology:
    wanted = factor / 6
    if wanted < 32:
        raise ValueError("FACTOR gives a hidden size below 64")
    hidden = min(valid_hidden_sizes(), key=lambda h: abs(h - wanted))
    return topology_for_hidden(hidden, vocab_size)


def topology_for_parameters(target: int, vocab_size: int) -> Topology:
    candidates = [topology_for_hidden(h, vocab_size) for h in valid_hidden_sizes()]
    best = min(candidates, key=lambda t: abs(math.log(t.parameter_count() / target)))
    if not 0.5 <= best.parameter_count() / target <= 2.0:
        raise ValueError(
            f"no topology within 2x of {target:,} parameters with VOCAB_SIZE {vocab_size} "
            f"(closest: {best.parameter_count():,})"
        )
    return best


# ---------------------------------------------------------------------------------------------
# The settings object.


@dataclass(frozen=True)
class Settings:
    preset: str
    input_dataset: str
    instruct_dataset: str | None
    output_repo: str
    input_repo: str
    init: int
    inst: bool
    run_all: bool
    use_quant: bool
    factor: int
    target_parameters: int | None
    vocab_size: int
    tokenizer_sample: int
    max_length: int
    global_batch_size: int
    batch_size: int | None  # None: auto (memory.plan_batch)
    gradient_accumulation_steps: int | None
    epochs: float
    instruct_epochs: float | None
    max_steps: int
    learning_rate: float
    weight_decay: float
    shard_size: int
    precision: str
    zero_stage: int
    gradient_checkpointing: bool | None
    use_liger: bool | None
    save_steps: int
    logging_steps: int
    eval_rows: int
    eval_steps: int
    report_to: str
    model_license: str
    seed: int
    num_processes: int
    nnodes: int
    node_rank: int
    master_addr: str | None
    master_port: int | None  # None: auto (trainer.sh)
    hostfile: Path | None
    output_dir: Path
    work_dir: Path
    cache_dir: Path
    startup_duration_timeout: float
    timeout_buffer: float
    save_adapter: bool
    gguf_types: tuple[str, ...]
    max_retries: int
    hf_token: str | None = field(repr=False)
    hf_endpoint: str
    space_id: str | None
    started_at: float | None
    topology: Topology
    sources: Mapping[str, str] = field(repr=False, compare=False)

    # --- the curriculum arithmetic of the original pipeline ---
    @property
    def shard_index(self) -> int:
        return 0 if self.init < 2 else self.init - 1

    @property
    def run_epochs(self) -> float:
        epochs = self.instruct_epochs if self.inst and self.instruct_epochs is not None else self.epochs
        return epochs / 2 if self.init < 2 else epochs

    @property
    def phase(self) -> str:
        return "instruct" if self.inst else "pretrain"

    @property
    def stage_dataset(self) -> str | None:
        return self.instruct_dataset if self.inst else self.input_dataset

    @property
    def is_demo(self) -> bool:
        return self.preset == "demo"

    @property
    def first_run(self) -> bool:
        """The run that trains the tokenizer and creates the model from scratch."""
        return not self.inst and self.init == 0

    @property
    def repo_name(self) -> str:
        return self.output_repo.split("/")[-1]

    @property
    def published_name(self) -> str:
        return f"{self.repo_name}-it" if self.inst else self.repo_name

    @property
    def input_repo_is_path(self) -> bool:
        """INPUT_REPO names a local folder (config resolves path forms to absolute; a Hub id never is)."""
        return Path(self.input_repo).is_absolute()

    @property
    def source_repo(self) -> str:
        """Where this run's tokenizer and model come from (INPUT_REPO-it for instruct runs with INIT > 0)."""
        return f"{self.input_repo}-it" if self.inst and self.init > 0 else self.input_repo

    @property
    def pushes_to_hub(self) -> bool:
        return bool(self.hf_token) and "/" in self.output_repo

    @property
    def time_limit_minutes(self) -> float:
        return self.startup_duration_timeout - self.timeout_buffer

    # --- files the stages exchange ---
    @property
    def prep_dir(self) -> Path:
        return self.work_dir / "prep"

    @property
    def checkpoint_dir(self) -> Path:
        return self.work_dir / "checkpoints"

    @property
    def trained_dir(self) -> Path:
        return self.work_dir / "trained"

    @property
    def state_file(self) -> Path:
        return self.output_dir / "run_state.json"

    @property
    def tensorboard_dir(self) -> Path:
        """This stage's TensorBoard events: beside the checkpoints, never rotated or published."""
        return self.work_dir / "tensorboard" / f"{self.phase}-init{self.init}"

    def stage_key(self) -> dict[str, Any]:
        """What identifies one run's preparation and checkpoints: a change means start over."""
        return {
            "phase": self.phase,
            "init": self.init,
            "shard_index": self.shard_index,
            "dataset": self.stage_dataset,
            "shard_size": self.shard_size,
            "max_length": self.max_length,
            "source_repo": None if self.first_run else self.source_repo,
            "use_quant": self.use_quant,
            "vocab_size": self.vocab_size,
            "tokenizer_sample": self.tokenizer_sample if self.first_run else None,
            "topology": dataclasses.asdict(self.topology),
            "seed": self.seed,
            "eval_rows": self.eval_rows,
        }

    def public_dict(self) -> dict[str, Any]:
        """Every setting except the secret, for logs, model cards and summaries."""
        import util  # imported here: util imports this module

        out = {}
        for var in VARIABLES:
            value = getattr(self, var.attr)
            if var.secret:
                value = "set" if value else "unset"
            elif var.automatic and value is None:
                value = "auto"
            elif var.name == "HF_ENDPOINT":  # a mirror's address may carry credentials (user:token@host)
                value = util.redact(value, self.hf_token)
            out[var.name] = str(value) if isinstance(value, Path) else value
        return out


STATE_FILE_FORM = '{"init": <number>, "inst": <true or false>}'
PUBLISH_MARKER = "publish.json"  # written last into every published folder (util.publish_folder)


def _read_state_file(output_dir: Path) -> dict[str, Any]:
    """The run state, {} when there is no file; a damaged file raises ConfigError."""
    path = output_dir / "run_state.json"
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, and UnicodeDecodeError of binary junk
        raise ConfigError([_damaged_state(path, f"unreadable: {err}")]) from None
    init, inst = (state.get("init"), state.get("inst")) if isinstance(state, dict) else (None, None)
    if type(init) is not int or init < 0 or type(inst) is not bool:
        raise ConfigError([_damaged_state(path, f"needs {STATE_FILE_FORM}")])
    return state


def _damaged_state(path: Path, what: str) -> str:
    # Deleting the file is not offered as the fix: without it the curriculum would start again at INIT 0.
    return (
        f"{path}: the run-state file is damaged ({what}); it records the next stage of the curriculum: "
        f"set INIT and INST to the stage to run next, or write {STATE_FILE_FORM} into it"
    )


def _published_stages(output_dir: Path, repo_name: str) -> dict[str, str]:
    """{folder name: stage} of the models published for OUTPUT_REPO's name in OUTPUT_DIR (pretraining and
    instruction); the stage is 'pretrain INIT=n', or 'unknown' where the publish record is unreadable."""
    stages = {}
    for name in (repo_name, f"{repo_name}-it"):
        try:
            key = json.loads((output_dir / name / PUBLISH_MARKER).read_text())["stage_key"]
            stages[name] = f"{key['phase']} INIT={key['init']}"
        except (FileNotFoundError, NotADirectoryError):
            continue
        except (OSError, ValueError, KeyError, TypeError):
            stages[name] = "unknown"
    return stages


def _check_published_without_state(values: dict, problems: list[str]) -> None:
    """No run-state file, and the stage left to its default (pretraining INIT 0): refuse when OUTPUT_DIR
    already holds models published by a later stage, which INIT 0 would train again and replace (a lost
    or deleted state file must not restart a finished curriculum). A model published by pretraining
    INIT 0 itself is that stage's own, not advanced yet (stopped by the timer, or killed before advancing):
    the run resumes it."""
    published = _published_stages(Path(values["output_dir"]), values["output_repo"].split("/")[-1])
    later = {name: stage for name, stage in published.items() if stage != "pretrain INIT=0"}
    if later:
        found = ", ".join(f"{name} ({stage})" for name, stage in later.items())
        problems.append(
            f"OUTPUT_DIR={values['output_dir']}: no run_state.json, but it holds published models "
            f"of later stages: {found}; set INIT and INST to the stage to run next (INIT=0 INST=false "
            "starts over and replaces them), or use another OUTPUT_DIR"
        )


def _raw_value(env: Mapping[str, str], var: Variable) -> tuple[str | None, str | None]:
    """The raw string and the name it was read from, aliases included; empty counts as unset."""
    for name in (var.name, *var.aliases):
        raw = env.get(name)
        if raw is not None and raw.strip() != "":
            return raw, name
    return None, None


def _choose_preset(env: Mapping[str, str], requested: str) -> str:
    if requested != "auto":
        return requested
    names_data = any(
        _raw_value(env, v)[0] for v in VARIABLES if v.name in ("INPUT_DATASET", "INSTRUCT_DATASET", "OUTPUT_REPO")
    )
    return "full" if names_data else "demo"


def misspelling_warnings(env: Mapping[str, str] | None = None) -> list[str]:
    """Set variables that look like ours but are not (BATCHSIZE, LEARNING_RATES)."""
    env = os.environ if env is None else env
    warnings = []
    for key in sorted(env):
        if key in VARIABLE_NAMES or not key.isupper():
            continue
        close = difflib.get_close_matches(key, VARIABLE_NAMES, n=1, cutoff=0.85)
        if close:
            warnings.append(f"warning: {key} is set but not used; did you mean {close[0]}?")
    return warnings


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Parse and validate every variable; raise one ConfigError with all problems."""
    env = dict(os.environ if env is None else env)
    problems: list[str] = []
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    raw_preset, _ = _raw_value(env, VARIABLES[0])
    try:
        preset = _choose_preset(env, VARIABLES[0].parse(raw_preset) if raw_preset else "auto")
    except ValueError:  # reported with the other variables below
        preset = "full"
    for var in VARIABLES:
        raw, name = _raw_value(env, var)
        if raw is None:
            use_demo = preset == "demo" and var.demo is not None
            values[var.attr] = var.demo if use_demo else var.default
            sources[var.name] = "demo" if use_demo else "default"
            continue
        sources[var.name] = "environment" if name == var.name else f"environment ({name})"
        try:
            values[var.attr] = var.parse(raw)
        except ValueError as err:
            shown = "(hidden)" if var.secret else repr(raw)
            default = var.shown_default or (
                "auto" if var.automatic and var.default is None else "unset" if var.default is None else var.default
            )
            problems.append(f"{name}={shown}: must be {err} (default {default})")
            values[var.attr] = var.default
    values["preset"] = preset
    _resolve_derived(preset, values, sources, problems)
    _apply_run_state(values, sources, problems)
    _check_combinations(values, problems)
    _check_nodes(values, problems)
    values["topology"] = _build_topology(values, problems)
    if problems:
        raise ConfigError(problems)
    return Settings(**values, sources=sources)


def _apply_run_state(values: dict, sources: dict, problems: list[str]) -> None:
    """INIT/INST come from the environment if set, else from OUTPUT_DIR/run_state.json."""
    from_environment = [name for name in ("INIT", "INST") if sources[name] != "default"]
    try:
        state = _read_state_file(values["output_dir"])
    except ConfigError as err:
        # With both set, the file is not read: the run says which stage it is, and advancing rewrites it.
        if len(from_environment) < 2:
            problems.extend(err.problems)
        return
    if not state and not from_environment:
        _check_published_without_state(values, problems)
    for var_name, attr in (("INIT", "init"), ("INST", "inst")):
        if sources[var_name] == "default" and attr in state:
            values[attr] = state[attr]
            sources[var_name] = "state file"
    # A finished curriculum keeps its last stage in the file. Asking for that same stage again (from
    # the file, or from a Space's variables that mirror it) means a restart after the end: refuse it.
    if state.get("done") and (values["init"], values["inst"]) == (state["init"], state["inst"]):
        problems.append(
            f"OUTPUT_DIR={values['output_dir']}: the run state says every stage is done; "
            "set INIT and INST to a stage to train more (INIT=0 INST=false starts over), "
            "or use another OUTPUT_DIR"
        )


def _resolve_derived(preset: str, values: dict, sources: dict, problems: list[str]) -> None:
    if preset == "demo":
        for attr, path, name in (
            ("input_dataset", DEMO_PRETRAIN, "INPUT_DATASET"),
            ("instruct_dataset", DEMO_INSTRUCT, "INSTRUCT_DATASET"),
        ):
            if values[attr] is None:
                values[attr] = str(path)
                sources[name] = "demo"
    if values["input_dataset"] is None:
        problems.append(
            "INPUT_DATASET: not set; name a Hub dataset id or a local file or folder "
            "with a `text` column (or set PRESET=demo for the embedded corpus)"
        )
    for attr in ("input_dataset", "instruct_dataset"):
        values[attr] = _resolved_local_dataset(values[attr])
    if values["input_repo"] is None:
        values["input_repo"] = values["output_repo"]
        sources["INPUT_REPO"] = f"OUTPUT_REPO ({sources['OUTPUT_REPO']})"
    values["output_dir"] = Path(values["output_dir"]).expanduser().resolve()
    values["work_dir"] = Path(values["work_dir"]).expanduser().resolve()
    values["cache_dir"] = Path(values["cache_dir"]).expanduser().resolve()
    values["hf_endpoint"] = values["hf_endpoint"].rstrip("/")


def _resolved_local_dataset(value: str | None) -> str | None:
    """A dataset naming an existing local file or folder as its absolute path, so that `data/x`, `./data/x`
    and `/abs/data/x` are one stage (the stage key holds it); a Hub id (no such local path) unchanged."""
    if value is None:
        return None
    parts = []
    for part in value.split(MIXTURE_SEPARATOR):
        base, marked, query = part.strip().partition("?")
        path = Path(base).expanduser()
        parts.append(str(path.resolve()) + marked + query if path.exists() else part.strip())
    return MIXTURE_SEPARATOR.join(parts)


def _check_combinations(values: dict, problems: list[str]) -> None:
    min_vocab = len(SPECIAL_TOKENS) + len(CHAT_TOKENS) + 256
    if values["vocab_size"] < min_vocab:
        problems.append(
            f"VOCAB_SIZE={values['vocab_size']}: must be at least {min_vocab} "
            "(256 byte tokens plus the special and chat tokens)"
        )
    if values["save_steps"] % values["logging_steps"] != 0:
        problems.append(
            f"SAVE_STEPS={values['save_steps']}: must be a multiple of LOGGING_STEPS="
            f"{values['logging_steps']}, so that every checkpoint follows a loss check"
        )
    if values["timeout_buffer"] >= values["startup_duration_timeout"]:
        problems.append(
            f"TIMEOUT_BUFFER={values['timeout_buffer']:g}: must be below "
            f"STARTUP_DURATION_TIMEOUT ({values['startup_duration_timeout']:g} minutes)"
        )
    if values["inst"] and not values["instruct_dataset"]:
        problems.append(
            "INSTRUCT_DATASET: not set, but INST=true; name the instruction data (a Hub id or a local file or folder)"
        )
    if values["use_quant"] and values["precision"] in ("fp16", "fp32"):
        problems.append(
            f"PRECISION={values['precision']}: USE_QUANT=true trains in bf16 "
            "(NF4 with bf16 compute); set PRECISION=auto or bf16"
        )
    if values["use_quant"] and values["zero_stage"] == 3:
        problems.append(
            "ZERO_STAGE=3: 4-bit weights cannot be partitioned by ZeRO-3; with USE_QUANT=true "
            "use ZERO_STAGE 0, 1 or 2 (the default)"
        )
    package = REPORT_TARGETS.get(values["report_to"])
    if package and importlib.util.find_spec(package) is None:
        problems.append(
            f"REPORT_TO={values['report_to']}: the Python package `{package}` "
            f"is not installed; install it (pip install {package}) or set "
            "REPORT_TO=tensorboard or none"
        )
    if values["hf_token"] and any(c.isspace() for c in values["hf_token"]):
        problems.append("HF_TOKEN=(hidden): contains whitespace; paste the token alone")


def _check_nodes(values: dict, problems: list[str]) -> None:
    """The multi-node settings agree with each other (trainer.sh turns them into launcher arguments)."""
    nnodes, node_rank, hostfile = values["nnodes"], values["node_rank"], values["hostfile"]
    if node_rank >= nnodes:
        problems.append(
            f"NODE_RANK={node_rank}: must be below NNODES={nnodes} (nodes count from 0); "
            "give each node its own number from 0 to NNODES-1"
        )
    if hostfile is not None:
        values["hostfile"] = hostfile = Path(hostfile).expanduser().resolve()
        if not hostfile.is_file():
            problems.append(
                f"HOSTFILE={hostfile}: no such file; write one `<host> slots=<GPUs>` line per "
                "node, or unset HOSTFILE and start trainer.sh on every node with its NODE_RANK"
            )
        elif node_rank != 0:
            problems.append(
                f"NODE_RANK={node_rank}: with HOSTFILE only node 0 runs trainer.sh (the launcher "
                "starts the others over ssh); unset NODE_RANK, or HOSTFILE to start every node "
                "yourself"
            )
    elif nnodes > 1 and not values["master_addr"]:
        problems.append(
            f"MASTER_ADDR: not set, but NNODES={nnodes}; set it to node 0's address (the same on "
            "every node), or give a HOSTFILE"
        )


def _build_topology(values: dict, problems: list[str]) -> Topology | None:
    try:
        if values["target_parameters"] is not None:
            return topology_for_parameters(values["target_parameters"], values["vocab_size"])
        return topology_for_factor(values["factor"], values["vocab_size"])
    except ValueError as err:
        name = "TARGET_PARAMETERS" if values["target_parameters"] is not None else "FACTOR"
        problems.append(f"{name}: {err}; choose FACTOR from 384 to 98304 or TARGET_PARAMETERS from 1M to 100B")
        return None


def settings_or_exit(env: Mapping[str, str] | None = None, quiet: bool = False) -> Settings:
    """For scripts: the settings, or every problem on stderr and exit status ExitCode.CONFIG."""
    env = os.environ if env is None else env
    if not quiet:
        for warning in misspelling_warnings(env):
            print(warning, file=sys.stderr)
    try:
        return load_settings(env)
    except ConfigError as err:
        for problem in err.problems:
            print(f"config error: {problem}", file=sys.stderr)
        sys.exit(ExitCode.CONFIG)


def describe(settings: Settings) -> str:
    """The resolved configuration, one variable a line, with where each value came from."""
    lines = [
        f"configuration (preset: {settings.preset}; stage: {settings.phase} INIT={settings.init}, "
        f"shard {settings.shard_index}, {settings.run_epochs:g} epochs)"
    ]
    for name, value in settings.public_dict().items():
        lines.append(f"  {name:<28} = {value!s:<40} [{settings.sources[name]}]")
    topo = settings.topology
    lines.append(f"  model: {topo.describe()}; {topo.parameter_count():,} parameters at vocabulary {topo.vocab_size}")
    return "\n".join(lines)


def markdown_table() -> str:
    rows = ["| Variable | Default | Demo | Meaning |", "| --- | --- | --- | --- |"]
    for var in VARIABLES:
        names = " / ".join(f"`{n}`" for n in (var.name, *var.aliases))
        default = var.shown_default or (
            "`auto`"
            if var.automatic and var.default is None
            else "unset"
            if var.default is None
            else f"`{var.default}`"
        )
        demo = "" if var.demo is None else f"`{var.demo}`"
        rows.append(f"| {names} | {default} | {demo} | {var.meaning} |")
    return "\n".join(rows)


ORIGINAL_BUCKET_ELEMENTS = int(5e8)  # the original's reduce_bucket_size and allgather_bucket_size


def deepspeed_buckets(trainable_parameters: int, world_size: int) -> tuple[int, bool]:
    """(bucket elements, overlap_comm) for ZeRO's gradient buckets: the original's 5e8 elements with
    overlapped communication, trimmed where they only cost memory. A bucket never needs more elements
    than there are trained parameters (DeepSpeed allocates the whole bucket at every backward: for
    LoRA's ~11M trained parameters two 5e8 buckets were 1.9 GiB of nothing), and with one process
    there is no communication to overlap, so the second (double-buffering) bucket goes too. The size
    stays even: ZeRO-1/2 require a multiple of 2 elements (4-byte alignment of 16-bit values)."""
    elements = max(2, trainable_parameters + trainable_parameters % 2)
    return min(ORIGINAL_BUCKET_ELEMENTS, elements), world_size > 1


def zero_stage_for(settings: Settings, world_size: int) -> int:
    """The ZeRO stage a run uses: ZERO_STAGE, except that ZeRO-2 runs as ZeRO-1 for 4-bit + LoRA on one
    process. One process has nothing to partition, so both stages hold the same memory, but ZeRO-2
    runs a Python hook per trained tensor in every backward: for LoRA's 252 adapter tensors that
    doubled the host time of an optimizer step on an H200 (BENCHMARKS.md). Full
    training keeps ZeRO-2, whose cost per tensor is small beside a full model's step (not measured)."""
    if settings.zero_stage == 2 and settings.use_quant and world_size == 1:
        return 1
    return settings.zero_stage


def deepspeed_config(settings: Settings, precision: str, trainable_parameters: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of the original pipeline (ZeRO with overlapped communication, contiguous
    gradients, 5e8 buckets, clipping 1.0; buckets trimmed by `deepspeed_buckets`, the stage chosen by
    `zero_stage_for`); "auto" values are filled in by the HF Trainer from the same settings, so
    micro-batch, accumulation and global batch always agree with the world size."""
    stage = zero_stage_for(settings, world_size)
    zero: dict[str, Any] = {"stage": stage}
    if stage > 0:
        bucket, overlap = deepspeed_buckets(trainable_parameters, world_size)
        zero.update(
            overlap_comm=overlap, contiguous_gradients=True, reduce_bucket_size=bucket, allgather_bucket_size=bucket
        )
    if stage == 3:
        # Publishing needs whole 16-bit weights gathered from the shards.
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # loss_scale 0 is DeepSpeed's dynamic loss scaling: fp16 overflows lower the scale instead of
        # producing inf weights.
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def main() -> int:
    args = sys.argv[1:]
    if args == ["--markdown"]:
        print(markdown_table())
        return ExitCode.OK
    if len(args) == 2 and args[0] == "--get":
        # For trainer.sh: one resolved setting, printed bare.
        if args[1] == "hf_token":
            print("config.py: the token is never printed", file=sys.stderr)
            return ExitCode.CONFIG
        names = sorted(f.name for f in dataclasses.fields(Settings) if f.name not in ("hf_token", "sources"))
        if args[1] not in names:
            close = difflib.get_close_matches(args[1], names, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            print(f"config.py: --get {args[1]}: no such setting; {hint}one of {', '.join(names)}", file=sys.stderr)
            return ExitCode.CONFIG
        value = getattr(settings_or_exit(quiet=True), args[1])
        print(str(value).lower() if isinstance(value, bool) else value)
        return ExitCode.OK
    print(describe(settings_or_exit()))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
