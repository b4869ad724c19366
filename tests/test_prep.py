"""Guards prep.py: every input form, shards, instruction formats (text, messages, ShareGPT, Alpaca,
prompt/completion) and the labels their masks give the trainer, tokenizer and model building, the
source model checked before it is loaded (INPUT_REPO as a path, damaged weights), clear errors naming
the variable, atomic and reusable preparation, leftovers of a killed run removed."""

import itertools
import json
import re
import shutil
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import config
import prep

DOCUMENTS = [f"Mira has {n} red foxes and {n + 1} blue owls. The number after {n} is {n + 1}." for n in range(60)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_format(path_stem, suffix, rows):
    """`rows` (dicts) as a file of the given type; .txt takes each row's text as one line."""
    path = path_stem.with_suffix(suffix)
    if suffix == ".txt":
        path.write_text("\n\n".join(row["text"] for row in rows) + "\n")
    elif suffix == ".jsonl":
        write_jsonl(path, rows)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
    elif suffix == ".csv":
        import csv

        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def settings_for(tmp_path, **env):
    # No eval split unless a test asks (EVAL_ROWS): these tests read the prepared rows by position.
    base = {
        "OUTPUT_DIR": str(tmp_path / "output"),
        "WORK_DIR": str(tmp_path / "work"),
        "PRESET": "full",
        "VOCAB_SIZE": "512",
        "FACTOR": "768",
        "MAX_LENGTH": "64",
        "SHARD_SIZE": "1000",
        "EVAL_ROWS": "0",
    }
    return config.load_settings({**base, **{k: str(v) for k, v in env.items()}})


def load_prep(settings):
    import datasets
    from transformers import AutoTokenizer

    return (
        json.loads((settings.prep_dir / "manifest.json").read_text()),
        AutoTokenizer.from_pretrained(settings.prep_dir / "tokenizer"),
        datasets.load_from_disk(str(settings.prep_dir / "dataset")),
    )


def publish_prep(settings, name="train-llama"):
    """What `util.py publish` does for the next stage: model and tokenizer in OUTPUT_DIR/<name>."""
    target = settings.output_dir / name
    target.mkdir(parents=True, exist_ok=True)
    for folder in ("model", "tokenizer"):
        for file in (settings.prep_dir / folder).iterdir():
            shutil.copy(file, target / file.name)
    return target


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A first pretraining run on 60 documents, published as OUTPUT_DIR/train-llama."""
    tmp_path = tmp_path_factory.mktemp("pretrained")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in DOCUMENTS])
    settings = settings_for(tmp_path, INPUT_DATASET=corpus, SHARD_SIZE=20)
    prep.prepare(settings)
    publish_prep(settings)
    return tmp_path, corpus


# ---- reading rows ----


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json", ".parquet", ".csv"])
def test_every_file_type_gives_the_same_rows_with_skips_and_counts(tmp_path, suffix):
    rows = [{"text": t, "id": i} for i, t in enumerate(DOCUMENTS[:30])]
    path = write_format(tmp_path / "data", suffix, rows)
    source = prep.open_data_source(str(path), "INPUT_DATASET", None)
    assert [r["text"] for r in prep.iter_rows(source)] == DOCUMENTS[:30]
    assert [r["text"] for r in prep.iter_rows(source, skip=17)] == DOCUMENTS[17:30]
    assert prep.count_rows(source) == 30


def test_a_folder_reads_its_data_files_in_order_and_skips_across_them(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_format(folder / "a", ".jsonl", [{"text": t} for t in DOCUMENTS[:10]])
    write_format(folder / "b", ".parquet", [{"text": t} for t in DOCUMENTS[10:25]])
    (folder / "README.md").write_text("not data")
    source = prep.open_data_source(str(folder), "INPUT_DATASET", None)
    assert [r["text"] for r in prep.iter_rows(source)] == DOCUMENTS[:25]
    assert [r["text"] for r in prep.iter_rows(source, skip=12)] == DOCUMENTS[12:25]
    assert prep.count_rows(source) == 25


def test_a_skip_past_whole_csv_and_json_array_files_lands_on_the_right_row(tmp_path):
    """Files without a cheap row count are still counted, not read from their own row `skip`."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_format(folder / "a", ".csv", [{"text": t} for t in DOCUMENTS[:3]])
    write_format(folder / "b", ".json", [{"text": t} for t in DOCUMENTS[3:6]])
    write_format(folder / "c", ".csv", [{"text": t} for t in DOCUMENTS[6:9]])
    source = prep.open_data_source(str(folder), "INPUT_DATASET", None)
    assert [r["text"] for r in prep.iter_rows(source, skip=4)] == DOCUMENTS[4:9]
    assert [r["text"] for r in prep.iter_rows(source, skip=7)] == DOCUMENTS[7:9]


def test_a_hub_dataset_is_streamed_and_sharded(tmp_path, monkeypatch):
    import datasets

    def stream(**kwargs):
        return datasets.IterableDatasetDict(
            {
                "train": datasets.IterableDataset.from_generator(
                    lambda: ({"text": t, "url": f"u{i}"} for i, t in enumerate(DOCUMENTS))
                )
            }
        )

    monkeypatch.setattr(
        datasets, "load_dataset", lambda spec, streaming, token, **options: stream() if streaming else None
    )
    source = prep.open_data_source("someone/corpus", "INPUT_DATASET", None)
    assert source.files is None and [r["text"] for r in prep.iter_rows(source, skip=25)] == DOCUMENTS[25:]
    manifest = prep.prepare(settings_for(tmp_path, INPUT_DATASET="someone/corpus", SHARD_SIZE=20))
    assert (manifest["rows"], manifest["is_last_shard"], manifest["num_shards"]) == (20, False, None)


# ---- instruction rows ----


def test_text_conversations_parse_into_alternating_messages():
    text = "<|user|>Reverse: apple<|end|><|bot|>elppa<|end|><|user|>Now in capitals.<|end|><|bot|>ELPPA<|end|>"
    assert prep.parse_text_conversation(text) == [
        {"role": "user", "content": "Reverse: apple"},
        {"role": "assistant", "content": "elppa"},
        {"role": "user", "content": "Now in capitals."},
        {"role": "assistant", "content": "ELPPA"},
    ]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty text"),
        ("Reverse: apple", "format"),
        ("<|user|>Reverse: apple<|end|>", "no assistant answer"),
        ("<|user|>Hi<|end|><|bot|>Hello<|end|><|user|>More<|end|>", "no assistant answer"),
        ("<|bot|>elppa<|end|><|user|>Reverse: apple<|end|>", "format"),
        ("<|user|>Reverse: apple<|bot|>elppa<|end|>", "missing <|end|>"),
        ("<|user|>Reverse: apple<|end|><|bot|>elppa<|user|>x<|end|>", "stray chat marker"),
        ("<|user|>Reverse: apple<|end|><|bot|> <|end|>", "empty assistant"),
    ],
)
def test_malformed_text_conversations_say_what_is_wrong(text, reason):
    with pytest.raises(prep.UnusableRow, match=reason):
        prep.parse_text_conversation(text)


def test_messages_allow_a_first_system_turn_and_reject_bad_roles():
    good = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add: 2 + 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert prep.check_messages(good) == good
    assert prep.check_messages(json.dumps(good)) == good
    bad = {
        "alternate": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        "role 'robot'": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}],
        "role 'system'": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
        "no assistant answer": [{"role": "user", "content": "a"}],
        "chat marker": [{"role": "user", "content": "a<|end|>"}, {"role": "assistant", "content": "b"}],
        "non-empty list": [],
    }
    for reason, messages in bad.items():
        with pytest.raises(prep.UnusableRow, match=reason):
            prep.check_messages(messages)


# ---- whole preparations, in process ----


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet", ".csv"])
def test_pretraining_preparation_from_each_file_type(tmp_path, suffix):
    import torch
    from transformers import AutoModelForCausalLM

    path = write_format(tmp_path / "corpus", suffix, [{"text": t} for t in DOCUMENTS])
    settings = settings_for(tmp_path, INPUT_DATASET=path)
    manifest = prep.prepare(settings)
    _, tokenizer, dataset = load_prep(settings)
    stream = []
    for text in DOCUMENTS:
        stream += [
            tokenizer.bos_token_id,
            *tokenizer(text, add_special_tokens=False)["input_ids"],
            tokenizer.eos_token_id,
        ]
    blocks = len(stream) // 64
    assert manifest["rows"] == 60 and manifest["skipped_rows"] == 0 and manifest["tokenizer_trained"] is True
    assert manifest["sequences"] == len(dataset) == blocks and manifest["tokens"] == blocks * 64
    assert manifest["dropped_tail_tokens"] == len(stream) - blocks * 64
    assert [token for row in dataset["input_ids"] for token in row] == stream[: blocks * 64]
    assert manifest["is_last_shard"] is True and manifest["num_shards"] == 1
    model = AutoModelForCausalLM.from_pretrained(settings.prep_dir / "model", dtype=torch.float32)
    assert manifest["parameters"] == settings.topology.parameter_count(len(tokenizer))
    assert sum(p.numel() for p in model.parameters()) == manifest["parameters"]
    assert model.config.vocab_size == config.padded_vocab(len(tokenizer))
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (0, 2, 1)


def test_tokenizer_saves_and_loads_unchanged(tmp_path, pretrained):
    from transformers import AutoTokenizer

    _, corpus = pretrained
    settings = settings_for(pretrained[0], INPUT_DATASET=corpus, SHARD_SIZE=20)
    tokenizer = AutoTokenizer.from_pretrained(settings.prep_dir / "tokenizer")
    assert tokenizer.convert_tokens_to_ids(list(config.SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    assert (
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.pad_token,
        tokenizer.unk_token,
        tokenizer.mask_token,
    ) == config.SPECIAL_TOKENS[0:1] + config.SPECIAL_TOKENS[2:3] + config.SPECIAL_TOKENS[1:2] + config.SPECIAL_TOKENS[
        3:
    ]
    tokenizer.save_pretrained(tmp_path / "again")
    again = AutoTokenizer.from_pretrained(tmp_path / "again")
    for text in DOCUMENTS[:5] + ["Unseen wörds, 123 and émojis 🦊"]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and again(text)["input_ids"] == ids
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == text


def test_shards_skip_earlier_rows_and_know_the_last_one(tmp_path, pretrained):
    folder, corpus = pretrained
    seen = {}
    for init, shard, is_last in ((2, 1, False), (3, 2, True)):
        settings = settings_for(
            folder, INPUT_DATASET=corpus, SHARD_SIZE=20, INIT=init, WORK_DIR=tmp_path / f"work{init}"
        )
        manifest, tokenizer, dataset = load_prep(settings) if prep.prepare(settings) else None
        text = tokenizer.decode([t for row in dataset["input_ids"] for t in row])
        seen[shard] = text
        assert manifest["rows"] == 20 and manifest["is_last_shard"] is is_last and manifest["num_shards"] == 3
        assert manifest["tokenizer_trained"] is False and manifest["model_source"] == str(
            folder / "output" / "train-llama"
        )
        assert DOCUMENTS[20 * shard + 1] in text and DOCUMENTS[20 * shard - 1] not in text
    assert seen[1] != seen[2]
    with pytest.raises(prep.PrepError, match=r"INPUT_DATASET=.*shard 3 .*starts at row 60.* 60 rows"):
        prep.prepare(settings_for(folder, INPUT_DATASET=corpus, SHARD_SIZE=20, INIT=4, WORK_DIR=tmp_path / "w4"))


def answer_positions(tokenizer, ids):
    """Positions of each answer's tokens and its <|end|>: after every <|bot|> up to the next <|end|>."""
    bot, end = tokenizer.convert_tokens_to_ids(["<|bot|>", "<|end|>"])
    positions, inside = [], False
    for position, token in enumerate(ids):
        if inside:
            positions.append(position)
            inside = token != end
        elif token == bot:
            inside = True
    return positions


def test_instruction_preparation_masks_exactly_the_answers(tmp_path, pretrained):
    import torch
    from safetensors.torch import load_file

    folder, corpus = pretrained
    rows = [{"text": f"<|user|>Add: {n % 10} + 1<|end|><|bot|>{n % 10 + 1}<|end|>"} for n in range(150)]
    rows[5] = {
        "text": "<|user|>Reverse: apple<|end|><|bot|>elppa<|end|><|user|>Now in capitals.<|end|><|bot|>ELPPA<|end|>"
    }
    rows[6] = {"text": "<|user|>no answer here<|end|>"}
    rows[7] = {"text": "<|user|>" + "long " * 80 + "<|end|><|bot|>x<|end|>"}
    data = write_jsonl(tmp_path / "instruct.jsonl", rows)
    settings = settings_for(
        folder, INPUT_DATASET=corpus, INSTRUCT_DATASET=data, INST="true", WORK_DIR=tmp_path / "work"
    )
    manifest = prep.prepare(settings)
    _, tokenizer, dataset = load_prep(settings)
    assert (manifest["rows"], manifest["skipped_rows"], manifest["long_rows_dropped"]) == (150, 1, 1)
    assert manifest["sequences"] == len(dataset) == 148 and manifest["phase"] == "instruct"
    for ids, mask in zip(dataset["input_ids"], dataset["assistant_masks"]):
        assert [i for i, m in enumerate(mask) if m] == answer_positions(tokenizer, ids)
        assert ids[0] == tokenizer.bos_token_id and len(ids) <= 64
    two_turns = dataset[5]
    assert (
        tokenizer.decode([t for t, m in zip(two_turns["input_ids"], two_turns["assistant_masks"]) if m]).replace(
            " ", ""
        )
        == "elppa<|end|>ELPPA<|end|>"
    )
    known = len(tokenizer) - 3
    weights = load_file(str(settings.prep_dir / "model" / "model.safetensors"))
    embeddings = weights["model.embed_tokens.weight"]
    assert embeddings.shape[0] == config.padded_vocab(len(tokenizer))
    # New rows lie near the mean of the known rows, each one distinct from the others.
    new, mean, spread = embeddings[known:], embeddings[:known].mean(0), embeddings[:known].std(0)
    assert ((new - mean).abs() <= 0.5 * spread + 1e-6).all()
    assert torch.cdist(new, new).fill_diagonal_(1.0).min() > 0


def test_the_eval_split_is_held_out_by_seed_and_shrinks_on_a_small_shard(tmp_path, pretrained, capsys):
    import datasets

    folder, corpus = pretrained
    rows = [
        {"messages": [{"role": "user", "content": f"Add: {n} + 2"}, {"role": "assistant", "content": str(n + 2)}]}
        for n in range(40)
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)

    def split(seed, eval_rows, work):
        settings = settings_for(
            folder,
            INPUT_DATASET=corpus,
            INSTRUCT_DATASET=data,
            INST="true",
            SEED=seed,
            EVAL_ROWS=eval_rows,
            WORK_DIR=tmp_path / work,
        )
        manifest = prep.prepare(settings)
        _, tokenizer, train = load_prep(settings)
        held = settings.prep_dir / "eval_dataset"
        held = datasets.load_from_disk(str(held)) if held.is_dir() else []
        texts = [{tokenizer.decode(row["input_ids"]) for row in part} for part in (train, held)]
        assert manifest["stage_key"]["eval_rows"] == eval_rows
        return manifest, texts, held

    manifest, (train, held), held_rows = split(1, 3, "a")
    assert (manifest["sequences"], manifest["eval_sequences"], len(held)) == (37, 3, 3)
    assert not train & held and len(train | held) == 40
    assert all(1 in row["assistant_masks"] for row in held_rows)  # answers to measure the eval loss on
    assert split(1, 3, "b")[1][1] == held and split(2, 3, "c")[1][1] != held
    # A tenth of the shard at most: 4 of 40 though 50 are asked for, and the log says so.
    manifest, (train, held), _ = split(1, 50, "d")
    assert (manifest["sequences"], manifest["eval_sequences"]) == (36, 4)
    assert "eval split: 4 sequences held out, fewer than EVAL_ROWS=50" in capsys.readouterr().out
    write_jsonl(tmp_path / "chat.jsonl", rows[:9])
    manifest, (train, held), _ = split(1, 3, "e")
    assert (manifest["sequences"], manifest["eval_sequences"], held) == (9, 0, set())
    assert "eval split: none; the shard's 9 sequences are too few" in capsys.readouterr().out


def test_a_messages_column_is_used_with_its_system_turn(tmp_path, pretrained):
    folder, corpus = pretrained
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Add: {n} + 2"},
                {"role": "assistant", "content": str(n + 2)},
            ]
        }
        for n in range(10)
    ]
    data = write_format(tmp_path / "chat", ".parquet", rows)
    settings = settings_for(
        folder, INPUT_DATASET=corpus, INSTRUCT_DATASET=data, INST="true", WORK_DIR=tmp_path / "work"
    )
    manifest = prep.prepare(settings)
    _, tokenizer, dataset = load_prep(settings)
    assert manifest["sequences"] == 10
    first = dataset[3]
    assert tokenizer.decode(first["input_ids"]).replace(" ", "") == "<s>Bebrief.<|user|>Add:3+2<|end|><|bot|>5<|end|>"
    assert (
        tokenizer.decode([t for t, m in zip(first["input_ids"], first["assistant_masks"]) if m]).strip() == "5<|end|>"
    )


def test_a_late_shard_of_a_text_file_is_read_from_a_seek_not_from_the_start(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "ROW_INDEX_STEP", 10)
    lines = [json.dumps({"text": f"row {n}"}) + ("\n\n" if n % 7 == 0 else "\n") for n in range(95)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(lines) + "{broken\n")
    plain = tmp_path / "rows.txt"
    plain.write_text("".join(f"line {n}\n" + ("\n" if n % 3 == 0 else "") for n in range(95)))
    assert prep.file_row_count(path) == 96 and prep.file_row_count(plain) == 95  # counting builds the index
    first_line = next(prep.lines_from_row(path, 57))[0]
    assert 50 < first_line <= 57 + 57 // 7  # started at the indexed row 50, not at line 1
    rows = prep.read_jsonl(path, 57)
    assert [next(rows)["text"] for _ in range(38)] == [f"row {n}" for n in range(57, 95)]
    with pytest.raises(prep.UnreadableData, match=r"line 110: not valid JSON"):  # numbered from the file's start
        next(rows)
    assert [row["text"] for row in prep.read_txt(plain, 83)] == [f"line {n}" for n in range(83, 95)]
    path.write_text("".join(lines))  # changed since it was counted: read from the start, still right
    assert next(prep.read_jsonl(path, 57))["text"] == "row 57"


def test_a_column_named_in_the_dataset_value_is_read_as_text(tmp_path):
    corpus = write_format(
        tmp_path / "corpus", ".parquet", [{"id": n, "body": text} for n, text in enumerate(DOCUMENTS)]
    )
    settings = settings_for(tmp_path, INPUT_DATASET=f"{corpus}?column=body", SHARD_SIZE=20)
    assert settings.input_dataset == f"{corpus.resolve()}?column=body"
    manifest = prep.prepare(settings)
    _, tokenizer, dataset = load_prep(settings)
    assert manifest["rows"] == 20 and "Mira has 0 red foxes" in tokenizer.decode(dataset[0]["input_ids"])


def test_the_tokenizer_reads_only_its_sample_of_a_large_dataset(tmp_path, capsys):
    documents = [f"Document {n}: " + " ".join(f"word{(n * 7 + k) % 500}" for k in range(120)) for n in range(400)]
    corpus = write_jsonl(tmp_path / "big.jsonl", [{"text": t} for t in documents])  # about 400k characters
    settings = settings_for(tmp_path, INPUT_DATASET=corpus, TOKENIZER_SAMPLE="100k", SHARD_SIZE=20)
    source = prep.open_data_source(str(corpus), "INPUT_DATASET", None)
    tokenizer = prep.train_tokenizer(settings, source)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("tokenizer: trained"))
    read = int(re.search(r"on the first ([\d,]+) characters \(TOKENIZER_SAMPLE=100,000\)", line)[1].replace(",", ""))
    rows = int(re.search(r": ([\d,]+) rows", line)[1].replace(",", ""))
    assert 100_000 <= read < 100_000 + max(map(len, documents)) and rows < 130
    assert len(tokenizer) == 512  # a full vocabulary from the sample
    whole = settings_for(tmp_path, INPUT_DATASET=corpus, TOKENIZER_SAMPLE="1M", SHARD_SIZE=20)
    prep.train_tokenizer(whole, source)
    assert "on the whole dataset: 400 rows" in capsys.readouterr().out


def test_sharegpt_alpaca_and_prompt_completion_rows_give_the_trainer_labels_on_the_answers_only(tmp_path, pretrained):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    folder, corpus = pretrained
    data = tmp_path / "mixed"
    data.mkdir()
    write_jsonl(
        data / "a_sharegpt.jsonl",
        [
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": f"Add: {n} + 1"},
                    {"from": "gpt", "value": str(n + 1)},
                    {"from": "human", "value": "Again"},
                    {"from": "gpt", "value": "ok"},
                ]
            }
            for n in range(5)
        ],
    )
    write_format(
        data / "b_alpaca",
        ".parquet",
        [{"instruction": "Reverse the word", "input": f"cat{n}", "output": f"{n}tac"} for n in range(5)],
    )
    write_format(
        data / "c_prompt_completion", ".csv", [{"prompt": f"Double: {n}", "completion": str(2 * n)} for n in range(5)]
    )
    settings = settings_for(
        folder, INPUT_DATASET=corpus, INSTRUCT_DATASET=data, INST="true", WORK_DIR=tmp_path / "work"
    )
    manifest = prep.prepare(settings)
    _, tokenizer, dataset = load_prep(settings)
    assert manifest["sequences"] == 15 and manifest["skipped_rows"] == 0
    texts = [tokenizer.decode(row["input_ids"]).replace(" ", "") for row in dataset]
    assert texts[0] == "<s>Bebrief.<|user|>Add:0+1<|end|><|bot|>1<|end|><|user|>Again<|end|><|bot|>ok<|end|>"
    assert texts[5] == "<s><|user|>Reversetheword\n\ncat0<|end|><|bot|>0tac<|end|>"
    assert texts[10] == "<s><|user|>Double:0<|end|><|bot|>0<|end|>"
    # The labels SFTTrainer gives the model for the prepared rows: the answers and their <|end|>, nothing else.
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(settings.prep_dir / "model"),
        train_dataset=dataset,
        processing_class=tokenizer,
        args=SFTConfig(
            output_dir=str(tmp_path / "out"),
            use_cpu=True,
            report_to="none",
            max_length=64,
            packing=False,
            dataset_num_proc=None,
        ),
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(dataset))])
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        trained = [position for position, label in enumerate(labels) if label != -100]
        length = ids.index(tokenizer.pad_token_id) if tokenizer.pad_token_id in ids else len(ids)
        assert trained == answer_positions(tokenizer, ids[:length]) and trained
        assert all(labels[p] == ids[p] for p in trained)


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"conversations": [{"from": "narrator", "value": "x"}]}, "conversation turn 0 is from 'narrator'"),
        ({"instruction": "Say hi", "output": 3}, "an Alpaca row needs text `instruction` and `output` values"),
        (
            {"prompt": "Hi", "completion": [{"role": "assistant", "content": "x"}]},
            "`prompt` and `completion` must both be text, or both lists",
        ),
        ({"conversations": [{"from": "gpt", "value": "first"}]}, "roles do not alternate user/assistant"),
        ({"id": 3}, "no `messages`, `conversations`, `instruction`, `prompt`, `text` value"),
    ],
)
def test_a_malformed_row_of_each_format_says_what_is_wrong(row, reason):
    with pytest.raises(prep.UnusableRow) as err:
        prep.conversation_messages(row)
    assert str(err.value).startswith(reason)


def test_more_than_one_percent_malformed_rows_stops_before_writing(tmp_path, pretrained):
    folder, corpus = pretrained
    rows = [{"text": "<|user|>Add: 1 + 1<|end|><|bot|>2<|end|>"}] * 97 + [{"text": "Add: 1 + 1 = 2"}] * 3
    data = write_jsonl(tmp_path / "instruct.jsonl", rows)
    settings = settings_for(
        folder, INPUT_DATASET=corpus, INSTRUCT_DATASET=data, INST="true", WORK_DIR=tmp_path / "work"
    )
    with pytest.raises(
        prep.PrepError, match=r"INSTRUCT_DATASET=.*3 of 100 rows \(3.0%\) are unusable.*row 97: .*row 98"
    ):
        prep.prepare(settings)
    assert not settings.prep_dir.exists() and list((tmp_path / "work").iterdir()) == []


# ---- errors, atomicity, reuse, the source model ----


def test_bad_inputs_name_the_variable_and_what_is_allowed(tmp_path):
    files = {
        "empty.jsonl": "",
        "wrong.jsonl": '{"content": "x", "id": 1}\n',
        "folder/data.xlsx": "x",
        "bad.jsonl": '{"text": "fine"}\n{"text": broken\n',
        "damaged.parquet": "not parquet",
        "latin1.txt": "caf\xe9\n",
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(content.encode("latin-1"))
    cases = {
        "missing.jsonl": r"INPUT_DATASET=.*missing.jsonl: no such file or folder; allowed: a Hub dataset id",
        "folder/data.xlsx": r"INPUT_DATASET=.*: unsupported file type '.xlsx'; allowed:",
        "wrong.jsonl": r"INPUT_DATASET=.*: no `text` column \(columns found: content, id\)",
        "empty.jsonl": r"INPUT_DATASET=.*: the dataset is empty",
        "bad.jsonl": r"INPUT_DATASET: .*bad.jsonl line 2: not valid JSON",
        "damaged.parquet": r"INPUT_DATASET: .*damaged.parquet: not a readable Parquet file",
        "latin1.txt": r"INPUT_DATASET: .*latin1.txt: not UTF-8 text",
        "folder": r"INPUT_DATASET=.*: the folder holds no data files \(found: .xlsx\)",
    }
    for name, message in cases.items():
        with pytest.raises(prep.PrepError, match=message):
            prep.prepare(settings_for(tmp_path, INPUT_DATASET=tmp_path / name))
    assert not (tmp_path / "work" / "prep").exists()


def test_a_failing_run_leaves_the_previous_preparation_untouched(tmp_path, monkeypatch):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in DOCUMENTS])
    settings = settings_for(tmp_path, INPUT_DATASET=corpus)
    prep.prepare(settings)
    before = {p.relative_to(settings.prep_dir): p.read_bytes() for p in settings.prep_dir.rglob("*") if p.is_file()}

    def broken_model(*args):
        raise RuntimeError("out of memory while building the model")

    monkeypatch.setattr(prep, "build_model", broken_model)
    with pytest.raises(RuntimeError, match="out of memory"):
        prep.prepare(settings_for(tmp_path, INPUT_DATASET=corpus, SEED=7))
    after = {p.relative_to(settings.prep_dir): p.read_bytes() for p in settings.prep_dir.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in settings.work_dir.iterdir()] == ["prep"]
    assert prep.finished_preparation(settings) and not prep.finished_preparation(
        settings_for(tmp_path, INPUT_DATASET=corpus, SEED=7)
    )


def test_the_source_model_is_found_or_named_in_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub

    settings = settings_for(tmp_path, INPUT_DATASET=tmp_path, INPUT_REPO="someone/base", INIT=1)
    published = settings.output_dir / "base"
    published.mkdir(parents=True)
    assert prep.resolve_source(settings) == published
    published.rmdir()

    def hub_without_it(**kwargs):
        assert kwargs["repo_id"] == "someone/base" and kwargs["endpoint"] == settings.hf_endpoint
        raise OSError("404 Client Error: Repository Not Found")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_without_it)
    with pytest.raises(prep.PrepError, match=r"INPUT_REPO=someone/base: no model 'someone/base' in .*404"):
        prep.resolve_source(settings)


def test_input_repo_as_a_path_prepares_from_that_folder(tmp_path, pretrained, monkeypatch):
    folder, corpus = pretrained
    monkeypatch.chdir(folder)
    settings = settings_for(
        folder, INPUT_DATASET=corpus, INIT=1, INPUT_REPO="./output/train-llama", WORK_DIR=tmp_path / "work"
    )
    assert settings.input_repo == str(folder / "output" / "train-llama")
    manifest = prep.prepare(settings)
    assert manifest["model_source"] == settings.input_repo and manifest["tokenizer_trained"] is False


def test_a_damaged_source_model_stops_before_reading_the_data(tmp_path, pretrained):
    folder, corpus = pretrained
    source = tmp_path / "copy"
    shutil.copytree(folder / "output" / "train-llama", source)
    weights = source / "model.safetensors"
    whole = weights.read_bytes()
    kept = 8 + int.from_bytes(whole[:8], "little") + 1000  # the header and 1,000 bytes of data
    weights.write_bytes(whole[:kept])
    settings = settings_for(tmp_path, INPUT_DATASET=corpus, INIT=1, INPUT_REPO=source)
    with pytest.raises(prep.PrepError) as raised:
        prep.prepare(settings)
    assert str(raised.value) == (
        f"INPUT_REPO={source}: {weights} is truncated: {kept:,} bytes, its header describes "
        f"{len(whole):,}; copy or download the model again, or publish it again with "
        "`python3 util.py publish`"
    )
    assert not (tmp_path / "work").exists()


def test_leftovers_of_a_killed_preparation_are_removed_at_the_next_start(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    leftovers = [work / ".prep.tmp-k1ll3d", work / ".prep.old-4242"]
    for leftover in leftovers:
        (leftover / "dataset").mkdir(parents=True)
    (work / "prep").mkdir()
    for name in config.VARIABLE_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in {
        "OUTPUT_DIR": tmp_path / "output",
        "WORK_DIR": work,
        "PRESET": "demo",
        "INPUT_DATASET": tmp_path / "missing.jsonl",
    }.items():
        monkeypatch.setenv(name, str(value))
    assert prep.main() == 1  # the missing dataset stops it, after the clean-up
    assert sorted(p.name for p in work.iterdir()) == ["prep"]
    out = capsys.readouterr().out
    assert all(f"removed a temporary folder left by an interrupted run: {leftover}" in out for leftover in leftovers)


def test_errors_exit_with_status_1_and_one_line(tmp_path, base_env, root):
    for dataset in (str(tmp_path / "missing.txt"), "nobody/no-such-dataset"):
        result = subprocess.run(
            [sys.executable, "prep.py"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=120,
            env={**base_env, "INPUT_DATASET": dataset},
        )
        assert result.returncode == 1, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("prep error:")]
        assert len(errors) == 1 and f"INPUT_DATASET={dataset}:" in errors[0]


# ---- the demo, end to end ----


@pytest.mark.slow
def test_demo_preparation_end_to_end_then_reused_then_instruction(tmp_path, base_env, root):
    started = time.monotonic()
    first = subprocess.run(
        [sys.executable, "prep.py"], cwd=root, capture_output=True, text=True, timeout=300, env=base_env
    )
    seconds = time.monotonic() - started
    assert first.returncode == 0, first.stderr[-3000:]
    settings = config.load_settings(base_env)
    manifest, tokenizer, dataset = load_prep(settings)
    assert manifest["stage_key"] == json.loads(json.dumps(settings.stage_key()))
    assert manifest["rows"] > 3000 and manifest["skipped_rows"] == 0 and manifest["is_last_shard"] is True
    assert all(len(row) == 256 for row in dataset["input_ids"]) and manifest["sequences"] == len(dataset) > 1000
    assert manifest["eval_sequences"] == 64 and "eval split: 64 of" in first.stdout
    assert "prep done:" in first.stdout and "tokens/s" in first.stdout and seconds < 120

    again = subprocess.run(
        [sys.executable, "prep.py"], cwd=root, capture_output=True, text=True, timeout=120, env=base_env
    )
    assert again.returncode == 0 and "reusing it" in again.stdout and "prep done" not in again.stdout

    publish_prep(settings)
    instruct_env = {**base_env, "INST": "true"}
    third = subprocess.run(
        [sys.executable, "prep.py"], cwd=root, capture_output=True, text=True, timeout=300, env=instruct_env
    )
    assert third.returncode == 0, third.stderr[-3000:]
    manifest, tokenizer, dataset = load_prep(config.load_settings(instruct_env))
    assert (manifest["phase"], manifest["rows"], manifest["sequences"], manifest["skipped_rows"]) == (
        "instruct",
        5000,
        4936,
        0,
    )
    assert manifest["eval_sequences"] == 64
    assert tokenizer.chat_template == prep.CHAT_TEMPLATE and manifest["model_source"].endswith("train-llama")
    import evaluate

    assert evaluate.heldout_accuracy(config.load_settings(instruct_env).prep_dir, limit=8) == 0.0  # untrained


def test_a_mixture_draws_rows_by_weight_and_a_late_shard_starts_where_the_draws_say(tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", [{"text": f"first {n}"} for n in range(3000)])
    second = write_format(tmp_path / "second", ".parquet", [{"body": f"second {n}"} for n in range(3000)])
    spec = f"{first}?weight=3|{second}?column=body"
    settings = settings_for(tmp_path, INPUT_DATASET=spec, SHARD_SIZE=500)
    source = prep.open_data_source(settings.input_dataset, "INPUT_DATASET", None)
    prep.check_columns(source, "pretrain")
    assert prep.count_rows(source) is None
    rows = [row["text"] for row in prep.iter_rows(source)]
    from_first = sum(text.startswith("first") for text in rows)
    assert from_first == 3000 and 3800 < len(rows) < 4200  # it stops when the first dataset runs out
    assert 0.72 < from_first / len(rows) < 0.78  # 3 to 1
    assert [r for r in rows if r.startswith("second")][:3] == ["second 0", "second 1", "second 2"]  # each in order
    late = list(itertools.islice(prep.iter_rows(source, 1500), 200))
    assert [row["text"] for row in late] == rows[1500:1700]
    import preflight

    check = preflight.check_dataset(settings)
    assert check.status == preflight.PASS and "a mixture of 2 datasets; first 5 rows usable" in check.detail


@pytest.mark.parametrize(
    "value, message",
    [
        ("a/b?weight=0|c/d", "a ?weight= above 0, not '0'"),
        ("a/b||c/d", "a local file or folder, or a Hub dataset id such as owner/name"),
    ],
)
def test_a_malformed_mixture_is_a_configuration_error(tmp_path, value, message):
    with pytest.raises(config.ConfigError) as err:
        settings_for(tmp_path, INPUT_DATASET=value)
    assert message in err.value.problems[0]
