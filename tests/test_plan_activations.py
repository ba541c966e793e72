"""The planner's activation model (haillm.tools.activations) against what autograd really keeps, for one
micro-batch of the whole model in one process: fp32 and BF16 parameters, FP8 linears, recomputation and
weight-gradient deferral (DualPipe's linears) on CPU (where BF16 GEMMs are fp32 arithmetic that keeps the
bf16 operands for backward, as a GPU does: haillm/ops/precision.py); BF16 parameters on a GPU. Measured by
storage with tests/saved_tensors.py. Tensor parallelism on 2 forked ranks (tests/dist.py): each transformer
block's share and the whole, with and without sequence parallelism, against the same model unsplit.
Run with `-s` to print the tensor-parallel table."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from dist import run_distributed
from memory_probe import allocated_during
from saved_tensors import saved_storages

import haillm.ops.linear as linear_mod
from haillm.fp8.policy import FP8_TINY_OVERRIDES, apply_fp8
from haillm.models.deepseek_v3.args import get_preset
from haillm.models.deepseek_v3.model import DeepSeekV3
from haillm.ops import Linear, set_weight_grad_deferral
from haillm.parallel.mesh import ParallelDims
from haillm.parallel.pipeline.stage import StageSpec
from haillm.parallel.tensor import TensorParallel
from haillm.parallel.tensor_plan import parallelize_tensor
from haillm.tools.activations import ActivationSetup, block_bytes, chunk_bytes
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


# name: (ModelArgs changes, recompute (with the SwiGLU technique), the fused head computes its gradients in forward)
TP_CASES = {
    "fp32": ({}, False, True),
    "fp32, recompute": ({}, True, True),
    "fp32, recompute, no q-LoRA, head recomputes its logits": ({"q_lora_rank": 0}, True, False),
}
TP_MODES = {"tp=1": None, "tp=2": False, "tp=2 SP": True}  # sequence_parallel (None: the model unsplit)


def _tp_kept(tp_size: int, micro_batch: int, seq_len: int) -> dict[tuple[str, str], tuple[dict, dict]]:
    """On this rank, per case and mode: ``({block: bytes}, {block: bytes})`` measured and planned, blocks of
    ``model.layers`` by name and "" for the rest (embedding, head, MTP)."""
    dims = ParallelDims(tp=tp_size, world_size=tp_size).build()
    wgrad_bytes = linear_mod.CE_WGRAD_BYTES_PER_TOKEN
    out = {}
    for case, (changes, recompute, grads_in_forward) in TP_CASES.items():
        linear_mod.CE_WGRAD_BYTES_PER_TOKEN = wgrad_bytes if grads_in_forward else 0  # the planner reads it too
        args = get_preset("tiny").replace(**changes)
        batch = torch.randint(0, args.vocab_size, (micro_batch, seq_len + 1),
                              generator=torch.Generator().manual_seed(0))
        for mode, sequence_parallel in TP_MODES.items():
            model = DeepSeekV3(args, init_seed=0)
            tp = 1 if sequence_parallel is None else tp_size
            if tp > 1:
                parallelize_tensor(model, TensorParallel(dims.tp_group, tp, dims.tp_rank, sequence_parallel))
            model.set_recompute(recompute, recompute)
            blocks: dict[int, str] = {}
            kept, losses = saved_storages(model, lambda: model.compute_loss(batch), blocks)  # noqa: B023
            losses["loss"].backward()
            measured: dict[str, int] = defaultdict(int)
            for ptr, nbytes in kept.items():
                measured[blocks[ptr]] += nbytes
            setup = ActivationSetup(act_bytes=4, recompute=recompute, cpu=True, tp=tp,
                                    sequence_parallel=bool(sequence_parallel))
            planned = {name: block_bytes(args, int(name) < args.n_dense_layers, micro_batch, seq_len, setup)
                       for name in model.layers}
            whole = StageSpec(0, range(args.n_layers), first=True, last=True)
            planned[""] = chunk_bytes(args, whole, micro_batch, seq_len, setup, shared_embedding=True) - sum(
                planned.values())
            out[case, mode] = dict(measured), planned
    linear_mod.CE_WGRAD_BYTES_PER_TOKEN = wgrad_bytes
    return out


def test_tensor_parallel_kept_bytes_per_layer():
    """Per rank of tp=2, with and without sequence parallelism, each block keeps what the planner says (within
    1%) and so does the rest of the model (embedding, head, MTP); per layer, tp=2 keeps less than tp=1, by the
    planned amounts. Sequence parallelism keeps less again without recompute; with it, it may keep more (its
    gathered inputs of the column-parallel linears are no norm outputs: recompute does not drop them)."""
    results = run_distributed(_tp_kept, world_size=2, args=(2, 2, 64), timeout=120)
    print("\ncase / mode / block: planned, measured bytes per rank")
    for rank, per_rank in enumerate(results):
        for (case, mode), (measured, planned) in per_rank.items():
            for block in planned:
                if rank == 0:
                    print(f"  {case:<55}{mode:<9}{block or 'rest':<6}{planned[block]:>11.0f}{measured[block]:>11}")
                assert planned[block] == pytest.approx(measured[block], rel=0.01), (rank, case, mode, block)
        for case, (_, recompute, _) in TP_CASES.items():
            for block in ("0", "1"):  # the dense layer, an MoE layer
                layer = {mode: per_rank[case, mode][0][block] for mode in TP_MODES}
                planned = {mode: per_rank[case, mode][1][block] for mode in TP_MODES}
                assert layer["tp=1"] > max(layer["tp=2"], layer["tp=2 SP"]), (case, block, layer)
                assert recompute or layer["tp=2"] > layer["tp=2 SP"], (case, block, layer)
                for mode in ("tp=2", "tp=2 SP"):
                    assert layer[mode] / layer["tp=1"] == pytest.approx(planned[mode] / planned["tp=1"], rel=0.01)
