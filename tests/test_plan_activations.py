"""The planner's activation model (haillm.tools.activations) against what autograd really keeps, for one
micro-batch of the whole model in one process: fp32 and BF16 parameters, FP8 linears, recomputation and
weight-gradient deferral (DualPipe's linears) on CPU (where BF16 GEMMs are fp32 arithmetic that keeps the
bf16 operands for backward, as a GPU does: haillm/ops/precision.py); BF16 parameters on a GPU. Measured by
storage with tests/saved_tensors.py."""

from __future__ import annotations

import pytest
import torch
from memory_probe import allocated_during
from saved_tensors import saved_storages

from haillm.fp8.policy import FP8_TINY_OVERRIDES, apply_fp8
from haillm.models.deepseek_v3.args import get_preset
from haillm.models.deepseek_v3.model import DeepSeekV3
from haillm.ops import Linear, set_weight_grad_deferral
from haillm.parallel.pipeline.stage import StageSpec
from haillm.tools.activations import ActivationSetup, chunk_bytes
from haillm.tools.memory import fp8_weight_cache_bytes

GPU = pytest.mark.gpu


@pytest.mark.parametrize("device, dtype, fp8, recompute, swiglu, deferred, tolerance", [
    ("cpu", torch.float32, False, False, False, False, 0.01),
    ("cpu", torch.float32, False, True, False, False, 0.01),
    ("cpu", torch.float32, False, True, True, False, 0.01),
    ("cpu", torch.float32, False, False, False, True, 0.01),
    ("cpu", torch.float32, True, False, False, False, 0.01),
    ("cpu", torch.float32, True, True, True, False, 0.01),
    ("cpu", torch.bfloat16, False, False, False, False, 0.01),
    ("cpu", torch.bfloat16, False, True, True, True, 0.01),
    ("cpu", torch.bfloat16, True, True, True, False, 0.01),
    pytest.param("cuda", torch.bfloat16, False, False, False, False, 0.05, marks=GPU),
    pytest.param("cuda", torch.bfloat16, False, True, True, True, 0.05, marks=GPU),
])
def test_kept_bytes_of_one_micro_batch(device, dtype, fp8, recompute, swiglu, deferred, tolerance):
    """Autograd's saved storages against the planner, and (CPU) against the allocator: the bytes a forward
    leaves allocated, which counts whatever else it may keep alive (recipes' arguments included)."""
    args = get_preset("tiny").replace(**(FP8_TINY_OVERRIDES if fp8 else {}))
    torch.manual_seed(0)
    model = DeepSeekV3(args).to(device=device, dtype=dtype)
    apply_fp8(model, fp8)
    set_weight_grad_deferral(model, deferred)
    model.set_recompute(recompute, swiglu)
    micro_batch, seq_len = 2, 64
    batch = torch.randint(0, args.vocab_size, (micro_batch, seq_len + 1), device=device)
    model.compute_loss(batch)  # builds the FP8 weight caches, which the forward below then finds allocated
    forward = lambda: saved_storages(model, lambda: model.compute_loss(batch))  # noqa: E731
    allocator = device == "cpu" and fp8 and swiglu  # the cases with recipes of views and FP8 pairs
    if allocator:
        resident, (kept, losses) = allocated_during(forward)
    else:
        kept, losses = forward()
    setup = ActivationSetup(act_bytes=dtype.itemsize, recompute=recompute, fp8=fp8, cpu=device == "cpu",
                            swiglu=swiglu)
    whole = StageSpec(0, range(args.n_layers), first=True, last=True)
    predicted = chunk_bytes(args, whole, micro_batch, seq_len, setup, shared_embedding=True)
    cache = 0
    if fp8:  # FP8 linears save the step's cached FP8 weights for backward (the planner counts them apart);
        # the grouped experts hold theirs in the module, outside autograd: only the linears' show up here
        linears = {name for name, m in model.named_modules() if isinstance(m, Linear)}
        cache = fp8_weight_cache_bytes(model, only=linears, transposed=False)
    assert predicted + cache == pytest.approx(sum(kept.values()), rel=tolerance)
    if allocator:  # allocated before the forward: the caches; allocated, not saved: the loss and scalars
        assert predicted == pytest.approx(resident, rel=0.02)
    losses["loss"].backward()
