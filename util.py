"""Shared helpers of the pipeline stages, and the publishing stage (`python3 util.py publish|advance`).

`publish` copies work/trained/model into OUTPUT_DIR/<published_name>/ with a serving-safe chat template,
the GGUF files of GGUF_TYPES, a model card and a publish marker, then pushes that folder to the Hub when
HF_TOKEN is set and OUTPUT_REPO is `owner/name`. `advance` moves the curriculum to the next stage
(OUTPUT_DIR/run_state.json, and the Space's INIT/INST variables), only for a training run that completed
and was published. `gguf FOLDER [OUT]` writes a model folder as GGUF files (gguf_export.py).

Exit status (config.ExitCode): FAILED with a one-line explanation on stderr; `advance` ends with
INCOMPLETE for a stage that stopped early, whose run state stays as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import fnmatch
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import config

T = TypeVar("T")

PUBLISH_MARKER = config.PUBLISH_MARKER  # defined in config, which reads it before util can be imported
NOT_COPIED = ("README.md", PUBLISH_MARKER, ".*")  # publish writes the first two itself; hidden files stay
PUBLISHED_FILE_MODE, PUBLISHED_FOLDER_MODE = 0o644, 0o755
DISK_FULL_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# prep.CHAT_TEMPLATE's {% generation %}...{% endgeneration %} marks the assistant's tokens for training;
# it is a transformers extension that other template engines (minijinja in Rust servers) refuse.
GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")
# Weights of an older upload that a new one may not overwrite (a model that changed its sharding).
STALE_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.gguf"]
DEFAULT_RETRY_DELAY = 2.0  # seconds before the first retry of a Hub call; doubles at each retry
MAX_RETRY_DELAY = 60.0  # also the most a Hub's Retry-After header makes us wait
# huggingface_hub's HTTP client waits forever for an answer, so a stalled Hub would hang the run for good:
# a Hub request that sends or receives nothing for this long fails (and is retried). huggingface_hub's
# HF_HUB_DOWNLOAD_TIMEOUT, its timeout for other requests, overrides it when set.
DEFAULT_HUB_TIMEOUT = 60.0
HISTORY_LENGTH = 50


def process_rank() -> int:
    """This process's global rank under the DeepSpeed launcher (0 when run alone)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine: the GPU it owns."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """Processes in this run under the DeepSpeed launcher (1 when run alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def visible_gpus() -> str | None:
    """CUDA_VISIBLE_DEVICES as this process was given it (None when unset)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def is_main_process() -> bool:
    return process_rank() == 0


def log(message: str) -> None:
    """Print on rank 0 only, flushed at once so that logs interleave correctly with child processes."""
    if is_main_process():
        print(message, flush=True)


def fsync_path(path: Path) -> None:
    """fsync one file or folder (a folder's fsync makes the names in it, e.g. a rename, durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path: Path) -> None:
    """fsync every regular file and folder under `path` (or the file itself), then its parent folder:
    what a rename is about to publish must be on disk first, or a power cut could publish empty files.
    Links, sockets and the like are skipped: they hold no data of ours, and a link may point anywhere."""
    targets = [path] if path.is_file() else [*path.rglob("*"), path]
    for target in targets:
        if not target.is_symlink() and (target.is_file() or target.is_dir()):
            fsync_path(target)
    fsync_path(path.parent)


# Temporary names beside a final file or folder: `.<name>.tmp-<random>` while it is written,
# `.<name>.old-<pid>` for the version being replaced. remove_stale_temporaries knows both.
TEMPORARY_PATTERNS = (".*.tmp-*", ".*.old-*")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file through a temporary file, an fsync and a rename, so a reader never sees half a file,
    even after a power cut; a kill leaves only a `.<name>.tmp-*` file (remove_stale_temporaries)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file readable by its owner only; these files are meant to be shared.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success it replaces `final` in one step.

    On an exception the temporary folder is removed and `final` (the last complete version) is left
    untouched. The old version is moved aside before the rename and deleted only after it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    # mkdtemp creates the folder private to its owner; the finished folder is meant to be shared.
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, final)


def replace_directory(complete: Path, final: Path) -> None:
    """Put the finished folder `complete` at `final`: its contents are fsync'ed first, the old version
    is moved aside before the rename and deleted only after it, so a crash never leaves `final` half
    written, and the parent folder is fsync'ed so that the rename itself survives a power cut."""
    sync_tree(complete)
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(complete, final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove what a killed run of this pipeline left directly in `folder`: the temporary files and
    folders of write_json_atomic, atomic_directory and replace_directory (TEMPORARY_PATTERNS), with a
    log line for each. Nothing else is touched, and nothing below `folder`'s own entries.

    Only safe when no other run of the pipeline uses `folder` at the same time: the temporaries of a
    live run look exactly like those of a killed one. Returns what was removed."""
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        if not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in TEMPORARY_PATTERNS):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
            kind = "folder"
        else:
            entry.unlink()
            kind = "file"
        log(f"removed a temporary {kind} left by an interrupted run: {entry}")
        removed.append(entry)
    return removed


class StageError(Exception):
    """A failure of publish/advance, explained in one line for the operator."""


# The user-info part of a URL (`scheme://user:password@host`): HF_ENDPOINT may carry a token there.
URL_CREDENTIALS = re.compile(r"(?<=://)[^/\s?#]+@")


def redact(text: str, secret: str | None) -> str:
    """`text` without the secret and without the credentials of any URL in it, for messages that quote
    URLs or errors of other libraries."""
    text = URL_CREDENTIALS.sub("<credentials>@", text)
    return text.replace(secret, "<HF_TOKEN>") if secret else text


def one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Hub calls with retries.


def hub_failure(err: BaseException) -> tuple[bool, str] | None:
    """(worth retrying, reason in one line) for an error of a Hub request; None for other errors."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return False, "HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set, so the Hub cannot be reached; unset both"
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        if status in (401, 403):
            return False, (
                f"the Hub rejected HF_TOKEN (HTTP {status}): check that the token is valid "
                "and has write access to the repository or Space"
            )
        if status == 404:
            return False, (
                "the repository or Space does not exist on the Hub (HTTP 404): check its "
                "name (OUTPUT_REPO, SPACE_ID) and that HF_TOKEN can see it"
            )
        detail = err.server_message or str(err).splitlines()[0]
        return status >= 500 or status in (408, 429), one_line(f"HTTP {status}: {detail}")
    if isinstance(
        err, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, ConnectionError, TimeoutError)
    ):
        return True, one_line(f"connection failed: {type(err).__name__}: {err}")
    if isinstance(err, httpx.HTTPError):
        return False, one_line(f"{type(err).__name__}: {err}")
    return None


def retry_after(err: BaseException) -> float | None:
    """The seconds that an HTTP error's Retry-After header asks to wait (None without one, or for the
    HTTP-date form, which the Hub does not send)."""
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after", "").strip() if response is not None else ""
    return float(value) if value.isdigit() else None


def hub_call(
    action: Callable[[], T],
    what: str,
    attempts: int,
    base_delay: float,
    secret: str | None = None,
    sleep: Callable[[float], None] | None = None,
) -> T:
    """Run one Hub request, retrying server errors (5xx), rate limits (429) and connection errors up
    to `attempts` times in all, waiting base_delay, 2*base_delay, ... between them, or what the Hub's
    Retry-After header asks, never more than MAX_RETRY_DELAY. A rejected token or a missing repository
    fails at once: retrying cannot fix those. `secret` is kept out of messages."""
    attempt = 1
    while True:
        try:
            return action()
        except Exception as err:
            failure = hub_failure(err)
            if failure is None:
                raise
            retryable, reason = failure[0], redact(failure[1], secret)
            if not retryable:
                raise StageError(f"{what} failed: {reason}") from None
            if attempt >= attempts:
                raise StageError(f"{what} failed after {attempts} attempts: {reason}") from None
            asked = retry_after(err)
            delay = min(base_delay * 2 ** (attempt - 1) if asked is None else asked, MAX_RETRY_DELAY)
            why = "" if asked is None else ", as the Hub's Retry-After asks"
            log(f"hub: {what} failed ({reason}); retry {attempt}/{attempts - 1} in {delay:.2f}s{why}")
            (sleep or time.sleep)(delay)  # looked up now, so that a test can replace time.sleep
            attempt += 1


class RedactingFilter(logging.Filter):
    """Rewrites log records without the secret or URL credentials: huggingface_hub logs the URLs of the
    requests it retries, and HF_ENDPOINT may carry a token."""

    def __init__(self, secret: str | None):
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage(), self.secret), None
        return True


def hub_timeout() -> float:
    """Seconds a Hub request may send or receive nothing: DEFAULT_HUB_TIMEOUT or HF_HUB_DOWNLOAD_TIMEOUT."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT"):
        return float(constants.HF_HUB_DOWNLOAD_TIMEOUT)
    return DEFAULT_HUB_TIMEOUT


def set_hub_timeout(seconds: float, connect: float | None = None) -> None:
    """Give huggingface_hub's shared HTTP client a timeout: it has none by default, so a stalled Hub
    would hang the run for good."""
    import httpx
    from huggingface_hub import get_session

    get_session().timeout = httpx.Timeout(seconds, connect=seconds if connect is None else connect)


@functools.cache
def prepare_hub_client(secret: str | None) -> None:
    """A timeout for the Hub requests of publishing, and the secret kept out of huggingface_hub's logs (once)."""
    from huggingface_hub.utils import logging as hub_logging

    set_hub_timeout(hub_timeout())
    for handler in hub_logging.get_logger().handlers:
        handler.addFilter(RedactingFilter(secret))


def hub_api(settings: config.Settings):
    from huggingface_hub import HfApi

    prepare_hub_client(settings.hf_token)
    return HfApi(endpoint=settings.hf_endpoint, token=settings.hf_token)


def hub_repo_id(settings: config.Settings, name: str) -> str:
    """The Hub id of a published folder: OUTPUT_REPO's owner and the folder's name."""
    return f"{settings.output_repo.split('/')[0]}/{name}"


# ---------------------------------------------------------------------------------------------
# The trained model, checked before anything is published.


def stage_text(key: Any) -> str:
    if isinstance(key, dict) and {"phase", "init", "shard_index"} <= key.keys():
        return f"{key['phase']} INIT={key['init']} (shard {key['shard_index']})"
    return "an unknown stage"


def read_summary(settings: config.Settings) -> tuple[dict[str, Any], str]:
    """train.py's summary of this stage and a digest of its exact text (the publish marker keeps it)."""
    path = settings.trained_dir / "summary.json"
    if not path.is_file():
        raise StageError(f"{path}: missing; train.py writes it when training ends, so train this stage first")
    try:
        text = path.read_text()
        summary = json.loads(text)
    except (OSError, json.JSONDecodeError) as err:
        raise StageError(f"{path}: unreadable ({one_line(err)}); train this stage again") from None
    if not isinstance(summary, dict):
        raise StageError(f"{path}: must hold a JSON object; train this stage again")
    return summary, hashlib.sha256(text.encode()).hexdigest()


def check_stage(settings: config.Settings, summary: dict[str, Any]) -> None:
    """The trained model must come from the stage that the settings describe."""
    expected, found = settings.stage_key(), summary.get("stage_key")
    if found == expected:
        return
    if isinstance(found, dict):
        differing = sorted(k for k in expected if found.get(k) != expected[k])
        detail = f"{stage_text(found)}; differs in {', '.join(differing)}"
    else:
        detail = "no stage_key"
    raise StageError(
        f"{settings.trained_dir / 'summary.json'}: the trained model belongs to another stage ({detail}), "
        f"not to this run's {stage_text(expected)}; train this stage first, or set INIT/INST to the "
        "stage that was trained"
    )


def check_final_loss(settings: config.Settings, summary: dict[str, Any]) -> float:
    loss = summary.get("final_loss")
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
        raise StageError(
            f"{settings.trained_dir / 'summary.json'}: final_loss is {loss!r}; a model without a finite "
            "training loss is not published (check the data or lower LEARNING_RATE, then train again)"
        )
    return float(loss)


def missing_model_files(folder: Path, weights: tuple[str, ...] = ("model.safetensors",)) -> list[str]:
    """Files a loadable model folder lacks: config.json, the tokenizer, and safetensors weights
    (`weights[0]` alone, or every shard that its `.index.json` names)."""
    missing = [name for name in ("config.json", *TOKENIZER_FILES) if not (folder / name).is_file()]
    return missing + missing_weights(folder, weights)


def missing_weights(folder: Path, weights: tuple[str, ...]) -> list[str]:
    if any((folder / name).is_file() for name in weights):
        return []
    index = folder / f"{weights[0]}.index.json"
    if not index.is_file():
        return [f"{weights[0]} (or its sharded {index.name})"]
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        return [f"a readable {index.name} ({one_line(err)})"]
    return sorted(name for name in shards if not (folder / name).is_file())


def check_model_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise StageError(f"{folder}: missing; train.py writes the trained model there, so train this stage first")
    missing = missing_model_files(folder)
    if missing:
        raise StageError(f"{folder}: incomplete trained model, missing {', '.join(missing)}; train this stage again")


# ---------------------------------------------------------------------------------------------
# The published folder.


def human_count(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "unknown"
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n:,} ({n / size:.1f}{suffix})"
    return f"{n:,}"


def number_text(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "unknown"


# Held-out conversations whose prompts, expected and generated answers an instruction model's card shows.
CARD_SAMPLES = 3


def hub_dataset_ids(value: str | None) -> list[str]:
    """The Hub datasets among a dataset setting's parts: config makes every local one an absolute
    path, which has no place in a card's metadata."""
    ids = [config.split_dataset_spec(part)[0] for part in (value or "").split(config.MIXTURE_SEPARATOR)]
    return [name for name in ids if name and not Path(name).is_absolute()]


def base_model_id(settings: config.Settings) -> str | None:
    """The Hub id of the pretrained model an instruction model was tuned from, where it has one."""
    repo = settings.input_repo
    return repo if settings.inst and not settings.input_repo_is_path and "/" in repo else None


def card_eval_results(settings: config.Settings, summary: dict[str, Any]) -> list:
    """This stage's eval loss and perplexity on its held-out split, as the Hub's model-index reads them."""
    from huggingface_hub import EvalResult

    loss = summary.get("eval_loss")
    if not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return []
    # The split's dataset by its Hub id where the stage reads one Hub dataset alone (no mixture).
    dataset = settings.stage_dataset
    single = config.MIXTURE_SEPARATOR not in dataset and hub_dataset_ids(dataset)
    where = dict(
        task_type="text-generation",
        task_name="Causal language modeling",
        dataset_type=single[0] if single else "held-out",
        dataset_name=f"held-out split of {settings.phase} shard {settings.shard_index} "
        f"({summary.get('eval_sequences')} sequences)",
        dataset_split="held-out",
    )
    results = [EvalResult(metric_type="loss", metric_name="Eval loss", metric_value=round(loss, 4), **where)]
    ppl = summary.get("eval_perplexity")
    if isinstance(ppl, (int, float)) and math.isfinite(ppl):
        results.append(
            EvalResult(metric_type="perplexity", metric_name="Perplexity", metric_value=round(ppl, 3), **where)
        )
    return results


def card_data(settings: config.Settings, summary: dict[str, Any], name: str):
    """The card's metadata, as huggingface_hub's ModelCardData (validated and written by it)."""
    from huggingface_hub import ModelCardData

    tags = [
        "llama",
        "text-generation",
        "train-llama",
        "instruction-tuned" if settings.inst else "pretrained-from-scratch",
    ]
    if settings.use_quant:
        tags.append("lora")
    trained_on = hub_dataset_ids(settings.input_dataset)
    if settings.inst:
        trained_on += hub_dataset_ids(settings.instruct_dataset)
    return ModelCardData(
        license=settings.model_license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=list(dict.fromkeys(trained_on)) or None,
        base_model=base_model_id(settings),
        model_name=name,
        eval_results=card_eval_results(settings, summary) or None,
    )


def card_facts(settings: config.Settings, summary: dict[str, Any]) -> list[tuple[str, str]]:
    steps = f"{summary.get('steps')} of {summary.get('total_steps')}"
    if not summary.get("completed"):
        steps += f" (stopped early by the {summary.get('stopped_by') or 'interruption'})"
    base = "none: trained from scratch" if settings.first_run else f"`{settings.source_repo}`"
    return [
        ("Parameters", human_count(summary.get("parameters"))),
        ("Topology", f"LLaMA, {settings.topology.describe()}, vocabulary {settings.topology.vocab_size}"),
        (
            "Stage",
            f"{settings.phase}, INIT={settings.init}, shard {settings.shard_index}, "
            f"{settings.run_epochs:g} epoch(s) over a shard of {settings.shard_size:,} rows",
        ),
        ("Dataset", f"`{settings.stage_dataset}`"),
        ("Base model", base),
        ("Steps", steps),
        ("Tokens seen", human_count(summary.get("tokens_seen"))),
        ("Loss", f"final {summary['final_loss']:.4f} (first logged: {number_text(summary.get('first_loss'))})"),
        (
            "Training",
            f"{summary.get('precision')} on {summary.get('world_size')} process(es), "
            f"{'4-bit NF4 + LoRA (merged)' if summary.get('use_quant') else 'full weights'}, "
            f"{summary.get('wall_seconds')} s",
        ),
        ("Date", utc_now()),
    ]


def card_evaluation(settings: config.Settings, summary: dict[str, Any]) -> str:
    """The card's Evaluation section: eval loss and perplexity, and the loss plot of the curriculum."""
    loss = summary.get("eval_loss")
    lines = ["## Evaluation", ""]
    if isinstance(loss, (int, float)):
        lines.append(
            f"On {summary.get('eval_sequences')} held-out sequences of this stage's shard (never "
            f"trained on): eval loss {loss:.4f}, perplexity {number_text(summary.get('eval_perplexity'))}."
        )
    else:
        lines.append("No eval loss: this stage held out no sequences (EVAL_ROWS=0 or a small shard).")
    if (settings.trained_dir / "model" / PLOT_FILE).is_file():
        lines += [
            "",
            f"![Training and eval loss of every stage so far]({PLOT_FILE})",
            "",
            f"The losses behind the plot, stage by stage, are in `{HISTORY_FILE}`.",
        ]
    return "\n".join(lines) + "\n"


def card_samples(settings: config.Settings) -> str:
    """An instruction model's answers to a few held-out prompts (greedy), beside the data's answers."""
    import evaluate

    eval_split = settings.prep_dir / "eval_dataset"
    manifest = read_json_object(settings.prep_dir / "manifest.json")
    if not settings.inst or not eval_split.is_dir() or manifest.get("stage_key") != settings.stage_key():
        return ""
    samples = evaluate.eval_split_samples(settings.trained_dir / "model", eval_split, CARD_SAMPLES)
    blocks = [
        f"**Prompt**\n\n{fenced(sample['prompt'])}\n"
        f"**Answer in the data**\n\n{fenced(sample['expected'])}\n"
        f"**This model's answer**\n\n{fenced(sample['answer'])}"
        for sample in samples
    ]
    return "\n## Held-out prompts\n\nGreedy answers to prompts of the held-out split:\n\n" + "\n".join(blocks)


def fenced(text: str) -> str:
    """`text` as a Markdown code block whose fence no backtick run inside it can close."""
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}text\n{text}\n{fence}\n"


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None where it is missing or half written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; {} where it is missing, unreadable or not an object."""
    value = read_json(path)
    return value if isinstance(value, dict) else {}


def model_card(settings: config.Settings, summary: dict[str, Any], name: str) -> str:
    """The README.md of a published model folder: metadata through huggingface_hub's ModelCard."""
    from huggingface_hub import ModelCard

    where = hub_repo_id(settings, name) if settings.pushes_to_hub else str(settings.output_dir / name)
    kind = "instruction-tuned" if settings.inst else "pretrained from scratch"
    table = "\n".join(f"| {key} | {value} |" for key, value in card_facts(settings, summary))
    prompt = "<|user|>Reverse the word: apple<|end|><|bot|>" if settings.inst else "Once upon a time"
    body = f"""
# {name}

A LLaMA-architecture causal language model, {kind}, by the train-llama pipeline.

## This run

| Fact | Value |
| --- | --- |
{table}

{card_evaluation(settings, summary)}{card_samples(settings)}
## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{where}")
model = AutoModelForCausalLM.from_pretrained("{where}")
inputs = tokenizer({prompt!r}, return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0]))
```

## Training settings

```json
{json.dumps(settings.public_dict(), indent=2, sort_keys=True, default=str)}
```
"""
    card = ModelCard(f"---\n{card_data(settings, summary, name).to_yaml()}\n---\n{body}")
    return redact(str(card), settings.hf_token)


# ---------------------------------------------------------------------------------------------
# The loss history of the whole curriculum, carried from stage to stage in each published folder.

# In every trained and published model folder: the loss history so far and its plot. prep.py copies
# the input model's history into WORK_DIR/prep; train.py extends it with this stage.
HISTORY_FILE, PLOT_FILE = "loss_history.json", "loss_curve.png"
PLOT_SIZE, PLOT_DPI = (8.0, 4.5), 100  # inches: an 800 x 450 pixel PNG


def stage_order(entry: dict[str, Any]) -> tuple[bool, int]:
    """Where a stage comes in the curriculum: every pretraining INIT, then every instruction INIT."""
    return entry.get("phase") == "instruct", int(entry.get("init", 0))


def is_loss_series(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(point, list) and len(point) == 2 and all(isinstance(x, (int, float)) for x in point)
        for point in value
    )


def is_stage_record(stage: Any) -> bool:
    """Whether a loss history entry has the form extend_history writes (a damaged one is left out)."""
    return (
        isinstance(stage, dict)
        and stage.get("phase") in ("pretrain", "instruct")
        and isinstance(stage.get("init"), int)
        and isinstance(stage.get("steps"), int)
        and is_loss_series(stage.get("train"))
        and is_loss_series(stage.get("eval"))
    )


def read_history(path: Path) -> list[dict[str, Any]]:
    """The stages recorded in a loss history file; [] where there is none or it is unreadable."""
    history = read_json_object(path)
    stages = history.get("stages")
    return [stage for stage in stages if is_stage_record(stage)] if isinstance(stages, list) else []


def extend_history(earlier: list[dict[str, Any]], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The stages before this one (a rerun of an earlier stage drops the later ones it replaces),
    then this stage's train and eval losses from train.py's summary."""
    key = summary["stage_key"]
    entry = {
        "stage": stage_text(key),
        "phase": key["phase"],
        "init": key["init"],
        "steps": summary["steps"],
        "train": summary.get("losses") or [],
        "eval": summary.get("eval_losses") or [],
    }
    return [stage for stage in earlier if stage_order(stage) < stage_order(entry)] + [entry]


def loss_figure(stages: list[dict[str, Any]]):
    """One train-loss curve per stage and its eval points in the same colour, the stages one after
    another on one step axis."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI, layout="constrained")
    axes = figure.subplots()
    offset = 0
    for number, stage in enumerate(stages):
        colour = f"C{number % 10}"
        train, evals = stage.get("train", []), stage.get("eval", [])
        axes.plot(
            [offset + step for step, _ in train],
            [loss for _, loss in train],
            color=colour,
            label=f"{stage.get('stage')} train",
        )
        if evals:
            axes.scatter(
                [offset + step for step, _ in evals],
                [loss for _, loss in evals],
                color=colour,
                edgecolors="black",
                zorder=3,
                label=f"{stage.get('stage')} eval",
            )
        offset += int(stage.get("steps") or 0)
    axes.set_xlabel("optimizer step (all stages so far)")
    axes.set_ylabel("loss")
    axes.set_title("Training and eval loss over the curriculum")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def write_history(folder: Path, stages: list[dict[str, Any]]) -> None:
    """HISTORY_FILE and its plot PLOT_FILE into a model folder."""
    write_json_atomic(folder / HISTORY_FILE, {"stages": stages})
    loss_figure(stages).savefig(folder / PLOT_FILE)


def ensure_generation_config(folder: Path) -> None:
    """Write a generation config from the model's special token ids when training left none."""
    target = folder / "generation_config.json"
    if target.is_file():
        return
    model_config = json.loads((folder / "config.json").read_text())
    ids = {k: model_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in model_config}
    write_json_atomic(target, {"_from_model_config": True, **ids})


def serving_chat_template(template: str) -> str:
    """The chat template without its generation markers, for any Jinja engine: the same text for every
    conversation while the markers carry no whitespace control (prep.CHAT_TEMPLATE's do not;
    tests/test_publish.py renders both)."""
    return GENERATION_TAG.sub("", template)


def write_serving_chat_templates(folder: Path) -> None:
    """Make the chat templates of a tokenizer folder serving-safe wherever transformers keeps them:
    chat_template.jinja (and additional_chat_templates/) in transformers 5, the chat_template entry of
    tokenizer_config.json before it (a string, or a list of named templates)."""
    for path in [folder / "chat_template.jinja", *sorted(folder.glob("additional_chat_templates/*.jinja"))]:
        if path.is_file():
            path.write_text(serving_chat_template(path.read_text()))
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        return
    tokenizer_config = json.loads(config_path.read_text())
    template = tokenizer_config.get("chat_template")
    if isinstance(template, str):
        tokenizer_config["chat_template"] = serving_chat_template(template)
    elif isinstance(template, list):
        tokenizer_config["chat_template"] = [
            {**entry, "template": serving_chat_template(entry["template"])} for entry in template
        ]
    else:
        return
    config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")


def publish_marker(settings: config.Settings, summary: dict[str, Any], digest: str) -> dict[str, Any]:
    """What `advance` checks: which stage and which exact summary this folder holds, and the push."""
    return {
        "stage_key": settings.stage_key(),
        "summary_sha256": digest,
        "published_at": utc_now(),
        "completed": bool(summary.get("completed")),
        "steps": summary.get("steps"),
        "final_loss": summary["final_loss"],
        "hub": None,
    }


def copy_model_files(source: Path, target: Path) -> None:
    """Copy the files and folders of `source` into the folder `target`, except NOT_COPIED names at any
    depth. shutil.copytree is not used: it wraps a full disk's OSError in a shutil.Error without errno."""
    for path in sorted(source.rglob("*")):  # sorted: a folder comes before what it holds
        relative = path.relative_to(source)
        if any(fnmatch.fnmatchcase(part, pattern) for part in relative.parts for pattern in NOT_COPIED):
            continue
        if path.is_dir():
            (target / relative).mkdir(exist_ok=True)
        else:
            shutil.copyfile(path, target / relative)


def make_readable_by_others(folder: Path) -> None:
    """Files 0644 and folders 0755 under `folder`: safetensors writes its weights 0600 and mkdtemp makes
    folders 0700, but a published model is meant for every user of the machine."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(PUBLISHED_FOLDER_MODE if path.is_dir() else PUBLISHED_FILE_MODE)


def publish_folder(
    source: Path, target: Path, card: str, marker: dict[str, Any], gguf_types: tuple[str, ...] = ()
) -> None:
    """Replace `target` by a copy of `source` with serving-safe chat templates, GGUF files of
    `gguf_types`, the card and the marker, all or nothing; a failure to write (a full disk) leaves the
    previous version at `target` as it was."""
    try:
        with atomic_directory(target) as tmp:
            copy_model_files(source, tmp)
            write_serving_chat_templates(tmp)
            write_gguf_files(tmp, target.name, gguf_types)
            (tmp / "README.md").write_text(card)
            if (tmp / "config.json").is_file():
                ensure_generation_config(tmp)
            write_json_atomic(tmp / PUBLISH_MARKER, marker)
            make_readable_by_others(tmp)
    except OSError as err:
        raise StageError(local_publish_failure(err, source, target)) from None


def write_gguf_files(folder: Path, name: str, gguf_types: tuple[str, ...]) -> None:
    """GGUF_TYPES: the model of `folder` as `<name>-<type>.gguf` files beside it."""
    if not gguf_types:
        return
    import gguf_export

    for type_name in gguf_types:
        target = folder / gguf_export.gguf_name(name, type_name)
        try:
            gguf_export.export(folder, target, type_name, name=name)
        except gguf_export.ExportError as err:
            raise StageError(f"GGUF_TYPES={','.join(gguf_types)}: {err}") from None
        log(f"publish: wrote {target.name} ({byte_text(target.stat().st_size)})")


def byte_text(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def local_publish_failure(err: OSError, source: Path, target: Path) -> str:
    """One line for an OSError while writing the published folder `target`: what failed, that the
    previous version is intact, and what to do."""
    previous = (
        f"the previously published version at {target} is intact"
        if target.is_dir()
        else f"nothing was published at {target}"
    )
    rerun = "then rerun `bash trainer.sh` or `python3 util.py publish`"
    if err.errno in DISK_FULL_ERRORS:
        needed = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
        existing = next(p for p in [target.parent, *target.parent.parents] if p.exists())
        free = shutil.disk_usage(existing).free
        return (
            f"{target.parent}: {DISK_FULL_ERRORS[err.errno]} while publishing {target.name} "
            f"(it needs about {byte_text(needed)}, {byte_text(free)} free); {previous}; "
            f"free space on that filesystem, {rerun}"
        )
    where = err.filename or target
    return f"{where}: {err.strerror or err} while publishing {target.name}; {previous}; fix that, {rerun}"


def adapter_card(settings: config.Settings, summary: dict[str, Any], name: str) -> str:
    text = (
        f"---\nlibrary_name: peft\ntags:\n- lora\n- train-llama\n---\n\n# {name}\n\n"
        f"The LoRA adapter (r={config.LORA_R}, alpha={config.LORA_ALPHA}) trained on 4-bit NF4 weights "
        f"in {stage_text(settings.stage_key())}; the merged model is `{settings.published_name}`. "
        f"Final loss {summary['final_loss']:.4f} after {summary.get('steps')} steps, {utc_now()}.\n"
    )
    return redact(text, settings.hf_token)


def adapter_source(settings: config.Settings) -> Path | None:
    """The LoRA adapter to publish alone (SAVE_ADAPTER with USE_QUANT), checked; None when not asked."""
    if not (settings.save_adapter and settings.use_quant):
        return None
    adapter = settings.trained_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file() or missing_weights(adapter, ("adapter_model.safetensors",)):
        raise StageError(
            f"{adapter}: SAVE_ADAPTER=true but the LoRA adapter is missing or incomplete; "
            "train this stage again or set SAVE_ADAPTER=false"
        )
    return adapter


def publish_local(settings: config.Settings, summary: dict[str, Any], digest: str) -> list[Path]:
    """Write OUTPUT_DIR/<published_name>/ (and <published_name>-adapter/ when SAVE_ADAPTER is on)."""
    adapter = adapter_source(settings)
    marker = publish_marker(settings, summary, digest)
    model_folder = settings.output_dir / settings.published_name
    publish_folder(
        settings.trained_dir / "model",
        model_folder,
        model_card(settings, summary, model_folder.name),
        marker,
        settings.gguf_types,
    )
    if adapter is None:
        return [model_folder]
    adapter_folder = settings.output_dir / f"{settings.published_name}-adapter"
    publish_folder(adapter, adapter_folder, adapter_card(settings, summary, adapter_folder.name), marker)
    return [model_folder, adapter_folder]


def commit_message(settings: config.Settings, summary: dict[str, Any]) -> str:
    early = "" if summary.get("completed") else f" (stopped early by the {summary.get('stopped_by')})"
    return (
        f"{stage_text(settings.stage_key())}: {summary.get('steps')} steps{early}, "
        f"{summary.get('tokens_seen')} tokens, final loss {summary['final_loss']:.4f}"
    )


def push_folder(settings: config.Settings, folder: Path, message: str, retry_delay: float) -> str:
    """Create the Hub repository if needed and upload the folder in one commit; its URL."""
    api = hub_api(settings)
    call = functools.partial(hub_call, attempts=settings.max_retries, base_delay=retry_delay, secret=settings.hf_token)
    repo_id = hub_repo_id(settings, folder.name)
    call(lambda: api.create_repo(repo_id, exist_ok=True), f"creating the Hub repository {repo_id}")
    commit = call(
        lambda: api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=message,
            ignore_patterns=[PUBLISH_MARKER],
            delete_patterns=STALE_WEIGHT_PATTERNS,
        ),
        f"uploading {folder.name} to {repo_id}",
    )
    marker = json.loads((folder / PUBLISH_MARKER).read_text())
    marker["hub"] = {"repo_id": repo_id, "commit_url": commit.commit_url, "pushed_at": utc_now()}
    write_json_atomic(folder / PUBLISH_MARKER, marker)
    return commit.commit_url


def check_token(settings: config.Settings, retry_delay: float) -> None:
    """Fail before any upload when the Hub refuses the token or it can only read."""
    api = hub_api(settings)
    who = hub_call(
        lambda: api.whoami(), "checking HF_TOKEN", settings.max_retries, retry_delay, secret=settings.hf_token
    )
    role = (who.get("auth") or {}).get("accessToken", {}).get("role")
    if role == "read":
        raise StageError("HF_TOKEN is a read-only token; publishing needs a token with write access")


def publish(settings: config.Settings, retry_delay: float) -> int:
    """Publish the trained model locally, then push it. Removes what a killed publish left in OUTPUT_DIR:
    the pipeline runs one stage at a time, so no other run writes there meanwhile."""
    remove_stale_temporaries(settings.output_dir)
    summary, digest = read_summary(settings)
    check_stage(settings, summary)
    loss = check_final_loss(settings, summary)
    check_model_folder(settings.trained_dir / "model")
    log(f"publish: {stage_text(settings.stage_key())}, {summary.get('steps')} steps, final loss {loss:.4f}")
    folders = publish_local(settings, summary, digest)
    for folder in folders:
        log(f"publish: saved {folder}")
    if not settings.pushes_to_hub:
        log("publish: not pushed to the Hub (that needs HF_TOKEN and OUTPUT_REPO as owner/name)")
        return config.ExitCode.OK
    try:
        check_token(settings, retry_delay)
        for folder in folders:
            url = push_folder(settings, folder, commit_message(settings, summary), retry_delay)
            log(f"publish: pushed {folder.name} to the Hub: {url}")
    except Exception as err:
        reason = str(err) if isinstance(err, StageError) else f"{type(err).__name__}: {err}"
        raise StageError(
            f"{one_line(reason, 500)}. The model is saved locally at {folders[0]}; the run "
            "state was not advanced; run `python3 util.py publish` again to retry the push"
        ) from None
    return config.ExitCode.OK


# ---------------------------------------------------------------------------------------------
# The curriculum.


def next_stage(init: int, inst: bool, is_last_shard: bool, has_instruct: bool) -> tuple[int, bool, bool]:
    """The stage after a completed one, as (init, inst, done).

    INIT 0 and 1 both train shard 0 for half the epochs each, so INIT 0 is always followed by INIT 1;
    from INIT >= 1 the next INIT trains shard INIT, which exists unless this shard was the last.
    After the last pretraining shard comes instruction tuning from INIT 0 (when there is instruction
    data); after the last instruction shard the curriculum is done (the stage stays as it was)."""
    if init == 0 or not is_last_shard:
        return init + 1, inst, False
    if not inst and has_instruct:
        return 0, True, False
    return init, inst, True


def check_published(settings: config.Settings, digest: str) -> None:
    """Advance only past a stage whose exact summary was published (and pushed, when pushing)."""
    path = settings.output_dir / settings.published_name / PUBLISH_MARKER
    try:
        marker = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        marker = None
    if not isinstance(marker, dict) or marker.get("summary_sha256") != digest:
        raise StageError(
            f"{path}: no publish record of this training run; the run state advances only "
            "after `python3 util.py publish` succeeded"
        )
    if settings.pushes_to_hub and not marker.get("hub"):
        raise StageError(
            f"{path}: this model was saved locally but not pushed to the Hub; run "
            "`python3 util.py publish` again before advancing"
        )


def previous_history(settings: config.Settings) -> list[Any]:
    try:
        state = json.loads(settings.state_file.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    history = state.get("history") if isinstance(state, dict) else None
    return history if isinstance(history, list) else []


def new_run_state(settings: config.Settings, stage: tuple[int, bool, bool], summary: dict[str, Any]) -> dict:
    init, inst, done = stage
    entry = {
        "at": utc_now(),
        "trained": stage_text(settings.stage_key()),
        "steps": summary.get("steps"),
        "final_loss": summary.get("final_loss"),
        "next": "done" if done else f"{'instruct' if inst else 'pretrain'} INIT={init}",
    }
    history = (previous_history(settings) + [entry])[-HISTORY_LENGTH:]
    return {"init": init, "inst": inst, "done": done, "updated_at": entry["at"], "history": history}


def update_space(settings: config.Settings, state: dict[str, Any], retry_delay: float) -> bool:
    """Store the new stage in the Space's variables (they become INIT/INST at its next start) and
    pause the Space when the curriculum is done; whether it was paused. INST goes first: a Space that
    restarts between the two writes then never retrains pretraining from INIT 0 over a finished model.
    A failure to pause only warns: the curriculum is done and recorded, the pause only saves hardware."""
    api = hub_api(settings)
    call = functools.partial(hub_call, attempts=settings.max_retries, base_delay=retry_delay, secret=settings.hf_token)
    space = settings.space_id
    inst_text = "true" if state["inst"] else "false"
    call(lambda: api.add_space_variable(space, "INST", inst_text), f"setting INST on the Space {space}")
    call(lambda: api.add_space_variable(space, "INIT", str(state["init"])), f"setting INIT on the Space {space}")
    if not state["done"]:
        return False
    try:
        call(lambda: api.pause_space(space), f"pausing the Space {space}")
    except StageError as err:
        log(f"warning: {err}; the curriculum is done and recorded, but the Space keeps running: pause it by hand")
        return False
    return True


def advance(settings: config.Settings, retry_delay: float) -> int:
    summary, digest = read_summary(settings)
    check_stage(settings, summary)
    current = stage_text(settings.stage_key())
    if not summary.get("completed"):
        log(
            f"advance: {current} is incomplete (stopped by the {summary.get('stopped_by') or 'interruption'}); "
            f"the run state stays; rerunning continues from the checkpoint in {settings.checkpoint_dir}"
        )
        return config.ExitCode.INCOMPLETE
    check_published(settings, digest)
    is_last_shard = summary.get("is_last_shard")
    if not isinstance(is_last_shard, bool):
        raise StageError(
            f"{settings.trained_dir / 'summary.json'}: is_last_shard must be true or false, "
            f"not {is_last_shard!r}; train this stage again"
        )
    if settings.space_id and not settings.hf_token:
        raise StageError(
            "SPACE_ID is set but HF_TOKEN is not: the Space's INIT/INST variables cannot be "
            "updated; add HF_TOKEN as a secret of the Space"
        )
    stage = next_stage(settings.init, settings.inst, is_last_shard, bool(settings.instruct_dataset))
    state = new_run_state(settings, stage, summary)
    write_json_atomic(settings.state_file, state)
    paused = False
    if settings.space_id:
        try:
            paused = update_space(settings, state, retry_delay)
        except StageError as err:
            raise StageError(
                f"{err}; {settings.state_file} already says INIT={state['init']} "
                f"INST={str(state['inst']).lower()}: set those Space variables by hand"
            ) from None
    log(advance_line(settings, state, current, paused))
    return config.ExitCode.OK


def advance_line(settings: config.Settings, state: dict[str, Any], current: str, paused: bool) -> str:
    if state["done"]:
        return f"done: the curriculum is finished after {current}" + (
            f"; the Space {settings.space_id} is paused" if paused else ""
        )
    phase = "instruct" if state["inst"] else "pretrain"
    shard = 0 if state["init"] < 2 else state["init"] - 1
    return (
        f"advanced: {current} -> {phase} INIT={state['init']} (shard {shard}); "
        f"next run: INIT={state['init']} INST={str(state['inst']).lower()}"
    )


def launcher_devices(processes: int, gpus: int, visible: str | None) -> list[str]:
    """The device arguments of the `deepspeed` launcher. Given --num_gpus it drops
    CUDA_VISIBLE_DEVICES and starts processes on GPUs 0..N-1, so a user who set CUDA_VISIBLE_DEVICES=2,3
    would train on 0 and 1; with a visible-devices list the GPUs are named with --include instead."""
    if gpus == 0 or not visible:
        return ["--num_gpus", str(processes)]
    indices = [part.strip() for part in visible.split(",") if part.strip()]
    if not all(part.isdigit() for part in indices):
        raise StageError(
            f"CUDA_VISIBLE_DEVICES={visible!r}: the DeepSpeed launcher needs GPU indices; "
            "name the GPUs by number, e.g. CUDA_VISIBLE_DEVICES=0,1"
        )
    return ["--include", "localhost:" + ",".join(indices[:processes])]


DEFAULT_MULTI_NODE_PORT = 29500  # torch.distributed's: every node must name the same port


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher_arguments(settings: config.Settings, processes: int, gpus: int, visible: str | None) -> list[str]:
    """The `deepspeed` launcher's arguments. One node: a free port (or MASTER_PORT) and the devices
    (launcher_devices). HOSTFILE: the launcher starts `processes` per host over ssh, on every host
    listed (the first NNODES where NNODES > 1). NNODES > 1 without one: every node runs the launcher
    itself (--no_ssh) with its --node_rank, from a hostfile written here that only counts the nodes
    (their names are never looked up). Several nodes must agree on the port: 29500 unless MASTER_PORT."""
    if settings.hostfile is None and settings.nnodes == 1:
        return ["--master_port", str(settings.master_port or free_port()), *launcher_devices(processes, gpus, visible)]
    port = settings.master_port or DEFAULT_MULTI_NODE_PORT
    common = ["--num_gpus", str(processes), "--master_port", str(port)]
    if settings.nnodes > 1:
        common = ["--num_nodes", str(settings.nnodes), *common]
    if settings.master_addr:
        common += ["--master_addr", settings.master_addr]
    if settings.hostfile is not None:
        return ["--hostfile", str(settings.hostfile), *common]
    hostfile = settings.work_dir / "nodes" / f"hostfile-node{settings.node_rank}"
    hostfile.parent.mkdir(parents=True, exist_ok=True)
    hostfile.write_text("".join(f"node-{rank} slots={processes}\n" for rank in range(settings.nnodes)))
    return ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(settings.node_rank), *common]


# The names trainer.sh reads from `util.py shell-settings`, and only these.
SHELL_SETTINGS = ("work_dir", "output_dir", "run_all", "processes", "gpus", "node_rank", "nnodes", "launcher_args")


def shell_settings(settings: config.Settings) -> dict[str, str]:
    """Everything trainer.sh needs before its stages, from one Python start instead of eight (each
    start costs a fraction of a second, torch's import two): folders, curriculum mode, nodes, GPUs,
    processes (NUM_PROCESSES=0: one per GPU, or one on CPU) and the launcher's arguments."""
    import memory

    gpus = memory.visible_gpu_count()
    processes = settings.num_processes or max(gpus, 1)
    values = {
        "work_dir": settings.work_dir,
        "output_dir": settings.output_dir,
        "run_all": str(settings.run_all).lower(),
        "processes": processes,
        "gpus": gpus,
        "node_rank": settings.node_rank,
        "nnodes": settings.nnodes,
        "launcher_args": " ".join(launcher_arguments(settings, processes, gpus, visible_gpus())),
    }
    for name, value in values.items():
        if "\n" in str(value):
            raise StageError(
                f"{name}={str(value)!r} holds a line break; trainer.sh reads one setting "
                "a line: name folders without line breaks"
            )
    return {name: str(values[name]) for name in SHELL_SETTINGS}


def main() -> int:
    if sys.argv[1:2] == ["gguf"]:  # its own arguments: gguf_export.main parses them
        import gguf_export

        return gguf_export.main(sys.argv[2:])
    parser = argparse.ArgumentParser(
        description="Publish the trained model, advance the curriculum, print "
        "the launcher's device arguments (launcher-devices) or, as "
        "name=value lines, what trainer.sh needs: folders, nodes, "
        "processes and the launcher's arguments (shell-settings)."
    )
    parser.add_argument(
        "command",
        choices=("publish", "advance", "launcher-devices", "shell-settings", "gguf"),
        help="gguf: write a model folder as GGUF files (`util.py gguf --help`)",
    )
    parser.add_argument("--processes", type=int, default=1, help="launcher-devices: training processes (per node)")
    parser.add_argument("--gpus", type=int, default=0, help="launcher-devices: GPUs torch sees")
    parser.add_argument(
        "--retry-delay",
        type=float,
        default=DEFAULT_RETRY_DELAY,
        metavar="SECONDS",
        help=f"wait before the first retry of a Hub call; doubles at each retry (default {DEFAULT_RETRY_DELAY:g})",
    )
    args = parser.parse_args()
    if args.command in ("launcher-devices", "shell-settings"):
        try:
            if args.command == "launcher-devices":
                print(" ".join(launcher_devices(args.processes, args.gpus, visible_gpus())))
            else:
                values = shell_settings(config.settings_or_exit(quiet=True))
                print("\n".join(f"{name}={value}" for name, value in values.items()))
        except StageError as err:
            print(f"launcher: error: {err}", file=sys.stderr)
            return config.ExitCode.CONFIG
        return config.ExitCode.OK
    if not is_main_process():
        return config.ExitCode.OK
    settings = config.settings_or_exit()
    stage = publish if args.command == "publish" else advance
    try:
        return stage(settings, args.retry_delay)
    except StageError as err:
        print(
            f"{args.command}: error: {redact(one_line(str(err), 1000), settings.hf_token)}", file=sys.stderr, flush=True
        )
        return config.ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(main())
