"""Context parallelism end to end: 10 optimizer steps of `tiny` on 1024-token sequences at cp=2 and cp=4, composed
with dp x ep, and with DualPipeV at pp=2, reproduce the single-process losses from the same seed and global
batch, on forked gloo ranks under NCCL's rules (tests/dist.py); so do 5 steps on 256-token sequences at cp=2 x
tp=2 (sequence parallel), with DualPipe at pp=2, and in BF16 with recomputation and FP8 at cp=2 x tp=2 (against
the single process of the same precision).

Tolerances (relative, per step): step 1 within 1e-6, later steps within 1e-3, the other layouts' (a routing
decision may flip on a near-tie). A context-parallel rank merges per-chunk softmaxes in fp32 where one process
runs one kernel over the whole sequence: the same sums in another order. Measured in fp32: step 1 at most
5.0e-8, every step at most 7.7e-8. BF16 at cp=2 x tp=2: step 1 1.8e-6 (tensor parallelism's bf16 partial sums,
as in test_train_tp.py), later at most 1.5e-4. FP8 (FP8_TP_MODEL: wkv_b in FP8, its latents quantized after the
exchange): step 1 6.6e-8, later at most 1.3e-4 (a value on the other side of an E4M3 rounding boundary moves by
2^-4 relative, as in test_train_tp.py).
"""

from __future__ import annotations

import pytest
from test_train_pp import losses, reference  # noqa: F401 (the session's cache of single-process runs)
from test_train_tp import FP8_TP_MODEL

# 1024-token sequences: two a step, one per micro-batch; four for DualPipeV at pp=2 (it needs four micro-batches)
LONG = ["train.seq_len=1024", "model.max_seq_len=1024", "train.global_batch_size=2", "train.micro_batch_size=1",
        "train.steps=10"]
LONG4 = [*LONG[:2], "train.global_batch_size=4", "train.micro_batch_size=1", "train.steps=10"]
# the compositions beyond the acceptance's four and the precisions on shorter sequences (the attention's blocks
# are the same code at any length), 5 steps; 4 micro-batches of one sequence for DualPipe at pp=2
SHORT = ["train.seq_len=256", "train.global_batch_size=4", "train.micro_batch_size=2", "train.steps=5"]
SHORT4 = ["train.seq_len=256", "train.global_batch_size=4", "train.micro_batch_size=1", "train.steps=5"]

CASES = {
    # name: (world, layout, data, precision and model, step-1 tolerance, later tolerances by last step)
    "cp2": (2, ["parallel.cp=2"], LONG, [], 1e-6, {10: 1e-3}),
    "cp4": (4, ["parallel.cp=4"], LONG, [], 1e-6, {10: 1e-3}),
    "cp2-dp2-ep2": (4, ["parallel.cp=2", "parallel.dp=2", "parallel.ep=2"], LONG, [], 1e-6, {10: 1e-3}),
    # tensor parallelism inside each cp rank: its local tokens split again by sequence between the regions
    "cp2-tp2": (4, ["parallel.cp=2", "parallel.tp=2"], SHORT, [], 1e-6, {5: 1e-3}),
    "cp2-pp2-dualpipev": (4, ["parallel.cp=2", "parallel.pp=2", "parallel.pp_schedule=dualpipev"], LONG4, [], 1e-6,
                          {10: 1e-3}),
    "cp2-pp2-dualpipe": (4, ["parallel.cp=2", "parallel.pp=2", "parallel.pp_schedule=dualpipe"], SHORT4, [], 1e-6,
                         {5: 1e-3}),
    "cp2-tp2-bf16-recompute": (4, ["parallel.cp=2", "parallel.tp=2"], SHORT,
                               ["train.dtype=bf16", "train.recompute=true"], 1e-5, {5: 1e-3}),
    "cp2-tp2-fp8": (4, ["parallel.cp=2", "parallel.tp=2"], SHORT, ["fp8.enabled=true", *FP8_TP_MODEL], 1e-6, {5: 1e-3}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_context_parallel_matches_single_process(reference, tmp_path, case):  # noqa: F811 (the fixture)
    world, layout, data, model, first_tol, later_tols = CASES[case]
    ref = reference(*data, *model)
    got = losses(tmp_path / "run", world, *data, *model, *layout)
    assert got[0] == pytest.approx(ref[0], rel=first_tol)
    for step, (g, r) in enumerate(zip(got[1:], ref[1:], strict=True), start=2):
        tol = next(t for last, t in sorted(later_tols.items()) if step <= last)
        assert g == pytest.approx(r, rel=tol), (step, g, r)
