"""The memory model: how much memory a training run needs per GPU, and the micro-batch that fits.

`estimate_training_memory` adds up, term by term, what train.py allocates (weights, optimizer states,
DeepSpeed's buffers, activations, the loss head); `advice_to_fit` lists the settings that would fit a
given budget; `plan_batch` chooses the micro-batch, gradient accumulation and activation
checkpointing left on `auto`, at the global batch the settings name. Pure functions of the topology
and the numbers, except `machine_for`, which reads the GPUs (or the RAM) train.py will use.
preflight.py checks a run against the estimate; train.py runs the plan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import config

GIB = 2**30


def gib(n_bytes: float) -> str:
    """Sizes for people: GiB with one decimal, or MiB below 1 GiB."""
    return f"{n_bytes / GIB:.1f} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.0f} MiB"


# The estimator (bytes per GPU).
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


def layer_activation_bytes(
    topology: config.Topology, precision_bytes: int, use_quant: bool, fused_kernels: bool = False
) -> float:
    """Bytes that autograd keeps per token for one decoder layer until its backward runs.

    Full training: each RMSNorm keeps its fp32 input (4h) and 1/rms (4), its 16-bit normalized
    value (p h, for the norm weight's gradient) and the weighted output that the next Linear keeps
    (p h); SDPA (flash/efficient kernels, no L x L score matrix) keeps q (p h), k and v (p kv each,
    not repeated: GQA runs inside the kernel) and its output, which o_proj reads without a copy
    (p h), plus the fp32 log-sum-exp (4 per head); the MLP keeps gate and up outputs, SiLU(gate)
    and their product for down_proj (4 p I). Rotary embeddings keep only cos/sin (shared).
    With USE_QUANT the norms and the NF4 Linear keep nothing for frozen weights, but each of the 7
    LoRA branches keeps its dropout output and bool mask ((p + 1) x its input) and its r-wide
    lora_A output.
    `fused_kernels` (Liger's RMSNorm and SwiGLU): a norm keeps its 16-bit input instead of an fp32
    copy, and no normalized value (its weight gradient is computed from the input and 1/rms); the
    MLP keeps gate and up outputs and their product, and recomputes SiLU in backward."""
    p, h = precision_bytes, topology.hidden_size
    kv, inter = topology.num_kv_heads * topology.head_dim, topology.intermediate_size
    attention = p * h + 2 * p * kv + p * h + 4 * topology.num_heads
    norm_input = _norm_input_bytes(h, p, fused_kernels)
    if not use_quant:
        norms = 2 * (norm_input + 4 + (1 if fused_kernels else 2) * p * h)
        return norms + attention + (3 if fused_kernels else 4) * p * inter
    norms = 2 * (norm_input + 4)
    lora_branches = 6 * (p + 1) * h + (p + 1) * inter + 7 * p * config.LORA_R
    return norms + attention + (2 if fused_kernels else 3) * p * inter + lora_branches


def _norm_input_bytes(hidden_size: int, precision_bytes: int, fused_kernels: bool) -> float:
    """What an RMSNorm keeps of its input per token: HF's keeps an fp32 copy, Liger's the 16-bit input."""
    return precision_bytes * hidden_size if fused_kernels else 4 * hidden_size


def _layer_backward_work_bytes(topology: config.Topology, precision_bytes: int) -> float:
    """Gradients of one layer's intermediates alive at once while its backward runs (per token):
    the incoming gradient and those of down_proj's input, SiLU(gate) and up."""
    return precision_bytes * (topology.hidden_size + 3 * topology.intermediate_size)


def fused_head_bytes(
    topology: config.Topology, vocab: int, tokens: int, precision_bytes: int, train_head: bool
) -> dict[str, float]:
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


def activation_bytes(
    topology: config.Topology,
    vocab: int,
    tokens: int,
    precision_bytes: int,
    use_quant: bool,
    gradient_checkpointing: bool,
    trains_token_rows: bool = False,
    fused_kernels: bool = False,
) -> dict[str, float]:
    """Peak activation memory, at the start of backward (everything saved + the head's backward) or
    during the first layer's backward, whichever is larger; with checkpointing only each layer's
    16-bit input is kept and one layer at a time is recomputed. `trains_token_rows` (4-bit + LoRA
    instruction tuning, which trains the chat markers' rows): peft builds an fp32 copy of the head with
    the trained rows swapped in, which backward needs whole, and the head gets a full weight gradient
    (derived from the code, not measured on a GPU). `fused_kernels`: see layer_activation_bytes."""
    p, layers, h = precision_bytes, topology.num_layers, topology.hidden_size
    per_layer = layer_activation_bytes(topology, p, use_quant, fused_kernels) * tokens
    norm_input = _norm_input_bytes(h, p, fused_kernels)
    final_norm = (norm_input + 4 + (0 if use_quant or fused_kernels else p * h)) * tokens
    head = fused_head_bytes(topology, vocab, tokens, p, train_head=not use_quant or trains_token_rows)
    layer_work = _layer_backward_work_bytes(topology, p) * tokens
    common = final_norm + head["saved"] + (4 * vocab * topology.hidden_size if trains_token_rows else 0)
    full = layers * per_layer + common + max(head["backward"], layer_work)
    checkpoints = layers * p * topology.hidden_size * tokens
    recomputed = checkpoints + common + max(head["backward"], per_layer + layer_work)
    return {
        "without_checkpointing": full,
        "with_checkpointing": recomputed,
        "used": recomputed if gradient_checkpointing else full,
        "loss_head": head["saved"] + head["backward"],
    }


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
    return {
        "weights": p * params / (n if zero_stage == 3 else 1),
        "gradients": p * params / (n if zero_stage >= 2 else 1),
        "optimizer_states": (master + ADAM_STATE_BYTES) * params / (n if zero_stage >= 1 else 1),
        "step": 4 * params if zero_stage == 0 else (p + 4) * params / n,
    }


def deepspeed_buffers(
    params: int,
    trainable: int,
    p: int,
    zero_stage: int,
    use_quant: bool,
    world_size: int,
    buckets: tuple[int, bool] | None = None,
) -> dict[str, float]:
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


def estimate_training_memory(
    topology: config.Topology,
    vocab_size: int,
    batch_size: int,
    max_length: int,
    precision_bytes: int,
    use_quant: bool,
    gradient_checkpointing: bool,
    zero_stage: int,
    world_size: int,
    *,
    gradient_accumulation_steps: int = 1,
    include_cuda_overhead: bool = True,
    trains_token_rows: bool = False,
    buckets: tuple[int, bool] | None = None,
    fused_kernels: bool = False,
) -> dict[str, float]:
    """Peak GPU memory per process (bytes) for one training run, by term.

    The peak is the larger of two moments. At the start of backward: weights, optimizer states,
    DeepSpeed's reduce buckets and every saved activation, but no gradients yet (DeepSpeed frees
    them at each step; with GRADIENT_ACCUMULATION_STEPS > 1 they persist between micro-steps).
    At the optimizer step: weights, optimizer states, gradients and the step's fp32 temporaries
    (activations and buckets are freed by then).

    `allocated` is what torch.cuda.max_memory_allocated() measures (train.py logs it as `mem`);
    `allocator_slack` is the caching allocator's reserve beyond it (measured 2-12%: 8%);
    `total` adds the CUDA context and NCCL buffers outside PyTorch, and is what must fit in each
    GPU's free memory. `buckets`: see deepspeed_buffers; `trains_token_rows` and `fused_kernels`
    (Liger): see activation_bytes.
    On an H200 (bf16, one GPU, SFTTrainer + DeepSpeed as train.py runs them) `allocated` was
    0.92-1.08x the measured peak for the demo, ~300M and ~1B models, ZeRO-0/1/2, with and without
    checkpointing, and 4-bit + LoRA pretraining (the 0.92: NF4 at 1x1024, a 0.85 GiB peak, where the
    slack and context terms of `total` more than cover it)."""
    p = precision_bytes
    vocab = config.padded_vocab(vocab_size)
    params = topology.parameter_count(vocab)
    acts = activation_bytes(
        topology, vocab, batch_size * max_length, p, use_quant, gradient_checkpointing, trains_token_rows, fused_kernels
    )
    trainable = lora_parameter_count(topology) if use_quant else params
    states = training_states(trainable, p, zero_stage, world_size)
    buffers = deepspeed_buffers(params, trainable, p, zero_stage, use_quant, world_size, buckets)
    if use_quant:
        quantized = _linear_parameter_count(topology)
        # NF4 projections; embeddings, head and norms stay frozen in 16 bit (DeepSpeed casts them).
        weights = quantized * NF4_BYTES_PER_PARAM + (params - quantized) * p
        terms = {
            "weights": weights,
            "gradients": 0.0,
            "optimizer_states": 0.0,
            "lora": states["weights"] + states["gradients"] + states["optimizer_states"],
        }
    else:
        terms = {
            "weights": states["weights"],
            "gradients": states["gradients"],
            "optimizer_states": states["optimizer_states"],
            "lora": 0.0,
        }
    static = (
        terms["weights"] + states["optimizer_states"] + buffers["resident"] + (states["weights"] if use_quant else 0.0)
    )
    gradients_in_backward = states["gradients"] if gradient_accumulation_steps > 1 else 0.0
    backward_peak = static + buffers["backward"] + gradients_in_backward + acts["used"]
    step_peak = static + states["gradients"] + states["step"]
    allocated = max(backward_peak, step_peak)
    slack = ALLOCATOR_SLACK * allocated
    overhead = (CUDA_CONTEXT_BYTES + (NCCL_BYTES if world_size > 1 else 0)) if include_cuda_overhead else 0
    return {
        "parameters": params,
        "trainable_parameters": trainable,
        "tokens_per_micro_batch": batch_size * max_length,
        **terms,
        "deepspeed_buffers": buffers["backward"] + buffers["resident"],
        "optimizer_step": states["step"],
        "activations": acts["used"],
        "activations_without_checkpointing": acts["without_checkpointing"],
        "activations_with_checkpointing": acts["with_checkpointing"],
        "loss_head": acts["loss_head"],
        "static": static,
        "deepspeed_buckets": buffers["backward"],
        "trained_gradients": states["gradients"],
        "gradients_in_backward": gradients_in_backward,
        "backward_peak": backward_peak,
        "step_peak": step_peak,
        "allocated": allocated,
        "allocator_slack": slack,
        "cuda_overhead": overhead,
        "total": allocated + slack + overhead,
    }


def describe_estimate(estimate: dict[str, float]) -> str:
    """One line: the total and the terms of its peak moment (they add up to it)."""
    if estimate["step_peak"] >= estimate["backward_peak"]:
        moment = "at the optimizer step"
        parts = [("gradients", estimate["trained_gradients"]), ("step temporaries", estimate["optimizer_step"])]
    else:
        moment = "at the start of backward"
        parts = [
            ("activations", estimate["activations"]),
            ("DeepSpeed buckets", estimate["deepspeed_buckets"]),
            ("gradients", estimate["gradients_in_backward"]),
        ]
    parts = [
        ("weights + optimizer states", estimate["static"]),
        *parts,
        ("allocator reserve", estimate["allocator_slack"]),
        ("CUDA context", estimate["cuda_overhead"]),
    ]
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
    names = {
        "gradient_checkpointing": "GRADIENT_CHECKPOINTING",
        "batch_size": "BATCH_SIZE",
        "gradient_accumulation_steps": "GRADIENT_ACCUMULATION_STEPS",
        "zero_stage": "ZERO_STAGE",
        "use_quant": "USE_QUANT",
        "max_length": "MAX_LENGTH",
    }
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
    groups += [_smaller_batches(kw), _zero_stages(kw), [c] if (c := _with_quant(kw)) else [], _shorter_sequences(kw)]
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


# A CPU training process's own memory beside the estimate's terms: 0.43 GiB resident after importing
# torch, transformers, datasets, TRL and DeepSpeed (measured on CPU with the pinned versions), rounded up.
CPU_PROCESS_BYTES = int(0.5 * GIB)


def cpu_precision_bytes(settings: config.Settings) -> int:
    """What train.py trains in on CPU (train.resolve_precision): bf16 when asked for or with USE_QUANT,
    else fp32."""
    return 2 if settings.precision == "bf16" or settings.use_quant else 4


def training_precision_bytes(settings: config.Settings) -> int:
    """Bytes of the 16-bit (bf16 or fp16: train.py's choice on a GPU) or fp32 weights."""
    return 4 if settings.precision == "fp32" and not settings.use_quant else 2


@dataclass(frozen=True)
class Machine:
    """What a batch plan is made for: the training processes, their precision, whether Liger's
    kernels run, and the memory one process may use (`budget_bytes`, described by `budget_text`)."""

    world_size: int
    on_gpu: bool
    precision_bytes: int
    fused_kernels: bool
    budget_bytes: float
    budget_text: str


@dataclass(frozen=True)
class BatchPlan:
    """Micro-batch, accumulation and checkpointing of a run, with the estimate they give and why."""

    batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    world_size: int
    estimate_kwargs: dict[str, Any]
    reason: str

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def estimate(self) -> dict[str, float]:
        return estimate_training_memory(**self.estimate_kwargs)


class BatchError(ValueError):
    """Settings that no plan can run (a global batch that cannot be made up, Liger without a GPU): one
    line naming the variables."""


# `auto` micro-batches keep the estimate within this share of the smallest GPU's memory (or of the RAM
# per process on CPU): the estimate was within 8% of measured peaks (estimate_training_memory).
MEMORY_SHARE = 0.9
# On CPU a larger micro-batch is no faster, only bigger: `auto` stops at the original's 4.
CPU_MAX_MICRO_BATCH = 4


def fused_kernels_enabled(settings: config.Settings, on_gpu: bool) -> bool:
    """USE_LIGER: `auto` means on a GPU (Liger's kernels are Triton GPU kernels, with no CPU path)."""
    return on_gpu if settings.use_liger is None else settings.use_liger


# Device files that a GPU driver creates (NVIDIA's, and AMD's for ROCm builds of torch). Where none
# exists torch can see no GPU, so the CPU path answers without importing torch, which costs a second or
# two in each of trainer.sh's checks.
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/kfd")


def visible_gpu_count() -> int:
    """The GPUs torch can use (CUDA_VISIBLE_DEVICES applied); 0 on a machine without a GPU driver."""
    if not any(os.path.exists(path) for path in GPU_DEVICE_FILES):
        return 0
    import torch

    return torch.cuda.device_count()


def machine_for(settings: config.Settings, world_size: int) -> Machine:
    """The Machine train.py will run on, read from the hardware. The budget is taken from total, not
    free, memory so that every process of a run computes the same plan; preflight checks the plan
    against what is free."""
    gpus = visible_gpu_count()
    if gpus:
        import torch

        count = min(world_size, gpus) or 1
        smallest = min((torch.cuda.get_device_properties(i) for i in range(count)), key=lambda p: p.total_memory)
        return Machine(
            world_size,
            True,
            training_precision_bytes(settings),
            fused_kernels_enabled(settings, True),
            MEMORY_SHARE * smallest.total_memory,
            f"{MEMORY_SHARE:.0%} of the {gib(smallest.total_memory)} of a {smallest.name}",
        )
    import psutil

    ram = psutil.virtual_memory().total
    return Machine(
        world_size,
        False,
        cpu_precision_bytes(settings),
        fused_kernels_enabled(settings, False),
        MEMORY_SHARE * ram / world_size - CPU_PROCESS_BYTES,
        f"{MEMORY_SHARE:.0%} of {gib(ram)} of RAM shared by {world_size} process(es)",
    )


def estimate_kwargs(
    settings: config.Settings, machine: Machine, batch_size: int, accumulation: int, checkpointing: bool
) -> dict[str, Any]:
    """The estimator's keyword arguments for these settings on `machine` (instruct tokenizers add the 3
    chat tokens; ZeRO's stage as config.zero_stage_for runs it)."""
    vocab = settings.vocab_size + (len(config.CHAT_TOKENS) if settings.inst else 0)
    return dict(
        topology=settings.topology,
        vocab_size=vocab,
        batch_size=batch_size,
        max_length=settings.max_length,
        precision_bytes=machine.precision_bytes,
        use_quant=settings.use_quant,
        gradient_checkpointing=checkpointing,
        zero_stage=config.zero_stage_for(settings, machine.world_size),
        world_size=machine.world_size,
        gradient_accumulation_steps=accumulation,
        trains_token_rows=settings.use_quant and settings.inst,
        fused_kernels=machine.fused_kernels,
        include_cuda_overhead=machine.on_gpu,
    )


def global_batch_for(settings: config.Settings, world_size: int) -> int:
    """GLOBAL_BATCH_SIZE, or BATCH_SIZE x GRADIENT_ACCUMULATION_STEPS x processes where both are set
    (then an explicitly set GLOBAL_BATCH_SIZE must agree)."""
    batch, accumulation = settings.batch_size, settings.gradient_accumulation_steps
    if batch is None or accumulation is None:
        return settings.global_batch_size
    product = batch * accumulation * world_size
    if (
        settings.sources.get("GLOBAL_BATCH_SIZE", "").startswith("environment")
        and settings.global_batch_size != product
    ):
        raise BatchError(
            f"GLOBAL_BATCH_SIZE={settings.global_batch_size}: BATCH_SIZE={batch} x "
            f"GRADIENT_ACCUMULATION_STEPS={accumulation} x {world_size} process(es) is {product}; "
            "set BATCH_SIZE or GRADIENT_ACCUMULATION_STEPS to auto, or unset GLOBAL_BATCH_SIZE"
        )
    return product


def micro_batch_candidates(settings: config.Settings, machine: Machine, per_process: int) -> list[int]:
    """The micro-batches to try, largest first: BATCH_SIZE if set, what GRADIENT_ACCUMULATION_STEPS
    leaves if that is set, else every divisor of the per-process batch (at most 4 on CPU)."""
    batch, accumulation = settings.batch_size, settings.gradient_accumulation_steps
    if batch is not None:
        if per_process % batch:
            raise BatchError(
                f"BATCH_SIZE={batch}: must divide the {per_process} sequences per process "
                f"(GLOBAL_BATCH_SIZE={settings.global_batch_size} over {machine.world_size} "
                "process(es)); choose a divisor, or set BATCH_SIZE=auto"
            )
        return [batch]
    if accumulation is not None:
        if per_process % accumulation:
            raise BatchError(
                f"GRADIENT_ACCUMULATION_STEPS={accumulation}: must divide the {per_process} sequences "
                f"per process (GLOBAL_BATCH_SIZE={settings.global_batch_size} over "
                f"{machine.world_size} process(es)); choose a divisor, or set it to auto"
            )
        return [per_process // accumulation]
    cap = per_process if machine.on_gpu else CPU_MAX_MICRO_BATCH
    return [size for size in range(min(cap, per_process), 0, -1) if per_process % size == 0]


def plan_batch(settings: config.Settings, machine: Machine) -> BatchPlan:
    """Micro-batch, accumulation and checkpointing for the settings left on `auto`: the largest
    micro-batch whose estimate fits the machine's budget without activation checkpointing, else with
    it, at the global batch the settings name; explicit settings are kept. Raises BatchError where the
    settings cannot make up the global batch, or ask for Liger without a GPU. When nothing fits, the
    smallest micro-batch (with checkpointing where that is `auto`) is planned, and preflight says what
    would fit."""
    if machine.fused_kernels and not machine.on_gpu:
        raise BatchError(
            "USE_LIGER=true needs a CUDA GPU (Liger's kernels have no CPU path); set USE_LIGER=auto or false"
        )
    world = machine.world_size
    global_batch = global_batch_for(settings, world)
    if global_batch % world:
        raise BatchError(
            f"GLOBAL_BATCH_SIZE={global_batch}: must be a multiple of the {world} training processes; "
            f"use {global_batch + world - global_batch % world}, or another NUM_PROCESSES"
        )
    per_process = global_batch // world
    candidates = micro_batch_candidates(settings, machine, per_process)
    checkpointing = [settings.gradient_checkpointing] if settings.gradient_checkpointing is not None else [False, True]
    chosen = [
        name
        for name, value in (
            ("BATCH_SIZE", settings.batch_size),
            ("GRADIENT_ACCUMULATION_STEPS", settings.gradient_accumulation_steps),
            ("GRADIENT_CHECKPOINTING", settings.gradient_checkpointing),
        )
        if value is None
    ]
    for checkpoint in checkpointing:
        for size in candidates:
            kwargs = estimate_kwargs(settings, machine, size, per_process // size, checkpoint)
            total = estimate_training_memory(**kwargs)["total"]
            if total <= machine.budget_bytes:
                why = (
                    f"{', '.join(chosen)} auto: the largest micro-batch whose estimate ({gib(total)}) fits in "
                    f"{machine.budget_text}"
                    if chosen
                    else "as set"
                )
                return BatchPlan(size, per_process // size, checkpoint, world, kwargs, why)
    size, checkpoint = candidates[-1], checkpointing[-1]
    kwargs = estimate_kwargs(settings, machine, size, per_process // size, checkpoint)
    why = (
        f"{', '.join(chosen)} auto, but even the smallest choice, estimated at "
        f"{gib(estimate_training_memory(**kwargs)['total'])}, exceeds {machine.budget_text}"
        if chosen
        else "as set"
    )
    return BatchPlan(size, per_process // size, checkpoint, world, kwargs, why)


def describe_plan(plan: BatchPlan, max_length: int) -> str:
    """One line for the log: the global batch, how it is made up, and why."""
    return (
        f"batch: {plan.global_batch} sequences ({plan.global_batch * max_length:,} tokens) per optimizer step = "
        f"{plan.world_size} process(es) x micro-batch {plan.batch_size} x {plan.gradient_accumulation_steps} "
        f"accumulation, activation checkpointing {'on' if plan.gradient_checkpointing else 'off'} ({plan.reason})"
    )
