"""Guards memory.plan_batch (the micro-batch, accumulation and checkpointing that `auto` chooses: the
largest that fits, never changing the global batch; explicit settings kept; one-line errors where the
global batch cannot be made up) and train.py's MFU arithmetic."""

import pytest

import config
import memory
import train

GIB = 2**30


def settings(**variables):
    env = {"INPUT_DATASET": "me/corpus", "OUTPUT_DIR": "/nonexistent/output", "WORK_DIR": "/nonexistent/work"}
    return config.load_settings({**env, **{k: str(v) for k, v in variables.items()}})


def gpu(budget_gib, world_size=1, fused=False):
    return memory.Machine(world_size, True, 2, fused, budget_gib * GIB, f"{budget_gib} GiB")


def plan_total(plan):
    return plan.estimate["total"]


def test_a_large_gpu_gets_the_largest_micro_batch_without_checkpointing():
    plan = memory.plan_batch(settings(FACTOR=6144), gpu(120))
    assert (plan.batch_size, plan.gradient_accumulation_steps, plan.gradient_checkpointing) == (32, 1, False)
    assert plan_total(plan) <= 120 * GIB and plan.global_batch == 32
    assert "BATCH_SIZE, GRADIENT_ACCUMULATION_STEPS, GRADIENT_CHECKPOINTING auto" in plan.reason


@pytest.mark.parametrize("budget_gib", [80, 40, 24])
def test_smaller_gpus_trade_micro_batch_then_checkpointing_for_memory_at_the_same_global_batch(budget_gib):
    s = settings()  # ~1B
    plan = memory.plan_batch(s, gpu(budget_gib))
    assert plan.global_batch == 32 and plan_total(plan) <= budget_gib * GIB
    bigger = [size for size in range(plan.batch_size + 1, 33) if 32 % size == 0]
    machine = gpu(budget_gib)
    for size in bigger:  # nothing larger fits with the same checkpointing
        kwargs = memory.estimate_kwargs(s, machine, size, 32 // size, plan.gradient_checkpointing)
        assert memory.estimate_training_memory(**kwargs)["total"] > budget_gib * GIB
    if plan.gradient_checkpointing:  # checkpointing only when no micro-batch fits without it
        kwargs = memory.estimate_kwargs(s, machine, 1, 32, False)
        assert memory.estimate_training_memory(**kwargs)["total"] > budget_gib * GIB


def test_fused_kernels_need_less_activation_memory_and_so_allow_larger_micro_batches():
    s = settings()
    plain, fused = gpu(100, fused=False), gpu(100, fused=True)
    for checkpointing in (False, True):
        kwargs = [memory.estimate_kwargs(s, m, 8, 4, checkpointing) for m in (plain, fused)]
        sizes = [memory.estimate_training_memory(**k)["activations"] for k in kwargs]
        assert sizes[1] < 0.85 * sizes[0]
    assert memory.plan_batch(s, fused).batch_size > memory.plan_batch(s, plain).batch_size


def test_explicit_settings_are_kept_and_only_the_rest_is_chosen():
    machine = gpu(200)
    kept = memory.plan_batch(settings(BATCH_SIZE=2, GRADIENT_CHECKPOINTING="true"), machine)
    assert (kept.batch_size, kept.gradient_accumulation_steps, kept.gradient_checkpointing) == (2, 16, True)
    accumulation = memory.plan_batch(settings(GRADIENT_ACCUMULATION_STEPS=4), machine)
    assert (accumulation.batch_size, accumulation.gradient_accumulation_steps) == (8, 4)
    both = memory.plan_batch(settings(BATCH_SIZE=4, GRADIENT_ACCUMULATION_STEPS=2), gpu(200, world_size=2))
    assert both.global_batch == 16  # the product wins over the default GLOBAL_BATCH_SIZE
    as_set = memory.plan_batch(
        settings(BATCH_SIZE=4, GRADIENT_ACCUMULATION_STEPS=2, GRADIENT_CHECKPOINTING="false"), gpu(1)
    )
    assert as_set.reason == "as set" and memory.describe_plan(as_set, 2048).startswith(
        "batch: 8 sequences (16,384 tokens) per optimizer step = 1 process(es) x micro-batch 4 x 2 accumulation"
    )


@pytest.mark.parametrize(
    "variables, world_size, message",
    [
        (
            dict(BATCH_SIZE=5),
            1,
            "BATCH_SIZE=5: must divide the 32 sequences per process (GLOBAL_BATCH_SIZE=32 over 1 "
            "process(es)); choose a divisor, or set BATCH_SIZE=auto",
        ),
        (
            dict(GRADIENT_ACCUMULATION_STEPS=3),
            1,
            "GRADIENT_ACCUMULATION_STEPS=3: must divide the 32 sequences per process",
        ),
        (dict(GLOBAL_BATCH_SIZE=32), 3, "GLOBAL_BATCH_SIZE=32: must be a multiple of the 3 training processes; use 33"),
        (
            dict(GLOBAL_BATCH_SIZE=64, BATCH_SIZE=4, GRADIENT_ACCUMULATION_STEPS=2),
            2,
            "GLOBAL_BATCH_SIZE=64: BATCH_SIZE=4 x GRADIENT_ACCUMULATION_STEPS=2 x 2 process(es) is 16",
        ),
    ],
)
def test_a_global_batch_that_cannot_be_made_up_is_one_line_naming_the_variable(variables, world_size, message):
    with pytest.raises(memory.BatchError) as err:
        memory.plan_batch(settings(**variables), gpu(200, world_size=world_size))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_cpu_keeps_small_micro_batches():
    machine = memory.Machine(1, False, 4, False, 1000 * GIB, "RAM")
    plan = memory.plan_batch(settings(FACTOR=768, MAX_LENGTH=256), machine)
    assert (plan.batch_size, plan.gradient_accumulation_steps, plan.gradient_checkpointing) == (4, 8, False)
    assert not plan.estimate_kwargs["include_cuda_overhead"]


def test_liger_follows_the_device_unless_set():
    assert memory.fused_kernels_enabled(settings(), on_gpu=True) is True
    assert memory.fused_kernels_enabled(settings(), on_gpu=False) is False
    assert memory.fused_kernels_enabled(settings(USE_LIGER="false"), on_gpu=True) is False


def test_flops_per_token_counts_matmuls_head_and_attention():
    topology = config.topology_for_factor(12288, 52000)
    rows = config.padded_vocab(52000)
    h, layers = topology.hidden_size, topology.num_layers
    non_embedding = topology.parameter_count(rows) - 2 * rows * h
    expected = 6 * non_embedding + 6 * rows * h + 12 * layers * h * 2048
    assert train.flops_per_token(topology, rows, 2048) == expected
    # The issue's arithmetic: 77k tokens/s of the 1B model is about half of an H200's 989 TFLOP/s.
    assert 77_000 * expected / train.peak_flops("NVIDIA H200") == pytest.approx(0.5, abs=0.02)
    assert train.peak_flops("NVIDIA H100 PCIe") == 756e12 and train.peak_flops("Tesla T4") is None


# Peaks measured on an NVIDIA H200 (2026-12-03, `benchmarks/speed.py`, BENCHMARKS.md): train.py with the
# plans that `auto` chose and with the plain path, a 52,000-token vocabulary, 2048-token rows, one GPU.
# (FACTOR, micro-batch, accumulation, checkpointing, USE_QUANT, Liger, ZeRO stage run, GiB allocated)
MEASURED_PEAKS_52K = [
    (12288, 32, 1, False, False, True, 2, 81.98),
    (6144, 32, 1, False, False, True, 2, 34.55),
    (12288, 32, 1, False, True, True, 1, 106.70),
    (12288, 4, 8, True, True, True, 1, 2.51),
    (6144, 4, 8, True, False, False, 2, 5.95),
]


@pytest.mark.parametrize(
    "factor, batch, accumulation, checkpointing, quant, liger, zero, measured_gib", MEASURED_PEAKS_52K
)
def test_the_estimate_of_the_chosen_plans_matches_measured_peaks(
    factor, batch, accumulation, checkpointing, quant, liger, zero, measured_gib
):
    estimate = memory.estimate_training_memory(
        config.topology_for_factor(factor, 52000),
        52000,
        batch,
        2048,
        2,
        quant,
        checkpointing,
        zero,
        1,
        gradient_accumulation_steps=accumulation,
        fused_kernels=liger,
    )
    assert estimate["allocated"] / GIB == pytest.approx(measured_gib, rel=0.05)
