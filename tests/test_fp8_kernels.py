"""The Triton quantization kernels (``haillm.fp8.triton_quant``) against the torch reference, bitwise.

Tests marked ``gpu`` run the public functions of ``haillm.fp8.quant`` on CUDA tensors, which dispatch to the
kernels (asserted), and compare them with the ``*_reference`` functions on the same tensors: the FP8 bytes
and the fp32 scales must be identical. The one freedom is the sign bit of a NaN byte (0x7F or 0xFF), which
torch's own cast does not fix across devices either. Tokens 1, 37, 128, 4097 and K 128, 200, 7168 cover
partial row blocks and partial last tiles. ``act_dequant`` is compared value by value, bitwise in its output
dtype (NaN matches NaN). The CPU tests check that the CPU path never imports Triton and run the dequantization
kernel through Triton's interpreter.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import haillm.fp8.quant as quant
from haillm.fp8 import fp8_linear
from haillm.fp8.quant import (
    AMAX_MIN,
    FP8_DTYPE,
    GRAD_AMAX_MIN,
    act_dequant,
    act_dequant_reference,
    act_quant,
    act_quant_reference,
    act_quant_t,
    act_quant_t_reference,
    act_quant_with_t,
    act_quant_with_t_reference,
    dequant_kernel_applies,
    quant_kernel_applies,
    requant_t,
    requant_t_reference,
    weight_quant,
    weight_quant_reference,
    weight_quant_with_t,
    weight_quant_with_t_reference,
)

ROOT = Path(__file__).resolve().parent.parent

gpu = pytest.mark.gpu
TOKENS = [1, 37, 128, 4097]
CHANNELS = [128, 200, 7168]
DTYPES = [torch.bfloat16, torch.float32]


def same_fp8(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, contiguous, same bytes; NaN (0x7F / 0xFF) matches NaN of either sign."""
    if a.dtype != FP8_DTYPE or a.shape != b.shape or not a.is_contiguous():
        return False
    ua, ub = a.view(torch.uint8), b.view(torch.uint8)
    both_nan = ((ua & 0x7F) == 0x7F) & ((ub & 0x7F) == 0x7F)
    return bool(((ua == ub) | both_nan).all())


def same_scales(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == torch.float32 and a.shape == b.shape and a.is_contiguous()
            and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))


def same_pairs(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> bool:
    return len(got) == len(want) and all(
        same_fp8(g, w) if w.dtype == FP8_DTYPE else same_scales(g, w) for g, w in zip(got, want, strict=True)
    )


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits, ``a`` contiguous; NaN matches NaN whatever its payload."""
    if a.dtype != b.dtype or a.shape != b.shape or not a.is_contiguous() or not torch.equal(a.isnan(), b.isnan()):
        return False
    bits = {torch.float32: torch.int32}.get(a.dtype, torch.int16)
    return torch.equal(a.nan_to_num().view(bits), b.nan_to_num().view(bits))


def varied(t: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Magnitudes that differ by orders from row to row and from column to column (so both the 1x128 and
    the 128x1 tiles have different scales), a zero 1x128 tile, a zero 128x1 tile and saturating values."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, k, generator=g, device="cuda")
    x *= 10.0 ** torch.randint(-3, 4, (t, 1), generator=g, device="cuda")
    x *= 10.0 ** torch.randint(-2, 3, (1, k), generator=g, device="cuda")
    x[t // 2, : min(k, 128)] = 0.0
    x[:, k - 1] = 0.0
    x[0, k // 2] = 3e38 if dtype == torch.float32 else 3e37  # scale near the top of the range
    return x.to(dtype)


@gpu
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", CHANNELS)
@pytest.mark.parametrize("t", TOKENS)
def test_activation_kernels_equal_reference(t, k, dtype, pow2):
    x = varied(t, k, dtype, seed=t * k)
    assert quant_kernel_applies(x)
    q, s = act_quant(x, pow2=pow2)
    assert same_pairs((q, s), act_quant_reference(x, pow2=pow2))
    qt, st = act_quant_t(x, pow2=pow2)
    assert same_pairs((qt, st), act_quant_t_reference(x, pow2=pow2))
    assert same_pairs(act_quant_with_t(x, pow2=pow2), (q, s, qt, st))  # one read, both copies
    # Wgrad's re-tiling of the FP8 copy (linear.py): the kernel reads only q and s.
    assert same_pairs(requant_t(q, s, pow2=pow2), requant_t_reference(q, s, pow2=pow2))


@gpu
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize(("t", "k"), [(37, 200), (4097, 7168)])
def test_gradient_floor(t, k, pow2):
    """Output gradients: tiny tiles keep their own scale with ``GRAD_AMAX_MIN``, zero tiles get the floor."""
    dy = varied(t, k, torch.bfloat16, seed=k) * 1e-12
    assert quant_kernel_applies(dy, min_amax=GRAD_AMAX_MIN)
    want = act_quant_with_t_reference(dy, pow2=pow2, min_amax=GRAD_AMAX_MIN)
    assert same_pairs(act_quant_with_t(dy, pow2=pow2, min_amax=GRAD_AMAX_MIN), want)
    assert same_pairs(act_quant(dy, pow2=pow2, min_amax=GRAD_AMAX_MIN), want[:2])
    assert same_pairs(act_quant_t(dy, pow2=pow2, min_amax=GRAD_AMAX_MIN), want[2:])


def special_values(dtype: torch.dtype) -> torch.Tensor:
    big = torch.finfo(torch.float32).max if dtype == torch.float32 else 3e38  # bf16(fp32 max) is inf
    x = torch.randn(300, 260, device="cuda")
    x[0, 3], x[0, 7], x[1, 200], x[2, 9] = big, -big, 1e30, -1e-30
    x[3, :128] = torch.linspace(-56.0, 56.0, 128)  # amax / 448 = 2^-3 exactly: pow2 keeps it
    x[4, 128:] = 0.0  # a zero 1x128 tile
    x[128:256, 7] = 0.0  # a zero 128x1 tile
    x[5, :] = -0.0
    x[6, 130:140] = 1e-40  # fp32 denormals
    x[7, 11] = float("nan")
    x[8, 140], x[9, 141] = float("inf"), -float("inf")
    x[200:, 250] = torch.linspace(-1e-3, 1e-3, 100)
    return x.to(dtype)


@gpu
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(dtype, pow2):
    """Zeros, -0, saturation, fp32 extremes and denormals, NaN and ±inf (the reference's NaN/inf rules,
    its pow2 quirk of scale 1 for a non-finite tile included), on the GPU and against the CPU reference."""
    x = special_values(dtype)
    for floor in (AMAX_MIN, GRAD_AMAX_MIN):
        got = act_quant_with_t(x, pow2=pow2, min_amax=floor)
        assert same_pairs(got, act_quant_with_t_reference(x, pow2=pow2, min_amax=floor))
        assert same_pairs(tuple(g.cpu() for g in got), act_quant_with_t_reference(x.cpu(), pow2=pow2, min_amax=floor))
    q, s = got[:2]
    assert same_pairs(requant_t(q, s, pow2=pow2), requant_t_reference(q, s, pow2=pow2))
    assert same_pairs(weight_quant_with_t(x, pow2=pow2), weight_quant_with_t_reference(x, pow2=pow2))


@gpu
def test_strided_and_batched_inputs():
    """Any 2-D strides (transposed views, column slices, storage offsets) and leading batch dims."""
    base = varied(300, 1000, torch.bfloat16, seed=3)
    for x in (base.t(), base[:, ::3], base[7:, 100:], base.view(3, 100, 1000)):
        assert same_pairs(act_quant(x, pow2=True), act_quant_reference(x, pow2=True))
        if x.dim() == 2:
            assert same_pairs(act_quant_with_t(x), act_quant_with_t_reference(x))
            assert same_pairs(weight_quant(x), weight_quant_reference(x))


@gpu
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), [(1, 37), (128, 128), (300, 200), (2112, 7168), (7168, 2048)])
def test_weight_kernel_equals_reference(n, k, dtype, pow2):
    w = varied(n, k, dtype, seed=n + k) * 0.02
    want = weight_quant_with_t_reference(w, pow2=pow2)
    assert same_pairs(weight_quant(w, pow2=pow2), want[:2])
    assert same_pairs(weight_quant_with_t(w, pow2=pow2), want)


@gpu
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize(("n", "k"), [(2048, 7168), (7168, 2048), (200, 300)])
def test_stack_kernel_equals_reference(n, k, pow2):
    """A routed experts' stack ``[G, n, k]`` with the transposed copy Dgrad reads: bitwise the reference, and
    each ``W[g].T`` K-major (unit stride along n: what the grouped FP8 GEMM copies ahead asynchronously)."""
    w = varied(4 * n, k, torch.bfloat16, seed=n).view(4, n, k) * 0.02
    got, want = weight_quant_with_t(w, pow2=pow2), weight_quant_with_t_reference(w, pow2=pow2)
    assert same_pairs(got[:2], want[:2]) and same_pairs(weight_quant(w, pow2=pow2), want[:2])
    assert got[2].shape == (4, k, n) and got[2].stride(-1) == 1  # views of one [k, 4 * n'] array
    assert same_pairs(tuple(t.contiguous() for t in got[2:]), want[2:])


OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@gpu
@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize(("t", "k"), [(1, 128), (37, 200), (128, 576), (4097, 2112), (300, 7168)])
def test_dequant_kernel_equals_reference(t, k, dtype):
    """The Wgrad / dispatch dequantization (``dtype`` written directly) is the reference's fp32 product and
    one rounding, bitwise, on whole and partial tiles."""
    q, s = act_quant(varied(t, k, torch.float32, seed=t + k), min_amax=GRAD_AMAX_MIN)
    assert dequant_kernel_applies(q, s, dtype=dtype)
    assert same_values(act_dequant(q, s, dtype=dtype), act_dequant_reference(q, s, dtype=dtype))


@gpu
@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_dequant_every_byte_and_extreme_scales(dtype):
    """Every E4M3 byte (NaN, ±0, subnormals, ±448) times scales from fp32 denormals to overflow, inf and NaN:
    no flush to zero, overflow to inf and round-to-nearest-even as torch does, on the GPU and on the CPU."""
    scales = [1.0, 2.0**-149, 2.0**-130, 2.0**-126, 1e-33, 3e-5, 0.3, 146.0, 1e36, 3e38 / 448, 1e38,
              float("inf"), float("nan")]
    q = torch.arange(256, dtype=torch.uint8, device="cuda").repeat(len(scales), 1).view(FP8_DTYPE)
    s = torch.tensor(scales, device="cuda")[:, None].repeat(1, 2)
    s[:, 1] *= 3.0  # the second tile's scale differs from the first's
    got = act_dequant(q, s, dtype=dtype)
    assert same_values(got, act_dequant_reference(q, s, dtype=dtype))
    assert same_values(got.cpu(), act_dequant_reference(q.cpu(), s.cpu(), dtype=dtype))


@gpu
def test_dequant_strided_and_batched_inputs():
    """Row and column slices (the scales sliced alike), a transposed pair and leading batch dims."""
    q, s = act_quant(varied(300, 1000, torch.bfloat16, seed=5))
    qt, st = q.t(), torch.rand(1000, 3, device="cuda").t().contiguous().t()  # both transposed views
    qb, sb = act_quant(varied(300, 1000, torch.bfloat16, seed=6).view(3, 100, 1000))
    for pair in ((q[7:], s[7:]), (q[:, :300], s[:, :3]), (q[:, 256:], s[:, 2:]), (qt, st), (qb, sb)):
        assert dequant_kernel_applies(*pair, dtype=torch.bfloat16)
        for dtype in (torch.bfloat16, torch.float32):
            assert same_values(act_dequant(*pair, dtype=dtype), act_dequant_reference(*pair, dtype=dtype))


@gpu
def test_dequant_dispatch_rule():
    q, s = act_quant(torch.randn(64, 300, device="cuda"))
    assert dequant_kernel_applies(q, s) and dequant_kernel_applies(q, s, dtype=torch.bfloat16)
    assert not dequant_kernel_applies(q, s, dtype=torch.float64) and not dequant_kernel_applies(q, s, block=64)
    assert not dequant_kernel_applies(q.float(), s) and not dequant_kernel_applies(q, s.double())
    assert not dequant_kernel_applies(q, s[:, :2]) and not dequant_kernel_applies(q[:0], s[:0])
    assert same_values(act_dequant(q, s, dtype=torch.float64), act_dequant_reference(q, s, dtype=torch.float64))


@gpu
def test_dispatch_rule():
    x = torch.randn(64, 256, device="cuda")
    assert quant_kernel_applies(x) and quant_kernel_applies(act_quant(x)[0])
    for no in (x.double(), x[:0]):
        assert not quant_kernel_applies(no)
    assert not quant_kernel_applies(x, block=64) and not quant_kernel_applies(x, min_amax=1e-40)
    assert same_pairs(act_quant(x, 64), act_quant_reference(x, 64))  # the reference where the kernel does not apply
    assert same_pairs(act_quant(x, min_amax=1e-40), act_quant_reference(x, min_amax=1e-40))


@gpu
def test_fp8_linear_same_with_kernels(monkeypatch):
    """``fp8_linear`` forward and backward give the same bits whether it quantizes through the kernels or
    (the dispatch rule switched off) through the reference: the GEMMs see identical operands."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 7168, generator=g, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2112, 7168, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02
    dy = torch.randn(300, 2112, generator=g, device="cuda", dtype=torch.bfloat16)

    def run() -> list[torch.Tensor]:
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_linear(xi, wi, pow2=True)
        y.backward(dy)
        return [y, xi.grad, wi.grad]

    fast = run()
    monkeypatch.setattr(quant, "quant_kernel_applies", lambda *args, **kwargs: False)
    for a, b in zip(fast, run(), strict=True):
        assert torch.equal(a, b)


def test_cpu_path_never_imports_triton_or_dynamo():
    """In one fresh process: the CPU path runs the torch references and never imports Triton or our kernels
    (linear, quantization, dequantization, the fused norm and SwiGLU producers), and nothing a run imports
    before it compiles pulls in dynamo (``haillm.ops.graph_breaks``: ~1.5 s of every process's start-up)."""
    code = (
        "import importlib.util, sys, torch\n"
        "from haillm.fp8 import fp8_linear\n"
        "from haillm.fp8.fused import rmsnorm_act_quant, swiglu_act_quant\n"
        "from haillm.fp8.quant import act_dequant, act_quant, act_quant_with_t, weight_quant_with_t\n"
        "x, w = torch.randn(37, 300, requires_grad=True), torch.randn(200, 300, requires_grad=True)\n"
        "fp8_linear(x, w).sum().backward(); act_quant_with_t(x.detach()); weight_quant_with_t(w.detach())\n"
        "act_dequant(*act_quant(x.detach()), dtype=torch.bfloat16)\n"
        "rmsnorm_act_quant(x, torch.ones(300), 1e-6)[0].sum().backward(); swiglu_act_quant(x, x)[0].sum()\n"
        "spec = importlib.util.spec_from_file_location('train', 'launch/train.py')\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "from haillm.models.deepseek_v3 import DeepSeekV3, get_preset\n"
        "DeepSeekV3(get_preset('tiny')).compute_loss(torch.randint(0, 64, (1, 9)))['loss'].backward()\n"
        "assert not {'triton', 'torch._dynamo'} & set(sys.modules), {'triton', 'torch._dynamo'} & set(sys.modules)\n"
        "assert not {f'haillm.fp8.triton_{k}' for k in ('quant', 'fused', 'grouped')} & set(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=ROOT)


def test_cpu_entry_points_are_the_reference():
    x = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    assert not quant_kernel_applies(x)
    for pow2 in (False, True):
        assert same_pairs(act_quant_with_t(x, pow2=pow2), (*act_quant(x, pow2=pow2), *act_quant_t(x, pow2=pow2)))
        q, s = weight_quant(x, pow2=pow2)
        assert same_pairs(weight_quant_with_t(x, pow2=pow2), (q, s, q.t().contiguous(), s.t().contiguous()))
    q, s = act_quant(x)
    assert not dequant_kernel_applies(q, s)
    for dtype in OUT_DTYPES:
        assert same_values(act_dequant(q, s, dtype=dtype), act_dequant_reference(q, s, dtype=dtype))


INTERPRETED_DEQUANT = """
import torch
from haillm.fp8 import triton_quant
from haillm.fp8.quant import act_dequant_reference, act_quant

g = torch.Generator().manual_seed(0)
for t, k in ((1, 128), (37, 200), (70, 576)):
    x = torch.randn(3, t, k, generator=g) * 10.0 ** torch.randint(-30, 30, (3, t, 1), generator=g)
    q, s = act_quant(x, min_amax=1e-30)
    pairs = ((q, s), (q[1], s[1]), (q[1, :, :100], s[1, :, :1]), (q[1].t(), torch.rand(-(-t // 128), k).t()))
    for qq, ss in pairs:
        for dtype in (torch.float32, torch.float16):
            want = act_dequant_reference(qq, ss, dtype=dtype)
            assert torch.equal(triton_quant.act_dequant(qq, ss, dtype), want), (t, k, dtype)
        # The interpreter casts fp32 to bf16 by truncation, the GPU by round-to-nearest-even: either is taken.
        got = triton_quant.act_dequant(qq, ss, torch.bfloat16).view(torch.int16)
        rne = act_dequant_reference(qq, ss, dtype=torch.bfloat16).view(torch.int16)
        cut = (act_dequant_reference(qq, ss).view(torch.int32) >> 16).to(torch.int16)
        assert ((got == rne) | (got == cut)).all(), (t, k)
"""


def test_dequant_kernel_in_the_interpreter():
    """The dequantization kernel's indexing (partial tiles, row and column slices, a transposed pair, batch
    dims), FP8 decoding and fp32 product, run by Triton's CPU interpreter: fp32 and fp16 bitwise."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", INTERPRETED_DEQUANT], check=True, timeout=120, env=env)
