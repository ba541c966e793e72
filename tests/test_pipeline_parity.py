"""Pipeline parity on the tiny DeepSeek-V3: one step (no optimizer) under pp=2 and pp=4 with 1F1B, DualPipe
and DualPipeV gives the loss and every parameter gradient of the single-process ``compute_loss`` +
``backward`` on the same global batch; plus the one-line errors for layouts that cannot run."""

import pytest
import torch
import torch.distributed as dist

# backward() imports this (and sympy) lazily: import it once here, before the workers fork, rather than
# once per worker (seconds with 6 workers on 2 cores).
import torch.fx.experimental.symbolic_shapes  # noqa: F401

from haillm.models.deepseek_v3 import DeepSeekV3, get_preset
from haillm.ops import set_weight_grad_deferral
from haillm.parallel.pipeline.runtime import PipelineRuntime
from haillm.parallel.pipeline.stage import (
    build_stage_model,
    partner_group,
    split_layers,
    stage_specs,
    sum_partner_grads,
)
from tests.dist import run_distributed

SEED, MICRO_BATCH, SEQ_LEN = 3, 2, 12


def tiny(dense: bool, n_layers: int):
    """The tiny preset with ``n_layers`` layers; ``dense``: every main layer dense (no routing ties), the
    MTP block stays MoE as in the model."""
    args = get_preset("tiny").replace(n_layers=n_layers)
    return args.replace(n_dense_layers=n_layers) if dense else args


def _pipeline_step(schedule: str, variants: list, deferred_linear: bool = False, recompute: bool = False
                   ) -> list[dict]:
    """On each rank: a pipelined step per model variant, compared with the full model on the same data.

    ``deferred_linear``: keep weight-grad deferral on in every ``ops.Linear`` of the stage model (the
    default for the schedules with I/W actions), else turn it off, so I is a full backward and W is empty.
    ``recompute``: recompute RMSNorm outputs and MLA up-projections in backward.
    """
    rank, pp = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    partners = partner_group(schedule, [list(range(pp))])
    n = 2 * pp
    out = []
    for args in variants:
        batch = torch.randint(0, args.vocab_size, (n * MICRO_BATCH, SEQ_LEN + 1),
                              generator=torch.Generator().manual_seed(SEED))
        model = build_stage_model(args, schedule, pp, rank, init_seed=SEED, recompute=recompute)
        set_weight_grad_deferral(model, deferred_linear)
        losses = PipelineRuntime(model, schedule, n, pp_group=group).step(list(batch.split(MICRO_BATCH)))
        sum_partner_grads(model.partner_params(schedule), partners)

        ref = DeepSeekV3(args, init_seed=SEED)
        ref_out = ref.compute_loss(batch)
        ref_out["loss"].backward()
        ref_grads = {name: p.grad for name, p in ref.named_parameters()}
        grads = dict(model.named_parameters())
        missing = [name for name in grads if name not in ref_grads]
        grad_err = max(
            ((p.grad - ref_grads[name]).abs().max() / ref_grads[name].abs().max().clamp_min(1e-12)).item()
            for name, p in grads.items()
        )
        loss_err = max(abs(losses.mean[k] - ref_out[k].item()) for k in ("loss", "lm_loss", "mtp_loss",
                                                                         "balance_loss"))
        out.append({"loss_err": loss_err, "grad_err": grad_err, "missing": missing, "n_params": len(grads)})
    return out


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("schedule", ["1f1b", "dualpipe", "dualpipev"])
def test_pipeline_matches_single_process(schedule, pp):
    n_layers = 8 if (schedule, pp) == ("dualpipev", 4) else 4  # DualPipeV needs 2*pp stages
    variants = [tiny(dense=True, n_layers=n_layers), tiny(dense=False, n_layers=n_layers)]
    results = run_distributed(_pipeline_step, pp, args=(schedule, variants))
    for rank, (dense, moe) in enumerate(results):
        assert not dense["missing"] and not moe["missing"], (rank, dense["missing"], moe["missing"])
        assert dense["loss_err"] < 1e-5 and dense["grad_err"] < 1e-5, (rank, dense)
        assert moe["loss_err"] < 1e-6, (rank, moe)
        assert moe["grad_err"] < 1e-5, (rank, moe)
    # Every parameter of the full model is held somewhere (DualPipe: twice).
    n_full = sum(1 for _ in DeepSeekV3(variants[0], init_seed=None).parameters())
    held = sum(r[0]["n_params"] for r in results)
    assert held == (2 * n_full if schedule == "dualpipe" else n_full) + (
        1 if schedule == "1f1b" else 0)  # 1F1B: the last rank's own embedding for MTP


@pytest.mark.parametrize(("schedule", "pp"), [("dualpipe", 4), ("dualpipev", 2)])
def test_pipeline_parity_with_deferred_weight_grads(schedule, pp):
    """The same parity when I/W defer the weight grads of every linear layer (W runs them later), and with
    activation recomputation."""
    results = run_distributed(_pipeline_step, pp, args=(schedule, [tiny(dense=False, n_layers=4)], True, True))
    for rank, (moe,) in enumerate(results):
        assert moe["loss_err"] < 1e-6 and moe["grad_err"] < 1e-5, (rank, moe)


def test_layer_split_is_balanced_and_complete():
    args = get_preset("tiny").replace(n_layers=12, n_dense_layers=3)
    for n_stages in (1, 2, 3, 4, 6, 12):
        ranges = split_layers(args, n_stages)
        assert [i for r in ranges for i in r] == list(range(12)) and all(len(r) for r in ranges)
    ranges = split_layers(args, 4)
    assert len(ranges[-1]) < len(ranges[0])  # head and MTP weigh on the last stage
    specs = stage_specs(args, "dualpipev", 2, 1)
    assert [s.index for s in specs] == [1, 2] and not any(s.first or s.last for s in specs)


def _runtime_error(schedule: str, n_microbatches: int) -> str:
    model = build_stage_model(get_preset("tiny"), schedule, dist.get_world_size(), dist.get_rank())
    try:
        PipelineRuntime(model, schedule, n_microbatches, pp_group=dist.group.WORLD)
    except ValueError as e:
        return str(e)
    return ""


def test_bad_layouts_fail_with_one_line():
    args = get_preset("tiny")  # 4 layers
    cases = [
        (lambda: build_stage_model(args, "dualpipe", 3, 0), "dualpipe needs an even pp >= 2, got pp=3"),
        (lambda: build_stage_model(args, "dualpipev", 4, 0), "8 pipeline stages but model.n_layers=4"),
        (lambda: build_stage_model(args, "1f1b", 5, 0), "5 pipeline stages but model.n_layers=4"),
    ]
    for make, text in cases:
        with pytest.raises(ValueError, match=text) as info:
            make()
        assert "\n" not in str(info.value)
    # Too few micro-batches for the pipeline (pp=2 ranks): the runtime refuses before any transfer.
    for schedule, n in (("dualpipev", 3), ("dualpipe", 2), ("dualpipe", 5)):
        errors = run_distributed(_runtime_error, 2, args=(schedule, n))
        assert all(e.startswith(f"{schedule} needs") and "micro-batches >= 2*pp=4" in e and "\n" not in e
                   for e in errors), errors
