"""The planner against reality: per-rank memory of real tiny runs on CPU (gloo) through launch/train.py's
`run`, measured by storage (tests/memory_probe.py), against `haillm.tools.plan`'s prediction.

Parameters, gradients, optimizer state, the FP8 weight caches and the end-of-step copies (sum_partner_grads'
buffer, a bf16 reduction's bucket copies) must match exactly (BF16 parameters included); activations (the
peak of live saved-for-backward storages over one optimizer step, pipeline in-flight micro-batches
included) within 10%, in fp32, in BF16 (whose GEMMs on CPU are fp32 arithmetic that keeps the bf16
operands for backward, as a GPU does: haillm/ops/precision.py) and with FP8 linears (the CPU reference GEMMs,
which keep what the GPU's do: FP8 inputs with their scales), and with tensor parallelism (each tp rank against
its pipeline rank's prediction).
Run with `-s` to print the table."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist import run_distributed
from memory_probe import LiveSaved, state_bytes
from test_train import launch_train

from haillm.config import compose_config, validate
from haillm.ops import Linear
from haillm.parallel.pipeline import stage
from haillm.parallel.zero import ZeroAdamW
from haillm.tools.plan import make_plan
from haillm.train.trainer import Trainer

LAYOUTS = {
    "dp2": ["parallel.dp=2"],
    "pp2_dualpipe": ["parallel.pp=2", "parallel.pp_schedule=dualpipe"],
    "dp2_pp2_dualpipe": ["parallel.dp=2", "parallel.pp=2", "parallel.pp_schedule=dualpipe"],
    "dp2_ep2": ["parallel.dp=2", "parallel.ep=2"],
    "dp2_ep2_fp8_recompute": ["parallel.dp=2", "parallel.ep=2", "fp8=enabled", "train.recompute=true"],
    "pp2_dualpipev_recompute_bf16moments": ["parallel.pp=2", "parallel.pp_schedule=dualpipev",
                                            "train.recompute=true", "optim.moment_dtype=bf16"],
    "pp2_1f1b": ["parallel.pp=2", "parallel.pp_schedule=1f1b"],
    "dp2_ep2_bf16_bf16reduce": ["parallel.dp=2", "parallel.ep=2", "train.dtype=bf16", "optim.grad_reduce_dtype=bf16"],
    "pp2_dualpipe_bf16_recompute": ["parallel.pp=2", "parallel.pp_schedule=dualpipe", "train.dtype=bf16",
                                    "train.recompute=true"],
    # tensor parallelism: ZeRO-1 groups by placement (split over dp, partial over dp x tp, experts over edp x tp)
    "dp2_ep2_tp2_fp8": ["parallel.dp=2", "parallel.ep=2", "parallel.tp=2", "fp8=enabled"],
    "pp2_tp2_dualpipev_replicated_recompute": ["parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=dualpipev",
                                               "parallel.sequence_parallel=false", "train.recompute=true"],
}
# One step of tiny: 8 micro-batches of 2 x 64 tokens per pipeline (DualPipe needs >= 2*pp of them).
RUN = ["train.steps=1", "train.seq_len=64", "train.global_batch_size=16", "train.micro_batch_size=2",
       "data.max_bytes=300000", "logging.progress=false", "checkpoint.interval=1000"]


class _PartnerAllReduce:
    """``torch.distributed`` as ``stage.py`` sees it, counting the bytes ``sum_partner_grads`` all-reduces."""

    def __init__(self, counts: dict[str, int]):
        self.counts = counts

    def __getattr__(self, name: str):
        return getattr(dist, name)

    def all_reduce(self, tensor: torch.Tensor, *args, **kwargs):
        self.counts["partner_grads"] += tensor.untyped_storage().nbytes()
        return dist.all_reduce(tensor, *args, **kwargs)


def _measure(overrides: list[str]) -> dict:
    """One step through launch/train.py's run: storage of the state, the peak of saved activations, and the
    transient copies (sum_partner_grads' buffer, a low-precision reduction's bucket copies, alive together
    until finish_grad_sync)."""
    peaks, copies = [], {"partner_grads": 0, "reduce_copies": 0}
    original, original_launch = Trainer.forward_backward, ZeroAdamW._launch_reduce

    def probed(self, micro_batches):
        with LiveSaved(self.model) as probe:
            out = original(self, micro_batches)
        peaks.append(probe.peak)
        return out

    def launch_reduce(self, b):
        original_launch(self, b)
        if b.reduce_out is not None and b.reduce_out.untyped_storage().data_ptr() != b.grad_buf.data_ptr():
            copies["reduce_copies"] += b.reduce_out.untyped_storage().nbytes()

    Trainer.forward_backward, ZeroAdamW._launch_reduce, stage.dist = probed, launch_reduce, _PartnerAllReduce(copies)
    try:
        cfg = compose_config(overrides)
        validate(cfg, dist.get_world_size())
        trainer = launch_train.run(cfg, dist.get_rank(), dist.get_world_size(), torch.device("cpu"))
    finally:
        Trainer.forward_backward, ZeroAdamW._launch_reduce, stage.dist = original, original_launch, dist
    caches = fp8_weight_caches(trainer.model)
    saved_caches = sum(caches[m] for m in caches if isinstance(m, Linear))  # what FP8 linears save for backward
    return {"pp_rank": trainer.dims.pp_rank, "activations": max(peaks) - saved_caches, **copies,
            "fp8_weight_cache": sum(caches.values()), **state_bytes(trainer.model, trainer.optimizer)}


def fp8_weight_caches(model: torch.nn.Module) -> dict[torch.nn.Module, int]:
    """Bytes of the FP8 weight copies each FP8 linear and routed-expert stack holds after the step."""
    out = {}
    for m in model.modules():
        caches = [m._fp8_weight] if isinstance(m, Linear) else list(getattr(m, "_fp8", {}).values())
        values = [c._value for c in caches if c is not None and c._value is not None]
        out[m] = sum(t.untyped_storage().nbytes() for v in values for t in v)
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_predicted_memory_matches_measured(name, tmp_path):
    overrides = [*RUN, *LAYOUTS[name]]
    cfg = compose_config(overrides)
    world = cfg.parallel.dp * cfg.parallel.pp * cfg.parallel.tp
    measured = run_distributed(_measure, world_size=world, args=([*overrides, f"output_dir={tmp_path}/run"],),
                               timeout=120)
    plan = make_plan(overrides, gpus=world, gpu="cpu")
    print(f"\n{name}: rank  kind  predicted  measured  predicted/measured")
    for m in measured:
        predicted = plan["memory_bytes_per_pp_rank"][m["pp_rank"]]
        for kind in ("parameters", "gradients", "optimizer", "fp8_weight_cache", "partner_grads", "reduce_copies",
                     "activations"):
            ratio = f"{predicted[kind] / m[kind]:>9.3f}" if m[kind] else ""
            print(f"  {m['pp_rank']} {kind:<14}{predicted[kind]:>12.0f}{m[kind]:>12}{ratio}")
        for kind in ("parameters", "gradients", "optimizer", "fp8_weight_cache", "partner_grads", "reduce_copies"):
            assert predicted[kind] == m[kind], (kind, m["pp_rank"])
        assert predicted["activations"] == pytest.approx(m["activations"], rel=0.1), m["pp_rank"]
