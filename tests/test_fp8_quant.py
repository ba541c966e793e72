"""Golden tests for FP8 (E4M3) tile/block quantization against per-tile Python loops.

Round-trip bound used below: ``q = cast(x / s)`` with ``|x / s| <= 448``. For a normal E4M3 value in
``[2^e, 2^(e+1))`` the spacing is ``2^(e-3)`` (3 mantissa bits), so round-to-nearest errs by at most
``2^-4 * |x / s|``; below the normal range (``2^-6``) the spacing is ``2^-9``, error at most ``2^-10``.
Hence ``|x - q * s| <= 2^-4 * |x| + 2^-10 * s`` per element (and so at most ``amax / 28`` in a tile).
"""

import math

import pytest
import torch

from haillm.fp8 import (
    FP8_DTYPE,
    GRAD_AMAX_MIN,
    act_dequant,
    act_quant,
    act_quant_t,
    requant_t,
    weight_dequant,
    weight_quant,
)

SLACK = 1 + 1e-5  # fp32 rounding of x / s and q * s


def loop_scale(tile: torch.Tensor, pow2: bool) -> float:
    s = max(tile.abs().max().item(), 1e-4) / 448.0
    s = float(torch.tensor(s, dtype=torch.float32))  # the scale is an fp32 number
    return 2.0 ** math.ceil(math.log2(s)) if pow2 else s


def loop_quant_tile(tile: torch.Tensor, s: float) -> torch.Tensor:
    return (tile / torch.tensor(s, dtype=torch.float32)).clamp(-448, 448).to(FP8_DTYPE)


def varied(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random values whose magnitude differs by orders from row to row."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 10 ** torch.randint(-3, 4, (*shape[:-1], 1), generator=g)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("pow2", [False, True])
def test_act_quant_matches_per_tile_loop(pow2):
    x = varied(3, 5, 300)  # last tile is partial: 300 = 2 * 128 + 44
    q, s = act_quant(x, pow2=pow2)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (3, 5, 3)
    for idx in torch.cartesian_prod(torch.arange(3), torch.arange(5)).tolist():
        for j in range(3):
            tile = x[idx[0], idx[1], j * 128 : (j + 1) * 128]
            want = loop_scale(tile, pow2)
            assert s[idx[0], idx[1], j].item() == want
            assert same_bits(q[idx[0], idx[1], j * 128 : (j + 1) * 128], loop_quant_tile(tile, want))


@pytest.mark.parametrize("pow2", [False, True])
def test_weight_quant_matches_per_block_loop(pow2):
    w = varied(300, 200, seed=1)  # 3 x 2 blocks, partial in both directions
    q, s = weight_quant(w, pow2=pow2)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape and s.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            blk = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            want = loop_scale(blk, pow2)
            assert s[i, j].item() == want
            assert same_bits(q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128], loop_quant_tile(blk, want))


def test_round_trip_error_bound():
    x = varied(64, 1000, seed=2)
    q, s = act_quant(x)
    err = (act_dequant(q, s) - x).abs()
    s_full = s.repeat_interleave(128, dim=-1)[:, :1000]
    assert (err <= (2**-4 * x.abs() + 2**-10 * s_full) * SLACK).all()
    # The bound is attained to within a factor 2 somewhere, so it is the right one for E4M3 (not E5M2...).
    assert (err / (x.abs() + 1e-30)).max() > 2**-5

    w = varied(384, 300, seed=3)
    wq, ws = weight_quant(w)
    w_err = (weight_dequant(wq, ws) - w).abs()
    ws_full = ws.repeat_interleave(128, 0)[:384].repeat_interleave(128, 1)[:, :300]
    assert (w_err <= (2**-4 * w.abs() + 2**-10 * ws_full) * SLACK).all()


@pytest.mark.parametrize("pow2", [False, True])
def test_zero_tiles_use_clamped_amax(pow2):
    x = torch.randn(4, 256)
    x[1] = 0.0  # whole row zero
    x[2, 128:] = 0.0  # one zero tile
    q, s = act_quant(x, pow2=pow2)
    floor = torch.tensor(1e-4 / 448, dtype=torch.float32).item()
    want = 2.0 ** math.ceil(math.log2(floor)) if pow2 else floor
    assert s[1].tolist() == [want, want] and s[2, 1].item() == want
    assert (q[1].float() == 0).all() and (q[2, 128:].float() == 0).all()
    assert (act_dequant(q, s)[1] == 0).all()


def test_pow2_scales_are_powers_of_two_covering_amax():
    x = varied(16, 512, seed=4)
    x[0, :128] = torch.linspace(-56.0, 56.0, 128)  # amax / 448 = 2^-3 exactly: must be kept, not doubled
    _, s = act_quant(x, pow2=True)
    mantissa, _ = torch.frexp(s)
    assert (mantissa == 0.5).all()
    exact = x.reshape(16, 4, 128).abs().amax(-1).clamp(min=1e-4) / 448
    assert (s >= exact).all() and (s < 2 * exact).all()
    assert s[0, 0].item() == 2**-3


def test_saturation_never_gives_nan_or_inf():
    fmax = torch.finfo(torch.float32).max
    x = torch.randn(2, 256)
    x[0, 3], x[0, 7], x[1, 200] = fmax, -fmax, 1e30
    xb = x.clamp(-1e38, 1e38).bfloat16()  # bf16(fp32 max) would be inf, and inf input is not finite
    for q, s in (act_quant(x), act_quant(x, pow2=True), weight_quant(x), act_quant(xb)):
        assert torch.isfinite(q.float()).all() and torch.isfinite(s).all()
        assert q.float().abs().max() <= 448
    q, s = act_quant(x)
    back = act_dequant(q, s)
    assert torch.isfinite(back).all()
    assert abs(back[0, 3].item() / fmax - 1) < 2**-4 and abs(back[1, 200].item() / 1e30 - 1) < 2**-4


def test_act_quant_t_tiles_along_tokens():
    x = varied(200, 300, seed=5).t()  # [T=300, K=200], magnitudes vary from channel to channel
    qt, st = act_quant_t(x)
    assert qt.shape == (200, 300) and st.shape == (200, 3)
    for k in range(0, 200, 37):
        for j in range(3):
            col = x[j * 128 : (j + 1) * 128, k]  # a 128x1 tile of x
            assert st[k, j].item() == loop_scale(col, False)
            assert same_bits(qt[k, j * 128 : (j + 1) * 128], loop_quant_tile(col, st[k, j].item()))


def test_requant_t_from_fp8_copy():
    x = varied(300, 200, seed=6)
    q, s = act_quant(x)
    x_hat = act_dequant(q, s)
    qt, st = requant_t(q, s)
    assert qt.shape == (200, 300) and st.shape == (200, 3)
    # It is act_quant_t of the dequantized copy, and within two roundings of the original.
    ref_q, ref_s = act_quant_t(x_hat)
    assert same_bits(qt, ref_q) and torch.equal(st, ref_s)
    floor = 2**-10 * (st.repeat_interleave(128, 1)[:, :300] + s.repeat_interleave(128, 1)[:, :200].t())
    err = (act_dequant(qt, st) - x.t()).abs()
    assert (err <= (2 * 2**-4 * x.t().abs() + floor) * 1.07).all()  # 1.07 covers 2^-4 * |x_hat - x|


def test_requant_t_with_pow2_scales_is_exact_in_normal_range():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(300, 200, generator=g) * (0.5 + torch.rand(300, 1, generator=g))
    q, s = act_quant(x, pow2=True)
    x_hat_t = act_dequant(q, s).t()
    qt, st = requant_t(q, s, pow2=True)
    normal = x_hat_t.abs() >= st.repeat_interleave(128, 1)[:, :300] * 2**-6  # E4M3 normal range in new tile
    assert normal.float().mean() > 0.9
    back = act_dequant(qt, st)
    assert torch.equal(back[normal], x_hat_t[normal])


def test_gradient_floor_keeps_small_tiles_precise():
    """A gradient tile far below the activation floor (1e-4) keeps E4M3's relative precision with
    ``GRAD_AMAX_MIN``; the activation floor would flush most of it to zero."""
    g = torch.randn(4, 256, generator=torch.Generator().manual_seed(7)) * 1e-11
    q, s = act_quant(g, min_amax=GRAD_AMAX_MIN)
    assert (act_dequant(q, s) - g).abs().le((2**-4 * g.abs() + 2**-10 * s.repeat_interleave(128, -1)) * SLACK).all()
    assert (act_quant(g)[0].float() == 0).all()
    zeros = torch.zeros(2, 256)
    qz, sz = act_quant(zeros, min_amax=GRAD_AMAX_MIN)
    assert (qz.float() == 0).all() and torch.isfinite(sz).all() and (sz > 0).all()
