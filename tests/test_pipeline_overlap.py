"""Overlapped F&B pairs, weight-gradient deferral in every linear layer, and activation recomputation on
the tiny DeepSeek-V3: the region-by-region backward of a cut graph equals the uncut one, I + W equals B,
pairs interleaved at the expert all-to-alls (ep=2) give bitwise the gradients of the same pairs run back to
back, and recomputing RMSNorm outputs and MLA up-projections changes no bit but keeps fewer activations."""

import pytest
import torch
import torch.distributed as dist

# backward() imports this (and sympy) lazily: import it once here, before the workers fork.
import torch.fx.experimental.symbolic_shapes  # noqa: F401
import torch.nn.functional as F
from dist import run_distributed
from saved_tensors import saved_storages

from haillm.fp8.policy import FP8_TINY_OVERRIDES, apply_fp8
from haillm.models.deepseek_v3 import get_preset
from haillm.ops import Linear, deferring_weight_grads
from haillm.parallel.expert import AllToAllDispatcher, ExpertPlacement, apply_expert_parallel
from haillm.parallel.pipeline.overlap import Tape, interleave, run_to_end
from haillm.parallel.pipeline.runtime import PipelineRuntime
from haillm.parallel.pipeline.stage import build_stage_model

SEED, MICRO_BATCH, SEQ_LEN, N_MICRO = 5, 2, 10, 4


def whole_model(recompute_on: bool = False, fp8: bool = False):
    """The tiny model as one stage (first and last) with weight-grad deferral on; ``fp8``: its 128-aligned
    variant with DeepSeek-V3's FP8 policy."""
    args = get_preset("tiny").replace(**FP8_TINY_OVERRIDES) if fp8 else get_preset("tiny")
    model = build_stage_model(args, "dualpipe", 2, 0, init_seed=SEED, recompute=recompute_on)
    if fp8:
        apply_fp8(model, True)
    model.specs = [model.specs[0].__class__(0, range(4), first=True, last=True)]
    return model


def tokens(n: int, seed: int = SEED) -> torch.Tensor:
    return torch.randint(0, 512, (n, SEQ_LEN + 1), generator=torch.Generator().manual_seed(seed))


def grads_of(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def max_rel_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)).item() for k in a)


# --- the tape: a cut graph, backpropagated region by region ----------------------------------------------


def test_tape_backward_equals_uncut_backward():
    """Two fake exchanges (identity, gradient sent back as is) and carried tensors across them."""
    gen = torch.Generator().manual_seed(0)
    w1, w2, w3 = (torch.randn(6, 6, generator=gen, requires_grad=True) for _ in range(3))
    x = torch.randn(4, 6, generator=gen, requires_grad=True)

    def model(cut):
        h = torch.tanh(x @ w1)
        carry = h.sum(1, keepdim=True)
        if cut is not None:
            (carry,) = cut(carry)
            h = cut.exchange(h, h.detach().clone(), lambda g: (lambda g=g: g.clone()))
        y = torch.sigmoid(h @ w2)
        if cut is not None:
            y = cut.exchange(y, y.detach().clone(), lambda g: (lambda g=g: g.clone()))
        return (y @ w3 * carry).square().sum()

    model(None).backward()
    expected = [t.grad.clone() for t in (x, w1, w2, w3)]
    for t in (x, w1, w2, w3):
        t.grad = None
    tape = Tape()
    loss = model(tape)
    assert tape.region == 2
    yields = sum(1 for _ in tape.backward([loss], [None]))
    assert yields == 2  # one per gradient exchange in flight
    for t, e in zip((x, w1, w2, w3), expected, strict=True):
        assert torch.allclose(t.grad, e, rtol=1e-6, atol=1e-7)


def test_interleave_runs_jobs_in_turns():
    log = []

    def job(name, steps):
        for i in range(steps):
            log.append(f"{name}{i}")
            yield
        log.append(f"{name}-end")
        return name

    interleave(job("b", 2), job("f", 3))
    assert log == ["b0", "f0", "b1", "f1", "b-end", "f2", "f-end"]
    assert run_to_end(job("x", 1)) == "x"


# --- weight-gradient deferral through ops.Linear ----------------------------------------------------------


def test_deferred_linear_is_plain_linear_outside_deferral():
    lin = Linear(8, 5, bias=True)
    torch.nn.init.normal_(lin.weight)
    torch.nn.init.normal_(lin.bias)
    x = torch.randn(3, 4, 8, requires_grad=True)
    ref = torch.autograd.grad(F.linear(x, lin.weight, lin.bias).square().sum(), (x, lin.weight, lin.bias))
    lin.defer_wgrad = True
    y = lin(x)
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias))
    got = torch.autograd.grad(y.square().sum(), (x, lin.weight, lin.bias))
    assert all(torch.equal(g, r) for g, r in zip(got, ref, strict=True))


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_input_grad_then_weight_grad_equals_full_backward_on_the_model(fp8):
    """I + W = B on the whole tiny model (every ops.Linear deferred, experts, shared experts, head, MTP);
    under FP8 the deferred Wgrad is the same FP8 GEMM on the same saved FP8 input."""
    model = whole_model(fp8=fp8)
    batch = tokens(MICRO_BATCH)
    model.forward_chunk(0, None, batch).loss.backward()
    full = grads_of(model)
    model.zero_grad(set_to_none=True)
    with deferring_weight_grads() as queue:
        model.forward_chunk(0, None, batch).loss.backward()
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Linear)}
    after_input_grads = grads_of(model)
    assert not linear_weights & after_input_grads.keys()  # every linear weight grad was deferred
    assert {"embed.weight", "norm.weight", "layers.1.ffn.gate.weight"} <= after_input_grads.keys()
    assert len(queue) >= len(linear_weights) - 8  # experts that received no token have no weight grad
    for fn in queue:
        fn()
    got = grads_of(model)
    assert got.keys() == full.keys() and not any(g.requires_grad for g in got.values())  # W built no graph
    assert max_rel_err(got, full) <= 1e-7


# --- activation recomputation ----------------------------------------------------------------------------


def saved_bytes(model, batch: torch.Tensor) -> tuple[int, dict]:
    """Bytes of the distinct non-parameter storages autograd keeps for one forward, and the gradients."""
    model.zero_grad(set_to_none=True)
    kept, out = saved_storages(model, lambda: model.forward_chunk(0, None, batch))
    out.loss.backward()
    return sum(kept.values()), grads_of(model)


def test_recompute_changes_no_gradient_and_keeps_less():
    batch = tokens(MICRO_BATCH)
    plain_bytes, plain = saved_bytes(whole_model(), batch)
    model = whole_model(recompute_on=True)
    kept_bytes, got = saved_bytes(model, batch)
    assert got.keys() == plain.keys() and all(torch.equal(got[k], plain[k]) for k in got)
    assert kept_bytes < 0.85 * plain_bytes, (kept_bytes, plain_bytes)
    model.set_recompute(False)
    assert not model._norm_hooks and not model.layers["0"].attn.recompute_up_proj


# --- overlapped pairs with expert parallelism (2 processes, ep=2, a 1-rank DualPipeV each) ----------------


def log_calls(obj, names: tuple[str, ...]) -> list[str]:
    """Wrap methods of ``obj`` so that each call appends its name to the returned list."""
    events: list[str] = []

    def wrap(name, method):
        def logged(*args, **kwargs):
            events.append(name)
            return method(*args, **kwargs)
        return logged

    for name in names:
        setattr(obj, name, wrap(name, getattr(obj, name)))
    return events


def _ep_pairs(variants: list[tuple[str, bool | str, bool]]) -> dict:
    """Per variant (mode, recompute, fp8 dispatch): this rank's step losses and gradients. Modes: "overlap"
    (pairs interleaved), "serial" (pairs back to back), "plain" (uncut graphs, one micro-batch after another).
    Recompute "swiglu": SwiGLU inputs only, the gate weights travelling with the tokens (``set_recompute``)."""
    rank = dist.get_rank()
    batches = list(tokens(N_MICRO * MICRO_BATCH, seed=SEED + rank).split(MICRO_BATCH))
    out = {}
    for mode, recompute_on, fp8 in variants:
        model = build_stage_model(get_preset("tiny"), "dualpipev", 1, 0, init_seed=SEED, recompute=recompute_on is True)
        model.set_recompute(recompute_on is True, swiglu=recompute_on == "swiglu")
        dispatcher = AllToAllDispatcher(dist.group.WORLD, ExpertPlacement(8, 2, rank, None, 4), fp8=fp8)
        apply_expert_parallel(model, dispatcher)
        events = log_calls(dispatcher, ("send_dispatch", "finish_dispatch", "_send_back"))
        if mode == "plain":
            losses = []
            for batch in batches:
                first = model.forward_chunk(0, None, batch)
                last = model.forward_chunk(1, first.hidden, batch)
                ((last.loss + first.loss) / N_MICRO).backward()
                losses.append(last.metrics["loss"] + first.metrics["loss"])
            losses = torch.stack(losses).double()
        else:
            runtime = PipelineRuntime(model, "dualpipev", N_MICRO, overlap=mode == "overlap")
            losses = runtime.step(batches).per_microbatch[0]
        # a gradient exchange started while a forward dispatch was in flight: the pair really interleaved
        overlapped = any(pair == ("send_dispatch", "_send_back") for pair in zip(events, events[1:], strict=False))
        out[(mode, recompute_on, fp8)] = {"losses": losses, "grads": grads_of(model), "overlapped": overlapped}
    # The last chunk cuts its graph at every exchange of its MoE layers and of the MTP block's MoE layer.
    tapes = [Tape(), Tape()]
    hidden = run_to_end(model.forward_phases(0, None, batches[0], tapes[0])).hidden
    run_to_end(model.forward_phases(1, hidden, batches[0], tapes[1]))
    last = [model.layers[str(i)] for i in model.specs[1].layers] + [m.block for m in model.mtp.values()]
    out["exchanges"] = (len(tapes[1].exchanges), 2 * sum(b.exchanges_tokens for b in last), len(model.mtp))
    # Until backward the cuts hold the exchanged tensors and the shared experts' outputs as autograd roots and
    # leaves only (their storage freed once read): what remains is each MoE layer's residual, which its FFN
    # norm saves anyway, the last chunk's final hidden state (the final norm saves it) and the balance loss
    out["held"] = [
        ([e.untyped_storage().nbytes() for sent, leaf, _ in tape.exchanges for e in (sent, leaf)],
         sum(t.untyped_storage().nbytes() > 4 for _, t, _ in tape.carried), len(tape.exchanges) // 2)
        for tape in tapes]
    return out


def test_overlapped_pairs_match_serial_pairs_with_expert_parallelism():
    variants = [("overlap", False, False), ("serial", False, False), ("plain", False, False),
                ("overlap", True, False), ("overlap", False, True), ("serial", False, True),
                ("overlap", "swiglu", False), ("plain", "swiglu", False), ("overlap", "swiglu", True),
                ("serial", "swiglu", True)]
    for rank, r in enumerate(run_distributed(_ep_pairs, 2, args=(variants,))):
        n_exchanges, expected, n_mtp = r["exchanges"]
        assert n_exchanges == expected and n_mtp == 1, r["exchanges"]
        (exchanged, carried, moe_layers), (exchanged_last, carried_last, moe_layers_last) = r["held"]
        assert moe_layers > 0 and not any(exchanged) and carried == moe_layers, r["held"]
        assert not any(exchanged_last) and carried_last == moe_layers_last + 1, r["held"]
        overlap, serial, plain = r[("overlap", False, False)], r[("serial", False, False)], r[("plain", False, False)]
        assert overlap["overlapped"] and not serial["overlapped"], rank
        assert torch.equal(overlap["losses"], serial["losses"]), rank
        assert overlap["grads"].keys() == serial["grads"].keys()
        assert all(torch.equal(overlap["grads"][k], serial["grads"][k]) for k in overlap["grads"]), rank
        # the uncut graph, one micro-batch after another: the same up to the order of sums
        assert torch.allclose(overlap["losses"], plain["losses"], rtol=1e-6, atol=0), rank
        assert max_rel_err(overlap["grads"], plain["grads"]) < 1e-6, rank
        # recomputation inside pairs changes no bit
        recomputed = r[("overlap", True, False)]
        assert recomputed["overlapped"] and torch.equal(recomputed["losses"], overlap["losses"])
        assert all(torch.equal(recomputed["grads"][k], overlap["grads"][k]) for k in overlap["grads"]), rank
        # FP8 dispatch payload: interleaving changes no bit either
        fp8, fp8_serial = r[("overlap", False, True)], r[("serial", False, True)]
        assert fp8["overlapped"] and torch.equal(fp8["losses"], fp8_serial["losses"])
        assert all(torch.equal(fp8["grads"][k], fp8_serial["grads"][k]) for k in fp8["grads"]), rank
        assert not torch.equal(fp8["losses"], overlap["losses"])  # the payload really was FP8
        # gate weights sent with the tokens (their bits packed in the payload, their gradients back in the
        # dispatch's reverse exchange): through cut graphs as through uncut ones, up to the order of sums; and
        # against weights applied after the combine, one product's rounding (tests/test_moe_memory.py)
        inside, inside_plain = r[("overlap", "swiglu", False)], r[("plain", "swiglu", False)]
        assert inside["overlapped"] and max_rel_err(inside["grads"], inside_plain["grads"]) < 1e-6, rank
        assert torch.allclose(inside["losses"], overlap["losses"], rtol=1e-6, atol=0), rank
        assert max_rel_err(inside["grads"], overlap["grads"]) < 1e-5, rank
        fp8_inside, fp8_inside_serial = r[("overlap", "swiglu", True)], r[("serial", "swiglu", True)]
        assert all(torch.equal(fp8_inside["grads"][k], fp8_inside_serial["grads"][k]) for k in fp8["grads"]), rank
