"""Guards the GGUF export (gguf_export.py, `util.py gguf`): transformers loads the file with the folder's
logits, its tokenizer metadata is what llama.cpp needs and splits text as the pipeline's tokenizer does,
and bad input stops in one line."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import config
import gguf_export
import prep
import util

# llama.cpp, transformers' GGUF tokenizer and the tokenizer prep.py trains all put no space before text,
# so they agree on texts with and without a leading one, and right after special tokens.
TEXTS = [
    "Once upon a time, a small model learned to speak.",
    " Once upon a time",
    "It's 42 o'clock -- isn't it?  \n\n Yes!",
    " naïve café, 東京, emoji 🦙 and tabs\tend",
    "<|user|>Reverse the word: apple<|end|><|bot|>",
    " <|user|> Reverse the word: apple<|end|><|bot|>",
]


@dataclasses.dataclass(frozen=True)
class TinyModel:
    folder: Path
    tokenizer: object
    model: object


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> TinyModel:
    """The pipeline's own tokenizer (prep.train_tokenizer, chat tokens and template) and a two-layer
    grouped-query LLaMA with weights large enough that attention is far from uniform: a wrong rotary
    permutation of q or k changes the logits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("gguf")
    settings = config.load_settings(
        {
            "INPUT_DATASET": str(config.DEMO_PRETRAIN),
            "VOCAB_SIZE": "512",
            "OUTPUT_DIR": str(root / "output"),
            "WORK_DIR": str(root / "work"),
        }
    )
    source = prep.open_data_source(settings.input_dataset, "INPUT_DATASET", None)
    tokenizer = prep.train_tokenizer(settings, source)
    prep.add_chat_tokens(tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=config.padded_vocab(len(tokenizer)),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=128,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
    ).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, parameter.shape[1] ** -0.5)
            else:
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
    folder = root / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return TinyModel(folder, tokenizer, model)


def load_gguf_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def export_alone(tiny: TinyModel, tmp_path: Path, type_name: str) -> Path:
    """The GGUF in a folder of its own: transformers would read tokenizer.json and config.json of a
    folder beside it instead of the file."""
    target = tmp_path / "gguf" / f"model-{type_name}.gguf"
    target.parent.mkdir()
    return gguf_export.export(tiny.folder, target, type_name)


def as_stored(model, type_name: str):
    """The model as a GGUF of that type holds it: each matrix quantized and back with gguf.quants, the
    vectors (norms) in f32."""
    import copy

    import gguf
    import torch

    stored = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in stored.parameters():
            if parameter.dim() == 2:
                qtype = gguf_export.tensor_type(type_name, tuple(parameter.shape))
                values = gguf.quants.dequantize(gguf.quants.quantize(parameter.numpy(), qtype), qtype)
                parameter.copy_(torch.from_numpy(values.reshape(parameter.shape)))
    return stored


# Against the weights as the file stores them, every type is exact to 1e-3 (the layout, the names and
# the rotary permutation are right). Against the folder's f32 weights, f16 and bf16 differ by their
# rounding (11 and 8 significant bits) and q8_0 by its blocks of 32 8-bit integers with one f16 scale:
# the stated bounds are fractions of the largest logit (about 4 here).
@pytest.mark.parametrize("type_name, relative", [("f32", 1e-6), ("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 5e-2)])
def test_transformers_loads_the_gguf_with_the_folders_logits(tiny_model, tmp_path, type_name, relative):
    import torch

    path = export_alone(tiny_model, tmp_path, type_name)
    loaded = load_gguf_model(path)
    ids = tiny_model.tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        actual = loaded(**ids).logits
        assert (actual - as_stored(tiny_model.model, type_name)(**ids).logits).abs().max() <= 1e-3
        expected = tiny_model.model(**ids).logits
    assert expected.abs().max() > 2  # logits of this size would show a misplaced weight
    assert (actual - expected).abs().max() <= relative * expected.abs().max()


def test_a_bf16_folder_goes_to_f16_exactly(tiny_model, tmp_path):
    """Models trained in bf16 are read through torch (numpy has no bfloat16); every bf16 value of these
    weights is an f16 value, so the f16 file holds the same model."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    model = copy.deepcopy(tiny_model.model).to(torch.bfloat16)  # Module.to works in place
    folder = tmp_path / "bf16"
    shutil.copytree(tiny_model.folder, folder)
    model.save_pretrained(folder)
    target = tmp_path / "gguf" / "model-f16.gguf"
    target.parent.mkdir()
    gguf_export.export(folder, target, "f16")
    loaded = AutoModelForCausalLM.from_pretrained(target.parent, gguf_file=target.name, dtype=torch.float32)
    # Read back in f32: the rotary frequencies of the bf16 model in memory are rounded to bf16 too.
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tiny_model.tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (loaded.eval()(ids).logits - reference.eval()(ids).logits).abs().max() <= 1e-3


def test_without_the_rotary_permutation_the_logits_differ(tiny_model, tmp_path, monkeypatch):
    """The comparison above can fail: an export that kept transformers' order of q and k rows loads
    with other logits."""
    import torch

    monkeypatch.setattr(gguf_export, "rotary_permute", lambda weights, heads: weights)
    path = export_alone(tiny_model, tmp_path, "f32")
    loaded = load_gguf_model(path)
    ids = tiny_model.tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (loaded(ids).logits - tiny_model.model(ids).logits).abs().max() > 0.1


def test_gguf_tokenizer_metadata_and_splits(tiny_model, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    path = export_alone(tiny_model, tmp_path, "q8_0")
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tokenizer = tiny_model.tokenizer
    rows = config.padded_vocab(len(tokenizer))
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == 7  # MOSTLY_Q8_0
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    known = list(range(len(tokenizer)))
    assert fields["tokenizer.ggml.tokens"][: len(tokenizer)] == tokenizer.convert_ids_to_tokens(known)
    assert len(fields["tokenizer.ggml.tokens"]) == rows == fields["llama.vocab_size"]
    types = fields["tokenizer.ggml.token_type"]
    special = config.SPECIAL_TOKENS + config.CHAT_TOKENS
    special_types = [types[i] for i in tokenizer.convert_tokens_to_ids(list(special))]
    assert special_types == [gguf.TokenType.CONTROL] * len(special)
    assert set(types[len(tokenizer) :]) <= {gguf.TokenType.UNUSED}
    merges = json.loads((tiny_model.folder / "tokenizer.json").read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(merge) for merge in merges]
    assert (
        fields["tokenizer.ggml.bos_token_id"],
        fields["tokenizer.ggml.eos_token_id"],
        fields["tokenizer.ggml.padding_token_id"],
        fields["tokenizer.ggml.eot_token_id"],
    ) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.convert_tokens_to_ids("<|end|>"),
    )
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    assert fields["tokenizer.chat_template"] == util.serving_chat_template(prep.CHAT_TEMPLATE)
    tensor_types = {t.name: t.tensor_type for t in reader.tensors}
    assert tensor_types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert tensor_types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32

    # transformers' GGUF tokenizer splits as llama.cpp does; it leaves the BOS to the caller.
    from_gguf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert [tokenizer.bos_token_id] + from_gguf(text)["input_ids"] == ids, text
        assert from_gguf.decode(ids[1:]) == text
    assert tokenizer("Once")["input_ids"] != tokenizer(" Once")["input_ids"]  # no space is added


def test_util_gguf_writes_every_type_and_refuses_bad_input_in_one_line(root, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, "util.py", "gguf", str(tiny_model.folder), str(out), "--types", "f16,q8_0"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model-f16.gguf", "model-q8_0.gguf"]

    def changed_copy(name: str, file: str, **changes) -> str:
        folder = tmp_path / name
        shutil.copytree(tiny_model.folder, folder)
        (folder / file).write_text(json.dumps({**json.loads((folder / file).read_text()), **changes}))
        return str(folder)

    not_llama = changed_copy("gpt2", "config.json", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    quantized = changed_copy("nf4", "config.json", quantization_config={"load_in_4bit": True})
    scaled = changed_copy("yarn", "config.json", rope_parameters={"rope_type": "yarn", "factor": 4.0})
    sentencepiece = changed_copy("spm", "tokenizer.json", pre_tokenizer={"type": "Metaspace"})
    cases = [
        ([str(tmp_path / "missing")], "missing: no such folder; name a model folder such as"),
        ([not_llama], "GGUF export takes a LLaMA (LlamaForCausalLM)"),
        ([quantized], "the weights are quantized; export the published (merged 16-bit) model"),
        ([scaled], "rope scaling or bias terms, which this exporter does not write"),
        ([sentencepiece], "a BPE model with a Metaspace pre-tokenizer; GGUF export takes"),
        ([str(tiny_model.folder), "--types", "q4_k"], "--types='q4_k': must be none, or GGUF types"),
        ([str(tiny_model.folder), str(tmp_path / "one.gguf"), "--types", "f16,q8_0"], "one file for several"),
        ([str(tiny_model.folder), str(tmp_path / "nowhere")], "nowhere: no such folder; create it"),
    ]
    for arguments, words in cases:
        invalid_types = words.startswith("--types=")  # a bad argument, like a bad GGUF_TYPES: CONFIG
        expected = config.ExitCode.CONFIG if invalid_types else config.ExitCode.FAILED
        assert gguf_export.main(arguments) == expected, arguments
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("gguf: error: ") and words in error[0], error

    # A tokenizer that puts a space before text (an earlier version's) exports, with a warning.
    pre_tokenizer = json.loads((tiny_model.folder / "tokenizer.json").read_text())["pre_tokenizer"]
    spaced = changed_copy("spaced", "tokenizer.json", pre_tokenizer={**pre_tokenizer, "add_prefix_space": True})
    assert gguf_export.main([spaced, str(tmp_path / "spaced.gguf"), "--types", "f16"]) == 0
    output = capsys.readouterr()
    assert "puts a space before text that lacks one and llama.cpp does not" in output.out + output.err
    assert not list(tmp_path.glob("**/*.partial"))
