"""The Triton grouped FP8 GEMM on an SM90 GPU and the FP8 experts on CUDA (all tests marked ``gpu``).

The kernel (``fp8_group_gemm`` on CUDA tensors) against ``fp8_group_gemm_reference`` run on the same FP8
operands: same semantics, so they must agree to fp32 rounding (DeepGEMM's ``calc_diff`` < 1e-6 with an fp32
output). Shapes: V2-Lite's experts (64 per rank, dim 2048, inter 1408) and V3's (8 per rank, dim 7168, inter
2048) at uneven row counts with empty groups; Fprop, and Dgrad through the transposed view of the stack;
widths that are not whole blocks. The k-grouped Wgrad kernel (``fp8_group_wgrad``) likewise against
``fp8_k_grouped_gemm_reference`` on the same aligned FP8 operands, at both projections' weight shapes. Then
``GroupedExperts`` in FP8 forward and backward on CUDA under ``torch.cuda.set_sync_debug_mode("error")``: no
host synchronisation in either Wgrad mode.
"""

import copy

import pytest
import torch
from test_grouped_experts import experts, grouped_run, rows

from haillm.fp8 import act_quant, calc_diff, device_capability, weight_quant
from haillm.fp8.grouped import (
    fp8_group_gemm,
    fp8_group_gemm_reference,
    fp8_group_wgrad,
    fp8_k_grouped_gemm_reference,
    group_gemm_plan,
    wgrad_operands,
)

gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def ieee_fp32(monkeypatch):
    """The fp32 reference's batched matmul must not run in TF32."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")


def uneven_counts(total: int, groups: int, seed: int) -> list[int]:
    """``total`` rows over ``groups`` experts, skewed, groups 1 and ``groups // 2`` empty."""
    weights = torch.rand(groups, generator=torch.Generator().manual_seed(seed)) ** 3
    weights[[1, groups // 2]] = 0.0
    counts = (weights / weights.sum() * total).floor().long()
    counts[0] += total - counts.sum()
    return counts.tolist()


def check(counts: list[int], n: int, k: int, seed: int = 0) -> None:
    """Fprop ``x @ W[g].T`` and Dgrad ``dy @ W[g]`` (``W.T`` as the transposed view of the quantized stack)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows_, groups = sum(counts), len(counts)
    w = torch.randn(groups, n, k, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(rows_, k, generator=g, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(rows_, n, generator=g, device="cuda", dtype=torch.bfloat16)
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    w_q, w_s = weight_quant(w)
    for a, b, b_s in ((act_quant(x), w_q, w_s), (act_quant(dy), w_q.transpose(1, 2), w_s.transpose(1, 2))):
        out = fp8_group_gemm(*a, b, b_s, offs, torch.float32)
        ref = fp8_group_gemm_reference(*a, b, b_s, offs)
        assert out.shape == ref.shape and calc_diff(out, ref) < 1e-6, (counts[:4], n, k, b.stride())
        assert calc_diff(fp8_group_gemm(*a, b, b_s, offs), ref) < 1e-5  # bf16 output


def check_wgrad(counts: list[int], n: int, k: int, seed: int = 0) -> None:
    """``dW[g] = dy[rows of g].T @ x[rows of g]`` (``[G, n, k]``) against the reference on the same operands."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dy = torch.randn(sum(counts), n, generator=g, device="cuda", dtype=torch.bfloat16)
    x_q, x_s = act_quant(torch.randn(sum(counts), k, generator=g, device="cuda", dtype=torch.bfloat16))
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    a, a_s, b, b_s, layout = wgrad_operands(dy, x_q, x_s, offs)
    ref = fp8_k_grouped_gemm_reference(a, a_s, b, b_s, layout.starts, layout.ends)
    out = fp8_group_wgrad(dy, x_q, x_s, offs)
    assert out.shape == ref.shape == (len(counts), n, k) and calc_diff(out, ref) < 1e-6, (counts[:4], n, k)
    assert calc_diff(fp8_group_wgrad(dy, x_q, x_s, offs, out_dtype=torch.bfloat16), ref) < 1e-5
    assert all(not out[e].any() for e, c in enumerate(counts) if c == 0)


EXPERT_SHAPES = pytest.mark.parametrize(
    ("groups", "total", "dim", "inter"), [(64, 6007, 2048, 1408), (8, 4099, 7168, 2048)], ids=["v2_lite", "v3"]
)
PARTIAL_BLOCKS = pytest.mark.parametrize(
    ("counts", "n", "k"), [([0, 37, 0, 300, 1], 200, 300), ([5], 130, 129), ([0, 0, 2], 64, 72)]
)


@gpu
@EXPERT_SHAPES
def test_kernel_matches_reference_on_expert_shapes(groups, total, dim, inter):
    assert group_gemm_plan(device_capability(torch.device("cuda"))) == "triton"
    counts = uneven_counts(total, groups, seed=groups)
    check(counts, inter, dim)  # up-projection w1/w3; its Dgrad contracts over inter
    check(counts, dim, inter)  # down-projection w2


@gpu
@PARTIAL_BLOCKS
def test_kernel_partial_blocks(counts, n, k):
    check(counts, n, k, seed=n)


@gpu
@EXPERT_SHAPES
def test_wgrad_kernel_matches_reference_on_expert_shapes(groups, total, dim, inter):
    counts = uneven_counts(total, groups, seed=groups)
    check_wgrad(counts, inter, dim)  # dW1, dW3: [E, inter, dim]
    check_wgrad(counts, dim, inter)  # dW2: [E, dim, inter]


@gpu
@PARTIAL_BLOCKS
def test_wgrad_kernel_partial_blocks(counts, n, k):
    check_wgrad(counts, n, k, seed=n)


@gpu
@pytest.mark.parametrize("wgrad", ["bf16", "fp8"])
def test_cuda_fp8_experts_match_cpu_without_host_sync(wgrad):
    """FP8 experts (one width not whole blocks) on CUDA against the same module on CPU; in either Wgrad mode
    forward and backward never synchronise ("fp8" through the k-grouped ``fp8_group_wgrad``)."""
    cpu = experts(dim=256, inter=200)
    cpu.set_precision("fp8", wgrad=wgrad)
    module = copy.deepcopy(cpu).cuda()
    counts = [0, 300, 0, 1, 77, 0]
    x, tensor_counts = rows(counts, 256)
    g = torch.randn(sum(counts), 256, generator=torch.Generator().manual_seed(1))
    want = grouped_run(cpu, x, tensor_counts, g)
    args = (module, x.cuda(), tensor_counts.cuda(), g.cuda())
    grouped_run(*args)  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = grouped_run(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name, a, b in zip(["y", "dx", "dw1", "dw2", "dw3"], got, want, strict=True):
        assert a.dtype == b.dtype and calc_diff(a.cpu(), b) < 1e-5, name
    for w in got[2:]:
        assert not w[[0, 2, 5]].any()
