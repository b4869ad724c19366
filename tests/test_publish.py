"""Guards `util.py publish` and `util.py advance`: the published folder, its model card and modes, atomic
replacement, a full disk while publishing, the curriculum walk (next_stage), the run state, and the Hub
push against the local Hub stand-in (tests/hub_server.py): retries of 5xx, 429 with Retry-After, a reset
connection and a stalled Hub, a rejected token, the push of the next run after a final failure, a failed
Space pause, and a sweep of every output for the token; the model card's metadata round-trips through
huggingface_hub's ModelCard with eval results, Hub datasets only and the base model, shows the loss plot and
an instruction model's answers to held-out prompts."""

import dataclasses
import datetime
import errno
import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from hub_server import HubStandIn, Repo
from huggingface_hub.errors import HfHubHTTPError

import config
import util

TOKEN = "hf_TESTsecret0123456789abcdef"
REPO = "tester/tiny-llama"
SPACE = "tester/trainer-space"
FINAL_LOSS = 2.3456


@dataclasses.dataclass(frozen=True)
class TinyModel:
    folder: Path
    parameters: int


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> TinyModel:
    """A two-layer LlamaForCausalLM and a byte-level BPE tokenizer, saved as train.py saves them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(config.SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["once upon a time a small model learned to speak"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=config.padded_vocab(len(tokenizer)),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
    )
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return TinyModel(folder, sum(p.numel() for p in model.parameters()))


def write_trained(settings, tiny: TinyModel, **overrides) -> dict:
    """The work/trained/ layout of train.py for this stage: model/ and summary.json."""
    shutil.rmtree(settings.trained_dir, ignore_errors=True)
    shutil.copytree(tiny.folder, settings.trained_dir / "model")
    summary = {
        "stage_key": settings.stage_key(),
        "completed": True,
        "stopped_by": None,
        "steps": 40,
        "total_steps": 40,
        "tokens_seen": 12345,
        "final_loss": FINAL_LOSS,
        "first_loss": 7.5,
        "wall_seconds": 12.5,
        "parameters": tiny.parameters,
        "trainable_parameters": tiny.parameters,
        "precision": "fp32",
        "world_size": 1,
        "use_quant": False,
        "is_last_shard": True,
        "topology": dataclasses.asdict(settings.topology),
    }
    summary.update(overrides)
    (settings.trained_dir / "summary.json").write_text(json.dumps(summary))
    return summary


def run_util(root, env, command):
    return subprocess.run(
        [sys.executable, "util.py", command, "--retry-delay", "0.01"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def train_stage(env, tiny, **overrides):
    """Pretend train.py ran the stage that `env` (and the run-state file) describe."""
    settings = config.load_settings(env)
    write_trained(settings, tiny, **overrides)
    return settings


def read_state(settings) -> dict:
    return json.loads(settings.state_file.read_text())


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if ": error: " in line]


# ---------------------------------------------------------------------------------------------
# The curriculum arithmetic.


def walk(pretrain_shards: int, instruct_shards: int, has_instruct: bool = True) -> list[tuple]:
    """Every stage the curriculum runs, as (phase, INIT, shard), for datasets of these sizes."""
    init, inst, done, stages = 0, False, False, []
    while not done:
        shard = 0 if init < 2 else init - 1
        shards = instruct_shards if inst else pretrain_shards
        stages.append(("instruct" if inst else "pretrain", init, shard))
        init, inst, done = util.next_stage(init, inst, shard == shards - 1, has_instruct)
        assert len(stages) < 50
    return stages


def test_next_stage_walks_every_shard_then_instruct_then_done():
    assert walk(3, 2) == [
        ("pretrain", 0, 0),
        ("pretrain", 1, 0),
        ("pretrain", 2, 1),
        ("pretrain", 3, 2),
        ("instruct", 0, 0),
        ("instruct", 1, 0),
        ("instruct", 2, 1),
    ]
    # One shard: the two half passes over shard 0, in each phase.
    assert walk(1, 1) == [("pretrain", 0, 0), ("pretrain", 1, 0), ("instruct", 0, 0), ("instruct", 1, 0)]
    assert walk(2, 5, has_instruct=False) == [("pretrain", 0, 0), ("pretrain", 1, 0), ("pretrain", 2, 1)]
    assert util.next_stage(0, False, True, True) == (1, False, False)  # INIT 0 -> 1 even on the last shard
    assert util.next_stage(3, False, True, True) == (0, True, False)
    assert util.next_stage(3, True, True, True) == (3, True, True)  # done keeps the last stage


# ---------------------------------------------------------------------------------------------
# Retries.


def http_error(status: int, message: str = "error from the test") -> HfHubHTTPError:
    response = httpx.Response(status, request=httpx.Request("POST", "http://127.0.0.1/api/repos/create"))
    return HfHubHTTPError(f"{status} {message}", response=response)


def flaky(errors: list[Exception]):
    calls = []

    def action():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return "ok"

    return action, calls


def test_hub_call_retries_server_errors_rate_limits_and_connection_errors_with_backoff():
    action, calls = flaky([http_error(503), http_error(429), httpx.ConnectError("refused")])
    sleeps = []
    assert util.hub_call(action, "creating the repo", attempts=5, base_delay=0.5, sleep=sleeps.append) == "ok"
    assert len(calls) == 4
    assert sleeps == [0.5, 1.0, 2.0]


def test_hub_call_gives_up_after_the_attempts_and_hides_the_token():
    action, calls = flaky([http_error(502, f"bad gateway for {TOKEN}")] * 10)
    sleeps = []
    with pytest.raises(util.StageError, match=r"creating the repo failed after 3 attempts: HTTP 502") as raised:
        util.hub_call(action, "creating the repo", attempts=3, base_delay=0.1, secret=TOKEN, sleep=sleeps.append)
    assert len(calls) == 3 and sleeps == [0.1, 0.2]
    assert TOKEN not in str(raised.value) and "<HF_TOKEN>" in str(raised.value)


@pytest.mark.parametrize(
    "status, words", [(401, "rejected HF_TOKEN"), (403, "rejected HF_TOKEN"), (404, "does not exist")]
)
def test_hub_call_does_not_retry_what_retrying_cannot_fix(status, words):
    action, calls = flaky([http_error(status)])
    with pytest.raises(util.StageError, match=words):
        util.hub_call(action, "creating the repo", attempts=5, base_delay=0.1, sleep=pytest.fail)
    assert len(calls) == 1


def test_redact_removes_the_token_and_the_credentials_of_urls():
    assert (
        util.redact(f"Hub unreachable at http://{TOKEN}@127.0.0.1:8080/api", TOKEN)
        == "Hub unreachable at http://<credentials>@127.0.0.1:8080/api"
    )
    assert (
        util.redact(f"at https://user:pa55@host:1/x@y?q=a@b, {TOKEN}", TOKEN)
        == "at https://<credentials>@host:1/x@y?q=a@b, <HF_TOKEN>"
    )
    assert util.redact("mail me@host, https://host/a@b", None) == "mail me@host, https://host/a@b"


# ---------------------------------------------------------------------------------------------
# Publishing to OUTPUT_DIR.


def test_local_publish_loads_generates_and_has_a_model_card(root, base_env, tiny_model):
    env = {**base_env, "GGUF_TYPES": "q8_0"}
    settings = train_stage(env, tiny_model)
    result = run_util(root, env, "publish")
    assert result.returncode == 0, result.stderr
    assert "not pushed to the Hub" in result.stdout
    assert "publish: wrote train-llama-q8_0.gguf" in result.stdout
    folder = settings.output_dir / settings.published_name
    assert folder == settings.output_dir / "train-llama"
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
        "publish.json",
        "train-llama-q8_0.gguf",
    } <= {p.name for p in folder.iterdir()}
    import gguf

    reader = gguf.GGUFReader(folder / "train-llama-q8_0.gguf")
    assert reader.fields["general.name"].contents() == "train-llama"
    assert {t.name: t.tensor_type for t in reader.tensors}["output.weight"] == gguf.GGMLQuantizationType.Q8_0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    inputs = tokenizer("once upon a time", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 5
    assert sum(p.numel() for p in model.parameters()) == tiny_model.parameters

    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "llama" in front["tags"]
    for fact in (
        f"{tiny_model.parameters:,}",
        settings.topology.describe(),
        "12,345",
        "40 of 40",
        f"final {FINAL_LOSS:.4f}",
        "pretrain, INIT=0, shard 0",
        "trained from scratch",
        datetime.datetime.now(datetime.UTC).date().isoformat(),
        '"HF_TOKEN": "unset"',
        '"LEARNING_RATE": 0.002',
    ):
        assert fact in card, fact
    marker = json.loads((folder / "publish.json").read_text())
    assert marker["stage_key"] == settings.stage_key() and marker["hub"] is None


CONVERSATIONS = [
    [{"role": "user", "content": "Reverse the word: apple"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Add 2 and 3"},
        {"role": "assistant", "content": "5"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Spell cat"},
        {"role": "assistant", "content": "c a t"},
    ],
]


def render_in_minijinja(template: str, conversation: list[dict], add_generation_prompt: bool) -> str:
    """The template rendered by minijinja, the engine of Rust servers (text-generation-inference)."""
    from minijinja import Environment

    def raise_exception(message):
        raise ValueError(message)

    env = Environment()
    env.add_function("raise_exception", raise_exception)
    return env.render_str(
        template, messages=conversation, add_generation_prompt=add_generation_prompt, bos_token="<s>", eos_token="</s>"
    )


def test_published_chat_template_has_no_generation_markers_and_renders_the_same(tmp_path, tiny_model):
    """The training template's {% generation %} markers stay in WORK_DIR; the published folder's template,
    in chat_template.jinja and (as older transformers wrote it) tokenizer_config.json, renders the same text
    in transformers' Jinja2 and in minijinja, which refuses the markers."""
    import minijinja
    from transformers import AutoTokenizer

    import prep

    source = tmp_path / "trained"
    shutil.copytree(tiny_model.folder, source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    prep.add_chat_tokens(tokenizer)
    tokenizer.save_pretrained(source)
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = prep.CHAT_TEMPLATE
    (source / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    target = tmp_path / "published"
    util.publish_folder(source, target, "card", {"stage_key": "test"})

    assert "{% generation %}" in (source / "chat_template.jinja").read_text()
    with pytest.raises(minijinja.TemplateError, match="unknown statement generation"):
        render_in_minijinja(prep.CHAT_TEMPLATE, CONVERSATIONS[0], True)
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        assert "generation %}" not in (target / name).read_text(), name
    serving = util.serving_chat_template(prep.CHAT_TEMPLATE)
    assert json.loads((target / "tokenizer_config.json").read_text())["chat_template"] == serving
    published = AutoTokenizer.from_pretrained(target)
    assert published.chat_template == serving
    for conversation in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            training_text = tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            served_text = published.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert served_text == training_text
            assert render_in_minijinja(serving, conversation, add_generation_prompt) == training_text
    assert training_text == (
        "<s><|user|>Hi<|end|><|bot|>Hello!<|end|><|user|>Spell cat<|end|><|bot|>c a t<|end|><|bot|>"
    )
    with pytest.raises(ValueError, match="must alternate"):
        render_in_minijinja(serving, [CONVERSATIONS[0][0]] * 2, False)


def write_eval_split(settings, tiny: TinyModel) -> list[int]:
    """A prepared eval split of two conversations (assistant mask on the answer), as prep.py writes it."""
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny.folder)
    prompt, answer = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("once upon a", " time"))
    ids = [tokenizer.bos_token_id, *prompt, *answer, tokenizer.eos_token_id]
    masks = [0] * (1 + len(prompt)) + [1] * (len(answer) + 1)
    datasets.Dataset.from_dict({"input_ids": [ids, ids], "assistant_masks": [masks, masks]}).save_to_disk(
        str(settings.prep_dir / "eval_dataset")
    )
    util.write_json_atomic(settings.prep_dir / "manifest.json", {"stage_key": settings.stage_key()})
    return ids


def test_an_instruction_models_card_has_valid_metadata_eval_results_plot_and_held_out_answers(
    base_env, tiny_model, tmp_path
):
    from huggingface_hub import ModelCard, ModelCardData

    local = tmp_path / "chats.jsonl"
    local.write_text("{}\n")
    env = {
        **base_env,
        "INST": "true",
        "INIT": "1",
        "OUTPUT_REPO": "tester/tiny-llama",
        "HF_TOKEN": TOKEN,
        "INPUT_DATASET": "owner/corpus?config=en",
        "INSTRUCT_DATASET": f"owner/chats|{local}?weight=2",
        "MODEL_LICENSE": "apache-2.0",
    }
    settings = train_stage(
        env,
        tiny_model,
        eval_loss=1.23456,
        eval_perplexity=math.exp(1.23456),
        eval_sequences=2,
        losses=[[10, 3.0], [20, 2.5]],
        eval_losses=[[20, 1.23456]],
    )
    earlier = [
        {
            "stage": "pretrain INIT=0 (shard 0)",
            "phase": "pretrain",
            "init": 0,
            "steps": 30,
            "train": [[10, 5.0], [30, 4.0]],
            "eval": [[30, 4.1]],
        }
    ]
    summary = json.loads((settings.trained_dir / "summary.json").read_text())
    util.write_history(settings.trained_dir / "model", util.extend_history(earlier, summary))
    write_eval_split(settings, tiny_model)
    (folder,) = util.publish_local(settings, summary, "digest")

    text = (folder / "README.md").read_text()
    assert TOKEN not in text and str(tmp_path) not in text.split("---")[1]
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert (data.license, data.base_model, data.datasets) == (
        "apache-2.0",
        "tester/tiny-llama",
        ["owner/corpus", "owner/chats"],
    )
    assert data.model_name == "tiny-llama-it" and "instruction-tuned" in data.tags
    assert [(r.metric_type, r.metric_value, r.dataset_type) for r in data.eval_results] == [
        ("loss", 1.2346, "held-out"),
        ("perplexity", round(math.exp(1.23456), 3), "held-out"),
    ]
    # The metadata survives huggingface_hub's own round trip (model-index back to EvalResults).
    again = ModelCardData(**data.to_dict())
    assert again.to_dict() == data.to_dict() and ModelCard(str(card)).data.to_dict() == data.to_dict()
    assert f"![Training and eval loss of every stage so far]({util.PLOT_FILE})" in text
    stages = json.loads((folder / util.HISTORY_FILE).read_text())["stages"]
    assert [s["stage"] for s in stages] == ["pretrain INIT=0 (shard 0)", "instruct INIT=1 (shard 0)"]
    assert "## Held-out prompts" in text and "```text\nonce upon a\n```" in text
    assert "**Answer in the data**\n\n```text\ntime\n```" in text
    assert text.count("**This model's answer**") == 2


def stage_summary(phase, init, steps, losses, eval_losses):
    key = {"phase": phase, "init": init, "shard_index": max(init - 1, 0)}
    return {"stage_key": key, "steps": steps, "losses": losses, "eval_losses": eval_losses}


def test_the_loss_history_keeps_earlier_stages_and_plots_one_curve_per_stage(tmp_path):
    import matplotlib.image

    history = []
    for phase, init in (("pretrain", 0), ("pretrain", 1), ("instruct", 0)):
        losses, eval_losses = [[10, 5.0 - init], [20, 4.0 - init]], [[20, 4.5 - init]]
        history = util.extend_history(history, stage_summary(phase, init, 20, losses, eval_losses))
    assert [s["stage"] for s in history] == [
        "pretrain INIT=0 (shard 0)",
        "pretrain INIT=1 (shard 0)",
        "instruct INIT=0 (shard 0)",
    ]
    # Pretraining INIT=1 run again replaces itself and the stages after it.
    rerun = util.extend_history(history, stage_summary("pretrain", 1, 30, [[30, 3.0]], []))
    assert [(s["stage"], s["steps"]) for s in rerun] == [
        ("pretrain INIT=0 (shard 0)", 20),
        ("pretrain INIT=1 (shard 0)", 30),
    ]

    figure = util.loss_figure(history)
    (axes,) = figure.axes
    assert [list(line.get_xdata()) for line in axes.get_lines()] == [[10, 20], [30, 40], [50, 60]]
    eval_points = [collection.get_offsets().tolist() for collection in axes.collections]
    assert eval_points == [[[20, 4.5]], [[40, 3.5]], [[60, 4.5]]]
    util.write_history(tmp_path, history)
    assert util.read_history(tmp_path / util.HISTORY_FILE) == json.loads(json.dumps(history))
    image = matplotlib.image.imread(tmp_path / util.PLOT_FILE)
    assert image.shape == (450, 800, 4) and image[..., :3].std() > 0.05  # drawn, not blank
    assert util.read_history(tmp_path / "missing.json") == []
    damaged = tmp_path / "damaged.json"
    damaged.write_text(
        json.dumps({"stages": [{**history[0], "init": "zero"}, {**history[1], "train": [[1]]}, history[2]]})
    )
    assert util.read_history(damaged) == json.loads(json.dumps(history[2:]))


def test_failed_publish_keeps_the_previous_version(root, base_env, tiny_model, monkeypatch):
    settings = train_stage(base_env, tiny_model)
    assert util.publish(settings, 0) == 0
    folder = settings.output_dir / settings.published_name
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken_card(*args):
        raise OSError("disk full while writing the model card")

    monkeypatch.setattr(util, "model_card", broken_card)
    write_trained(settings, tiny_model, final_loss=1.0)
    with pytest.raises(OSError, match="disk full"):
        util.publish(settings, 0)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in settings.output_dir.iterdir()] == [folder.name]  # no half-written folder left

    write_trained(settings, tiny_model, final_loss=math.nan)
    result = run_util(root, base_env, "publish")
    assert result.returncode == 1
    assert len(error_lines(result)) == 1 and "final_loss is nan" in result.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_publish_refuses_a_model_of_another_stage_or_an_incomplete_folder(base_env, tiny_model):
    settings = train_stage(base_env, tiny_model)
    other = config.load_settings({**base_env, "INIT": "3"})
    write_trained(settings, tiny_model, stage_key=other.stage_key())
    with pytest.raises(
        util.StageError,
        match=r"belongs to another stage \(pretrain INIT=3 \(shard 2\); "
        r"differs in init, shard_index",
    ):
        util.publish(settings, 0)
    write_trained(settings, tiny_model)
    (settings.trained_dir / "model" / "tokenizer.json").unlink()
    with pytest.raises(util.StageError, match="missing tokenizer.json"):
        util.publish(settings, 0)
    assert not settings.output_dir.exists()


def test_save_adapter_publishes_the_adapter_beside_the_merged_model(base_env, tiny_model):
    env = {**base_env, "USE_QUANT": "true", "SAVE_ADAPTER": "true"}
    settings = train_stage(env, tiny_model)
    adapter = settings.trained_dir / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": config.LORA_R}))
    with pytest.raises(util.StageError, match="SAVE_ADAPTER=true but the LoRA adapter is missing"):
        util.publish(settings, 0)
    assert not settings.output_dir.exists()  # checked before anything is written
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    assert util.publish(settings, 0) == 0
    published = settings.output_dir / "train-llama-adapter"
    assert (published / "adapter_model.safetensors").read_bytes() == b"weights"
    card = (published / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "peft" and "`train-llama`" in card
    assert json.loads((published / "publish.json").read_text())["stage_key"] == settings.stage_key()


def test_published_files_are_readable_by_others_whatever_the_umask(base_env, tiny_model):
    settings = train_stage(base_env, tiny_model)
    (settings.trained_dir / "model" / "model.safetensors").chmod(0o600)  # as safetensors writes it
    previous_umask = os.umask(0o077)
    try:
        assert util.publish(settings, 0) == 0
    finally:
        os.umask(previous_umask)
    folder = settings.output_dir / settings.published_name
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}
    assert modes[folder.name] == 0o755 and modes["model.safetensors"] == 0o644
    assert set(modes.values()) == {0o644, 0o755}, modes


def test_publish_removes_what_a_killed_publish_left(base_env, tiny_model, capsys):
    settings = train_stage(base_env, tiny_model)
    leftovers = [settings.output_dir / ".train-llama.tmp-k1ll3d", settings.output_dir / ".train-llama.old-4242"]
    for folder in leftovers:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
    (settings.output_dir / ".run_state.json.tmp-abc").write_text("{")
    (settings.output_dir / "notes.tmp-1").write_text("the user's")
    assert util.publish(settings, 0) == 0
    assert sorted(p.name for p in settings.output_dir.iterdir()) == ["notes.tmp-1", "train-llama"]
    out = capsys.readouterr().out
    for folder in leftovers:
        assert f"removed a temporary folder left by an interrupted run: {folder}" in out
    assert "removed a temporary file left by an interrupted run: " in out


def fail_when_writing(monkeypatch, name: str, code: int) -> None:
    """Make the publish's write of the file `name` fail with `code` halfway through (copy) or at once."""
    real_copyfile, real_write_json = shutil.copyfile, util.write_json_atomic

    def copyfile(source, target, *args, **kwargs):
        if Path(target).name == name:
            Path(target).write_bytes(Path(source).read_bytes()[:100])
            raise OSError(code, os.strerror(code), str(target))
        return real_copyfile(source, target, *args, **kwargs)

    def write_json(path, data):
        if path.name == name:
            raise OSError(code, os.strerror(code), str(path))
        real_write_json(path, data)

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    monkeypatch.setattr(util, "write_json_atomic", write_json)


@pytest.mark.parametrize(
    "name, code, words",
    [
        ("model.safetensors", errno.ENOSPC, "the disk is full"),
        ("publish.json", errno.ENOSPC, "the disk is full"),
        ("model.safetensors", errno.EDQUOT, "the disk quota is exceeded"),
    ],
)
def test_full_disk_while_publishing_stops_in_one_line_and_keeps_the_previous_version(
    base_env, tiny_model, monkeypatch, name, code, words
):
    settings = train_stage(base_env, tiny_model)
    assert util.publish(settings, 0) == 0
    folder = settings.output_dir / settings.published_name
    util.write_json_atomic(settings.state_file, {"init": 0, "inst": False, "history": []})
    before = {p: p.read_bytes() for p in settings.output_dir.rglob("*") if p.is_file()}
    write_trained(settings, tiny_model, final_loss=1.0)
    fail_when_writing(monkeypatch, name, code)
    with pytest.raises(util.StageError) as raised:
        util.publish(settings, 0)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{settings.output_dir}: {words} while publishing train-llama (it needs about ")
    assert f"the previously published version at {folder} is intact" in message
    assert "free space on that filesystem, then rerun `bash trainer.sh` or `python3 util.py publish`" in message
    assert {p: p.read_bytes() for p in settings.output_dir.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in settings.output_dir.iterdir()) == ["run_state.json", "train-llama"]


def test_other_write_errors_name_the_path_in_one_line(base_env, tiny_model, monkeypatch):
    settings = train_stage(base_env, tiny_model)
    fail_when_writing(monkeypatch, "config.json", errno.EACCES)
    with pytest.raises(util.StageError) as raised:
        util.publish(settings, 0)
    folder = settings.output_dir / settings.published_name
    assert re.fullmatch(
        rf"{re.escape(str(settings.output_dir))}/\.train-llama\.tmp-\w+/config\.json: "
        rf"Permission denied while publishing train-llama; nothing was published at "
        rf"{re.escape(str(folder))}; fix that, then rerun .*",
        str(raised.value),
    )
    assert list(settings.output_dir.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Advancing the run state.


def test_advance_walks_the_curriculum_and_the_environment_overrides_the_state(root, base_env, tiny_model):
    """Each stage trained (here: one shard per phase) and published moves the state on, to done."""
    expected = [
        (1, False, "advanced: pretrain INIT=0 (shard 0) -> pretrain INIT=1 (shard 0)"),
        (0, True, "advanced: pretrain INIT=1 (shard 0) -> instruct INIT=0 (shard 0)"),
        (1, True, "advanced: instruct INIT=0 (shard 0) -> instruct INIT=1 (shard 0)"),
        (1, True, "done: the curriculum is finished after instruct INIT=1 (shard 0)"),
    ]
    for init, inst, line in expected:
        settings = train_stage(base_env, tiny_model)
        assert run_util(root, base_env, "publish").returncode == 0
        result = run_util(root, base_env, "advance")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1].startswith(line)
        state = read_state(settings)
        assert (state["init"], state["inst"]) == (init, inst)
        if not line.startswith("done"):
            resumed = config.load_settings(base_env)
            assert (resumed.init, resumed.inst, resumed.sources["INIT"]) == (init, inst, "state file")
    assert state["done"] is True and len(state["history"]) == 4
    assert (settings.output_dir / "train-llama-it" / "README.md").is_file()
    with pytest.raises(config.ConfigError, match="every stage is done"):
        config.load_settings(base_env)
    explicit = config.load_settings({**base_env, "INIT": "4", "INST": "false"})
    assert (explicit.init, explicit.inst, explicit.sources["INIT"]) == (4, False, "environment")


def test_advance_twice_is_refused(root, base_env, tiny_model):
    settings = train_stage(base_env, tiny_model)
    assert run_util(root, base_env, "publish").returncode == 0
    assert run_util(root, base_env, "advance").returncode == 0
    again = run_util(root, base_env, "advance")
    assert again.returncode == 1 and "belongs to another stage" in again.stderr
    assert read_state(settings)["init"] == 1 and len(read_state(settings)["history"]) == 1


def test_advance_on_a_space_without_token_is_refused_before_any_change(base_env, tiny_model):
    env = {**base_env, "SPACE_ID": SPACE}
    settings = train_stage(env, tiny_model)
    assert util.publish(settings, 0) == 0
    with pytest.raises(util.StageError, match="SPACE_ID is set but HF_TOKEN is not"):
        util.advance(settings, 0)
    assert not settings.state_file.exists()


def test_incomplete_stage_is_published_but_does_not_advance(root, base_env, tiny_model):
    settings = train_stage(base_env, tiny_model, completed=False, stopped_by="timer", steps=17)
    assert run_util(root, base_env, "publish").returncode == 0
    result = run_util(root, base_env, "advance")
    assert result.returncode == config.ExitCode.INCOMPLETE == 3
    assert "pretrain INIT=0 (shard 0) is incomplete (stopped by the timer)" in result.stdout
    assert "continues from the checkpoint" in result.stdout
    assert not settings.state_file.exists()


def test_advance_needs_a_publish_of_this_exact_training_run(root, base_env, tiny_model):
    settings = train_stage(base_env, tiny_model)
    result = run_util(root, base_env, "advance")
    assert result.returncode == 1 and "no publish record" in result.stderr
    assert run_util(root, base_env, "publish").returncode == 0
    write_trained(settings, tiny_model, final_loss=math.nan)  # trained again, and not published
    assert run_util(root, base_env, "advance").returncode == 1
    assert not settings.state_file.exists()


# ---------------------------------------------------------------------------------------------
# The Hub, through the stand-in.


@pytest.fixture
def hub():
    with HubStandIn(token=TOKEN, user="tester") as server:
        server.add_space(SPACE)
        yield server


@pytest.fixture
def hub_env(base_env, hub):
    # huggingface_hub refuses every request while either of these is set.
    env = {k: v for k, v in base_env.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {
        **env,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": TOKEN,
        "OUTPUT_REPO": REPO,
        "PRESET": "demo",
        "MAX_RETRIES": "3",
    }


def assert_token_absent(env, hub, *results):
    """No output line, no file under OUTPUT_DIR or WORK_DIR, and nothing the Hub received or stored
    holds the token, except the Authorization header that carries it on purpose."""
    for result in results:
        assert TOKEN not in result.stdout and TOKEN not in result.stderr
    for folder in (env["OUTPUT_DIR"], env["WORK_DIR"]):
        for path in Path(folder).rglob("*"):
            assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path
    for request in hub.requests:
        headers = {k: v for k, v in request.headers.items() if k != "authorization"}
        assert TOKEN not in f"{request.path} {request.query} {headers}", request.path
        assert TOKEN.encode() not in request.body, request.path
    for repo in hub.repos.values():
        assert all(TOKEN.encode() not in data for data in repo.files.values())
        assert TOKEN not in json.dumps(repo.commits)
    assert TOKEN not in json.dumps({k: dataclasses.asdict(v) for k, v in hub.spaces.items()})


def test_push_creates_repo_uploads_sets_space_variables_and_pauses_when_done(root, hub, hub_env, tiny_model):
    env = {**hub_env, "SPACE_ID": SPACE}
    settings = train_stage(env, tiny_model, is_last_shard=False)
    published, advanced = run_util(root, env, "publish"), run_util(root, env, "advance")
    assert published.returncode == 0 and advanced.returncode == 0, published.stderr + advanced.stderr
    files = hub.repos[REPO].files
    folder = settings.output_dir / "tiny-llama"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= set(files)
    assert "publish.json" not in files
    assert all(files[name] == (folder / name).read_bytes() for name in files)
    assert f"final loss {FINAL_LOSS:.4f}" in hub.repos[REPO].commits[-1]["summary"]
    assert hub.spaces[SPACE].variables == {"INST": "false", "INIT": "1"}
    assert hub.spaces[SPACE].stage == "RUNNING"
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests_to("POST", r"/api/.*"))

    last_env = {**env, "INIT": "2", "INST": "true"}  # the last instruction shard
    train_stage(last_env, tiny_model)
    last = [run_util(root, last_env, "publish"), run_util(root, last_env, "advance")]
    assert [r.returncode for r in last] == [0, 0], last[0].stderr + last[1].stderr
    assert "README.md" in hub.repos[f"{REPO}-it"].files
    assert hub.spaces[SPACE].variables == {"INST": "true", "INIT": "2"}
    assert hub.spaces[SPACE].stage == "PAUSED"
    assert last[1].stdout.strip().splitlines()[-1].startswith("done:")
    assert read_state(settings)["done"] is True
    assert_token_absent(env, hub, published, advanced, *last)


def test_server_errors_are_retried(root, hub, hub_env, tiny_model):
    hub.fail_next(2, status=503, path_contains="/commit/")
    settings = train_stage(hub_env, tiny_model)
    result = run_util(root, hub_env, "publish")
    assert result.returncode == 0, result.stderr
    assert len(hub.requests_to("POST", rf"/api/models/{REPO}/commit/main")) == 3
    assert "retry 1/2" in result.stdout and "retry 2/2" in result.stdout
    assert len(hub.repos[REPO].commits) == 1
    marker = json.loads((settings.output_dir / "tiny-llama" / "publish.json").read_text())
    assert marker["hub"]["repo_id"] == REPO
    assert_token_absent(hub_env, hub, result)


def test_permanent_failure_keeps_the_local_copy_and_the_state(root, hub, hub_env, tiny_model):
    hub.fail_always(status=500, path_contains="/commit/")
    settings = train_stage(hub_env, tiny_model)
    result = run_util(root, hub_env, "publish")
    folder = settings.output_dir / "tiny-llama"
    assert result.returncode == 1
    assert len(hub.requests_to("POST", rf"/api/models/{REPO}/commit/main")) == 3
    [line] = error_lines(result)
    assert "failed after 3 attempts: HTTP 500" in line and str(folder) in line and "not advanced" in line
    assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()
    advanced = run_util(root, hub_env, "advance")
    assert advanced.returncode == 1 and "not pushed to the Hub" in advanced.stderr
    assert not settings.state_file.exists()
    assert_token_absent(hub_env, hub, result, advanced)


def test_rejected_token_fails_at_once_in_one_line(root, hub, hub_env, tiny_model):
    hub.reject_token()
    train_stage(hub_env, tiny_model)
    result = run_util(root, hub_env, "publish")
    assert result.returncode == 1
    [line] = error_lines(result)
    assert "the Hub rejected HF_TOKEN (HTTP 401)" in line
    assert len(hub.requests_to("GET", r"/api/whoami-v2")) == 1
    assert not hub.requests_to("POST", r"/api/repos/create") and not hub.repos
    assert_token_absent(hub_env, hub, result)


def commit_requests(hub):
    return hub.requests_to("POST", rf"/api/models/{REPO}/commit/main")


@pytest.fixture
def in_process_hub_env(hub_env, monkeypatch):
    """hub_env for util.publish called in this process, with its HF_HUB_DISABLE_XET applied: with hf_xet,
    upload_folder commits through a pipeline that retries by itself, before util.hub_call sees an error."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    return hub_env


@pytest.mark.parametrize("asked, waited", [("7", 7.0), ("600", util.MAX_RETRY_DELAY)])
def test_rate_limit_waits_what_retry_after_asks_at_most_max_retry_delay(
    hub, in_process_hub_env, tiny_model, monkeypatch, asked, waited
):
    hub.fail_next(1, status=429, path_contains="/commit/", headers={"Retry-After": asked})
    settings = train_stage(in_process_hub_env, tiny_model)
    delays = []
    monkeypatch.setattr(time, "sleep", delays.append)
    assert util.publish(settings, 0.01) == 0
    assert delays == [waited]  # not the 0.01 s of the backoff
    assert len(commit_requests(hub)) == 2 and len(hub.repos[REPO].commits) == 1


def test_connection_reset_mid_upload_is_retried(root, hub, hub_env, tiny_model):
    hub.reset_next(1, path_contains="/commit/")
    settings = train_stage(hub_env, tiny_model)
    result = run_util(root, hub_env, "publish")
    assert result.returncode == 0, result.stderr
    cut, complete = commit_requests(hub)
    assert len(cut.body) == len(complete.body) // 2  # the server dropped the first upload halfway
    assert "failed (connection failed: " in result.stdout and "retry 1/2" in result.stdout
    folder = settings.output_dir / "tiny-llama"
    assert hub.repos[REPO].files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert_token_absent(hub_env, hub, result)


def test_a_stalled_hub_times_out_and_is_retried(root, hub, hub_env, tiny_model):
    env = {**hub_env, "HF_HUB_DOWNLOAD_TIMEOUT": "1"}
    hub.stall_next(1, seconds=60, path_contains="/commit/")
    train_stage(env, tiny_model)
    started = time.monotonic()
    result = run_util(root, env, "publish")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30  # gave up after the client's timeout, not the server's 60 s
    assert "failed (connection failed: ReadTimeout" in result.stdout
    assert len(commit_requests(hub)) == 2 and len(hub.repos[REPO].commits) == 1


# Each fault, on every attempt: (how to inject it, what the one error line says).
FINAL_FAULTS = {
    "5xx": (lambda hub: hub.fail_always(503, path_contains="/commit/"), "failed after 3 attempts: HTTP 503"),
    "429": (
        lambda hub: hub.fail_always(429, path_contains="/commit/", headers={"Retry-After": "0"}),
        "failed after 3 attempts: HTTP 429",
    ),
    "reset": (
        lambda hub: hub.reset_next(None, path_contains="/commit/"),
        "failed after 3 attempts: connection failed: ",
    ),
    "timeout": (
        lambda hub: hub.stall_next(None, seconds=60, path_contains="/commit/"),
        "failed after 3 attempts: connection failed: ReadTimeout",
    ),
    "401": (lambda hub: hub.reject_token(), "checking HF_TOKEN failed: the Hub rejected HF_TOKEN (HTTP 401)"),
}


@pytest.mark.parametrize("fault", FINAL_FAULTS)
def test_after_a_final_hub_failure_the_next_run_pushes_what_was_not_pushed(
    root, hub, in_process_hub_env, tiny_model, fault
):
    env = {**in_process_hub_env, "HF_HUB_DOWNLOAD_TIMEOUT": "1"}
    util.write_json_atomic(Path(env["OUTPUT_DIR"]) / "run_state.json", {"init": 1, "inst": False, "done": False})
    settings = train_stage(env, tiny_model)
    state = settings.state_file.read_bytes()
    inject, words = FINAL_FAULTS[fault]
    inject(hub)
    failed = run_util(root, env, "publish")
    folder = settings.output_dir / "tiny-llama"
    assert failed.returncode == 1
    [line] = error_lines(failed)
    assert words in line and f"The model is saved locally at {folder}; the run state was not advanced" in line
    assert (folder / "model.safetensors").is_file() and settings.state_file.read_bytes() == state
    assert not hub.repos.get(REPO, Repo()).files
    assert_token_absent(env, hub, failed)

    hub.heal()  # the next run, with the Hub back
    assert util.publish(settings, 0) == 0 and util.advance(settings, 0) == 0
    assert hub.repos[REPO].files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    [entry] = read_state(settings)["history"]
    assert entry["trained"] == "pretrain INIT=1 (shard 0)"


def test_a_failed_space_pause_warns_and_the_curriculum_still_advances(root, hub, hub_env, tiny_model):
    env = {**hub_env, "SPACE_ID": SPACE, "INIT": "2", "INST": "true"}  # the last stage
    settings = train_stage(env, tiny_model)
    hub.fail_always(503, path_contains="/pause")
    assert run_util(root, env, "publish").returncode == 0
    result = run_util(root, env, "advance")
    assert result.returncode == 0, result.stderr
    [warning] = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    assert warning.startswith(f"warning: pausing the Space {SPACE} failed after 3 attempts: HTTP 503")
    assert warning.endswith("the Space keeps running: pause it by hand")
    assert result.stdout.strip().splitlines()[-1] == "done: the curriculum is finished after instruct INIT=2 (shard 1)"
    assert hub.spaces[SPACE].variables == {"INST": "true", "INIT": "2"} and hub.spaces[SPACE].stage == "RUNNING"
    assert read_state(settings)["done"] is True
    assert_token_absent(env, hub, result)


def test_the_token_is_in_no_output_line_file_or_request(root, hub, hub_env, tiny_model):
    """The last stage on a Space: failing with a rejected token, and with a Hub that answers 503 to
    everything; then published with the token written into HF_ENDPOINT's URL (as user, then as password;
    huggingface_hub logs that URL when it retries), and published and advanced as usual."""
    env = {**hub_env, "SPACE_ID": SPACE, "INIT": "2", "INST": "true"}
    train_stage(env, tiny_model)
    hub.reject_token()
    results = [run_util(root, env, "publish")]
    hub.heal()
    hub.fail_always(503)
    results.append(run_util(root, env, "publish"))
    hub.heal()
    host = hub.endpoint.split("://")[1]
    for endpoint in (f"http://{TOKEN}@{host}", f"http://user:{TOKEN}@{host}"):
        hub.fail_next(1, status=503, path_contains="/preupload/")
        results.append(run_util(root, {**env, "HF_ENDPOINT": endpoint}, "publish"))
        assert "HTTP Error 503 thrown while requesting POST http://<credentials>@" in results[-1].stderr
    results += [run_util(root, env, "publish"), run_util(root, env, "advance")]
    assert [r.returncode for r in results] == [1, 1, 0, 0, 0, 0], [r.stderr for r in results]
    assert hub.spaces[SPACE].stage == "PAUSED"
    assert_token_absent(env, hub, *results)
