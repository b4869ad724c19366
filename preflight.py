"""Checks before any GPU time is spent: `python3 preflight.py`.

Every check runs (none stops the others) and prints one numbered line, `✓` passed, `✗` failed or
`⊘` skipped (with why), with `⚠` warnings below it that do not fail the run. Exit status: 0 when no
check failed, 1 when one did, 2 when the configuration itself is invalid (config.py's convention:
nothing else can be checked without settings).

The checks: the configuration; HF_TOKEN accepted by the Hub (when publishing there or on a Space);
GPU memory (or, on CPU, RAM) against an estimate for this model, batch and mode
(`estimate_training_memory`, importable and unit-tested, with `advice_to_fit` for what would fit);
OUTPUT_DIR and WORK_DIR writable; disk space for what the run writes; 4-bit quantization (with
USE_QUANT); the input model and tokenizer (runs after the first: files, a LLaMA config that fits
MAX_LENGTH, whole safetensors weights); the stage's dataset and its first rows; and sanity warnings
on the training settings. A token inside HF_ENDPOINT is never printed.

Heavy modules are imported inside the checks that need them: torch for the GPU check,
bitsandbytes only with USE_QUANT, datasets only for a dataset on the Hub.
"""
from __future__ import annotations

import itertools
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import config
import util

GIB = 2**30
PASS, FAIL, SKIP = "pass", "fail", "skip"
SYMBOLS = {PASS: "✓", FAIL: "✗", SKIP: "⊘"}
ROWS_TO_READ = 5


@dataclass
class CheckResult:
    status: str
    detail: str
    notes: list[str] = field(default_factory=list)  # indented lines under the verdict (advice, problems)
    warnings: list[str] = field(default_factory=list)


def passed(detail: str, warnings: list[str] | None = None, notes: list[str] | None = None) -> CheckResult:
    return CheckResult(PASS, detail, notes or [], warnings or [])


def failed(detail: str, notes: list[str] | None = None, warnings: list[str] | None = None) -> CheckResult:
    return CheckResult(FAIL, detail, notes or [], warnings or [])


def skipped(detail: str, notes: list[str] | None = None, warnings: list[str] | None = None) -> CheckResult:
    return CheckResult(SKIP, detail, notes or [], warnings or [])


def gib(n_bytes: float) -> str:
    """Sizes for people: GiB with one decimal, or MiB below 1 GiB."""
    return f"{n_bytes / GIB:.1f} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.0f} MiB"


# The memory estimator (pure: no torch, no settings object; bytes per GPU).
#
# It follows what train.py actually runs: TRL's SFTTrainer (whose fused LM head never builds the
# (batch, length, vocab) logits) under DeepSpeed with config.deepspeed_config (contiguous gradients,
# buckets from config.deepspeed_buckets), HF LLaMA with SDPA attention, and with USE_QUANT an
# NF4 double-quantized base with r=16 LoRA on the 7 projections (quant_utils). The activation
# terms were checked on CPU by summing the storages that autograd saves (saved_tensors_hooks) for
# a small LlamaForCausalLM in bf16: they match to the byte.

ZERO3_REUSE_DISTANCE = int(1e9)  # DeepSpeed's stage3_max_reuse_distance default (elements)
FUSED_HEAD_TOKEN_TILE, FUSED_HEAD_VOCAB_TILE = 4096, 32768  # trl.kernels.chunked_logprob tile shape
CUDA_CONTEXT_BYTES = int(0.6 * GIB)  # context, kernels and cuBLAS/cuDNN handles outside the allocator
NCCL_BYTES = int(0.3 * GIB)  # NCCL's communicator buffers, with more than one process
ALLOCATOR_SLACK = 0.08  # reserved beyond allocated by PyTorch's caching allocator (measured 2-12%)
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 per 256 blocks
ADAM_STATE_BYTES = 8  # exp_avg and exp_avg_sq in fp32


def _linear_parameter_count(topology: config.Topology) -> int:
    """Parameters of the 7 projections of all layers: what NF4 quantizes."""
    h, kv, inter = topology.hidden_size, topology.num_kv_heads * topology.head_dim, topology.intermediate_size
    return topology.num_layers * (2 * h * h + 2 * h * kv + 3 * h * inter)


def lora_parameter_count(topology: config.Topology, rank: int = config.LORA_R) -> int:
    """r x (in + out) for q, k, v, o, gate, up and down in every layer."""
    h, kv, inter = topology.hidden_size, topology.num_kv_heads * topology.head_dim, topology.intermediate_size
    per_layer = 2 * (h + h) + 2 * (h + kv) + 3 * (h + inter)
    return topology.num_layers * rank * per_layer


def layer_activation_bytes(topology: config.Topology, precision_bytes: int, use_quant: bool) -> float:
    """Bytes that autograd keeps per token for one decoder layer until its backward runs.

    Full training: each RMSNorm keeps its fp32 input (4h) and 1/rms (4), its 16-bit normalized
    value (p h, for the norm weight's gradient) and the weighted output that the next Linear keeps
    (p h); SDPA (flash/efficient kernels, no L x L score matrix) keeps q (p h), k and v (p kv each,
    not repeated: GQA runs inside the kernel) and its output, which o_proj reads without a copy
    (p h), plus the fp32 log-sum-exp (4 per head); the MLP keeps gate and up outputs, SiLU(gate)
    and their product for down_proj (4 p I). Rotary embeddings keep only cos/sin (shared).
    With USE_QUANT the norms and the NF4 Linear keep nothing for frozen weights, but each of the 7
    LoRA branches keeps its dropout output and bool mask ((p + 1) x its input) and its r-wide
    lora_A output."""
    p, h = precision_bytes, topology.hidden_size
    kv, inter = topology.num_kv_heads * topology.head_dim, topology.intermediate_size
    attention = p * h + 2 * p * kv + p * h + 4 * topology.num_heads
    if not use_quant:
        norms = 2 * (4 * h + 4 + 2 * p * h)
        return norms + attention + 4 * p * inter
    norms = 2 * (4 * h + 4)
    lora_branches = 6 * (p + 1) * h + (p + 1) * inter + 7 * p * config.LORA_R
    return norms + attention + 3 * p * inter + lora_branches


def _layer_backward_work_bytes(topology: config.Topology, precision_bytes: int) -> float:
    """Gradients of one layer's intermediates alive at once while its backward runs (per token):
    the incoming gradient and those of down_proj's input, SiLU(gate) and up."""
    return precision_bytes * (topology.hidden_size + 3 * topology.intermediate_size)


def fused_head_bytes(topology: config.Topology, vocab: int, tokens: int, precision_bytes: int,
                     train_head: bool) -> dict[str, float]:
    """TRL's chunked log-prob head: it keeps a 16-bit copy of the scored hidden states and three fp32
    numbers per token; backward allocates an fp32 hidden gradient, an fp32 head-weight gradient
    (unless the head is frozen), a token x vocab tile and the 16-bit casts of both gradients."""
    p, h = precision_bytes, topology.hidden_size
    tile = min(tokens, FUSED_HEAD_TOKEN_TILE) * FUSED_HEAD_VOCAB_TILE * p
    saved = tokens * (p * h + 12)
    backward = tokens * h * (4 + p) + tile
    if train_head:
        backward += vocab * h * (4 + p)
    return {"saved": saved, "backward": backward}


def activation_bytes(topology: config.Topology, vocab: int, tokens: int, precision_bytes: int,
                     use_quant: bool, gradient_checkpointing: bool, trains_token_rows: bool = False) -> dict[str, float]:
    """Peak activation memory, at the start of backward (everything saved + the head's backward) or
    during the first layer's backward, whichever is larger; with checkpointing only each layer's
    16-bit input is kept and one layer at a time is recomputed. `trains_token_rows` (4-bit + LoRA
    instruction tuning, which trains the chat markers' rows): peft builds an fp32 copy of the head with
    the trained rows swapped in, which backward needs whole, and the head gets a full weight gradient
    (derived from the code, not measured on a GPU)."""
    p, layers = precision_bytes, topology.num_layers
    per_layer = layer_activation_bytes(topology, p, use_quant) * tokens
    final_norm = (4 * topology.hidden_size + 4 + (0 if use_quant else p * topology.hidden_size)) * tokens
    head = fused_head_bytes(topology, vocab, tokens, p, train_head=not use_quant or trains_token_rows)
    layer_work = _layer_backward_work_bytes(topology, p) * tokens
    common = final_norm + head["saved"] + (4 * vocab * topology.hidden_size if trains_token_rows else 0)
    full = layers * per_layer + common + max(head["backward"], layer_work)
    checkpoints = layers * p * topology.hidden_size * tokens
    recomputed = checkpoints + common + max(head["backward"], per_layer + layer_work)
    return {"without_checkpointing": full, "with_checkpointing": recomputed,
            "used": recomputed if gradient_checkpointing else full,
            "loss_head": head["saved"] + head["backward"]}


def training_states(params: int, p: int, zero_stage: int, world_size: int) -> dict[str, float]:
    """Weights, gradients, AdamW states and the optimizer step's temporaries of the trained
    parameters, as DeepSpeed holds them per GPU.

    Mixed precision keeps 16-bit weights and gradients and an fp32 master copy with two fp32 Adam
    moments (12 bytes/param); ZeRO-1 shards the 12, ZeRO-2 also the gradients, ZeRO-3 also the
    weights. In fp32 the master copy exists only under ZeRO (it clones the partition). The step:
    ZeRO-0 casts the gradients to one fp32 buffer (4 bytes/param, measured); ZeRO-1/2/3 flatten the
    16-bit gradient partition into a copy and cast that to fp32 (p + 4 bytes per sharded param)."""
    n = max(1, world_size)
    master = 4 if (p < 4 or zero_stage > 0) else 0
    return {"weights": p * params / (n if zero_stage == 3 else 1),
            "gradients": p * params / (n if zero_stage >= 2 else 1),
            "optimizer_states": (master + ADAM_STATE_BYTES) * params / (n if zero_stage >= 1 else 1),
            "step": 4 * params if zero_stage == 0 else (p + 4) * params / n}


def deepspeed_buffers(params: int, trainable: int, p: int, zero_stage: int, use_quant: bool, world_size: int,
                      buckets: tuple[int, bool] | None = None) -> dict[str, float]:
    """DeepSpeed's own allocations. `backward`: the gradient buckets, allocated whole when backward
    starts and freed at its end: for ZeRO-1/2 one bucket, two with overlap_comm (double buffering);
    one for ZeRO-3. `buckets` is (elements, overlap_comm), config.deepspeed_buckets' choice unless
    given. `resident`: ZeRO-3 keeps gathered the 16-bit parameters that are reused within
    stage3_max_reuse_distance (1e9 elements of forward+backward traversal), i.e. up to 5e8 of them."""
    elements, overlap = buckets or config.deepspeed_buckets(trainable, world_size)
    if zero_stage in (1, 2):
        return {"backward": (2 if overlap else 1) * elements * p, "resident": 0.0}
    if zero_stage == 3:
        gathered = 0 if use_quant else min(params, ZERO3_REUSE_DISTANCE // 2) * p
        return {"backward": elements * p, "resident": gathered}
    return {"backward": 0.0, "resident": 0.0}


def estimate_training_memory(topology: config.Topology, vocab_size: int, batch_size: int, max_length: int,
                             precision_bytes: int, use_quant: bool, gradient_checkpointing: bool,
                             zero_stage: int, world_size: int, *, gradient_accumulation_steps: int = 1,
                             include_cuda_overhead: bool = True, trains_token_rows: bool = False,
                             buckets: tuple[int, bool] | None = None) -> dict[str, float]:
    """Peak GPU memory per process (bytes) for one training run, by term.

    The peak is the larger of two moments. At the start of backward: weights, optimizer states,
    DeepSpeed's reduce buckets and every saved activation, but no gradients yet (DeepSpeed frees
    them at each step; with GRADIENT_ACCUMULATION_STEPS > 1 they persist between micro-steps).
    At the optimizer step: weights, optimizer states, gradients and the step's fp32 temporaries
    (activations and buckets are freed by then).

    `allocated` is what torch.cuda.max_memory_allocated() measures (train.py logs it as `mem`);
    `allocator_slack` is the caching allocator's reserve beyond it (measured 2-12%: 8%);
    `total` adds the CUDA context and NCCL buffers outside PyTorch, and is what must fit in each
    GPU's free memory. `buckets`: see deepspeed_buffers; `trains_token_rows`: see activation_bytes.
    On an H200 (bf16, one GPU, SFTTrainer + DeepSpeed as train.py runs them) `allocated` was
    0.92-1.08x the measured peak for the demo, ~300M and ~1B models, ZeRO-0/1/2, with and without
    checkpointing, and 4-bit + LoRA pretraining (the 0.92: NF4 at 1x1024, a 0.85 GiB peak, where the
    slack and context terms of `total` more than cover it)."""
    p = precision_bytes
    vocab = config.padded_vocab(vocab_size)
    params = topology.parameter_count(vocab)
    acts = activation_bytes(topology, vocab, batch_size * max_length, p, use_quant, gradient_checkpointing,
                            trains_token_rows)
    trainable = lora_parameter_count(topology) if use_quant else params
    states = training_states(trainable, p, zero_stage, world_size)
    buffers = deepspeed_buffers(params, trainable, p, zero_stage, use_quant, world_size, buckets)
    if use_quant:
        quantized = _linear_parameter_count(topology)
        # NF4 projections; embeddings, head and norms stay frozen in 16 bit (DeepSpeed casts them).
        weights = quantized * NF4_BYTES_PER_PARAM + (params - quantized) * p
        terms = {"weights": weights, "gradients": 0.0, "optimizer_states": 0.0,
                 "lora": states["weights"] + states["gradients"] + states["optimizer_states"]}
    else:
        terms = {"weights": states["weights"], "gradients": states["gradients"],
                 "optimizer_states": states["optimizer_states"], "lora": 0.0}
    static = terms["weights"] + states["optimizer_states"] + buffers["resident"] + (
        states["weights"] if use_quant else 0.0)
    gradients_in_backward = states["gradients"] if gradient_accumulation_steps > 1 else 0.0
    backward_peak = static + buffers["backward"] + gradients_in_backward + acts["used"]
    step_peak = static + states["gradients"] + states["step"]
    allocated = max(backward_peak, step_peak)
    slack = ALLOCATOR_SLACK * allocated
    overhead = (CUDA_CONTEXT_BYTES + (NCCL_BYTES if world_size > 1 else 0)) if include_cuda_overhead else 0
    return {
        "parameters": params, "trainable_parameters": trainable, "tokens_per_micro_batch": batch_size * max_length,
        **terms, "deepspeed_buffers": buffers["backward"] + buffers["resident"], "optimizer_step": states["step"],
        "activations": acts["used"], "activations_without_checkpointing": acts["without_checkpointing"],
        "activations_with_checkpointing": acts["with_checkpointing"], "loss_head": acts["loss_head"],
        "static": static, "deepspeed_buckets": buffers["backward"], "trained_gradients": states["gradients"],
        "gradients_in_backward": gradients_in_backward, "backward_peak": backward_peak, "step_peak": step_peak,
        "allocated": allocated, "allocator_slack": slack, "cuda_overhead": overhead,
        "total": allocated + slack + overhead,
    }


def describe_estimate(estimate: dict[str, float]) -> str:
    """One line: the total and the terms of its peak moment (they add up to it)."""
    if estimate["step_peak"] >= estimate["backward_peak"]:
        moment = "at the optimizer step"
        parts = [("gradients", estimate["trained_gradients"]), ("step temporaries", estimate["optimizer_step"])]
    else:
        moment = "at the start of backward"
        parts = [("activations", estimate["activations"]), ("DeepSpeed buckets", estimate["deepspeed_buckets"]),
                 ("gradients", estimate["gradients_in_backward"])]
    parts = [("weights + optimizer states", estimate["static"]), *parts,
             ("allocator reserve", estimate["allocator_slack"]), ("CUDA context", estimate["cuda_overhead"])]
    shown = ", ".join(f"{label} {size / GIB:.1f}" for label, size in parts if size >= 0.05 * GIB)
    return f"{gib(estimate['total'])} per GPU, peaking {moment} ({shown} GiB)"


# Changes that reduce memory, in the order a user should try them; each maps the estimator's
# keyword arguments to new ones, or to None where it does not apply.
def _with_checkpointing(kw: dict) -> dict | None:
    return None if kw["gradient_checkpointing"] else {**kw, "gradient_checkpointing": True}


def _smaller_batches(kw: dict) -> list[dict]:
    """Halve BATCH_SIZE, raising GRADIENT_ACCUMULATION_STEPS so the effective batch stays the same."""
    out, batch, accumulation = [], kw["batch_size"], kw.get("gradient_accumulation_steps", 1)
    while batch > 1:
        batch //= 2
        accumulation *= 2
        out.append({**kw, "batch_size": batch, "gradient_accumulation_steps": accumulation})
    return out


def _zero_stages(kw: dict) -> list[dict]:
    """Other ZeRO stages: higher ones shard more over several GPUs; on one GPU stage 0 avoids the
    gradient bucket of stages 1 and 2."""
    stages = range(kw["zero_stage"] + 1, 4) if kw["world_size"] > 1 else ([0] if kw["zero_stage"] else [])
    return [{**kw, "zero_stage": s} for s in stages]


def _with_quant(kw: dict) -> dict | None:
    return None if kw["use_quant"] else {**kw, "use_quant": True, "precision_bytes": 2}


def _shorter_sequences(kw: dict) -> list[dict]:
    out, length = [], kw["max_length"]
    while length > 256:
        length //= 2
        out.append({**kw, "max_length": length})
    return out


def _change_text(before: dict, after: dict) -> str:
    names = {"gradient_checkpointing": "GRADIENT_CHECKPOINTING", "batch_size": "BATCH_SIZE",
             "gradient_accumulation_steps": "GRADIENT_ACCUMULATION_STEPS", "zero_stage": "ZERO_STAGE",
             "use_quant": "USE_QUANT", "max_length": "MAX_LENGTH"}
    parts = []
    for key, name in names.items():
        if after.get(key) != before.get(key):
            value = after[key]
            parts.append(f"{name}={str(value).lower() if isinstance(value, bool) else value}")
    return " ".join(parts)


def advice_to_fit(estimate_kwargs: dict[str, Any], free_bytes: float) -> list[str]:
    """The settings changes whose estimate fits in `free_bytes`, each as `VAR=value ... (estimate)`.

    Each single change that fits is listed (for batch size and sequence length, the largest value
    that fits); if none does alone, the changes are combined in order (checkpointing, smaller
    batches, ZeRO stage, 4-bit + LoRA, shorter sequences) and the first combination that fits is
    given. An empty list means nothing tried fits."""
    def total(kw: dict) -> float:
        return estimate_training_memory(**kw)["total"]

    def first_fitting(candidates: list[dict]) -> dict | None:
        return next((c for c in candidates if total(c) <= free_bytes), None)

    kw = dict(estimate_kwargs)
    groups = [[c] if c else [] for c in (_with_checkpointing(kw),)]
    groups += [_smaller_batches(kw), _zero_stages(kw), [c] if (c := _with_quant(kw)) else [],
               _shorter_sequences(kw)]
    advice = []
    for group in groups:
        found = first_fitting(group)
        if found:
            advice.append(f"{_change_text(kw, found)} (estimate {gib(total(found))})")
    if advice:
        return advice
    combined = kw
    for step in (_with_checkpointing, _smaller_batches, _zero_stages, _with_quant, _shorter_sequences):
        options = step(combined)
        options = options if isinstance(options, list) else ([options] if options else [])
        if not options:
            continue
        combined = first_fitting(options) or options[-1]
        if total(combined) <= free_bytes:
            return [f"{_change_text(kw, combined)} (estimate {gib(total(combined))})"]
    return []


# Reporting Hub failures in one line.

def hub_unreachable_reason(err: BaseException) -> str | None:
    """A short reason when `err` means the Hub could not be reached (connection refused, DNS,
    timeout, offline mode); None for other errors (a 401 or 404 is an answer, not unreachability)."""
    import httpx
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set"
    chain = [err]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt in chain:
            break
        chain.append(nxt)
    for item in chain:
        if isinstance(item, httpx.TimeoutException):
            return "timed out"
        if isinstance(item, (httpx.TransportError, ConnectionError)):
            return _short_reason(item)
    return None


def _short_reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for known in ("Connection refused", "Name or service not known", "Temporary failure in name resolution",
                  "Network is unreachable", "No route to host"):
        if known in str(err):
            return known.lower()
    return text[:120]


HUB_TIMEOUT_SECONDS, HUB_CONNECT_TIMEOUT_SECONDS = 20, 5


def hub_api(settings: config.Settings):
    """An HfApi for HF_ENDPOINT whose requests time out: huggingface_hub's shared client waits forever
    by default, and a silently dropped connection must not hang the checks."""
    from huggingface_hub import HfApi

    util.set_hub_timeout(HUB_TIMEOUT_SECONDS, connect=HUB_CONNECT_TIMEOUT_SECONDS)
    return HfApi(endpoint=settings.hf_endpoint)


def shown_endpoint(settings: config.Settings) -> str:
    """HF_ENDPOINT as messages print it: a token written into the address (`https://user:hf_...@host`)
    is replaced."""
    return util.redact(settings.hf_endpoint, settings.hf_token)


def hub_unreachable(settings: config.Settings, reason: str) -> str:
    return f"Hub unreachable at {shown_endpoint(settings)} ({reason})"


def _http_status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


# The checks. Each takes the settings and returns a CheckResult.

def check_configuration(settings: config.Settings, warnings: list[str]) -> CheckResult:
    topo = settings.topology
    detail = (f"preset {settings.preset}; {settings.phase} INIT={settings.init} (shard {settings.shard_index}, "
              f"{settings.run_epochs:g} epochs); model {topo.describe()}, "
              f"{topo.parameter_count():,} parameters")
    return passed(detail, warnings=[w.removeprefix("warning: ") for w in warnings])


def check_hub_token(settings: config.Settings) -> CheckResult:
    """The token is accepted, can write, and may write to OUTPUT_REPO's owner."""
    warnings = []
    if "/" in settings.output_repo and not settings.hf_token:
        warnings.append(f"OUTPUT_REPO={settings.output_repo} names an owner but HF_TOKEN is unset: "
                        "the model is published to OUTPUT_DIR only")
    if not (settings.pushes_to_hub or settings.space_id):
        return skipped("not publishing to the Hub (needs HF_TOKEN and OUTPUT_REPO=owner/name) "
                       "and not on a Space", warnings=warnings)
    if not settings.hf_token:
        return failed(f"SPACE_ID={settings.space_id} is set but HF_TOKEN is not: the run state cannot be kept "
                      "in the Space's variables; add HF_TOKEN (write access) as a Space secret")
    try:
        who = hub_api(settings).whoami(token=settings.hf_token)
    except Exception as err:
        reason = hub_unreachable_reason(err)
        if reason:
            return failed(hub_unreachable(settings, reason))
        if _http_status(err) == 401:
            return failed(f"HF_TOKEN was rejected by {shown_endpoint(settings)} (401 Unauthorized); create a "
                          f"token with write access at {shown_endpoint(settings)}/settings/tokens")
        raise
    return _judge_token(settings, who, warnings)


def _judge_token(settings: config.Settings, who: dict, warnings: list[str]) -> CheckResult:
    name = who.get("name", "?")
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        return failed(f"HF_TOKEN (user {name}) is read-only; pushing {settings.output_repo} needs a token "
                      "with write access")
    if settings.pushes_to_hub:
        owner = settings.output_repo.split("/")[0]
        orgs = {org.get("name") for org in who.get("orgs") or []}
        if owner != name and owner not in orgs:
            warnings.append(f"OUTPUT_REPO owner '{owner}' is neither the token's user ({name}) nor one of "
                            "its organizations: the push may be refused")
    return passed(f"accepted by {shown_endpoint(settings)} as user {name}" + (f" ({role} token)" if role else ""),
                  warnings=warnings)


def training_precision_bytes(settings: config.Settings) -> int:
    """Bytes of the 16-bit (bf16 or fp16: train.py's choice on a GPU) or fp32 weights."""
    return 4 if settings.precision == "fp32" and not settings.use_quant else 2


def estimate_for_settings(settings: config.Settings, world_size: int, precision_bytes: int) -> dict[str, Any]:
    """The estimator's keyword arguments for these settings (instruct tokenizers add 3 chat tokens)."""
    vocab = settings.vocab_size + (len(config.CHAT_TOKENS) if settings.inst else 0)
    return dict(topology=settings.topology, vocab_size=vocab, batch_size=settings.batch_size,
                max_length=settings.max_length, precision_bytes=precision_bytes, use_quant=settings.use_quant,
                gradient_checkpointing=settings.gradient_checkpointing, zero_stage=settings.zero_stage,
                world_size=world_size, gradient_accumulation_steps=settings.gradient_accumulation_steps,
                trains_token_rows=settings.use_quant and settings.inst)


def judge_memory(estimate_kwargs: dict[str, Any], free_by_gpu: dict[str, float]) -> CheckResult:
    """Compare the estimate with the free memory of each GPU; on a shortfall, say what would fit."""
    estimate = estimate_training_memory(**estimate_kwargs)
    tightest_name, tightest_free = min(free_by_gpu.items(), key=lambda item: item[1])
    if estimate["total"] > tightest_free:
        advice = advice_to_fit(estimate_kwargs, tightest_free)
        notes = [f"would fit: {a}" for a in advice] or [
            "no single setting change fits: use more GPUs (with ZERO_STAGE=3) or a smaller model "
            "(lower FACTOR or TARGET_PARAMETERS)"]
        return failed(f"estimated {describe_estimate(estimate)} > {gib(tightest_free)} free on {tightest_name}",
                      notes=notes)
    warnings = []
    if estimate["total"] > 0.9 * tightest_free:
        warnings.append(f"the estimate uses {estimate['total'] / tightest_free:.0%} of {tightest_name}'s free "
                        "memory; an out-of-memory error is possible")
    return passed(f"estimated {describe_estimate(estimate)}; {gib(tightest_free)} free on {tightest_name}",
                  warnings=warnings)


# A CPU training process's own memory beside the estimate's terms: 0.43 GiB resident after importing
# torch, transformers, datasets, TRL and DeepSpeed (measured on CPU with the pinned versions), rounded up.
CPU_PROCESS_BYTES = int(0.5 * GIB)


def cpu_precision_bytes(settings: config.Settings) -> int:
    """What train.py trains in on CPU (train.resolve_precision): bf16 when asked for or with USE_QUANT,
    else fp32."""
    return 2 if settings.precision == "bf16" or settings.use_quant else 4


def judge_cpu_memory(estimate_kwargs: dict[str, Any], available_bytes: float) -> CheckResult:
    """Training on CPU: every process holds the estimate's terms (no CUDA context) and its own runtime
    in the machine's RAM, which they share; on a shortfall, say what would fit."""
    kwargs = {**estimate_kwargs, "include_cuda_overhead": False}
    processes = kwargs["world_size"]
    per_process = estimate_training_memory(**kwargs)["total"] + CPU_PROCESS_BYTES
    need = processes * per_process
    detail = (f"training on CPU ({processes} process(es) at {8 * kwargs['precision_bytes']}-bit) needs an "
              f"estimated {gib(need)} of RAM")
    if need > available_bytes:
        advice = advice_to_fit(kwargs, available_bytes / processes - CPU_PROCESS_BYTES)
        notes = [f"would fit: {a}" for a in advice] or [
            "no single setting change fits: train on a GPU, or a smaller model (lower FACTOR or TARGET_PARAMETERS)"]
        return failed(f"{detail} > {gib(available_bytes)} available", notes=notes)
    warnings = []
    if need > 0.9 * available_bytes:
        warnings.append(f"the estimate uses {need / available_bytes:.0%} of the available RAM; "
                        "an out-of-memory kill is possible")
    return passed(f"{detail}; {gib(available_bytes)} available", warnings=warnings)


def check_gpu_memory(settings: config.Settings) -> CheckResult:
    """The estimate against each GPU's free memory, or against the available RAM when training runs on CPU."""
    import torch

    if not torch.cuda.is_available():
        import psutil

        kwargs = estimate_for_settings(settings, settings.num_processes or 1, cpu_precision_bytes(settings))
        return judge_cpu_memory(kwargs, psutil.virtual_memory().available)
    count = torch.cuda.device_count()
    world = settings.num_processes or count
    if world > count:
        return failed(f"NUM_PROCESSES={settings.num_processes} but only {count} GPU(s) are visible; "
                      "set NUM_PROCESSES=auto or at most the GPU count")
    if settings.precision == "bf16" and not torch.cuda.is_bf16_supported():
        return failed(f"PRECISION=bf16 but GPU 0 ({torch.cuda.get_device_name(0)}) has no bf16 support; "
                      "use PRECISION=auto (fp16 there)")
    free_by_gpu = {f"GPU {i} ({torch.cuda.get_device_name(i)})": torch.cuda.mem_get_info(i)[0]
                   for i in range(world)}
    precision = training_precision_bytes(settings)
    return judge_memory(estimate_for_settings(settings, world, precision), free_by_gpu)


# Disk.

def _folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def folder_problem(name: str, folder: Path) -> str | None:
    """Why the pipeline could not write into `folder`, or None: the folder, or else the nearest part of
    its path that exists (the rest is created), must be a folder this user can write into."""
    anchor = _existing_parent(folder)
    if not anchor.is_dir():
        where = "is" if anchor == folder else f"lies under {anchor}, which is"
        return f"{name}={folder}: {where} a file, not a folder; set {name} to a folder (created if missing)"
    if not os.access(anchor, os.W_OK | os.X_OK):
        return (f"{name}={folder}: {anchor} is not writable by this user; set {name} to a writable folder "
                "or change its permissions")
    return None


def check_folders(settings: config.Settings) -> CheckResult:
    """OUTPUT_DIR and WORK_DIR can be written: otherwise prep, training or publishing fails late."""
    problems = [problem for problem in (folder_problem("OUTPUT_DIR", settings.output_dir),
                                        folder_problem("WORK_DIR", settings.work_dir)) if problem]
    if problems:
        return failed(problems[0], notes=problems[1:])
    return passed(f"OUTPUT_DIR={settings.output_dir} and WORK_DIR={settings.work_dir} can be written")


def disk_needs(settings: config.Settings, on_gpu: bool) -> dict[str, dict[str, float]]:
    """Bytes each folder will need: the prepared data, the 32-bit prepared model and (per checkpoint)
    the trained weights twice (HF + DeepSpeed files) with fp32 master weights and Adam moments, for the
    2 kept plus the one being written, the trained model; OUTPUT_DIR: the published model. Weights are
    16-bit on a GPU and 32-bit on CPU (each as train.py trains); with SAVE_ADAPTER (and USE_QUANT) the
    LoRA adapter is also kept and published, counted in fp32."""
    params = settings.topology.parameter_count()
    lora = lora_parameter_count(settings.topology)
    trained = lora if settings.use_quant else params
    weight_bytes = training_precision_bytes(settings) if on_gpu else cpu_precision_bytes(settings)
    source = _local_dataset(settings.stage_dataset)
    # Text of one shard: the local data itself, or ~2 KB a row from the Hub; the prepared tokens
    # take about the same bytes (4-byte ids, ~4 characters a token), twice with assistant masks.
    text = min(_folder_bytes(source), settings.shard_size * 2048) if source else settings.shard_size * 2048
    prepared = text * (2 if settings.inst else 1)
    checkpoint = trained * (2 * weight_bytes + 12) + (params * 2 if settings.use_quant else 0)
    # USE_QUANT merges the adapter into a bf16 model before saving it.
    model = params * (2 if settings.use_quant else weight_bytes)
    work = {"prepared data": prepared, "prepared model": 4 * params,
            "checkpoints": 3 * checkpoint, "trained model": model}
    output = {"published model": model}
    if settings.save_adapter and settings.use_quant:
        work["trained adapter"] = output["published adapter"] = 4 * lora
    return {str(settings.work_dir): work, str(settings.output_dir): output}


def check_disk(settings: config.Settings) -> CheckResult:
    needs = disk_needs(settings, on_gpu=_gpu_count() > 0)
    by_device: dict[int, dict[str, Any]] = {}
    for folder, items in needs.items():
        anchor = _existing_parent(Path(folder))
        entry = by_device.setdefault(anchor.stat().st_dev, {"anchor": anchor, "need": 0.0, "folders": []})
        entry["need"] += sum(items.values())
        entry["folders"].append(folder)
    problems, summaries, warnings = [], [], []
    for entry in by_device.values():
        free = shutil.disk_usage(entry["anchor"]).free
        where = " and ".join(entry["folders"])
        summaries.append(f"{gib(entry['need'])} needed, {gib(free)} free for {where}")
        if entry["need"] > free:
            problems.append(f"{where}: needs ~{gib(entry['need'])} but {gib(free)} is free; free space or set "
                            "WORK_DIR/OUTPUT_DIR to a larger disk")
        elif entry["need"] > 0.8 * free:
            warnings.append(f"{where}: the run will use {entry['need'] / free:.0%} of the free space")
    breakdown = "; ".join(f"{name} {gib(size)}" for items in needs.values() for name, size in items.items())
    if problems:
        return failed(problems[0], notes=problems[1:] + [f"estimate: {breakdown}"])
    return passed("; ".join(summaries), warnings=warnings, notes=[f"estimate: {breakdown}"])


# Quantization.

def quiet_bitsandbytes() -> None:
    """bitsandbytes logs a warning about an optional CPU kernel package on import; it changes nothing."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def nf4_round_trip_error(device: str) -> float:
    """Relative error of an NF4 quantize/dequantize round trip of a random bf16 matrix."""
    import torch

    quiet_bitsandbytes()
    import bitsandbytes.functional as bnbf

    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(256, 256, generator=generator).to(device=device, dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(weights, quant_type="nf4", blocksize=64, compress_statistics=True)
    restored = bnbf.dequantize_4bit(packed, state).float()
    return ((restored - weights.float()).norm() / weights.float().norm()).item()


def check_quantization(settings: config.Settings) -> CheckResult:
    if not settings.use_quant:
        return skipped("USE_QUANT=false")
    quiet_bitsandbytes()
    try:
        import bitsandbytes
    except ImportError as err:
        return failed(f"USE_QUANT=true but bitsandbytes cannot be imported ({err}); install it with "
                      "`pip install -r requirements.txt -c constraints.txt`, or set USE_QUANT=false")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    error = nf4_round_trip_error(device)
    if not math.isfinite(error) or error >= 0.15:
        return failed(f"bitsandbytes {bitsandbytes.__version__}: NF4 round trip on {device} has relative error "
                      f"{error:.3f} (expected < 0.15); this bitsandbytes build does not work on this device")
    return passed(f"bitsandbytes {bitsandbytes.__version__}: NF4 round trip on {device}, relative error {error:.3f}")


# The input model.

def check_input_model(settings: config.Settings) -> CheckResult:
    """The model this run continues from: a local folder through prep.py's own checks (files, a LLaMA
    config that fits MAX_LENGTH, whole safetensors weights), else the Hub repository's file list."""
    if settings.first_run:
        return skipped("the first pretraining run (INIT=0) builds the model and tokenizer from scratch")
    import prep

    var = prep.source_label(settings)
    for folder in prep.local_model_candidates(settings):
        if folder.is_dir():
            try:
                prep.check_source_model(settings, folder)
            except prep.PrepError as err:
                return failed(str(err))
            return passed(f"{var}: local model and tokenizer in {folder}")
    if settings.input_repo_is_path:
        return failed(prep.no_source_folder(settings))
    return _check_hub_model(settings, var)


def _check_hub_model(settings: config.Settings, var: str) -> CheckResult:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    import prep

    where = f"no folder {prep.local_model_candidates(settings)[0]}"
    try:
        info = hub_api(settings).model_info(settings.source_repo, token=settings.hf_token)
    except GatedRepoError:
        return failed(f"{var}: {where}, and the Hub repo is gated; accept its terms with the HF_TOKEN account")
    except RepositoryNotFoundError:
        return failed(f"{var}: {where}, and no model {settings.source_repo} on {shown_endpoint(settings)} "
                      "(or it is private and HF_TOKEN has no access); run the earlier stage first or fix INPUT_REPO")
    except Exception as err:
        reason = hub_unreachable_reason(err)
        if reason:
            return failed(f"{var}: {where}; {hub_unreachable(settings, reason)}")
        raise
    files = {s.rfilename for s in info.siblings or []}
    missing = [f for f in ("config.json", "tokenizer.json") if files and f not in files]
    if missing:
        return failed(f"{var}: the Hub repo {settings.source_repo} lacks {', '.join(missing)}")
    return passed(f"{var}: model {settings.source_repo} on {shown_endpoint(settings)}")


# The dataset.

def _local_dataset(value: str | None) -> Path | None:
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.exists() else None


def judge_rows(rows: list[Any], instruct: bool, var: str, where: str) -> CheckResult:
    """The first rows need a `text` column (instruct: a conversation) or, for instruct, `messages`;
    each row is checked by prep.py's own row checks, so what passes here is what preparation takes."""
    import prep

    if not rows:
        return failed(f"{var}: {where} has no rows")
    columns = sorted({str(key) for row in rows for key in row})
    if not any(name in columns for name in (("text", "messages") if instruct else ("text",))):
        wanted = "`text` or `messages`" if instruct else "`text`"
        return failed(f"{var}: {where} has no {wanted} column (columns: {', '.join(columns) or 'none'})")
    row_check = prep.conversation_messages if instruct else prep.pretrain_text
    problems = []
    for number, row in enumerate(rows, 1):
        try:
            row_check(row)
        except prep.UnusableRow as err:
            problems.append(f"row {number}: {err}")
    if problems:
        return failed(f"{var}: the first rows of {where} are not usable ({'; '.join(problems[:3])})")
    return passed(f"{var}: {where}; first {len(rows)} rows usable")


def check_dataset(settings: config.Settings) -> CheckResult:
    import prep

    value = settings.stage_dataset
    variable = prep.dataset_variable(settings)
    if _local_dataset(value) is not None or not prep.looks_like_hub_id(value):
        return _check_local_dataset(settings, variable)
    return _check_hub_dataset(settings, value, variable)


def _check_local_dataset(settings: config.Settings, variable: str) -> CheckResult:
    """The first rows through prep.py's own readers: the same files, formats and errors."""
    import prep

    var = f"{variable}={settings.stage_dataset}"
    try:
        source = prep.open_data_source(settings.stage_dataset, variable, settings.hf_token)
        rows = list(itertools.islice(prep.iter_rows(source), ROWS_TO_READ))
    except prep.PrepError as err:
        return failed(str(err))
    where = f"{len(source.files)} file(s)"
    return judge_rows(rows, settings.inst, var, where)


def _check_hub_dataset(settings: config.Settings, repo_id: str, variable: str) -> CheckResult:
    """Existence through the Hub API (clear errors), then the first rows through datasets streaming."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    var = f"{variable}={repo_id}"
    try:
        hub_api(settings).dataset_info(repo_id, token=settings.hf_token)
    except GatedRepoError:
        return failed(f"{var}: the dataset is gated; accept its terms with the HF_TOKEN account")
    except RepositoryNotFoundError:
        return failed(f"{var}: no such local file or folder, and no dataset {repo_id} on {shown_endpoint(settings)}")
    except Exception as err:
        reason = hub_unreachable_reason(err)
        if reason:
            return failed(f"{var}: {hub_unreachable(settings, reason)}")
        raise
    import prep

    try:
        train_split = prep.open_hub_dataset(repo_id, variable, settings.hf_token)
    except prep.PrepError as err:
        return failed(str(err))
    rows = list(train_split.take(ROWS_TO_READ))
    return judge_rows(rows, settings.inst, var, f"Hub dataset {repo_id} (streamed)")


# Sanity warnings.

def sanity_warnings(settings: config.Settings, world_size: int) -> list[str]:
    """The original's warnings on settings that are legal but probably not meant."""
    warnings = []
    effective = settings.batch_size * settings.gradient_accumulation_steps * world_size
    tokens = effective * settings.max_length
    if effective < 8:
        warnings.append(f"effective batch is {effective} sequences (BATCH_SIZE x GRADIENT_ACCUMULATION_STEPS x "
                        f"{world_size} process(es)): very noisy gradients; raise GRADIENT_ACCUMULATION_STEPS")
    if tokens > 8 * 2**20:
        warnings.append(f"effective batch is {tokens:,} tokens per optimizer step: few steps per shard; "
                        "lower BATCH_SIZE or GRADIENT_ACCUMULATION_STEPS")
    if not 1e-5 <= settings.learning_rate <= 1e-2:
        warnings.append(f"LEARNING_RATE={settings.learning_rate:g} is outside the usual 1e-5..1e-2")
    if settings.max_length & (settings.max_length - 1):
        warnings.append(f"MAX_LENGTH={settings.max_length} is not a power of two (slower attention kernels)")
    if settings.max_length > 8192:
        warnings.append(f"MAX_LENGTH={settings.max_length} > 8192: attention time and activation memory grow fast")
    if settings.epochs > 10:
        warnings.append(f"EPOCHS={settings.epochs:g} > 10: the model will likely memorize the shard")
    if settings.weight_decay > 0.3:
        warnings.append(f"WEIGHT_DECAY={settings.weight_decay:g} is unusually high (0.01..0.1 is common)")
    if settings.use_quant and settings.first_run:
        warnings.append("USE_QUANT=true on the first pretraining run trains LoRA adapters on a random 4-bit "
                        "base: the model can barely learn; pretrain in 16 bit first")
    if settings.precision == "fp16":
        warnings.append("PRECISION=fp16 can overflow (NaN loss); prefer bf16 where the GPU supports it")
    if settings.timeout_buffer < 5:
        warnings.append(f"TIMEOUT_BUFFER={settings.timeout_buffer:g} minutes may be too short to save and publish")
    embeddings = 2 * config.padded_vocab(settings.vocab_size) * settings.topology.hidden_size
    if embeddings > 0.5 * settings.topology.parameter_count():
        warnings.append(f"embeddings are {embeddings / settings.topology.parameter_count():.0%} of the model's "
                        "parameters: a smaller VOCAB_SIZE or a larger FACTOR balances it")
    return warnings


def check_sanity(settings: config.Settings) -> CheckResult:
    world = settings.num_processes or _gpu_count() or 1
    warnings = sanity_warnings(settings, world)
    effective = settings.batch_size * settings.gradient_accumulation_steps * world
    return passed(f"effective batch {effective} sequences x {settings.max_length} tokens, "
                  f"learning rate {settings.learning_rate:g}, {settings.run_epochs:g} epochs", warnings=warnings)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


# Running and printing.

CHECKS: tuple[tuple[str, Callable[[config.Settings], CheckResult]], ...] = (
    ("Hugging Face token", check_hub_token),
    ("memory", check_gpu_memory),
    ("output folders", check_folders),
    ("disk space", check_disk),
    ("quantization", check_quantization),
    ("input model", check_input_model),
    ("dataset", check_dataset),
    ("training settings", check_sanity),
)


def run_check(check: Callable[[config.Settings], CheckResult], settings: config.Settings) -> CheckResult:
    """One check; an unexpected error becomes a failed line (no traceback), a Hub outage one line."""
    try:
        return check(settings)
    except Exception as err:
        reason = hub_unreachable_reason(err)
        if reason:
            return failed(hub_unreachable(settings, reason))
        message = str(err).splitlines()[0] if str(err) else ""
        return failed(util.redact(f"the check itself failed: {type(err).__name__}: {message}"[:300], settings.hf_token))


def print_result(index: int, total: int, name: str, result: CheckResult) -> None:
    line = f"[{index}/{total}] {SYMBOLS[result.status]} {name}: "
    line += f"skipped ({result.detail})" if result.status == SKIP else result.detail
    print(line, flush=True)
    for note in result.notes:
        print(f"      {note}", flush=True)
    for warning in result.warnings:
        print(f"      ⚠ {warning}", flush=True)


def print_config_errors(problems: list[str], total: int) -> None:
    print(f"[1/{total}] ✗ configuration: {len(problems)} problem(s)")
    for problem in problems:
        print(f"      ✗ {problem}")
    print("preflight: the configuration is invalid; nothing else can be checked (fix it and rerun)")


def main() -> int:
    total = len(CHECKS) + 1
    environment_warnings = config.misspelling_warnings()
    try:
        settings = config.load_settings()
    except config.ConfigError as err:
        print_config_errors(err.problems, total)
        return 2
    print(f"preflight: {total} checks for {settings.phase} INIT={settings.init} (preset {settings.preset})")
    results = [check_configuration(settings, environment_warnings)]
    print_result(1, total, "configuration", results[0])
    for index, (name, check) in enumerate(CHECKS, start=2):
        results.append(run_check(check, settings))
        print_result(index, total, name, results[-1])
    counts = {status: sum(r.status == status for r in results) for status in (PASS, FAIL, SKIP)}
    warnings = sum(len(r.warnings) for r in results)
    print(f"preflight: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped, "
          f"{warnings} warning(s)")
    if counts[FAIL]:
        print("preflight: fix the ✗ lines above before spending GPU time")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
