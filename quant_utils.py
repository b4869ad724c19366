"""4-bit NF4 quantization, dequantization and the LoRA merge of the pipeline (bitsandbytes + peft).

What the other stages call:
- `is_4bit_checkpoint(path) -> bool`: a local model folder whose config or safetensors hold bitsandbytes
  4-bit weights.
- `model_folder(source, token=None) -> Path`: a local folder as is, or a Hub id downloaded (config and
  weights only).
- `load_causal_lm_16bit(source, dtype=None, token=None)`: a causal LM with plain 16/32-bit weights. A 4-bit
  checkpoint is dequantized weight by weight from its saved quant state (bf16 unless `dtype` says
  otherwise); a weight that cannot be rebuilt raises `QuantizationError` naming it, never zeros or a
  random init. The model's config carries no `quantization_config`.
- `is_4bit_model(model) -> bool`: bitsandbytes 4-bit layers or a 4-bit quantization config inside.
- `load_for_training(model_dir, use_quant, dtype, device_map=None, gradient_checkpointing=True, trained_tokens=None)`
  -> (model, trainable_params, total_params): with `use_quant`, real NF4 quantization on load (double
  quantization, bf16 compute) plus LoRA (config.LORA_*), and the `trained_tokens`' embedding and LM-head
  rows trained with it; otherwise the plain model in `dtype`.
- `merge_lora_to_16bit(peft_model, out_dir, tokenizer=None) -> PreTrainedModel`: dequantizes the NF4 base
  the adapter was trained on to bf16, merges the adapter into it and saves a plain bf16 safetensors model
  (no peft or bitsandbytes needed to load it).
- `save_adapter(peft_model, out_dir)`: the LoRA adapter alone (adapter_config.json + safetensors).
Also public: `QuantizationError` (what the loaders raise, a ValueError), `nf4_quantization_config()`,
`dequantized_base_model(peft_model, dtype)` (the base the adapter saw, as a plain model) and
`check_plain_model(model, source)`.

Both the checkpoint loader and the merge rebuild 16-bit weights through one function
(`dequantize_state_dict`), so the checks on quant states (every part present, sizes consistent with the
weight's shape, finite result) guard both.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import util

# Suffixes bitsandbytes gives the parts of a 4-bit weight's quant state in a state dict / safetensors file.
QUANT_STATE_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
PACKED_STATE_TAG = "bitsandbytes__"  # + "nf4" or "fp4": a uint8 tensor holding the JSON of the minor fields
PACKED_STATE_PREFIX = "quant_state." + PACKED_STATE_TAG
# torch asks for an explicit choice; the non-reentrant variant also works with frozen inputs (LoRA).
CHECKPOINTING_KWARGS = {"use_reentrant": False}
_WEIGHT_FILE_PATTERNS = ["*.json", "*.safetensors", "pytorch_model*.bin"]


class QuantizationError(ValueError):
    """A 4-bit checkpoint or model that cannot be turned into a correct 16-bit one."""


def _quantization_config(folder: Path) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        return {}
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise QuantizationError(f"{config_file}: not valid JSON ({err}); fix or re-export the model") from None
    quant = config.get("quantization_config") or {}
    return quant if isinstance(quant, dict) else {}


def _config_says_4bit(quant: dict[str, Any]) -> bool:
    if not quant:
        return False
    four_bit = bool(quant.get("load_in_4bit") or quant.get("_load_in_4bit"))
    return four_bit and quant.get("quant_method", "bitsandbytes") == "bitsandbytes"


def _config_says_8bit(quant: dict[str, Any]) -> bool:
    return bool(quant.get("load_in_8bit") or quant.get("_load_in_8bit"))


def _is_quant_state_key(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last in QUANT_STATE_PARTS or last.startswith(PACKED_STATE_TAG)


def _safetensors_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    keys: list[str] = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:  # reads the header only
            keys.extend(handle.keys())
    return keys


def is_4bit_checkpoint(path: str | Path) -> bool:
    """True if the local model folder holds bitsandbytes 4-bit weights: its config says so, or its
    safetensors files carry 4-bit quant-state tensors (a config may have lost the quantization_config)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a model folder; pass a local folder (see model_folder() for Hub ids)")
    if _config_says_4bit(_quantization_config(folder)):
        return True
    return any(_is_quant_state_key(key) for key in _safetensors_keys(folder))


def model_folder(source: str | Path, token: str | None = None) -> Path:
    """A local folder as is; anything else is a Hub id whose config and weights are downloaded."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    # The endpoint (HF_ENDPOINT) and offline mode are read by huggingface_hub itself.
    return Path(snapshot_download(str(source), token=token, allow_patterns=_WEIGHT_FILE_PATTERNS))


def _read_safetensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise QuantizationError(
            f"{folder}: a 4-bit checkpoint needs safetensors weights, found none; "
            "re-save the model with save_pretrained(safe_serialization=True)"
        )
    tensors: dict[str, Any] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def _split_quantized(state_dict: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """({weight name: {part suffix: tensor}} for every weight with quant-state parts, all other tensors)."""
    parts: dict[str, dict[str, Any]] = {}
    plain: dict[str, Any] = {}
    for key, tensor in state_dict.items():
        if not _is_quant_state_key(key):
            plain[key] = tensor
            continue
        # "x.weight.absmax" -> ("x.weight", "absmax"); "x.weight.quant_state.bitsandbytes__nf4" likewise
        marker = ".quant_state." if ".quant_state." in key else "." + key.rsplit(".", 1)[-1]
        weight_name, _, _ = key.rpartition(marker)
        parts.setdefault(weight_name, {})[key[len(weight_name) + 1 :]] = tensor
    return parts, plain


def _quant_state_for(weight_name: str, packed: Any, parts: dict[str, Any]):
    """bitsandbytes' QuantState of one weight, after checking that every part is there."""
    from bitsandbytes.functional import QuantState

    packed_keys = [k for k in parts if k.startswith(PACKED_STATE_PREFIX)]
    missing = [p for p in ("absmax", "quant_map") if p not in parts] + (
        [] if packed_keys else [PACKED_STATE_PREFIX + "nf4"]
    )
    if packed is None:
        missing.insert(0, "(the packed 4-bit data itself)")
    if missing:
        raise QuantizationError(
            f"{weight_name}: 4-bit quant state incomplete, missing {', '.join(missing)}; "
            "the checkpoint is damaged, re-export it from the original model"
        )
    try:
        state = QuantState.from_dict(dict(parts), device=packed.device)
    except (
        ValueError,
        KeyError,
        AssertionError,
        TypeError,
        json.JSONDecodeError,
        UnicodeDecodeError,
        AttributeError,
    ) as err:
        raise QuantizationError(
            f"{weight_name}: unreadable 4-bit quant state ({type(err).__name__}: {err}); "
            "the checkpoint is damaged, re-export it from the original model"
        ) from None
    return state


def _check_quant_sizes(weight_name: str, packed: Any, state: Any, expected_shape: tuple[int, ...] | None) -> None:
    """The shape in the quant state must be the model's and agree with the data and absmax sizes;
    bitsandbytes itself would read past the data or silently produce garbage otherwise."""
    shape = tuple(state.shape) if state.shape is not None else None
    if shape is None or (expected_shape is not None and shape != tuple(expected_shape)):
        raise QuantizationError(
            f"{weight_name}: 4-bit quant state has shape {shape}, the model needs "
            f"{expected_shape}; the checkpoint does not match its config.json"
        )
    count = math.prod(shape)
    packed_bytes = packed.numel() * packed.element_size()
    if packed_bytes != (count + 1) // 2:
        raise QuantizationError(
            f"{weight_name}: {packed_bytes} bytes of 4-bit data for {count} values "
            f"(needs {(count + 1) // 2}); the checkpoint is damaged, re-export it"
        )
    blocks = -(-count // state.blocksize)
    if state.absmax.numel() != blocks:
        raise QuantizationError(
            f"{weight_name}: absmax has {state.absmax.numel()} scales for {blocks} blocks "
            "of the weight; the checkpoint is damaged, re-export it"
        )


def dequantize_state_dict(
    state_dict: dict[str, Any], expected_shapes: dict[str, tuple[int, ...]], dtype
) -> dict[str, Any]:
    """A state dict whose 4-bit weights (packed data + quant-state parts, as bitsandbytes saves them)
    are replaced by dequantized `dtype` tensors; other floating tensors are cast to `dtype`.
    Raises QuantizationError naming the first weight that cannot be rebuilt."""
    import torch
    from bitsandbytes.functional import dequantize_4bit

    parts_by_weight, plain = _split_quantized(state_dict)
    out: dict[str, Any] = {}
    for weight_name, parts in parts_by_weight.items():
        packed = plain.pop(weight_name, None)
        state = _quant_state_for(weight_name, packed, parts)
        _check_quant_sizes(weight_name, packed, state, expected_shapes.get(weight_name))
        out[weight_name] = dequantize_4bit(packed, state).to(dtype)
    for name, tensor in plain.items():
        if tensor.dtype == torch.uint8:
            # packed 4-bit data whose quant state is gone: exactly the case that used to become zeros
            raise QuantizationError(
                f"{name}: uint8 data {tuple(tensor.shape)} without a 4-bit quant state; "
                "the checkpoint is damaged, re-export it from the original model"
            )
        out[name] = tensor.to(dtype) if torch.is_floating_point(tensor) else tensor
    for name, tensor in out.items():
        if not torch.isfinite(tensor).all():
            raise QuantizationError(f"{name}: non-finite values after dequantization; the checkpoint is damaged")
    return out


def _plain_config(folder: Path):
    """The folder's model config with the quantization settings removed: the model we build is 16-bit."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory, no initialization
        skeleton = AutoModelForCausalLM.from_config(config)
    return {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}


def _raise_on_incomplete_load(source: Any, info: dict[str, Any]) -> None:
    """from_pretrained initializes missing weights at random and only warns: for us that is an error."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [str(item[0]) if isinstance(item, tuple) else str(item) for item in info.get("mismatched_keys") or []]
    if missing:
        raise QuantizationError(
            f"{source}: weights missing from the checkpoint: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; the checkpoint is incomplete, re-export it"
        )
    if mismatched:
        raise QuantizationError(
            f"{source}: weights of the wrong shape for config.json: {', '.join(mismatched[:5])}; "
            "the checkpoint does not match its config, re-export it"
        )


def check_plain_model(model, source: Any) -> None:
    """No bitsandbytes layer or parameter, no quantization config, every weight finite."""
    import torch

    if is_4bit_model(model):
        raise QuantizationError(f"{source}: 4-bit layers remain after dequantization; report this as a bug")
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if torch.is_floating_point(tensor) and not torch.isfinite(tensor).all():
            raise QuantizationError(f"{source}: {name} has non-finite values; the checkpoint is damaged")


def _load_dequantized(folder: Path, dtype):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = _plain_config(folder)
    state_dict = dequantize_state_dict(_read_safetensors(folder), _expected_shapes(config), dtype)
    # The concrete class, not the Auto one: only it accepts weights given as a state dict.
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model, info = model_class.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=dtype, output_loading_info=True
    )
    _raise_on_incomplete_load(folder, info)
    return model


def load_causal_lm_16bit(source: str | Path, dtype=None, token: str | None = None):
    """A causal LM with plain weights from a local folder or Hub id. A 4-bit checkpoint is dequantized
    (to `dtype`, default bf16); a 16-bit one is loaded in `dtype` (default: its own). Missing, damaged
    or misshaped weights raise QuantizationError naming them instead of being zero- or random-filled."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = model_folder(source, token)
    if _config_says_8bit(_quantization_config(folder)):
        raise QuantizationError(
            f"{source}: an 8-bit bitsandbytes checkpoint; only 4-bit (NF4/FP4) or 16-bit "
            "sources are supported, re-export it in 16-bit"
        )
    if is_4bit_checkpoint(folder):
        model = _load_dequantized(folder, dtype or torch.bfloat16)
        util.log(f"dequantized the 4-bit checkpoint {source} to {dtype or torch.bfloat16}")
    else:
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto", output_loading_info=True)
        _raise_on_incomplete_load(folder, info)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    check_plain_model(model, source)
    return model


def is_4bit_model(model) -> bool:
    """True if any bitsandbytes 4-bit layer or parameter is inside, or the config declares 4-bit."""
    # By class name: bitsandbytes need not be installed where a published model is checked; peft's
    # LoRA wrapper of a 4-bit layer is also called Linear4bit.
    modules = list(model.modules())
    if any(type(m).__name__ == "Linear4bit" for m in modules):
        return True
    if any(type(p).__name__ == "Params4bit" for p in model.parameters()):
        return True
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict()
    return _config_says_4bit(quant or {})


def nf4_quantization_config():
    """QLoRA's settings: NF4 with double quantization (the scales quantized too), bf16 compute."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _device_map_for_quant(device_map):
    """bitsandbytes quantizes while loading, onto the device the map names. Under DeepSpeed each rank
    holds a whole quantized copy on its own GPU, so "auto" (which spreads one copy over all GPUs) is wrong."""
    import torch

    if device_map == "auto":
        raise ValueError(
            'device_map="auto" splits one model over every GPU; under DeepSpeed pass '
            '{"": local_rank} (or None to use this process\'s GPU)'
        )
    if device_map is not None or not torch.cuda.is_available():
        return device_map
    return {"": util.local_rank()}


def _keep_4bit_layers_differentiable(model) -> None:
    """bitsandbytes 0.50 repacks a 4-bit weight for its CPU inference kernel at the layer's first forward
    in eval mode without gradients (train.py's sanity check is one), and from then on runs that kernel in
    every forward, training too. It has no backward: no gradient would pass the frozen base layers to
    the adapters below them until a checkpoint save unpacked the weights again."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _attach_lora(model, gradient_checkpointing: bool, trained_tokens: list[int]):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    import config

    # Freezes the 4-bit base, upcasts norms/embeddings to fp32 for stable training and, with
    # checkpointing, makes the inputs require grad so that gradients reach the adapters.
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS
    )
    # Rows of tokens the frozen base never learned (the chat markers that instruction tuning adds)
    # train as part of the adapter, in the input embedding and in the LM head: without them the
    # model cannot learn to emit <|end|>, and its answers never stop.
    rows = {"embed_tokens": trained_tokens, "lm_head": trained_tokens} if trained_tokens else None
    lora = LoraConfig(
        r=config.LORA_R,
        lora_alpha=config.LORA_ALPHA,
        lora_dropout=config.LORA_DROPOUT,
        bias="none",
        target_modules=list(config.LORA_TARGETS),
        task_type="CAUSAL_LM",
        trainable_token_indices=rows,
    )
    peft_model = get_peft_model(model, lora)
    if rows:
        # TRL's fused LM head reads `lm_head.bias`, and peft 0.21's wrapper of the head passes only
        # `weight` through to the wrapped layer; a LLaMA head has no bias.
        head = peft_model.get_output_embeddings()
        head.bias = head.token_adapter.base_layer.bias
    return peft_model


def load_for_training(
    model_dir: Path,
    use_quant: bool,
    dtype,
    device_map=None,
    gradient_checkpointing: bool = True,
    trained_tokens: list[int] | None = None,
):
    """(model, trainable_params, total_params) for training the 16-bit model in `model_dir`.

    use_quant: quantized to NF4 while loading (real bitsandbytes quantization) onto `device_map`
    (default: this process's GPU, {"": local rank}; None on CPU), then LoRA adapters (config.LORA_*) and
    the embedding and LM-head rows of `trained_tokens` are the only trainable weights. Otherwise the
    plain model in `dtype` on the CPU, all weights trainable (`device_map` is not used: DeepSpeed
    places the model)."""
    from transformers import AutoModelForCausalLM

    if use_quant:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            quantization_config=nf4_quantization_config(),
            dtype=dtype,
            device_map=_device_map_for_quant(device_map),
        )
        if not is_4bit_model(model):
            raise QuantizationError(
                f"{model_dir}: loading with 4-bit quantization left no 4-bit layer; "
                "check that bitsandbytes supports this device"
            )
        _keep_4bit_layers_differentiable(model)
        model = _attach_lora(model, gradient_checkpointing, trained_tokens or [])
        trainable, total = model.get_nb_trainable_parameters()  # counts each packed 4-bit byte as two weights
    else:
        model = load_causal_lm_16bit(model_dir, dtype=dtype)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    if gradient_checkpointing:
        model.config.use_cache = False  # the cache is useless while training and conflicts with checkpointing
    kind = "LoRA adapters on an NF4 base" if use_quant else "all weights"
    util.log(f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%, {kind})")
    return model, trainable, total


def save_adapter(peft_model, out_dir: Path) -> None:
    """The LoRA adapter alone: adapter_config.json + adapter_model.safetensors."""
    # Never "auto" for the embedding layers: it may ask the Hub about the base model's vocabulary.
    peft_model.save_pretrained(str(out_dir), safe_serialization=True, save_embedding_layers=False)


def _base_state_dict(peft_model) -> dict[str, Any]:
    """The peft model's base weights (4-bit ones with their quant states) under plain model names."""
    state: dict[str, Any] = {}
    for key, tensor in peft_model.get_base_model().state_dict().items():
        parts = key.split(".")
        if any(part.startswith(("lora_", "trainable_tokens_")) for part in parts):
            continue  # adapter weights travel through the saved adapter instead
        state[".".join(p for p in parts if p not in ("base_layer", "token_adapter"))] = tensor.detach()
    return state


def dequantized_base_model(peft_model, dtype):
    """A fresh plain model holding the peft model's base weights, 4-bit ones dequantized to `dtype`
    exactly as the 4-bit layers dequantize them in their forward pass."""
    import copy

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    base = peft_model.get_base_model()
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state_dict = dequantize_state_dict(_base_state_dict(peft_model), _expected_shapes(config), dtype)
    state_dict = {name: tensor.cpu() for name, tensor in state_dict.items()}
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model, info = model_class.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=dtype, output_loading_info=True
    )
    _raise_on_incomplete_load("the trained model's base", info)
    model.generation_config = copy.deepcopy(base.generation_config)
    return model


def merge_lora_to_16bit(peft_model, out_dir: Path, tokenizer=None):
    """Merge the trained LoRA adapter into a bf16 copy of its base and save that plain model to
    `out_dir` (safetensors, no quantization_config); returns the merged model.

    Which base: the adapter was trained against the NF4 base, i.e. against the weights
    dequantize(quantize(W)), not the original W. Merging onto the original 16-bit W would shift every
    targeted layer by the quantization error (about 9% of the weight norm) that the adapter never saw
    and partly learned to compensate, so the published model would not be the model we trained and
    evaluated. Merging into the 4-bit base directly re-quantizes W + BA and loses most of the update.
    So: dequantize the NF4 base to bf16 (the values the 4-bit layers compute with), merge there."""
    import torch
    from peft import PeftModel

    # The merge runs in fp32 and the sum W + scale*BA is rounded to bf16 once: merging in bf16 would
    # round the update first and the sum again. The dequantized W is exact in fp32 already.
    base = dequantized_base_model(peft_model, torch.bfloat16).to(torch.float32)
    with tempfile.TemporaryDirectory(prefix="adapter-") as adapter_dir:
        save_adapter(peft_model, Path(adapter_dir))
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload(safe_merge=True)
    merged = merged.to(torch.bfloat16)
    check_plain_model(merged, "the merged model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    util.log(f"merged the LoRA adapter into the dequantized bf16 base; saved to {out_dir}")
    return merged
