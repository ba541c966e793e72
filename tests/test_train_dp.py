"""Data parallelism end to end: dp=2 and dp=4 (ZeRO-1) reproduce the single-process run; resume across dp sizes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dist import run_distributed
from test_train import launch_train

from haillm.config import compose_config, to_model_args
from haillm.models.deepseek_v3.flops import flops_per_token
from haillm.train.metrics import named_peak_flops

# parity runs that read no checkpoint save none (4 saves add ~5 s to a 4-rank run)
CHECKPOINTS_OFF = ["checkpoint.interval=100", "checkpoint.final=false"]
COMMON = ["train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2", "data.max_bytes=300000",
          "logging.progress=false", "train.deterministic=true", "optim.warmup_steps=3", "checkpoint.interval=3"]


def _main(argv: list[str]) -> int:
    return launch_train.main(argv)


def train(out: Path, dp: int, *overrides: str) -> list[dict]:
    argv = [*COMMON, f"output_dir={out}", f"parallel.dp={dp}", *overrides]
    codes = run_distributed(_main, world_size=dp, args=(argv,), timeout=240) if dp > 1 else [_main(argv)]
    assert codes == [0] * dp
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_losses(got: list[dict], ref: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for g, r in zip(got, ref, strict=True):
        tol = 1e-6 if g["step"] == 1 else 1e-5
        assert g["loss"] == pytest.approx(r["loss"], rel=tol), (g["step"], g["loss"], r["loss"])


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> list[dict]:
    return train(tmp_path_factory.mktemp("dp1") / "run", 1, "train.steps=10", *CHECKPOINTS_OFF)


@pytest.mark.parametrize("dp", [2, 4])
def test_dp_matches_single_process(single, tmp_path, dp):
    got = train(tmp_path / "run", dp, "train.steps=10", *CHECKPOINTS_OFF)
    assert_same_losses(got, single)
    full, sharded = single[0]["optimizer_state_bytes"], got[0]["optimizer_state_bytes"]
    assert full / dp <= sharded <= full / dp + 3 * 4 * dp  # master + 2 moments, fp32; <= dp-1 pad elements
    # MFU: the step's FLOPs over the peak of all dp devices (a forked rank: one CPU thread)
    args = to_model_args(compose_config(COMMON).model)
    peak = dp * named_peak_flops(None)[0] / torch.get_num_threads()
    for r in got:
        assert r["mfu"] == pytest.approx(flops_per_token(args, 32) * r["tokens_per_s"] / peak, rel=1e-6)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-path", "fp8"])
def test_every_weight_waits_for_its_gather(tmp_path, fp8):
    """ZeRO-1 returns from `step` with the parameter all-gathers in flight; each weight must be waited for before
    it is read. Buckets so small that each parameter has its own (the output head's included, read by the
    fused head + cross-entropy outside the module's forward; with FP8 the norms, read by the fused RMSNorm +
    quantization): under NCCL's rules a gather's output is poison until waited, so a missed wait is a NaN."""
    from haillm.models.deepseek_v3 import DeepSeekV3, get_preset
    from haillm.parallel.zero import ZeroAdamW

    bucket_mb = 0.001
    buckets = ZeroAdamW(DeepSeekV3(get_preset("tiny")).named_parameters(), bucket_mb=bucket_mb)._buckets
    head_bucket = next(b.names for b in buckets if "head.weight" in b.names)
    assert not any(name.startswith(("embed.", "layers.", "norm.")) for name in head_bucket), head_bucket
    extra = ["train.steps=4", f"optim.bucket_mb={bucket_mb}", *(["fp8=enabled"] if fp8 else [])]
    assert_same_losses(train(tmp_path / "dp2", 2, *extra), train(tmp_path / "dp1", 1, *extra))


def test_resume_across_dp_sizes(single, tmp_path):
    """A checkpoint written at dp=2 (step 3) continues at dp=1 and dp=4 exactly like the dp=2 run itself."""
    base = tmp_path / "dp2"
    ref = train(base, 2, "train.steps=6")
    shutil.rmtree(base / "checkpoints" / "step_6")
    for dp in (1, 4):
        out = tmp_path / f"to_dp{dp}"
        shutil.copytree(base, out)
        got = train(out, dp, "train.steps=6", "checkpoint.resume=auto")
        assert_same_losses(got[3:], ref[3:])
