"""Where each FP8 GEMM runs: never the fp32 reference on a GPU.

On SM90 every shape goes to cuBLAS's blockwise ``scaled_mm``, padded where cuBLAS wants whole blocks
(padding changes no value: checked through the reference, to the fp32 rounding of its matmul, whose BLAS
kernel may differ with the shape); a GPU without blockwise FP8 keeps the
policy's linears in default precision (BF16 in a bf16 run); the CPU runs the reference.
"""

import logging

import pytest
import torch

import haillm.fp8.policy as policy
from haillm.fp8 import act_quant, calc_diff, fp8_gemm, fp8_gemm_reference, gemm_plan, pad_for_scaled_mm, weight_quant
from haillm.fp8.gemm import scaled_mm_shape
from haillm.fp8.grouped import group_gemm_plan
from haillm.models.deepseek_v3 import DeepSeekV3, get_preset
from haillm.models.deepseek_v3.experts import GroupedExperts
from haillm.ops import Linear

SM90, SM80 = (9, 0), (8, 0)
TOKENS = [8192, 4096, 300, 37, 1]  # micro-batches, and the odd row counts routed experts get


def operands(m: int, k: int, n: int, b_block: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    return (*act_quant(a), *(weight_quant(b) if b_block == 128 else act_quant(b)))


@pytest.mark.parametrize("b_block", [128, 1])
@pytest.mark.parametrize(("m", "k", "n"), [(37, 200, 576), (1, 128, 100), (6, 384, 130), (130, 64, 16)])
def test_padding_changes_no_value(m, k, n, b_block):
    a, a_s, b, b_s = operands(m, k, n, b_block)
    padded = pad_for_scaled_mm(a, a_s, b, b_s, b_block)
    m2, k2, n2 = scaled_mm_shape(m, k, n, b_block)
    assert padded[0].shape == (m2, k2) and padded[2].shape == (n2, k2)
    assert scaled_mm_shape(m2, k2, n2, b_block) == (m2, k2, n2)
    assert gemm_plan(SM90, m2, k2, n2, b_block) == "scaled_mm"
    out = fp8_gemm_reference(*padded, b_block=b_block)
    ref = fp8_gemm_reference(a, a_s, b, b_s, b_block)
    assert (out[:m, :n] - ref).abs().max() <= 1e-6 * ref.abs().max()
    assert not out[m:].any() and not out[:, n:].any()


def test_plan_rule():
    assert gemm_plan(None, 37, 200, 576) == "reference"
    assert gemm_plan(SM90, 4096, 7168, 2048) == "scaled_mm"
    assert gemm_plan(SM90, 4096, 7168, 2112) == "scaled_mm_padded"  # V3's fused q/kv down-projection
    assert gemm_plan(SM90, 4096, 7168, 2112, b_block=1) == "scaled_mm"  # 1x128 tiles: N in 16s
    assert gemm_plan(SM80, 4096, 7168, 2048) == "unsupported"


def fp8_linears(preset: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]], set[str]]:
    """(in, out) features of the Linears the FP8 policy puts in FP8, of its routed-expert linears in FP8, and
    of the linears it keeps in default precision, on the meta device; and the precisions their modules got."""
    with torch.device("meta"):
        model = DeepSeekV3(get_preset(preset), init_seed=None)
    report = policy.apply_precision(model, "fp8")
    features = {name: (shape[1], shape[0]) for name, shape in report.shapes.items()}
    modes = {m.precision for m in model.modules() if isinstance(m, (Linear, GroupedExperts))}
    linears = {n for n, m in model.named_modules() if isinstance(m, Linear)}
    low = [features[n] for n in report.low if n in linears]
    routed = [features[n] for n in report.low if n not in linears]
    return low, routed, [features[n] for n in report.kept], modes


@pytest.mark.parametrize("preset", ["v3_671b", "v2_lite_16b", "small"])
def test_every_linear_shape_runs_fp8_or_bf16_on_a_gpu(preset):
    """Fprop ``x[T,K] W[N,K]^T``, Dgrad ``dy[T,N] (W^T)[K,N]^T`` (128x128 blocks) and Wgrad ``dy^T[N,T]
    x^T[K,T]^T`` (1x128 tiles along tokens, ``fp8.wgrad=fp8``) of every FP8 Linear, at every token count:
    cuBLAS on SM90. The routed experts' Fprop and Dgrad: the grouped Triton kernel, any width. The policy's
    other linears run F.linear in the parameters' dtype (BF16 on a GPU); so does the default Wgrad."""
    low, routed, high, modes = fp8_linears(preset)
    assert low and routed and high and modes == {"fp8", "default"}
    plans = set()
    for k, n in low:
        for t in TOKENS:
            plans |= {gemm_plan(SM90, t, k, n), gemm_plan(SM90, t, n, k), gemm_plan(SM90, n, t, k, b_block=1)}
    assert plans <= {"scaled_mm", "scaled_mm_padded"}, plans
    assert group_gemm_plan(SM90) == "triton" and group_gemm_plan(None) == "reference"


def test_gpu_without_blockwise_fp8_keeps_bf16(monkeypatch, caplog):
    model = DeepSeekV3(get_preset("tiny").replace(**policy.FP8_TINY_OVERRIDES), init_seed=0)
    monkeypatch.setattr(policy, "device_capability", lambda device: SM80)
    with caplog.at_level(logging.WARNING, logger=policy.__name__):
        report = policy.apply_fp8(model, True)
    assert not report.low and all(m.precision == "default" for m in model.modules() if isinstance(m, Linear))
    assert sum("SM90" in r.message for r in caplog.records) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("b_block", [128, 1])
@pytest.mark.parametrize(("m", "k", "n"), [(37, 7168, 576), (4096, 7168, 2112), (130, 10944, 2048), (8, 512, 7168)])
def test_padded_scaled_mm_matches_the_reference_on_gpu(m, k, n, b_block):
    args = [t.cuda() for t in operands(m, k, n, b_block)]
    out = fp8_gemm(*args, out_dtype=torch.float32, b_block=b_block)
    assert out.shape == (m, n)
    assert calc_diff(out, fp8_gemm_reference(*args, b_block=b_block)) < 1e-6
