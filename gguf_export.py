"""Export a model folder of this pipeline to GGUF, the file format of llama.cpp, Ollama and LM Studio:
`python3 util.py gguf FOLDER [OUT] [--types f16,q8_0]`, and `util.py publish` with GGUF_TYPES set.

Written with the `gguf` package (maintained by llama.cpp) the way llama.cpp's convert_hf_to_gguf.py
writes a LLaMA: its tensor names, the rotary permutation of the query and key rows, vectors in f32,
matrices in the asked type (q8_0 where the row length allows 32-value blocks, else f16). The tokenizer
goes in as llama.cpp's `gpt2` byte-level BPE with the `gpt-2` pre-tokenizer, whose split is the one
of tokenizers' ByteLevel; the chat template goes in serving-safe. llama.cpp adds no prefix space to
BPE text, and neither does the tokenizer prep.py trains, so the two give the same tokens. A tokenizer
with `add_prefix_space` (trained by an earlier version) is exported with a warning: there a text that
starts without a space (the first word, or a word right after a special token) comes out as other
tokens.

Exit status: 0 written; 1 bad input or a failure, in one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import config
import util

LLAMA_ARCHITECTURE = "LlamaForCausalLM"
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for the GPT-2 split regex that tokenizers' ByteLevel applies
END_OF_TURN = "<|end|>"  # closes every turn of our chat template: llama.cpp stops generating at it
DEFAULT_TYPES = ("f16",)


class ExportError(Exception):
    """Bad input or a failed write: one line naming the folder or file, what is wrong and what to do."""


@dataclass(frozen=True)
class Tensor:
    """One tensor to write: its GGUF name, where it comes from, and how it is stored."""

    name: str
    file: Path  # the safetensors file that holds it
    source: str  # its name there
    shape: tuple[int, ...]
    stored_as: str  # its safetensors dtype: F32, F16, BF16
    qtype: Any  # gguf.GGMLQuantizationType
    permute_heads: int | None = None  # heads whose rotary halves are interleaved (q and k only)


def file_type(type_name: str):
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[type_name]


def tensor_type(type_name: str, shape: tuple[int, ...]):
    """How convert_hf_to_gguf.py stores a LLaMA tensor: vectors (norms) in f32, matrices in the asked
    type, q8_0 falling back to f16 for rows that are not whole 32-value blocks."""
    import gguf

    kinds = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return kinds.F32
    wanted = {"f32": kinds.F32, "f16": kinds.F16, "bf16": kinds.BF16, "q8_0": kinds.Q8_0}[type_name]
    block_size, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block_size == 0 else kinds.F16


def read_json(path: Path, needed: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"{path}: unreadable ({util.one_line(str(err))}); {needed}") from None


def read_model_config(folder: Path) -> dict[str, Any]:
    """config.json of a 16-bit LlamaForCausalLM, or an ExportError saying what the folder is instead."""
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such folder; name a model folder such as output/train-llama")
    path = folder / "config.json"
    model_config = read_json(path, "a model folder has the config.json that save_pretrained writes")
    architectures = model_config.get("architectures") or []
    if model_config.get("model_type") != "llama" or LLAMA_ARCHITECTURE not in architectures:
        found = ", ".join(architectures) or "no architectures"
        raise ExportError(
            f"{path}: a {model_config.get('model_type')!r} model ({found}); "
            f"GGUF export takes a LLaMA ({LLAMA_ARCHITECTURE})"
        )
    if model_config.get("quantization_config"):
        raise ExportError(f"{path}: the weights are quantized; export the published (merged 16-bit) model")
    rope = model_config.get("rope_parameters") or model_config.get("rope_scaling") or {}
    if (
        rope.get("rope_type", "default") != "default"
        or model_config.get("attention_bias")
        or model_config.get("mlp_bias")
    ):
        raise ExportError(
            f"{path}: rope scaling or bias terms, which this exporter does not write; "
            "use llama.cpp's convert_hf_to_gguf.py"
        )
    return model_config


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise ExportError(f"{folder}: no model.safetensors (or its index); export a folder that save_pretrained wrote")


def plan_tensors(folder: Path, model_config: dict[str, Any], type_name: str) -> list[Tensor]:
    """Every tensor of the folder with its llama.cpp name."""
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model_config["num_hidden_layers"])
    heads = model_config["num_attention_heads"]
    kv_heads = model_config.get("num_key_value_heads") or heads
    planned = []
    for path in safetensors_files(folder):
        with safe_open(path, framework="numpy") as weights:
            for source in weights.keys():
                name = names.get_name(source, try_suffixes=(".weight",))
                if name is None:
                    raise ExportError(f"{path}: tensor {source} has no place in a llama.cpp LLaMA")
                stored = weights.get_slice(source)
                shape = tuple(stored.get_shape())
                permute = (
                    heads if name.endswith("attn_q.weight") else kv_heads if name.endswith("attn_k.weight") else None
                )
                qtype = tensor_type(type_name, shape)
                planned.append(Tensor(name, path, source, shape, stored.get_dtype(), qtype, permute))
    return planned


def rotary_permute(weights, heads: int):
    """llama.cpp's rotary embedding rotates adjacent pairs where transformers rotates the two halves of
    each head: convert_hf_to_gguf.py's LlamaModel.permute reorders the rows of q and k to match."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def tokenizer_json(folder: Path) -> dict[str, Any]:
    """tokenizer.json, checked to be the byte-level BPE (GPT-2 split) that llama.cpp's gpt2 model reads."""
    path = folder / "tokenizer.json"
    data = read_json(path, "GGUF export needs the fast tokenizer's tokenizer.json")
    pre = data.get("pre_tokenizer") or {}
    if (
        (data.get("model") or {}).get("type") != "BPE"
        or pre.get("type") != "ByteLevel"
        or not pre.get("use_regex", True)
        or data.get("normalizer")
    ):
        raise ExportError(
            f"{path}: a {(data.get('model') or {}).get('type')} model with a "
            f"{pre.get('type')} pre-tokenizer; GGUF export takes the byte-level BPE "
            "(ByteLevel pre-tokenizer, no normalizer) that this pipeline trains"
        )
    if pre.get("add_prefix_space"):
        util.log(
            f"gguf: warning: {path} puts a space before text that lacks one and llama.cpp does not: "
            "there the first word of a prompt, and a word right after a special token, become other "
            "tokens unless the prompt has that space (TROUBLESHOOTING.md)"
        )
    return data


def vocabulary(data: dict[str, Any], rows: int, folder: Path) -> tuple[list[str], list[int]]:
    """Tokens and llama.cpp token types for every embedding row: added special tokens are CONTROL,
    rows past the tokenizer (the vocabulary is padded to a multiple of 64) are UNUSED."""
    import gguf

    by_id = {token_id: token for token, token_id in data["model"]["vocab"].items()}
    special = set()
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        if added.get("special"):
            special.add(added["id"])
    if max(by_id) >= rows:
        raise ExportError(
            f"{folder}: the tokenizer has token id {max(by_id)} but the model only {rows} "
            "embedding rows; export a folder whose tokenizer and model were saved together"
        )
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(rows)]
    types = [
        gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED
        for i in range(rows)
    ]
    return tokens, [int(t) for t in types]


def add_tokenizer(writer, folder: Path, rows: int) -> None:
    import gguf

    data = tokenizer_json(folder)
    tokens, types = vocabulary(data, rows, folder)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # What llama.cpp does to BPE text anyway; said outright, readers of the file (transformers) then
    # do not strip a space that decoding should keep.
    writer.add_add_space_prefix(False)
    # Merges, special token ids, add_bos and the chat template. Its parser warns about the `<s> $A <s> $B`
    # pair template, which a GGUF has no place for: only warnings from it are silenced.
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    special = gguf.SpecialVocab(folder, load_merges=True)
    if isinstance(special.chat_template, str):
        special.chat_template = util.serving_chat_template(special.chat_template)
    elif special.chat_template:
        special.chat_template = [
            {**entry, "template": util.serving_chat_template(entry["template"])} for entry in special.chat_template
        ]
    special.add_special_token.setdefault("eos", False)  # said outright: llama.cpp's default varies by model
    special.add_to_gguf(writer, quiet=True)
    if END_OF_TURN in tokens:
        writer.add_eot_token_id(tokens.index(END_OF_TURN))


def add_hyperparameters(writer, model_config: dict[str, Any], name: str, type_name: str) -> None:
    import gguf

    hidden, heads = model_config["hidden_size"], model_config["num_attention_heads"]
    head_dim = model_config.get("head_dim") or hidden // heads
    rope = model_config.get("rope_parameters") or {}
    writer.add_name(name)
    writer.add_file_type(file_type(type_name))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(model_config["vocab_size"])
    writer.add_context_length(model_config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(model_config["num_hidden_layers"])
    writer.add_feed_forward_length(model_config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(model_config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", model_config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(model_config["rms_norm_eps"])
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def add_tensor_infos(writer, planned: list[Tensor]) -> None:
    """Names, shapes and types go in the header, before any data: the data can then be written one
    tensor at a time (a model never sits in memory whole)."""
    import gguf
    import numpy as np

    for tensor in planned:
        nbytes = math.prod(gguf.quant_shape_to_byte_shape(tensor.shape, tensor.qtype))
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), nbytes, raw_dtype=tensor.qtype)


def write_tensor_data(writer, planned: list[Tensor]) -> None:
    """Each tensor in the order of add_tensor_infos, read, permuted and converted as it is written."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    # numpy has no bfloat16: such weights are read through torch (a slower import, so only then).
    framework = "pt" if any(t.stored_as == "BF16" for t in planned) else "numpy"
    with contextlib.ExitStack() as stack:
        files = {path: stack.enter_context(safe_open(path, framework=framework)) for path in {t.file for t in planned}}
        for tensor in planned:
            weights = files[tensor.file].get_tensor(tensor.source)
            weights = weights.float().numpy() if framework == "pt" else weights.astype(np.float32)
            if tensor.permute_heads:
                weights = rotary_permute(weights, tensor.permute_heads)
            writer.write_tensor_data(gguf.quants.quantize(np.ascontiguousarray(weights), tensor.qtype))


def gguf_name(model_name: str, type_name: str) -> str:
    return f"{model_name}-{type_name}.gguf"


def export(folder: Path, target: Path, type_name: str, name: str | None = None) -> Path:
    """Write `folder` as one GGUF file at `target` (through a hidden temporary file beside it)."""
    import gguf

    model_config = read_model_config(folder)
    planned = plan_tensors(folder, model_config, type_name)
    partial = target.with_name(f".{target.name}.partial")
    writer = gguf.GGUFWriter(partial, "llama")
    try:
        add_hyperparameters(writer, model_config, name or folder.name, type_name)
        add_tokenizer(writer, folder, model_config["vocab_size"])
        add_tensor_infos(writer, planned)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        write_tensor_data(writer, planned)
        writer.close()
        os.replace(partial, target)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    return target


def output_path(folder: Path, out: Path | None, type_name: str, several: bool) -> Path:
    """OUT as a .gguf file (one type), else the folder the files go in (default: the model folder)."""
    if out is not None and out.suffix == ".gguf":
        if several:
            raise ExportError(f"{out}: one file for several types; name a folder for OUT instead")
        return out
    if out is not None and not out.is_dir():
        raise ExportError(f"{out}: no such folder; create it, or name a .gguf file")
    return (out or folder) / gguf_name(folder.resolve().name, type_name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="util.py gguf", description="Write a LLaMA model folder as GGUF files for llama.cpp, Ollama and LM Studio."
    )
    parser.add_argument("folder", type=Path, help="a model folder, such as output/train-llama-it")
    parser.add_argument(
        "out", type=Path, nargs="?", help="a folder for the files (default: FOLDER), or a .gguf file for one type"
    )
    parser.add_argument(
        "--types",
        default=",".join(DEFAULT_TYPES),
        help=f"comma-separated, from {', '.join(config.GGUF_TYPES)} (default %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        types = config.parse_gguf_types(args.types)
        if not types:
            raise ValueError("at least one type")
    except ValueError as err:
        print(f"gguf: error: --types={args.types!r}: must be {err}", file=sys.stderr)
        return config.ExitCode.CONFIG
    try:
        for type_name in types:
            target = output_path(args.folder, args.out, type_name, len(types) > 1)
            export(args.folder, target, type_name, name=args.folder.resolve().name)
            util.log(f"gguf: wrote {target} ({util.byte_text(target.stat().st_size)}, {type_name})")
    except ExportError as err:
        print(f"gguf: error: {err}", file=sys.stderr)
        return config.ExitCode.FAILED
    except OSError as err:
        print(
            f"gguf: error: {err.filename or args.out or args.folder}: {err.strerror or err}; "
            "free space or fix the permissions, then run it again",
            file=sys.stderr,
        )
        return config.ExitCode.FAILED
    return config.ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
