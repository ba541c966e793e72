"""BF16 mixed precision end to end (`train.dtype=bf16`): bf16 parameters and activations, fp32 masters and
moments in the ZeRO-1 shards, fp32 gradient accumulation and reduction; on one process and on the layouts
that move bf16 tensors between ranks (dp x ep all-to-alls, DualPipe and DualPipeV P2P).

Tolerance against the fp32 run of the same seed and batch (measured on tiny with COMMON, seeds 1234 and 7):
- steps 1-5 within 0.2% relative: the only difference is bf16 rounding of weights, activations and
  per-micro-batch gradients (2^-9 relative per value); measured at most 0.02%. A lost gradient
  contribution, a master weight not updated, or a wrong reduction shows within the first updates.
- steps 6-10 within 2%: once a routing decision flips on a near-tie (the fp32 layouts allow 1e-3 for the
  same reason) the runs take different paths; measured at most 0.6% by step 10, 1.6% by step 20.
- with FP8 GEMMs, the first loss (same weights) within 0.2%, steps 2-4 within 0.5%: an activation rounded to
  bf16 crosses an E4M3 rounding boundary for a few percent of values, each then moving by an FP8 step
  (2^-4 relative, not bf16's 2^-9), so the two runs part faster; measured at most 0.21% (0.19% before
  every linear width ran FP8).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dist import run_distributed
from test_train import launch_train
from test_train_dp import CHECKPOINTS_OFF, COMMON
from test_train_fp8 import FP8_MODEL

STEPS = 10
EARLY, EARLY_TOL, LATE_TOL, FP8_TOL = 5, 2e-3, 2e-2, 5e-3


def _main(argv: list[str]) -> int:
    return launch_train.main(argv)


def run(out: Path, world: int, *overrides: str) -> list[dict]:
    argv = [*COMMON, f"output_dir={out}", f"train.steps={STEPS}", *overrides]
    codes = run_distributed(_main, world_size=world, args=(argv,), timeout=240) if world > 1 else [_main(argv)]
    assert codes == [0] * world
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> list[float]:
    return [r["loss"] for r in run(tmp_path_factory.mktemp("fp32") / "run", 1, "train.dtype=fp32", *CHECKPOINTS_OFF)]


LAYOUTS = {
    "single": (1, []),
    "dp2-ep2": (2, ["parallel.dp=2", "parallel.ep=2"]),
    "pp2-dualpipe": (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipe"]),
    "pp2-dualpipev": (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipev"]),
    # deferred weight grads (I/W) into fp32 main_grad, recomputed bf16 norms and up-projections
    "pp2-dualpipe-recompute": (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipe", "train.recompute=true"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bf16_trains_and_tracks_fp32(fp32, tmp_path, layout):
    world, overrides = LAYOUTS[layout]
    rows = run(tmp_path / "run", world, "train.dtype=bf16", *overrides, *CHECKPOINTS_OFF)
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - 1.0, losses  # it learns
    for step, (got, ref) in enumerate(zip(losses, fp32, strict=True), start=1):
        assert got == pytest.approx(ref, rel=EARLY_TOL if step <= EARLY else LATE_TOL), (step, got, ref)
    assert not any(r["skipped"] for r in rows)


def test_bf16_run_records_its_dtype_and_resumes_exactly(tmp_path):
    """A bf16 run resumed from its checkpoint (fp32 masters) continues exactly as the uninterrupted one."""
    whole = run(tmp_path / "whole", 1, "train.dtype=bf16", "train.steps=6")
    out = tmp_path / "split"
    run(out, 1, "train.dtype=bf16", "train.steps=3")
    resumed = run(out, 1, "train.dtype=bf16", "train.steps=6", "checkpoint.resume=auto")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]
    assert "dtype: bf16" in (out / "config.yaml").read_text()


def test_fp8_with_bf16_parameters_tracks_fp8_with_fp32(tmp_path):
    """FP8 GEMMs quantize from bf16 parameters and activations as from fp32 ones: same tolerances."""
    fp8 = ["fp8.enabled=true", *FP8_MODEL, "train.steps=4"]
    ref = [r["loss"] for r in run(tmp_path / "fp32", 1, "train.dtype=fp32", *fp8, *CHECKPOINTS_OFF)]
    got = [r["loss"] for r in run(tmp_path / "bf16", 1, "train.dtype=bf16", *fp8, *CHECKPOINTS_OFF)]
    assert got[-1] < got[0]
    assert got[0] == pytest.approx(ref[0], rel=EARLY_TOL) and got == pytest.approx(ref, rel=FP8_TOL)
