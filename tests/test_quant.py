"""Guards quant_utils: real NF4 quantization, dequantization that never invents weights, 4-bit layers that
stay differentiable after an eval forward, and a LoRA merge (with trained rows for chosen tokens, such as
the chat markers) whose published bf16 model computes what the adapter-on-4-bit model computed, loadable
without peft/bnb."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import quant_utils
from quant_utils import QuantizationError

# NF4 maps each block of 64 weights to 16 levels scaled by the block's absmax; on normally distributed
# weights the round trip error is ~9% of the weight norm (0.092 measured). bf16 rounding alone is
# ~2^-9 = 0.2%, so a relative error above 5% proves the weights really went through 4 bits.
NF4_MAX_ERROR, NF4_MIN_ERROR = 0.10, 0.05
# bf16 keeps 8 significant bits: eps = 2^-8. The merged model rounds W + scale*BA to bf16 once and computes
# every layer (norms, lm_head, the LoRA path included) in bf16, where the adapter model kept norms,
# embeddings, lm_head and the LoRA path in fp32. Those roundings accumulate over the layers to a few eps of
# the logit scale: allow 4 eps (measured 1.3 to 1.5 eps on CPU and on an H200). Merging onto the
# original 16-bit weights instead of the dequantized NF4 ones misses by ~20 eps, dropping the adapter
# by ~300 eps: both fail this bound.
BF16_EPS = 2.0**-8
LOGIT_TOLERANCE_IN_EPS = 4
WEIGHT = "model.layers.1.self_attn.v_proj.weight"


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(torch.bfloat16)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A bf16 tiny LLaMA folder and the same model quantized to NF4 and saved by save_pretrained."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("quant")
    _tiny_llama().save_pretrained(root / "bf16")
    quantized = AutoModelForCausalLM.from_pretrained(
        root / "bf16", dtype=torch.bfloat16, quantization_config=quant_utils.nf4_quantization_config()
    )
    quantized.save_pretrained(root / "nf4")
    return {"bf16": root / "bf16", "nf4": root / "nf4", "root": root}


def _quantized_weight_errors(model, reference_state: dict) -> dict[str, float]:
    """Relative error ||W' - W|| / ||W|| of every decoder projection (the weights NF4 quantizes)."""
    state = model.state_dict()
    return {
        name: ((state[name].float() - ref.float()).norm() / ref.float().norm()).item()
        for name, ref in reference_state.items()
        if name.endswith("proj.weight")
    }


def _damaged_copy(folders, name: str, damage) -> Path:
    target = folders["root"] / f"damaged-{name}"
    shutil.copytree(folders["nf4"], target)
    weights = target / "model.safetensors"
    tensors = load_file(weights)
    damage(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    return target


def test_detects_4bit_folders_and_models(folders, tmp_path):
    assert not quant_utils.is_4bit_checkpoint(folders["bf16"])
    assert quant_utils.is_4bit_checkpoint(folders["nf4"])
    # A config that lost its quantization_config: the quant-state tensors still give it away.
    stripped = tmp_path / "stripped"
    shutil.copytree(folders["nf4"], stripped)
    config = json.loads((stripped / "config.json").read_text())
    del config["quantization_config"]
    (stripped / "config.json").write_text(json.dumps(config))
    assert quant_utils.is_4bit_checkpoint(stripped)

    quantized, trainable, total = quant_utils.load_for_training(folders["bf16"], True, torch.bfloat16)
    assert quant_utils.is_4bit_model(quantized)
    assert 0 < trainable < total
    plain, trainable, total = quant_utils.load_for_training(folders["bf16"], False, torch.bfloat16)
    assert not quant_utils.is_4bit_model(plain)
    assert trainable == total == sum(p.numel() for p in _tiny_llama().parameters())


def test_4bit_checkpoint_loads_as_dequantized_bf16(folders):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(folders["bf16"]).state_dict()
    model = quant_utils.load_causal_lm_16bit(folders["nf4"])

    assert not quant_utils.is_4bit_model(model)
    assert not hasattr(model.config, "quantization_config")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    errors = _quantized_weight_errors(model, original)
    assert len(errors) == 2 * 7
    assert all(NF4_MIN_ERROR < e <= NF4_MAX_ERROR for e in errors.values()), errors
    # Embeddings, norms and lm_head are not quantized: they must come back bit for bit.
    state = model.state_dict()
    assert all(torch.equal(state[n], w) for n, w in original.items() if not n.endswith("proj.weight"))


def test_round_trips_in_both_directions(folders, tmp_path):
    """16 -> 4 -> 16 loses NF4's error once; 4 -> 16 -> 4 -> 16 must not lose it a second time, because
    dequantized NF4 values sit on the NF4 grid (only bf16 and double-quant rounding of the scales remain)."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(folders["bf16"]).state_dict()
    once = quant_utils.load_causal_lm_16bit(folders["nf4"])
    once.save_pretrained(tmp_path / "once-bf16")
    requantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "once-bf16", dtype=torch.bfloat16, quantization_config=quant_utils.nf4_quantization_config()
    )
    requantized.save_pretrained(tmp_path / "twice-nf4")
    twice = quant_utils.load_causal_lm_16bit(tmp_path / "twice-nf4")

    versus_original = _quantized_weight_errors(twice, original)
    assert all(NF4_MIN_ERROR < e <= NF4_MAX_ERROR for e in versus_original.values()), versus_original
    versus_once = _quantized_weight_errors(twice, once.state_dict())
    assert max(versus_once.values()) < 0.01, versus_once


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda t: t.pop(f"{WEIGHT}.absmax"), "missing absmax"),
        (lambda t: t.pop(WEIGHT), "packed 4-bit data"),
        (
            lambda t: t.update({f"{WEIGHT}.quant_state.bitsandbytes__nf4": torch.zeros(9, dtype=torch.uint8)}),
            "unreadable 4-bit quant state",
        ),
        (lambda t: t.update({WEIGHT: t[WEIGHT][:-4]}), "bytes of 4-bit data"),
        (lambda t: t.update({f"{WEIGHT}.nested_absmax": torch.tensor([float("nan")])}), "non-finite"),
    ],
    ids=["no-absmax", "no-data", "corrupt-state", "truncated", "nan-scale"],
)
def test_damaged_4bit_checkpoint_names_the_weight(folders, damage, expected):
    damaged = _damaged_copy(folders, expected.replace(" ", "-"), damage)
    with pytest.raises(QuantizationError, match=f"^{WEIGHT.replace('.', '[.]')}: .*{expected}"):
        quant_utils.load_causal_lm_16bit(damaged)


def test_missing_plain_weight_is_an_error_not_a_random_init(folders):
    damaged = _damaged_copy(folders, "no-norm", lambda t: t.pop("model.layers.1.input_layernorm.weight"))
    with pytest.raises(QuantizationError, match="missing from the checkpoint: model.layers.1.input_layernorm.weight"):
        quant_utils.load_causal_lm_16bit(damaged)


# Run in a fresh interpreter where peft and bitsandbytes cannot be imported: a None entry in sys.modules
# makes both `import` and importlib.util.find_spec (transformers' availability check) fail for them.
RELOAD_WITHOUT_PEFT = """
import sys
sys.modules.update(peft=None, bitsandbytes=None)
import torch
from transformers import AutoModelForCausalLM
model_dir, ids_file, out_file = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(model_dir)
assert "peft" not in str(type(model)) and sys.modules["bitsandbytes"] is None
with torch.no_grad():
    torch.save(model(input_ids=torch.load(ids_file)).logits.float(), out_file)
"""


def _train_a_few_steps(model, ids) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def _adapter_gradients(model, ids) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same LoRA dropout masks at every call
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_an_eval_forward_leaves_the_training_gradients_whole(folders):
    # On a CPU with AVX512-BF16, bitsandbytes would switch a 4-bit layer to its inference kernel (no
    # backward) at an eval forward without gradients, like train.py's sanity check: the gradients of the
    # lower layer's adapters would then lose what passes through the upper layer's 4-bit weights.
    model, _, _ = quant_utils.load_for_training(folders["bf16"], True, torch.bfloat16)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2)).to(model.device)
    before = _adapter_gradients(model, ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = _adapter_gradients(model, ids)
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)
    assert any(name.startswith("base_model.model.model.layers.0.") and g.abs().sum() > 0 for name, g in after.items())


@pytest.mark.parametrize("trained_tokens", [[], [250, 251, 252]], ids=["lora", "lora-and-token-rows"])
def test_qlora_merge_matches_the_adapter_model_without_peft(folders, tmp_path, trained_tokens):
    model, _, _ = quant_utils.load_for_training(folders["bf16"], True, torch.bfloat16, trained_tokens=trained_tokens)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    ids[:, 4:7] = torch.tensor([250, 251, 252])  # each trained token in every row, as input and as label
    losses = _train_a_few_steps(model, ids.to(model.device))  # on a GPU machine the 4-bit model is on the GPU
    assert losses[-1] < losses[0] - 0.3, losses
    with torch.no_grad():
        adapter_logits = model(input_ids=ids.to(model.device)).logits.float().cpu()
        untrained_logits = quant_utils.dequantized_base_model(model, torch.bfloat16)(input_ids=ids).logits.float()

    quant_utils.merge_lora_to_16bit(model, tmp_path / "merged")
    quant_utils.save_adapter(model, tmp_path / "adapter")
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run(
        [
            sys.executable,
            "-c",
            RELOAD_WITHOUT_PEFT,
            str(tmp_path / "merged"),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "logits.pt"),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    merged_logits = torch.load(tmp_path / "logits.pt")

    tolerance = LOGIT_TOLERANCE_IN_EPS * BF16_EPS * adapter_logits.abs().max().item()
    assert (merged_logits - adapter_logits).abs().max().item() <= tolerance
    # The adapter changed the model far beyond the tolerance, so matching is not trivially true.
    assert (untrained_logits - adapter_logits).abs().max().item() > 20 * tolerance
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    # The trained tokens' rows (and only theirs) moved, in the input embedding and in the LM head.
    merged, original = (
        load_file(tmp_path / "merged" / "model.safetensors"),
        load_file(folders["bf16"] / "model.safetensors"),
    )
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        moved = sorted((merged[name] != original[name]).any(dim=1).nonzero().flatten().tolist())
        assert moved == trained_tokens, (name, moved)
