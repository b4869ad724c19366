"""Stage 1 of every run: the tokenizer, the tokenized shard and the model, written to WORK_DIR/prep.

The shard of this run (rows shard_index*SHARD_SIZE onwards, SHARD_SIZE of them) is streamed from a Hub
dataset (a configuration, split and column as the dataset value's options name) or local files,
checked row by row and spooled to disk, so bad data stops the run before any expensive work and no
corpus is held in memory. The first run trains a byte-level BPE tokenizer on the first
TOKENIZER_SAMPLE characters of the input dataset and builds the model from scratch; later runs load
both from INPUT_REPO. Instruction rows in any supported format (INSTRUCT_COLUMNS) become one
conversation each; instruction runs add the chat tokens and a chat template, and record which tokens
are the assistant's. Reading stops with a line when the job's time limit passes.
Everything is written into a temporary folder that replaces WORK_DIR/prep only when complete; a rerun
for the same stage (after a crash further on) reuses the finished preparation.

What other stages import: `resolve_source(settings) -> Path`, `local_model_candidates`, `source_label`,
`check_source_model(settings, folder)`, `PrepError`, `CHAT_TEMPLATE`,
`parse_text_conversation(text)`, `check_messages(messages)`, `conversation_messages(row)`,
`INSTRUCT_COLUMNS`, `INSTRUCT_FORMS`, `open_data_source`, `iter_rows`, `check_columns`,
`add_chat_tokens(tokenizer) -> int`.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import config
import util

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet", ".csv")
ALLOWED_FORMS = "a Hub dataset id or a local .txt, .jsonl, .json, .parquet or .csv file, or a folder of them"
UNUSABLE_LIMIT = 0.01  # more than 1% unusable rows in a shard stops the run
EXAMPLES_SHOWN = 3
BATCH_ROWS = 1000
PREP_STARTED = time.time()  # the time limit's start when trainer.sh did not set TRAINER_STARTED_AT
MARKER = re.compile(r"<\|user\|>|<\|bot\|>|<\|end\|>")
TURN = re.compile(r"\s*<\|user\|>(?P<user>.*?)<\|end\|>\s*<\|bot\|>(?P<bot>.*?)<\|end\|>", re.DOTALL)
TRAILING_USER_TURN = re.compile(r"\s*<\|user\|>(?:(?!<\|(?:user|bot|end)\|>).)*<\|end\|>\s*", re.DOTALL)

# Renders `<s>[system]<|user|>PROMPT<|end|><|bot|>ANSWER<|end|>...`; the generation block marks the
# answer and its <|end|> as the tokens to learn. Raises on anything but system-first, user/assistant
# alternation, so malformed conversations cannot be rendered silently.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set offset = 1 if messages and messages[0]['role'] == 'system' else 0 -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{- raise_exception('a system message is allowed only first') -}}{%- endif -%}"
    "{{- message['content'] -}}"
    "{%- elif message['role'] not in ['user', 'assistant'] -%}"
    "{{- raise_exception('unknown role ' ~ message['role'] ~ '; allowed: system (first), user, assistant') -}}"
    "{%- elif (message['role'] == 'user') != ((loop.index0 - offset) % 2 == 0) -%}"
    "{{- raise_exception('conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '<|user|>' + message['content'] + '<|end|>' -}}"
    "{%- else -%}"
    "{{- '<|bot|>' -}}{% generation %}{{- message['content'] + '<|end|>' -}}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|bot|>' -}}{%- endif -%}"
)


class PrepError(Exception):
    """Bad input or a missing source: one line naming the variable or file, what is wrong and what is allowed."""


class UnreadableData(Exception):
    """A file that cannot be parsed at all (the caller adds which variable named it)."""


class UnusableRow(Exception):
    """One row that cannot be trained on; counted and reported, never dropped silently."""


# ---- where rows come from ----


@dataclass
class DataSource:
    variable: str  # INPUT_DATASET or INSTRUCT_DATASET
    spec: str  # as configured
    files: list[Path] | None  # local files in order, or None for a Hub dataset
    hub_dataset: Any = field(default=None, repr=False)  # a streamed datasets.IterableDataset
    column: str | None = None  # the column read as `text` (the spec's ?column=)
    split: str = "train"  # of a Hub dataset
    weight: float = 1.0  # its share of a mixture
    parts: list[DataSource] | None = None  # a mixture's datasets (then `files` is empty)

    @property
    def label(self) -> str:
        return f"{self.variable}={self.spec}"


def dataset_variable(settings: config.Settings) -> str:
    return "INPUT_DATASET" if settings.phase == "pretrain" else "INSTRUCT_DATASET"


def looks_like_hub_id(spec: str) -> bool:
    owner_and_name = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", spec)
    return bool(owner_and_name) and Path(spec).suffix.lower() not in SUPPORTED_EXTENSIONS


def open_data_source(spec: str, variable: str, token: str | None) -> DataSource:
    """A local file or folder, else a Hub dataset id (each with config.split_dataset_spec's options),
    or a mixture of them joined by '|'; missing or unsupported input is a PrepError."""
    if config.MIXTURE_SEPARATOR in spec:
        parts = [open_one_source(part.strip(), variable, token) for part in spec.split(config.MIXTURE_SEPARATOR)]
        return DataSource(variable, spec, [], parts=parts)
    return open_one_source(spec, variable, token)


def open_one_source(spec: str, variable: str, token: str | None) -> DataSource:
    try:
        base, options = config.split_dataset_spec(spec)
    except ValueError as err:
        raise PrepError(f"{variable}={spec}: must be {err}") from None
    path = Path(base).expanduser()
    chosen = dict(
        column=options.get("column"), weight=float(options.get("weight", 1.0)), split=options.get("split", "train")
    )
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise PrepError(
                f"{variable}={spec}: unsupported file type {path.suffix or '(none)'!r}; allowed: {ALLOWED_FORMS}"
            )
        return DataSource(variable, spec, [path], **chosen)
    if path.is_dir():
        return DataSource(variable, spec, folder_files(path, variable, spec), **chosen)
    if not looks_like_hub_id(base):
        raise PrepError(f"{variable}={spec}: no such file or folder; allowed: {ALLOWED_FORMS}")
    return DataSource(variable, spec, None, open_hub_dataset(spec, variable, token), **chosen)


def folder_files(folder: Path, variable: str, spec: str) -> list[Path]:
    # Hidden files and folders (.git, .cache of a Hub snapshot) are not data.
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    data = [p for p in files if p.suffix.lower() in SUPPORTED_EXTENSIONS]
    if not data:
        found = sorted({p.suffix or p.name for p in files}) or ["nothing"]
        raise PrepError(
            f"{variable}={spec}: the folder holds no data files (found: {', '.join(found)}); allowed: {ALLOWED_FORMS}"
        )
    ignored = len(files) - len(data)
    if ignored:
        util.log(f"{variable}: reading {len(data)} data files in {folder}; ignoring {ignored} other files")
    return data


def open_hub_dataset(spec: str, variable: str, token: str | None):
    """The spec's split (default `train`) of a Hub dataset, streamed, in the configuration and files
    that the spec's options name."""
    import datasets

    repo_id, options = config.split_dataset_spec(spec)
    split = options.get("split", "train")
    try:
        loaded = datasets.load_dataset(
            repo_id,
            name=options.get("config"),
            data_dir=options.get("data_dir"),
            data_files=options.get("data_files"),
            streaming=True,
            token=token,
        )
    except Exception as err:  # datasets raises many types for a missing or unreachable dataset
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PrepError(
            f"{variable}={spec}: not a local file or folder, and opening it as a Hub dataset failed "
            f"({first_line}); allowed: {ALLOWED_FORMS}"
        ) from err
    if split not in loaded:
        raise PrepError(
            f"{variable}={spec}: the Hub dataset has no {split!r} split (splits: {', '.join(loaded)}); "
            "name one with ?split="
        )
    return loaded[split]


def iter_rows(source: DataSource, skip: int = 0) -> Iterator[dict]:
    """The dataset's rows as dicts from row `skip` on, streamed; the spec's ?column= read as `text`."""
    if source.parts is not None:
        yield from mixture_rows(source.parts, skip)
        return
    rows = _source_rows(source, skip)
    if source.column is None:
        yield from rows
        return
    for row in rows:
        yield {**row, "text": row.get(source.column)}


# The draws that interleave a mixture's datasets: fixed, so that every run (and every shard) sees the
# same order, and drawn in blocks by numpy so that skipping to a late shard costs little.
MIXTURE_SEED, MIXTURE_BLOCK = 0, 65536


def mixture_draws() -> Iterator[float]:
    import numpy as np

    generator = np.random.default_rng(MIXTURE_SEED)
    while True:
        yield from generator.random(MIXTURE_BLOCK).tolist()


def mixture_rows(parts: list[DataSource], skip: int) -> Iterator[dict]:
    """Rows of several datasets interleaved at random in proportion to their weights, until the first
    one runs out (datasets.interleave_datasets' `first_exhausted`, with a fixed seed). Row `skip` is
    reached by replaying the draws and skipping that many rows in each dataset, not by reading them."""
    import numpy as np

    weights = np.array([part.weight for part in parts])
    bounds = np.cumsum(weights / weights.sum())
    draws = mixture_draws()
    skipped = [0] * len(parts)
    for _ in range(skip):
        skipped[min(int(np.searchsorted(bounds, next(draws), side="right")), len(parts) - 1)] += 1
    streams = [iter_rows(part, count) for part, count in zip(parts, skipped)]
    for draw in draws:
        row = next(streams[min(int(np.searchsorted(bounds, draw, side="right")), len(parts) - 1)], None)
        if row is None:
            return
        yield row


def _source_rows(source: DataSource, skip: int) -> Iterator[dict]:
    if source.files is None:
        yield from (source.hub_dataset.skip(skip) if skip else source.hub_dataset)
        return
    try:
        for path in source.files:
            if skip:
                count = file_row_count(path)
                if skip >= count:
                    skip -= count
                    continue
            yield from READERS[file_kind(path)](path, skip)
            skip = 0
    except UnreadableData as err:
        raise PrepError(f"{source.variable}: {err}") from None


def file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json" and first_character(path) == "[":
        return "json-array"
    return {".json": ".jsonl"}.get(suffix, suffix)


def first_character(path: Path) -> str:
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(4096), b""):
            stripped = chunk.lstrip()
            if stripped:
                return chr(stripped[0])
    return ""


# Every ROW_INDEX_STEP-th row's place in a text or JSON Lines file, recorded while counting its rows
# (file_row_count), so that reading shard k seeks near its first row instead of reading the
# k*SHARD_SIZE rows before it again: {(path, size, mtime): [(byte offset, lines before it), ...]}.
ROW_INDEX_STEP = 4096
ROW_OFFSETS: dict[tuple[str, int, int], list[tuple[int, int]]] = {}


def index_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def count_and_index_lines(path: Path) -> int:
    """Non-blank lines of a text or JSON Lines file, recording ROW_OFFSETS on the way."""
    offsets, rows, position = [], 0, 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle):
            if line.strip():
                if rows % ROW_INDEX_STEP == 0:
                    offsets.append((position, number))
                rows += 1
            position += len(line)
    ROW_OFFSETS[index_key(path)] = offsets
    return rows


def lines_from_row(path: Path, skip: int) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line, skipped) for each line of the file, starting at the indexed row nearest before
    non-blank row `skip` (from the start where the file has no index: changed, or never counted);
    `skipped` marks the non-blank lines before row `skip`."""
    offsets = ROW_OFFSETS.get(index_key(path), [])
    block = min(skip // ROW_INDEX_STEP, len(offsets) - 1) if offsets else 0
    position, before = offsets[block] if block > 0 else (0, 0)
    skip -= block * ROW_INDEX_STEP
    with open(path, "rb") as handle:
        handle.seek(position)
        for number, line in enumerate(handle, before + 1):
            blank = not line.strip()
            yield number, line, skip > 0 and not blank
            if skip and not blank:
                skip -= 1


def read_txt(path: Path, skip: int) -> Iterator[dict]:
    for _, line, skipped in lines_from_row(path, skip):
        if skipped or not line.strip():
            continue
        try:
            yield {"text": line.decode("utf-8").rstrip("\r\n")}
        except UnicodeDecodeError as err:
            raise UnreadableData(f"{path}: not UTF-8 text ({err}); save the file as UTF-8") from None


def read_jsonl(path: Path, skip: int) -> Iterator[dict]:
    for number, line, skipped in lines_from_row(path, skip):
        if skipped or not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
            raise UnreadableData(
                f"{path} line {number}: not valid JSON ({err}); each line must be one "
                'JSON object such as {"text": "..."}'
            ) from None
        if not isinstance(row, dict):
            raise UnreadableData(
                f"{path} line {number}: a JSON {type(row).__name__}, not an object; each line "
                'must be one JSON object such as {"text": "..."}'
            )
        yield row


def read_json_array(path: Path, skip: int) -> Iterator[dict]:
    # A JSON array cannot be streamed with the standard library; JSON Lines (.jsonl) can.
    try:
        rows = json.loads(path.read_bytes())
    except ValueError as err:
        raise UnreadableData(f"{path}: not valid JSON ({err}); use a JSON array of objects or JSON Lines") from None
    for number, row in enumerate(rows[skip:], skip + 1):
        if not isinstance(row, dict):
            raise UnreadableData(
                f'{path} item {number}: a JSON {type(row).__name__}, not an object such as {{"text": "..."}}'
            )
        yield row


def parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError... for a damaged file
        raise UnreadableData(f"{path}: not a readable Parquet file ({err})") from None


def read_parquet(path: Path, skip: int) -> Iterator[dict]:
    parquet = parquet_file(path)
    groups = list(range(parquet.num_row_groups))
    while groups and skip >= parquet.metadata.row_group(groups[0]).num_rows:
        skip -= parquet.metadata.row_group(groups.pop(0)).num_rows
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=groups):
        rows = batch.to_pylist()
        yield from rows[skip:]
        skip = max(0, skip - len(rows))


def read_csv(path: Path, skip: int) -> Iterator[dict]:
    csv.field_size_limit(2**31 - 1)  # long documents in one cell are normal for training text
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            yield from itertools.islice(csv.DictReader(handle), skip, None)
    except (UnicodeDecodeError, csv.Error) as err:
        raise UnreadableData(f"{path}: not a readable UTF-8 CSV file ({err})") from None


READERS: dict[str, Callable[[Path, int], Iterator[dict]]] = {
    ".txt": read_txt,
    ".jsonl": read_jsonl,
    "json-array": read_json_array,
    ".parquet": read_parquet,
    ".csv": read_csv,
}


def file_row_count(path: Path) -> int:
    """Rows of one file: Parquet metadata, or non-blank lines of text/JSON Lines; CSV and JSON arrays
    have no cheaper way than reading them."""
    kind = file_kind(path)
    if kind == ".parquet":
        return parquet_file(path).metadata.num_rows
    if kind in (".txt", ".jsonl"):
        return count_and_index_lines(path)
    return sum(1 for _ in READERS[kind](path, 0))


def count_rows(source: DataSource) -> int | None:
    """All rows of the dataset when that is cheap to know: local files, or the Hub's split metadata
    (a mixture's length depends on the draws: not counted)."""
    if source.parts is not None:
        for part in source.parts:
            count_rows(part)  # indexes the local files for seeking
        return None
    if source.files is None:
        splits = getattr(source.hub_dataset.info, "splits", None) or {}
        split = splits.get(source.split)
        return split.num_examples if split is not None and split.num_examples else None
    try:
        return sum(file_row_count(path) for path in source.files)
    except UnreadableData as err:
        raise PrepError(f"{source.variable}: {err}") from None


def column_names(source: DataSource) -> list[str]:
    if source.files is None and source.hub_dataset.column_names:
        return list(source.hub_dataset.column_names)
    first = next(iter_rows(source), None)
    if first is None:
        raise PrepError(f"{source.label}: the dataset is empty (no rows); name a dataset with rows")
    return list(first)


# The columns that name an instruction format, in the order a row is read by (conversation_messages).
INSTRUCT_COLUMNS = ("messages", "conversations", "instruction", "prompt", "text")
INSTRUCT_FORMS = (
    "`messages` ({role, content} turns), `conversations` (ShareGPT {from, value} turns), "
    "`instruction` + `output` (Alpaca, with optional `input`), `prompt` + `completion`, or `text` "
    "in the <|user|>…<|end|><|bot|>…<|end|> format"
)


def check_columns(source: DataSource, phase: str) -> None:
    if source.parts is not None:
        for part in source.parts:
            check_columns(part, phase)
        return
    columns = column_names(source)
    if source.column is not None:
        if source.column not in columns:
            raise PrepError(
                f"{source.label}: no column {source.column!r} (columns found: "
                f"{', '.join(map(str, columns)) or 'none'}); name one of them with ?column="
            )
        columns = [*columns, "text"]
    needed = ["text"] if phase == "pretrain" else list(INSTRUCT_COLUMNS)
    if not any(name in columns for name in needed):
        wanted = "a `text` column" if phase == "pretrain" else f"one of {INSTRUCT_FORMS}"
        raise PrepError(
            f"{source.label}: no {' or '.join(f'`{n}`' for n in needed)} column "
            f"(columns found: {', '.join(map(str, columns)) or 'none'}); the data needs {wanted}"
        )


# ---- rows: what is usable ----


def pretrain_text(row: dict) -> str:
    text = row.get("text")
    if text is None:
        raise UnusableRow("no `text` value")
    if not isinstance(text, str):
        raise UnusableRow(f"`text` is a {type(text).__name__}, not a string")
    if not text.strip():
        raise UnusableRow("empty text")
    return text


def parse_text_conversation(text: Any) -> list[dict[str, str]]:
    """`<|user|>PROMPT<|end|><|bot|>ANSWER<|end|>` (repeated) as messages; UnusableRow says what is wrong."""
    if not isinstance(text, str) or not text.strip():
        empty = isinstance(text, str) or text is None
        raise UnusableRow("empty text" if empty else f"`text` is a {type(text).__name__}, not a string")
    messages: list[dict[str, str]] = []
    position, end = 0, len(text.rstrip())
    while position < end:
        match = TURN.match(text, position)
        if match is None:
            if TRAILING_USER_TURN.fullmatch(text, position):
                raise UnusableRow("the last user turn has no assistant answer (<|bot|>ANSWER<|end|>)")
            raise UnusableRow(
                f"not in the <|user|>PROMPT<|end|><|bot|>ANSWER<|end|> format from character {position} "
                "(a missing <|end|>, or turns out of order?)"
            )
        for role, content in (("user", match["user"]), ("assistant", match["bot"])):
            if MARKER.search(content):
                raise UnusableRow(f"a {role} turn contains a stray chat marker (a missing <|end|>?)")
            if not content.strip():
                raise UnusableRow(f"an empty {role} turn")
            messages.append({"role": role, "content": content})
        position = match.end()
    return messages


def check_messages(messages: Any) -> list[dict[str, str]]:
    """A `messages` value as clean {role, content} dicts: system only first, then user/assistant
    alternating from user, ending with an assistant answer."""
    if isinstance(messages, str):  # CSV cells hold JSON text
        try:
            messages = json.loads(messages)
        except ValueError:
            raise UnusableRow("`messages` is text but not JSON") from None
    if not isinstance(messages, list) or not messages:
        raise UnusableRow("`messages` is not a non-empty list of {role, content}")
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UnusableRow(f"message {index} is not a {{role, content}} object with text content")
        role, content = message.get("role"), message["content"]
        if role not in ("system", "user", "assistant") or (role == "system" and index > 0):
            raise UnusableRow(f"message {index} has role {role!r}; allowed: system (first only), user, assistant")
        if MARKER.search(content):
            raise UnusableRow(f"message {index} contains a chat marker (<|user|>, <|bot|> or <|end|>)")
        if not content.strip():
            raise UnusableRow(f"message {index} ({role}) is empty")
        clean.append({"role": role, "content": content})
    roles = [m["role"] for m in clean if m["role"] != "system"]
    if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2):
        raise UnusableRow("roles do not alternate user/assistant starting with user")
    if not roles or roles[-1] != "assistant":
        raise UnusableRow("no assistant answer after the last user turn")
    return clean


# ShareGPT's speaker names and the roles they stand for.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}


def json_cell(value: Any) -> Any:
    """A list or object kept as JSON text (CSV cells), decoded; other values unchanged."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def sharegpt_messages(turns: Any) -> list[dict[str, Any]]:
    """ShareGPT `conversations` ([{from, value}, ...]) as {role, content} messages."""
    turns = json_cell(turns)
    if not isinstance(turns, list) or not turns:
        raise UnusableRow("`conversations` is not a non-empty list of {from, value}")
    messages = []
    for index, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise UnusableRow(f"conversation turn {index} is from {speaker!r}; allowed: {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
    return messages


def alpaca_messages(row: dict) -> list[dict[str, Any]]:
    """Alpaca's instruction, optional input and output as one user turn and the answer."""
    instruction, extra, output = row.get("instruction"), row.get("input"), row.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str):
        raise UnusableRow("an Alpaca row needs text `instruction` and `output` values")
    prompt = instruction if not isinstance(extra, str) or not extra.strip() else f"{instruction}\n\n{extra}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def prompt_completion_messages(row: dict) -> list[dict[str, Any]]:
    """`prompt` and `completion` as text (one user turn and the answer) or as lists of messages, TRL's
    conversational prompt-completion form."""
    prompt, completion = json_cell(row.get("prompt")), json_cell(row.get("completion"))
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if isinstance(prompt, list) and isinstance(completion, list):
        return prompt + completion
    raise UnusableRow("`prompt` and `completion` must both be text, or both lists of {role, content}")


def conversation_messages(row: dict) -> list[dict[str, str]]:
    """An instruction row's conversation, in the first format its columns name (INSTRUCT_COLUMNS);
    every format is checked as `messages` are, so the masks cover exactly the answers."""
    if row.get("messages") is not None:
        return check_messages(row["messages"])
    if row.get("conversations") is not None:
        return check_messages(sharegpt_messages(row["conversations"]))
    if row.get("instruction") is not None:
        return check_messages(alpaca_messages(row))
    if row.get("prompt") is not None:
        return check_messages(prompt_completion_messages(row))
    if "text" not in row:
        raise UnusableRow(f"no {', '.join(f'`{name}`' for name in INSTRUCT_COLUMNS)} value")
    return parse_text_conversation(row.get("text"))


def row_snippet(row: dict, limit: int = 80) -> str:
    value = next((row[name] for name in INSTRUCT_COLUMNS if row.get(name) is not None), row)
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return repr(text if len(text) <= limit else text[:limit] + "...")


# ---- the shard ----


@dataclass
class ShardReport:
    first_row: int
    rows: int = 0  # rows read, usable or not
    unusable: int = 0
    examples: list[str] = field(default_factory=list)
    is_last_shard: bool = True

    @property
    def usable(self) -> int:
        return self.rows - self.unusable

    def note_unusable(self, position: int, row: dict, reason: str) -> None:
        self.unusable += 1
        if len(self.examples) < EXAMPLES_SHOWN:
            self.examples.append(f"row {self.first_row + position}: {reason}: {row_snippet(row)}")


def check_shard_start(settings: config.Settings, source: DataSource, total_rows: int | None) -> None:
    first = settings.shard_index * settings.shard_size
    if total_rows == 0:
        raise PrepError(f"{source.label}: the dataset is empty (no rows); name a dataset with rows")
    if total_rows is not None and first >= total_rows:
        shards = math.ceil(total_rows / settings.shard_size)
        raise PrepError(
            f"{source.label}: shard {settings.shard_index} (INIT={settings.init}) starts at row {first:,}, "
            f"but the dataset has {total_rows:,} rows, {shards} shards of "
            f"SHARD_SIZE={settings.shard_size:,}; "
            "lower INIT or set INST=true for the instruction phase"
        )


def spool_shard(settings: config.Settings, source: DataSource, spool: Path) -> ShardReport:
    """Read this run's rows (one more to learn whether it is the last shard), write the usable ones to
    `spool` as JSON lines (text, or a messages list), and count the unusable ones."""
    from tqdm import tqdm

    validate = pretrain_text if settings.phase == "pretrain" else conversation_messages
    report = ShardReport(first_row=settings.shard_index * settings.shard_size)
    rows = itertools.islice(iter_rows(source, report.first_row), settings.shard_size + 1)
    with open(spool, "w", encoding="utf-8") as out:
        for position, row in enumerate(tqdm(rows, desc="reading shard", unit=" rows", mininterval=2)):
            if position == settings.shard_size:
                report.is_last_shard = False
                break
            report.rows += 1
            if position % BATCH_ROWS == 0:
                check_time_left(settings, f"reading shard {settings.shard_index}")
            try:
                out.write(json.dumps(validate(row), ensure_ascii=False) + "\n")
            except UnusableRow as err:
                report.note_unusable(position, row, str(err))
    if report.rows == 0:
        raise PrepError(
            f"{source.label}: shard {settings.shard_index} (INIT={settings.init}) starts at row "
            f"{report.first_row:,}, past the end of the dataset; lower INIT or set INST=true"
        )
    return report


def check_unusable(report: ShardReport, source: DataSource) -> None:
    """Report unusable rows; more than 1% of the shard stops the run."""
    if not report.unusable:
        return
    share = report.unusable / report.rows
    details = "; ".join(report.examples)
    if share > UNUSABLE_LIMIT:
        raise PrepError(
            f"{source.label}: {report.unusable:,} of {report.rows:,} rows ({share:.1%}) are unusable, more "
            f"than the {UNUSABLE_LIMIT:.0%} allowed; fix the data. First ones: {details}"
        )
    util.log(f"warning: skipped {report.unusable:,} unusable rows of {report.rows:,} ({share:.2%}): {details}")


def read_spool(spool: Path, batch_rows: int = BATCH_ROWS) -> Iterator[list]:
    with open(spool, encoding="utf-8") as handle:
        while batch := [json.loads(line) for line in itertools.islice(handle, batch_rows)]:
            yield batch


# ---- the tokenizer ----


@dataclass
class SampleReport:
    rows: int = 0
    characters: int = 0
    unusable: int = 0
    complete: bool = True  # the whole dataset fit in the sample


def training_texts(settings: config.Settings, source: DataSource, report: SampleReport) -> Iterator[list[str]]:
    """Batches of the usable texts at the start of the dataset, up to TOKENIZER_SAMPLE characters, with
    a progress bar; counts what was read in `report`, and stops at the run's time limit."""
    from tqdm import tqdm

    batch: list[str] = []
    with tqdm(
        total=settings.tokenizer_sample, desc="tokenizer sample", unit=" chars", unit_scale=True, mininterval=2
    ) as progress:
        for row in iter_rows(source):
            if report.characters >= settings.tokenizer_sample:
                report.complete = False
                break
            report.rows += 1
            try:
                text = pretrain_text(row)
            except UnusableRow:
                report.unusable += 1
                continue
            batch.append(text)
            report.characters += len(text)
            progress.update(len(text))
            if len(batch) == BATCH_ROWS:
                check_time_left(settings, "reading the tokenizer's sample")
                yield batch
                batch = []
    if batch:
        yield batch


def check_time_left(settings: config.Settings, doing: str) -> None:
    """Preparation counts toward the job's time limit (STARTUP_DURATION_TIMEOUT less TIMEOUT_BUFFER, from
    the job's start): past it, stop with a line instead of being killed later."""
    started = settings.started_at or PREP_STARTED
    if time.time() > started + settings.time_limit_minutes * 60:
        raise PrepError(
            f"prep: the time limit (STARTUP_DURATION_TIMEOUT={settings.startup_duration_timeout:g}m less "
            f"TIMEOUT_BUFFER={settings.timeout_buffer:g}m) passed while {doing}; lower TOKENIZER_SAMPLE "
            "or SHARD_SIZE, or raise STARTUP_DURATION_TIMEOUT"
        )


def train_tokenizer(settings: config.Settings, source: DataSource):
    """A byte-level BPE of VOCAB_SIZE trained on the first TOKENIZER_SAMPLE characters of the input
    dataset, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    # No space is put before text that lacks one (GPT-2's choice, and llama.cpp's for every byte-level
    # BPE): a GGUF export of the model then tokenizes exactly as training did.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings.vocab_size,
        special_tokens=list(config.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sample = SampleReport()
    started = time.monotonic()
    bpe.train_from_iterator(training_texts(settings, source, sample), trainer)
    bos, pad, eos, unk, mask = config.SPECIAL_TOKENS
    # Plain `tokenizer(text)` starts with <s>, as every training document does.
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bpe.token_to_id(bos))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk, mask_token=mask
    )
    note = f", {sample.unusable:,} unusable rows ignored" if sample.unusable else ""
    read = (
        "the whole dataset"
        if sample.complete
        else f"the first {sample.characters:,} characters (TOKENIZER_SAMPLE={settings.tokenizer_sample:,})"
    )
    util.log(
        f"tokenizer: trained a byte-level BPE of {len(tokenizer):,} tokens (VOCAB_SIZE {settings.vocab_size:,}) "
        f"in {time.monotonic() - started:.1f}s on {read}: {sample.rows:,} rows{note}"
    )
    return tokenizer


def add_chat_tokens(tokenizer) -> int:
    """Add <|user|>, <|bot|>, <|end|> as special tokens and set the chat template; returns how many
    tokens were new (0 when the tokenizer already had them)."""
    added = tokenizer.add_special_tokens(
        {"extra_special_tokens": list(config.CHAT_TOKENS)}, replace_extra_special_tokens=False
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return added


def load_tokenizer(settings: config.Settings, source_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    missing = [name for name in ("bos_token", "eos_token") if getattr(tokenizer, name) is None]
    if missing:
        raise PrepError(
            f"INPUT_REPO={settings.input_repo}: the tokenizer in {source_dir} has no "
            f"{' or '.join(missing)}; "
            "continue from a model this pipeline trained, or one with <s> and </s> tokens"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        util.log(f"tokenizer: {source_dir} has no pad token; padding with {tokenizer.eos_token}")
    return tokenizer


# ---- the tokenized dataset ----


@dataclass
class TokenCounts:
    tokens: int = 0  # tokens in the saved sequences
    sequences: int = 0
    dropped_tokens: int = 0  # pretraining: the final partial block
    long_rows_dropped: int = 0  # instruction: conversations over MAX_LENGTH
    longest_dropped: int = 0
    seconds: float = 0.0
    eval_sequences: int = 0  # held out of `sequences` for the eval loss

    @property
    def tokens_per_second(self) -> float:
        return (self.tokens + self.dropped_tokens) / max(self.seconds, 1e-9)


def pack_documents(tokenizer, spool: Path, block: int, total: int, counts: TokenCounts):
    """Documents as <s> text </s>, concatenated and cut into blocks of exactly `block` tokens."""
    import numpy as np
    import pyarrow as pa
    from tqdm import tqdm

    blocks, carry = [], np.empty(0, dtype=np.int32)
    with tqdm(total=total, desc="tokenizing", unit=" rows", mininterval=2) as progress:
        for texts in read_spool(spool):
            flat: list[int] = []
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                flat.append(tokenizer.bos_token_id)
                flat.extend(ids)
                flat.append(tokenizer.eos_token_id)
            stream = np.concatenate([carry, np.asarray(flat, dtype=np.int32)])
            full = len(stream) // block * block
            blocks.append(stream[:full])
            carry = stream[full:]
            progress.update(len(texts))
    values = np.concatenate(blocks) if blocks else np.empty(0, dtype=np.int32)
    counts.tokens, counts.sequences, counts.dropped_tokens = len(values), len(values) // block, len(carry)
    offsets = np.arange(0, len(values) + 1, block, dtype=np.int32)
    return pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))})


def encode_conversations(tokenizer, spool: Path, max_length: int, total: int, counts: TokenCounts):
    """One row per conversation: input_ids and assistant_masks (1 on each answer and its <|end|>)."""
    import pyarrow as pa
    from tqdm import tqdm

    ids_chunks, mask_chunks = [], []
    with tqdm(total=total, desc="tokenizing", unit=" conversations", mininterval=2) as progress:
        for conversations in read_spool(spool):
            encoded = tokenizer.apply_chat_template(
                conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            kept = []
            for i, ids in enumerate(encoded["input_ids"]):
                if len(ids) <= max_length:
                    kept.append(i)
                else:
                    counts.long_rows_dropped += 1
                    counts.longest_dropped = max(counts.longest_dropped, len(ids))
            ids_chunks.append(pa.array([encoded["input_ids"][i] for i in kept], type=pa.list_(pa.int32())))
            mask_chunks.append(pa.array([encoded["assistant_masks"][i] for i in kept], type=pa.list_(pa.int8())))
            counts.tokens += sum(len(encoded["input_ids"][i]) for i in kept)
            counts.sequences += len(kept)
            progress.update(len(conversations))
    return pa.table(
        {
            "input_ids": pa.chunked_array(ids_chunks, pa.list_(pa.int32())),
            "assistant_masks": pa.chunked_array(mask_chunks, pa.list_(pa.int8())),
        }
    )


def tokenize_shard(
    settings: config.Settings, tokenizer, spool: Path, report: ShardReport, out_dir: Path
) -> TokenCounts:
    """Tokenize the shard into out_dir/dataset (training) and out_dir/eval_dataset (the held-out split)."""
    import datasets
    import numpy as np

    counts = TokenCounts()
    started = time.monotonic()
    if settings.phase == "pretrain":
        table = pack_documents(tokenizer, spool, settings.max_length, report.usable, counts)
    else:
        table = encode_conversations(tokenizer, spool, settings.max_length, report.usable, counts)
    counts.seconds = time.monotonic() - started
    if counts.long_rows_dropped:
        util.log(
            f"warning: dropped {counts.long_rows_dropped:,} conversations longer than MAX_LENGTH="
            f"{settings.max_length} tokens (longest {counts.longest_dropped:,}); raise MAX_LENGTH to keep them"
        )
    if counts.sequences == 0:
        raise PrepError(
            f"{dataset_variable(settings)}={settings.stage_dataset}: "
            f"the shard gives no training sequence ({counts.dropped_tokens:,} tokens, MAX_LENGTH="
            f"{settings.max_length}); use more rows (SHARD_SIZE) or a smaller MAX_LENGTH"
        )
    util.log(
        f"tokenized {report.usable:,} rows into {counts.sequences:,} sequences of {counts.tokens:,} tokens "
        f"in {counts.seconds:.1f}s ({counts.tokens_per_second:,.0f} tokens/s)"
    )
    held_out = eval_indices(counts.sequences, settings.eval_rows, settings.seed)
    log_eval_split(settings, counts.sequences, len(held_out))
    if len(held_out):
        # take() copies the table: only when there is a split to take out.
        datasets.Dataset(table.take(held_out)).save_to_disk(str(out_dir / "eval_dataset"))
        table = table.take(np.setdiff1d(np.arange(counts.sequences), held_out))
    datasets.Dataset(table).save_to_disk(str(out_dir / "dataset"))
    counts.eval_sequences = len(held_out)
    return counts


# A shard gives at most this share of its sequences to the eval split, so training keeps the most.
EVAL_SHARE = 10


def eval_indices(sequences: int, eval_rows: int, seed: int):
    """The sorted positions of the held-out sequences: EVAL_ROWS of them drawn with SEED, at most
    1/EVAL_SHARE of the shard (none below EVAL_SHARE sequences)."""
    import numpy as np

    count = min(eval_rows, sequences // EVAL_SHARE)
    return np.sort(np.random.default_rng(seed).permutation(sequences)[:count])


def log_eval_split(settings: config.Settings, sequences: int, held_out: int) -> None:
    if settings.eval_rows == 0:
        util.log("eval split: none (EVAL_ROWS=0); no eval loss is measured")
    elif held_out == 0:
        util.log(
            f"eval split: none; the shard's {sequences:,} sequences are too few to hold any out "
            f"(at most 1 in {EVAL_SHARE}); no eval loss is measured for this stage"
        )
    elif held_out < settings.eval_rows:
        util.log(
            f"eval split: {held_out:,} sequences held out, fewer than EVAL_ROWS={settings.eval_rows:,} "
            f"(at most 1 in {EVAL_SHARE} of the shard's {sequences:,})"
        )
    else:
        util.log(f"eval split: {held_out:,} of {sequences:,} sequences held out (EVAL_ROWS, drawn with SEED)")


# ---- the model ----


def source_label(settings: config.Settings) -> str:
    """How messages name the model this run continues from: INPUT_REPO, and the -it model an instruct run reads."""
    label = f"INPUT_REPO={settings.input_repo}"
    if settings.source_repo != settings.input_repo:
        label += f" (this instruct run reads {settings.source_repo})"
    return label


def local_model_candidates(settings: config.Settings) -> list[Path]:
    """Where the model this run continues from is looked for before the Hub: a path given as INPUT_REPO
    alone; else OUTPUT_DIR/<the last part of its name> (where `util.py publish` put it), then the name
    as a local path."""
    if settings.input_repo_is_path:
        return [Path(settings.source_repo)]
    return [settings.output_dir / settings.source_repo.split("/")[-1], Path(settings.source_repo).resolve()]


def no_source_folder(settings: config.Settings) -> str:
    """The error for an INPUT_REPO path whose folder is missing (a path is never looked up on the Hub)."""
    return (
        f"{source_label(settings)}: no folder {settings.source_repo}; point INPUT_REPO at a model folder "
        "(instruction runs after the first read INPUT_REPO-it)"
    )


def resolve_source(settings: config.Settings) -> Path:
    """The local folder of the model and tokenizer this run continues from (settings.source_repo):
    the first local candidate that exists, else a Hub download."""
    name = settings.source_repo
    candidates = local_model_candidates(settings)
    for folder in candidates:
        if folder.is_dir():
            return folder
    if settings.input_repo_is_path:
        raise PrepError(no_source_folder(settings))
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, token=settings.hf_token, endpoint=settings.hf_endpoint))
    except Exception as err:  # not found, offline, unauthorised: all mean "no source model"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PrepError(
            f"INPUT_REPO={settings.input_repo}: no model {name!r} in {candidates[0]}, no local folder of that "
            f"name, and the Hub download failed ({reason}); run the earlier stage first (INIT=0 INST=false "
            "trains one from scratch) or point INPUT_REPO at an existing model"
        ) from err


# ---- checking the source model before loading it (preflight runs the same checks) ----

LLAMA_MODEL_TYPE, LLAMA_ARCHITECTURE = "llama", "LlamaForCausalLM"
LLAMA_DEFAULT_POSITIONS = 2048  # LlamaConfig's max_position_embeddings where config.json leaves it out
REPAIR_ADVICE = "copy or download the model again, or publish it again with `python3 util.py publish`"


def missing_source_files(folder: Path) -> list[str]:
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        missing.append("model weights (*.safetensors)")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        missing.append("tokenizer (tokenizer.json)")
    return missing


SAFETENSORS_HEADER_LIMIT = 100_000_000  # bytes: what the safetensors library itself accepts
NOT_SAFETENSORS = "is not a safetensors file (no valid header)"


def safetensors_problem(path: Path) -> str | None:
    """What makes a safetensors file unloadable, read from its framing alone, or None: an 8-byte
    little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}, and the data
    after it as long as the largest data_offsets end (a truncated copy is shorter)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        if size < 8 or header_length > min(size - 8, SAFETENSORS_HEADER_LIMIT):
            return f"{NOT_SAFETENSORS}, or is truncated to {size:,} bytes"
        try:
            header = json.loads(handle.read(header_length))
            ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return NOT_SAFETENSORS
    expected = 8 + header_length + max(ends, default=0)
    if size < expected:
        return f"is truncated: {size:,} bytes, its header describes {expected:,}"
    return None


def read_model_config(settings: config.Settings, folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        model_config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PrepError(
            f"{source_label(settings)}: {path} is unreadable ({util.one_line(err, 120)}); {REPAIR_ADVICE}"
        ) from None
    if not isinstance(model_config, dict):
        raise PrepError(f"{source_label(settings)}: {path} is not a JSON object; {REPAIR_ADVICE}")
    return model_config


def check_llama_config(settings: config.Settings, path: Path, model_config: dict[str, Any]) -> None:
    """A LLaMA causal LM (what the pipeline trains, and what its model card describes) whose context is
    at least MAX_LENGTH: the positions beyond what it was trained on are untrained."""
    model_type, architectures = model_config.get("model_type"), model_config.get("architectures")
    if model_type != LLAMA_MODEL_TYPE or architectures not in (None, [LLAMA_ARCHITECTURE]):
        described = f"model_type {model_type!r}" + (f", architectures {architectures}" if architectures else "")
        raise PrepError(
            f"{source_label(settings)}: {path} is not a LLaMA model ({described}); INPUT_REPO must be a "
            f"LLaMA model (model_type {LLAMA_MODEL_TYPE!r}, {LLAMA_ARCHITECTURE}), such as one this "
            "pipeline published"
        )
    positions = model_config.get("max_position_embeddings", LLAMA_DEFAULT_POSITIONS)
    if settings.max_length > positions:
        raise PrepError(
            f"{source_label(settings)}: MAX_LENGTH={settings.max_length} is longer than the model's "
            f"context (max_position_embeddings {positions} in {path}); set MAX_LENGTH to at most "
            f"{positions}"
        )


def check_source_model(settings: config.Settings, folder: Path) -> None:
    """The model folder this run continues from can be loaded and trained: every file there, a LLaMA
    config that fits MAX_LENGTH, and safetensors weights that are whole. Raises PrepError in one line."""
    missing = missing_source_files(folder)
    if missing:
        raise PrepError(f"{source_label(settings)}: the folder {folder} lacks {', '.join(missing)}; {REPAIR_ADVICE}")
    check_llama_config(settings, folder / "config.json", read_model_config(settings, folder))
    for weights in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise PrepError(f"{source_label(settings)}: {weights} {problem}; {REPAIR_ADVICE}")


def build_model(settings: config.Settings, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(settings.seed)
    model_config = LlamaConfig(
        **settings.topology.llama_kwargs(len(tokenizer)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=settings.max_length,
    )
    return LlamaForCausalLM._from_config(model_config, attn_implementation="sdpa")


def load_model(settings: config.Settings, source_dir: Path):
    """The source model in 16 bit; missing, misshaped or non-finite (NaN/inf) weights stop here, before
    any training, in one line naming the tensor (check_plain_model's check after loading)."""
    import quant_utils

    try:
        return quant_utils.load_causal_lm_16bit(source_dir, token=settings.hf_token)
    except quant_utils.QuantizationError as err:
        raise PrepError(f"{source_label(settings)}: {err}") from None


def fit_embeddings(model, tokenizer, known_tokens: int, seed: int) -> None:
    """Resize the embeddings to len(tokenizer) padded to a multiple of 64; rows of tokens new to the
    model (and padding rows after them) start near the mean of the known tokens' rows (a small seeded
    spread keeps them apart), so a new token's first logits and inputs look like an average token
    instead of random noise."""
    import torch

    rows_before = model.get_input_embeddings().weight.shape[0]
    if rows_before < known_tokens:
        raise PrepError(
            f"the model has {rows_before:,} embedding rows but its tokenizer {known_tokens:,} tokens; "
            "INPUT_REPO holds a mismatched model and tokenizer"
        )
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=config.VOCAB_MULTIPLE, mean_resizing=False)
    rows_after = model.get_input_embeddings().weight.shape[0]
    first_new = known_tokens if len(tokenizer) > known_tokens else rows_before
    if rows_after <= first_new:
        return
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            known = matrix[:known_tokens].float()
            # A little spread around the mean keeps the new rows apart from the first step: identical
            # rows would give <|user|>, <|bot|> and <|end|> the same input and the same logit until
            # training separates them.
            noise = torch.randn(matrix.shape[0] - first_new, matrix.shape[1], generator=generator)
            matrix[first_new:] = (known.mean(dim=0) + 0.1 * known.std(dim=0) * noise).to(matrix.dtype)
    util.log(
        f"model: {rows_after:,} embedding rows (had {rows_before:,}); rows from {first_new:,} on start near "
        f"the mean of the {known_tokens:,} known tokens' rows"
    )


def set_chat_generation(model, tokenizer) -> None:
    """Generation of an instruction model stops at <|end|> as well as </s>."""
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def check_parameter_count(settings: config.Settings, model, tokenizer) -> int:
    actual = count_parameters(model)
    predicted = settings.topology.parameter_count(len(tokenizer))
    if actual != predicted:
        util.log(
            f"note: the model has {actual:,} parameters; FACTOR/TARGET_PARAMETERS describe {predicted:,} "
            "(a source model of another shape is continued as it is)"
        )
    return actual


# ---- the stage ----


def finished_preparation(settings: config.Settings) -> bool:
    manifest_path = settings.prep_dir / "manifest.json"
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        util.log(f"{manifest_path} is unreadable ({err}); preparing again")
        return False
    return isinstance(manifest, dict) and manifest.get("stage_key") == settings.stage_key()


def prepare_tokenizer_and_model(settings: config.Settings, source: DataSource, source_dir: Path | None):
    """(tokenizer, model): trained and built from scratch on the first run, else loaded from the source."""
    if source_dir is None:
        tokenizer = train_tokenizer(settings, source)
        model = build_model(settings, tokenizer)
        return tokenizer, model
    tokenizer = load_tokenizer(settings, source_dir)
    known_tokens = len(tokenizer)
    if settings.phase == "instruct":
        added = add_chat_tokens(tokenizer)
        util.log(
            f"tokenizer: {added} chat tokens added, chat template set"
            if added
            else "tokenizer: chat tokens present, chat template set"
        )
    model = load_model(settings, source_dir)
    fit_embeddings(model, tokenizer, known_tokens, settings.seed)
    if settings.phase == "instruct":
        set_chat_generation(model, tokenizer)
    return tokenizer, model


def prepare(settings: config.Settings) -> dict[str, Any]:
    """Write settings.prep_dir for this run and return its manifest. Raises PrepError on bad input."""
    started = time.monotonic()
    variable = dataset_variable(settings)
    source = open_data_source(settings.stage_dataset, variable, settings.hf_token)
    check_columns(source, settings.phase)
    total_rows = count_rows(source)
    check_shard_start(settings, source, total_rows)
    source_dir = None if settings.first_run else resolve_source(settings)
    if source_dir is not None:
        check_source_model(settings, source_dir)
    with util.atomic_directory(settings.prep_dir) as work:
        spool = work / "shard.jsonl"
        report = spool_shard(settings, source, spool)
        check_unusable(report, source)
        tokenizer, model = prepare_tokenizer_and_model(settings, source, source_dir)
        counts = tokenize_shard(settings, tokenizer, spool, report, work)
        spool.unlink()
        # Set after tokenizing: longer rows were counted above, without a warning for each.
        tokenizer.model_max_length = settings.max_length
        tokenizer.save_pretrained(work / "tokenizer")
        model.save_pretrained(work / "model")
        carry_loss_history(source_dir, work)
        manifest = build_manifest(settings, report, counts, total_rows, source_dir, model, tokenizer)
        util.write_json_atomic(work / "manifest.json", manifest)
    print_summary(manifest, counts, time.monotonic() - started)
    return manifest


def carry_loss_history(source_dir: Path | None, work: Path) -> None:
    """The input model's loss history of the earlier stages, which train.py extends with this one."""
    stages = util.read_history(source_dir / util.HISTORY_FILE) if source_dir is not None else []
    if stages:
        util.write_json_atomic(work / util.HISTORY_FILE, {"stages": stages})
        util.log(f"loss history: {len(stages)} earlier stage(s) from the input model")


def model_source_label(settings: config.Settings, source_dir: Path | None) -> str:
    """'scratch', the local folder the model came from, or the Hub id it was downloaded as."""
    if source_dir is None:
        return "scratch"
    return str(source_dir) if source_dir in local_model_candidates(settings) else settings.source_repo


def build_manifest(
    settings: config.Settings,
    report: ShardReport,
    counts: TokenCounts,
    total_rows: int | None,
    source_dir: Path | None,
    model,
    tokenizer,
) -> dict[str, Any]:
    import quant_utils

    return {
        "stage_key": settings.stage_key(),
        "phase": settings.phase,
        "rows": report.rows,
        "skipped_rows": report.unusable,
        "long_rows_dropped": counts.long_rows_dropped,
        "tokens": counts.tokens,
        "dropped_tail_tokens": counts.dropped_tokens,
        "sequences": counts.sequences - counts.eval_sequences,
        "eval_sequences": counts.eval_sequences,
        "is_last_shard": report.is_last_shard,
        "num_shards": math.ceil(total_rows / settings.shard_size) if total_rows else None,
        "parameters": check_parameter_count(settings, model, tokenizer),
        "vocabulary": len(tokenizer),
        "tokenizer_trained": source_dir is None,
        "model_source": model_source_label(settings, source_dir),
        "source_format": "4bit" if source_dir is not None and quant_utils.is_4bit_checkpoint(source_dir) else "16bit",
    }


def print_summary(manifest: dict[str, Any], counts: TokenCounts, seconds: float) -> None:
    shards = manifest["num_shards"] if manifest["num_shards"] is not None else "unknown"
    util.log(
        f"prep done: {manifest['rows']:,} rows, {manifest['skipped_rows']:,} skipped, "
        f"{manifest['long_rows_dropped']:,} too long; {manifest['tokens']:,} tokens "
        f"({counts.tokens_per_second:,.0f} tokens/s) in {manifest['sequences']:,} training sequences "
        f"(+{manifest['eval_sequences']:,} held out); "
        f"{manifest['parameters']:,} parameters; last shard: {manifest['is_last_shard']} of {shards}; "
        f"wall time {seconds:.1f}s"
    )


def main() -> int:
    settings = config.settings_or_exit()
    util.log(config.describe(settings))
    # What a killed preparation left (`.prep.tmp-*`); one stage runs at a time, so none is in use.
    util.remove_stale_temporaries(settings.work_dir)
    if finished_preparation(settings):
        util.log(f"prep: {settings.prep_dir} already holds this stage's preparation; reusing it")
        return config.ExitCode.OK
    try:
        prepare(settings)
    except PrepError as err:
        print(f"prep error: {err}", file=sys.stderr)
        return config.ExitCode.FAILED
    return config.ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
