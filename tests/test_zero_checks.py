"""Guards util.fuse_zero_gradient_checks: its one-kernel overflow check and gradient norm give the
answers of DeepSpeed's own per-tensor ones, so a step with an inf/NaN gradient is still skipped and
clipping still sees the same norm."""
import math

import pytest
import torch

import util


class PartitionedOptimizer:
    """The attributes of DeepSpeedZeroOptimizer that its overflow check and gradient norm read."""

    device = "cpu"
    model_parallel_rank = 0
    dp_process_group = "data-parallel group"

    def __init__(self, grads):
        self.bit16_groups = [grads]
        self.averaged_gradients = {0: grads}

    def _model_parallel_all_reduce(self, tensor, op):
        pass  # no model parallelism


@pytest.fixture
def all_reduces(monkeypatch):
    """deepspeed.comm.all_reduce as two processes holding equal partitions would see it: the tensor
    doubles in place. Returns the (op, group) of each call."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed import comm

    calls = []

    def all_reduce(tensor, op=None, group=None, **kwargs):
        calls.append((op, group))
        tensor.mul_(2)

    monkeypatch.setattr(comm, "all_reduce", all_reduce)
    return calls


@pytest.fixture
def zero_optimizer(monkeypatch, all_reduces):
    """DeepSpeedZeroOptimizer's own two methods (restored after the test) and the fused ones."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    # DeepSpeed's own overflow check tests each tensor with this static method of its class.
    monkeypatch.setattr(PartitionedOptimizer, "_has_inf_or_nan", DeepSpeedZeroOptimizer.__dict__["_has_inf_or_nan"],
                        raising=False)
    own = {}
    for name in ("has_overflow_partitioned_grads_serial", "get_grad_norm_direct"):
        own[name] = getattr(DeepSpeedZeroOptimizer, name)
        monkeypatch.setattr(DeepSpeedZeroOptimizer, name, own[name])
    assert util.fuse_zero_gradient_checks()
    fused = {name: getattr(DeepSpeedZeroOptimizer, name) for name in own}
    assert all(fused[name] is not own[name] for name in own)
    return own, fused


def lora_like_gradients(poison: float | None = None):
    """bf16 gradients of LoRA-like shapes; `poison` is written into one element of the last one."""
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=generator).to(torch.bfloat16) * scale
             for shape, scale in [((16, 64), 0.1), ((64, 16), 3.0), ((16, 48), 1e-3), ((48, 16), 20.0)] * 3]
    if poison is not None:
        grads[-1][5, 7] = poison
    return grads


def step_decision(methods, optimizer, grads, params) -> tuple[bool, float | None]:
    """(skipped, norm) as DeepSpeedZeroOptimizer.step decides them with bf16 and check_grad_overflow
    on: the overflow check first, then the norm, which marks an inf/NaN total as -1."""
    if methods["has_overflow_partitioned_grads_serial"](optimizer).item():
        return True, None
    norm = methods["get_grad_norm_direct"](optimizer, grads, params).item()
    return norm == -1.0, norm


@pytest.mark.parametrize("poison", [None, math.nan, math.inf, -math.inf, 1e30])
def test_fused_checks_skip_the_same_steps_as_deepspeeds_own(zero_optimizer, poison):
    own, fused = zero_optimizer
    grads = lora_like_gradients(poison)
    optimizer = PartitionedOptimizer(grads)
    params = [torch.empty_like(g) for g in grads]
    skipped, norm = step_decision(fused, optimizer, grads, params)
    own_skipped, own_norm = step_decision(own, optimizer, grads, params)
    # 1e30 is a finite bf16 value whose square overflows the fp32 total: DeepSpeed's norm then skips
    # that step, where the fused overflow check already did.
    assert skipped == own_skipped == (poison is not None)
    assert fused["has_overflow_partitioned_grads_serial"](optimizer).item() == (poison is not None)
    if not skipped:
        assert norm == pytest.approx(own_norm, rel=1e-6)


def test_fused_norm_leaves_zero_padding_out(zero_optimizer):
    own, fused = zero_optimizer
    grads = lora_like_gradients()
    padding = torch.full((8,), 100.0, dtype=torch.bfloat16)
    padding._zero_padding = True  # how ZeRO marks the filler of its last partition
    optimizer = PartitionedOptimizer(grads)
    params = [torch.empty_like(g) for g in grads]
    padded = grads[:6] + [padding] + grads[6:]
    norm = fused["get_grad_norm_direct"](optimizer, padded, params).item()
    assert norm == pytest.approx(own["get_grad_norm_direct"](optimizer, grads, params).item(), rel=1e-6)
    assert norm == pytest.approx(math.sqrt(2 * sum(g.double().pow(2).sum().item() for g in grads)), rel=1e-6)


def test_fused_norm_sums_over_processes_once(zero_optimizer, all_reduces):
    from deepspeed import comm

    _, fused = zero_optimizer
    grads = lora_like_gradients()
    optimizer = PartitionedOptimizer(grads)
    norm = fused["get_grad_norm_direct"](optimizer, grads, [torch.empty_like(g) for g in grads]).item()
    assert all_reduces == [(comm.ReduceOp.SUM, optimizer.dp_process_group)]
    one_process = math.sqrt(sum(g.double().pow(2).sum().item() for g in grads))
    assert norm == pytest.approx(math.sqrt(2) * one_process, rel=1e-6)


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_fused_norm_marks_an_invalid_norm_as_deepspeed_does(zero_optimizer, poison):
    _, fused = zero_optimizer
    grads = lora_like_gradients(poison)
    norm = fused["get_grad_norm_direct"](PartitionedOptimizer(grads), grads, [torch.empty_like(g) for g in grads])
    assert norm.item() == -1.0  # step() skips the update on this marker


@pytest.mark.parametrize("case", ["pipeline-replicated", "model-parallel-rank-1", "no-parameters"])
def test_fused_norm_leaves_out_what_deepspeed_leaves_out(zero_optimizer, case):
    own, fused = zero_optimizer
    grads = lora_like_gradients()
    optimizer = PartitionedOptimizer(grads)
    params = [torch.empty_like(g) for g in grads]
    if case == "pipeline-replicated":
        params[1].ds_pipe_replicated = True  # counted on another pipeline stage
    elif case == "model-parallel-rank-1":
        optimizer.model_parallel_rank = 1  # only model-parallel weights count here: none
    else:
        params = []
    norm = fused["get_grad_norm_direct"](optimizer, grads, params).item()
    assert norm == pytest.approx(own["get_grad_norm_direct"](optimizer, grads, params).item(), rel=1e-6)
    if case != "pipeline-replicated":
        assert norm == 0.0
