"""FP8 GEMM: accuracy against the high-precision product (DeepGEMM's metric and threshold) and exactness
against a slow per-128-K-block loop."""

import pytest
import torch
import torch.nn.functional as F

from haillm.fp8 import FP8_DTYPE, act_quant, calc_diff, fp8_gemm, fp8_gemm_scaled_mm, weight_quant


def naive_blockwise_gemm(a, a_s, b, b_s, b_block):
    """One 128-wide K slice at a time: fp8 upcast, partial product, times the two scales, accumulate."""
    m, k = a.shape
    n = b.shape[0]
    acc = torch.zeros(m, n, dtype=torch.float64)
    for j in range(0, (k + 127) // 128):
        sl = slice(j * 128, (j + 1) * 128)
        partial = a[:, sl].double() @ b[:, sl].double().T
        row_scale_b = torch.tensor([b_s[i // b_block, j].item() for i in range(n)], dtype=torch.float64)
        acc += partial * a_s[:, j : j + 1].double() * row_scale_b[None, :]
    return acc


def quantized_pair(m, n, k, b_block, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b, b_s = weight_quant(w) if b_block == 128 else act_quant(w)
    return x, w, (*act_quant(x), b, b_s)


def test_calc_diff_metric():
    x = torch.randn(1000, dtype=torch.float64)
    assert calc_diff(x, x) == 0.0
    assert calc_diff(x, -x) == pytest.approx(2.0)
    e = 0.01  # y = (1 + e) x  ->  1 - 2(1 + e) / (1 + (1 + e)^2) = e^2 / (2 + 2e + e^2)
    assert calc_diff(x, (1 + e) * x) == pytest.approx(e * e / (2 + 2 * e + e * e), rel=1e-6)


@pytest.mark.parametrize("b_block", [128, 1], ids=["w128x128", "wgrad1x128"])
@pytest.mark.parametrize("k", [128, 256, 512, 1024, 2048, 7168])
def test_accuracy_vs_high_precision_product(k, b_block):
    x, w, args = quantized_pair(64, 256, k, b_block, seed=k)
    out = fp8_gemm(*args, out_dtype=torch.float32, b_block=b_block)
    diff = calc_diff(out, x.double() @ w.double().T)
    assert diff < 1e-3, diff


def test_default_output_is_bf16():
    x, w, args = quantized_pair(64, 128, 512, 128)
    out = fp8_gemm(*args)
    assert out.dtype == torch.bfloat16 and out.shape == (64, 128)
    assert calc_diff(out, x.double() @ w.double().T) < 1e-3


@pytest.mark.parametrize("b_block", [128, 1])
@pytest.mark.parametrize("m,n,k", [(64, 256, 512), (37, 200, 300), (5, 130, 1000)])
def test_matches_naive_per_block_loop(m, n, k, b_block):
    _, _, args = quantized_pair(m, n, k, b_block, seed=m + n + k)
    out = fp8_gemm(*args, out_dtype=torch.float32, b_block=b_block)
    ref = naive_blockwise_gemm(*args, b_block)
    assert (out.double() - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_rejects_bad_inputs():
    _, _, (a, a_s, b, b_s) = quantized_pair(8, 128, 256, 128)
    with pytest.raises(ValueError, match="scale shapes"):
        fp8_gemm(a, a_s, b, b_s, b_block=1)  # a 128x128 scale passed as 1x128
    with pytest.raises(TypeError):
        fp8_gemm(a.float(), a_s, b, b_s)
    with pytest.raises(ValueError):
        fp8_gemm(a, a_s, b[:, :128].contiguous(), b_s[:, :1])


def meta(*shape, dtype=FP8_DTYPE):
    return torch.empty(*shape, dtype=dtype, device="meta")


@pytest.mark.parametrize("m,k,n", [(256, 7168, 512), (4, 640, 128)])  # K/128 = 5: padded to 8 for cuBLAS
def test_scaled_mm_layouts_pass_torch_checks(m, k, n):
    """On meta tensors F.scaled_mm runs torch's CUDA size/stride checks (the meta registration mirrors
    ScaledBlas.cpp), so the GPU path's scale layouts are checked here without a GPU."""
    kb = k // 128
    a, a_s, b = meta(m, k), meta(m, kb, dtype=torch.float32), meta(n, k)
    out = fp8_gemm_scaled_mm(a, a_s, b, meta(n // 128, kb, dtype=torch.float32))
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    out = fp8_gemm_scaled_mm(a, a_s, b, meta(n, kb, dtype=torch.float32), torch.float32, b_block=1)
    assert out.shape == (m, n) and out.dtype == torch.float32
    with pytest.raises(RuntimeError, match="blockwise scaling"):  # the checks are live: a row-major a_s fails
        F.scaled_mm(
            a,
            b.t(),
            a_s,
            F.ScalingType.BlockWise1x128,
            meta(n, kb, dtype=torch.float32).t(),
            F.ScalingType.BlockWise1x128,
        )
