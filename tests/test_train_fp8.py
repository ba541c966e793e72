"""FP8 training end to end: single process, composed with dp, ep and pp; checkpoints stay fp32 and resume
with FP8 on or off."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp
from dist import run_distributed
from nccl_rules import check_logs, subprocess_env
from test_train import launch_train
from test_train_dp import CHECKPOINTS_OFF, COMMON

from haillm.fp8.policy import FP8_TINY_OVERRIDES

# A tiny MoE whose projections are whole 128x128 blocks, so the FP8 GEMMs really run (wkv_a falls back).
FP8_MODEL = [f"model.{k}={v}" for k, v in FP8_TINY_OVERRIDES.items()]
FP8 = ["fp8.enabled=true", *FP8_MODEL]


def _main(argv: list[str]) -> int:
    return launch_train.main(argv)


def run(out: Path, world: int, *overrides: str) -> list[dict]:
    argv = [*COMMON, f"output_dir={out}", *overrides]
    codes = run_distributed(_main, world_size=world, args=(argv,), timeout=300) if world > 1 else [_main(argv)]
    assert codes == [0] * world
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """Two FP8 steps in one process (its checkpoint is step_2)."""
    out = tmp_path_factory.mktemp("fp8") / "run"
    run(out, 1, *FP8, "train.steps=2")
    return out


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fp8_trains_and_checkpoint_stays_fp32(single, tmp_path):
    out = single
    rows = records(out)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert " fp8, " in (out / "train.log").read_text()  # the policy's summary: how many linears run in FP8
    metadata = dcp.FileSystemReader(str(out / "checkpoints" / "step_2")).read_metadata().state_dict_metadata
    dtypes = {str(m.properties.dtype) for k, m in metadata.items() if k.startswith("model.")}
    assert dtypes == {"torch.float32"}
    for fp8 in ("true", "false"):  # the same checkpoint continues with FP8 on or off
        resumed = tmp_path / f"resume_{fp8}"
        shutil.copytree(out, resumed)
        rows = run(resumed, 1, *FP8_MODEL, f"fp8.enabled={fp8}", "train.steps=3", "checkpoint.resume=auto")
        assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] == pytest.approx(rows[1]["loss"], 0.2)


@pytest.mark.parametrize(
    ("world", "layout"),
    [
        (2, ["parallel.dp=2"]),
        (2, ["parallel.dp=2", "parallel.ep=2"]),
        (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipev"]),
    ],
    ids=["dp2", "dp2-ep2", "pp2-dualpipev"],
)
def test_fp8_composes_with_parallelism(single, tmp_path, world, layout):
    ref = records(single)
    got = run(tmp_path / "layout", world, *FP8, *layout, "train.steps=2", *CHECKPOINTS_OFF)
    for g, r in zip(got, ref, strict=True):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-3)
    assert all(r["skipped"] is False for r in got)


def test_fp8_torchrun_dp_ep_pp(single, tmp_path):
    """The real launcher with every composition at once: `torchrun --standalone --nproc_per_node=4
    launch/train.py fp8.enabled=true parallel.pp=2 parallel.dp=2 parallel.ep=2 parallel.pp_schedule=dualpipe`
    (FP8 GEMMs, FP8 dispatch payload, deferred FP8 weight grads) reproduces the single-process FP8 losses,
    prints its summary line and leaves a run directory of the run's files only."""
    import subprocess
    import sys

    out = tmp_path / "run"
    layout = ["parallel.pp=2", "parallel.dp=2", "parallel.ep=2", "parallel.pp_schedule=dualpipe",
              "train.micro_batch_size=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           str(Path(launch_train.__file__)), *COMMON, *FP8, *layout, "train.steps=2", f"output_dir={out}"]
    logs = tmp_path / "nccl_logs"
    logs.mkdir()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(logs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_logs(logs, 4)
    assert "loss: step 1" in proc.stdout
    assert [r["step"] for r in records(out)] == [1, 2]
    for g, r in zip(records(out), records(single), strict=True):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-3)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "train.log"]
