"""FP8 policy on the DeepSeek-V3 model: which linears go FP8 (every width), closeness to
the fp32 model, the BF16-emulated linear against its reference, the once-per-step weight cache (torch AdamW
and ZeRO-1) and FP32-only checkpoints."""

import contextlib
import logging
from collections import Counter

import pytest
import torch

import haillm.fp8.linear as fp8_linear_module
from haillm.fp8 import calc_diff, weight_quant
from haillm.fp8.policy import FP8_TINY_OVERRIDES, apply_fp8, apply_precision, invalidate_weight_caches
from haillm.models.deepseek_v3.args import get_preset
from haillm.models.deepseek_v3.experts import WEIGHTS, GroupedExperts
from haillm.models.deepseek_v3.model import DeepSeekV3
from haillm.ops import Linear
from haillm.ops.linear import Bf16EmulatedLinear
from haillm.parallel.zero import ZeroAdamW


def fp8_model(**changes) -> DeepSeekV3:
    """1 dense + 1 MoE layer + 1 MTP block, every eligible linear 128-aligned except wkv_a (160 out)."""
    return DeepSeekV3(get_preset("tiny").replace(**{**FP8_TINY_OVERRIDES, "n_layers": 2, **changes}), init_seed=0)


def tokens(seed: int, bsz: int = 2, seq: int = 64) -> torch.Tensor:
    return torch.randint(0, 258, (bsz, seq + 1), generator=torch.Generator().manual_seed(seed))


def precisions(model) -> dict[str, str]:
    """Every linear's precision by FQN, the stacked routed experts' as their per-expert linears."""
    found = {}
    for n, m in model.named_modules():
        if isinstance(m, Linear):
            found[n] = m.precision
        elif isinstance(m, GroupedExperts):
            found |= {f"{n}.{gid}.{w}": m.precision for gid in m.ids for w in WEIGHTS}
    return found


def test_policy_selects_the_published_linears():
    model = fp8_model()
    report = apply_fp8(model, enabled=True)
    prec = precisions(model)
    fp8 = ["attn.wq_a", "attn.wq_b", "attn.wkv_a", "attn.wkv_b", "attn.wo"]  # wkv_a: 160 out, partial blocks
    moe_blocks = ("layers.1", "mtp.0.block")
    expected_fp8 = (
        [f"layers.{i}.{n}" for i in (0, 1) for n in fp8]
        + [f"mtp.0.block.{n}" for n in fp8]
        + [f"layers.0.ffn.{w}" for w in ("w1", "w2", "w3")]  # dense FFN
        + [f"{b}.ffn.experts.{e}.{w}" for b in moe_blocks for e in range(8) for w in ("w1", "w2", "w3")]
        + [f"{b}.ffn.shared_experts.{w}" for b in moe_blocks for w in ("w1", "w2", "w3")]
        + ["mtp.0.eh_proj"]
    )
    assert sorted(report.low) == sorted(expected_fp8)
    assert report.kept == ["head"]
    assert prec == {n: "fp8" if n in expected_fp8 else "default" for n in prec}
    assert set(prec) == set(expected_fp8) | {"head"}  # gate, embedding, norms: not Linear
    assert report.summary() == f"linears: {len(expected_fp8)} fp8, 1 high precision by policy (head)"
    # Without q compression the single query projection is FP8 too.
    no_q_lora = fp8_model(q_lora_rank=0, mtp_depth=0)
    apply_fp8(no_q_lora, enabled=True)
    assert precisions(no_q_lora)["layers.0.attn.wq"] == "fp8"


def test_fp8_off_is_bitwise_the_plain_model():
    batch = tokens(0)
    plain = fp8_model().compute_loss(batch)["loss"]
    model = fp8_model()
    apply_fp8(model, enabled=True)
    model.compute_loss(batch)
    report = apply_fp8(model, enabled=False)
    assert set(precisions(model).values()) == {"default"} and not report.low
    assert torch.equal(model.compute_loss(batch)["loss"], plain)


def test_every_width_runs_fp8(caplog):
    """The tiny preset's widths (64, 32, 96: no whole 128-block anywhere) all run FP8, silently, on partial
    blocks, and stay close to fp32 on the same weights (measured: loss 8e-6 relative, gradient calc_diff 2e-4;
    bounds as in ``test_low_precision_model_close_to_fp32``)."""
    tiny = DeepSeekV3(get_preset("tiny"), init_seed=0)
    batch = tokens(0)
    ref_loss, ref = loss_and_grads(tiny, batch)
    with caplog.at_level(logging.WARNING, logger="haillm.fp8.policy"):
        report = apply_fp8(tiny, enabled=True)
    assert not caplog.records and report.kept == ["head"]
    assert set(precisions(tiny).values()) == {"fp8", "default"} and len(report.low) == len(precisions(tiny)) - 1
    loss, grads = loss_and_grads(tiny, batch)
    flat = torch.cat([g.flatten() for g in grads.values()])
    assert loss != ref_loss and loss == pytest.approx(ref_loss, rel=1e-3)
    assert 0 < calc_diff(flat, torch.cat([g.flatten() for g in ref.values()])) < 5e-3


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model.compute_loss(batch)["loss"]
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("precision,pow2", [("fp8", False), ("fp8", True), ("bf16_emulated", False)])
def test_low_precision_model_close_to_fp32(precision, pow2):
    batch = tokens(0, bsz=4)
    model = fp8_model()
    ref_loss, ref = loss_and_grads(model, batch)
    apply_precision(model, precision, pow2_scales=pow2)
    loss, grads = loss_and_grads(model, batch)
    assert loss != ref_loss and loss == pytest.approx(ref_loss, rel=1e-3)
    assert grads.keys() == ref.keys()
    flat = torch.cat([g.flatten() for g in grads.values()])
    assert 0 < calc_diff(flat, torch.cat([g.flatten() for g in ref.values()])) < 5e-3  # measured <= 9e-4
    # Away from the routers (whose near-tie flips move single experts' grads by several %), tensor by tensor
    # (measured <= 4e-3 for FP8).
    for name in ["embed.weight", "layers.0.attn.wq_a.weight", "layers.0.attn.wkv_b.weight", "layers.0.ffn.w2.weight"]:
        assert calc_diff(grads[name], ref[name]) < 1e-2, name


def test_bf16_emulated_linear_rounds_every_gemm_operand():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 96, generator=g, requires_grad=True)
    w = torch.randn(80, 96, generator=g, requires_grad=True)
    dy = torch.randn(3, 50, 80, generator=g)
    y = Bf16EmulatedLinear.apply(x, w)
    y.backward(dy)

    def r(t):  # the bf16 value of a tensor, in float64
        return t.detach().to(torch.bfloat16).double()

    x2, dy2 = r(x).reshape(-1, 96), r(dy).reshape(-1, 80)
    torch.testing.assert_close(y.double(), r(x) @ r(w).T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), r(dy) @ r(w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), dy2.T @ x2, rtol=1e-5, atol=1e-5)
    assert calc_diff(y, x.detach() @ w.detach().T) > 1e-6  # the rounding is really there


@pytest.fixture
def quant_calls(monkeypatch) -> Counter:
    """Counts weight quantizations per weight storage (the cache's only calls into ``weight_quant`` and
    ``weight_quant_with_t``)."""
    calls: Counter = Counter()
    for name in ("weight_quant", "weight_quant_with_t"):
        real = getattr(fp8_linear_module, name)

        def counting(w, *args, real=real, **kwargs):
            calls[w.data_ptr()] += 1
            return real(w, *args, **kwargs)

        monkeypatch.setattr(fp8_linear_module, name, counting)
    return calls


@pytest.mark.parametrize("optimizer", ["torch_adamw", "zero_adamw"])
def test_weight_cache_once_per_step(quant_calls, optimizer):
    """Micro-batches of one step share each FP8 weight; after the optimizer step the next forward uses the
    new weight's quantization (torch AdamW: seen through the version counter; ZeRO-1 writes parameters in
    its gather buffers, so the trainer calls ``invalidate_weight_caches``)."""
    model = fp8_model(mtp_depth=0)
    apply_fp8(model, enabled=True)
    if optimizer == "torch_adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    else:
        opt = ZeroAdamW(model.named_parameters(), lr=1e-2)
    wo = model.layers["0"].attn.wo  # used by every micro-batch, unlike a routed expert
    for step in range(3):
        quant_calls.clear()
        for mb in range(3):
            with opt.no_sync() if optimizer == "zero_adamw" and mb < 2 else contextlib.nullcontext():
                model.compute_loss(tokens(10 * step + mb))["loss"].backward()
        assert max(quant_calls.values()) == 1  # at most once per weight per step
        assert quant_calls[wo.weight.data_ptr()] == 1  # ... and again after each optimizer step
        fresh_q, fresh_s = weight_quant(wo.weight.detach())
        cached_q, cached_s, *_ = wo._fp8_weight.get()
        assert torch.equal(cached_q.view(torch.uint8), fresh_q.view(torch.uint8)) and torch.equal(cached_s, fresh_s)
        before = wo.weight.detach().clone()
        opt.step()
        opt.zero_grad()
        assert not torch.equal(before, wo.weight)
        if optimizer == "zero_adamw":
            invalidate_weight_caches(model)


def test_checkpoint_stays_fp32():
    """FP8 is a compute format only: no parameter, buffer or state-dict entry changes with FP8 on."""

    def layout(model):
        return {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}

    model = fp8_model()
    before, n_buffers = layout(model), len(list(model.buffers()))
    apply_fp8(model, enabled=True)
    model.compute_loss(tokens(0))["loss"].backward()  # fills the weight caches
    assert layout(model) == before and len(list(model.buffers())) == n_buffers
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())
    assert all(p.dtype == torch.float32 for p in model.parameters())
