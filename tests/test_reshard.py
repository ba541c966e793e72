"""The reshard matrix: a checkpoint written at step N under layout A continues under layout B like the run that
went on under A (step N+1 within 1e-6, later steps within 1e-3: MoE routing near-ties may flip).

Checkpoints hold every tensor under its full-model name and global shape (a tensor-parallel block in its whole
tensor's), the ZeRO state as pieces of those tensors and the data position as a global sample count, so any pair of
layouts works, tp and cp included; DualPipe's two copies of each stage are stored once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from dist import run_distributed
from test_train import launch_train
from test_train_dp import COMMON

from haillm.train.checkpoint import list_checkpoints

SAVED, STEPS = 2, 4  # checkpoint at step 2, compare steps 3 and 4
LAYOUTS = {  # name: (world size, overrides); micro-batches of 1 give DualPipe enough of them at dp=2
    "dp1": (1, []),
    "dp2": (2, ["parallel.dp=2"]),
    "dp4": (4, ["parallel.dp=4", "train.micro_batch_size=1"]),
    "dp2-ep2": (2, ["parallel.dp=2", "parallel.ep=2"]),
    "dp4-ep2": (4, ["parallel.dp=4", "parallel.ep=2", "train.micro_batch_size=1"]),
    "dp4-ep4": (4, ["parallel.dp=4", "parallel.ep=4", "train.micro_batch_size=1"]),
    "pp2-1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    "pp2-dualpipe": (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipe"]),
    "pp2-dualpipev": (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipev"]),
    "pp2-dp2-ep2-dualpipe": (4, ["parallel.pp=2", "parallel.dp=2", "parallel.ep=2", "parallel.pp_schedule=dualpipe",
                                 "train.micro_batch_size=1"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2-dp2": (4, ["parallel.tp=2", "parallel.dp=2"]),
    "cp4": (4, ["parallel.cp=4"]),  # chunks of 4 tokens: each sequence over 4 ranks, ZeRO-1 over them
}
PAIRS = [
    ("dp2", "dp1"), ("dp1", "dp4"), ("dp2-ep2", "dp4-ep4"), ("dp4-ep4", "dp2-ep2"), ("pp2-dualpipe", "dp1"),
    ("pp2-1f1b", "pp2-dualpipev"), ("pp2-dp2-ep2-dualpipe", "dp4-ep2"),
    ("dp1", "pp2-dualpipe"), ("pp2-dualpipev", "pp2-1f1b"), ("dp4-ep2", "pp2-dp2-ep2-dualpipe"),
    ("tp2-dp2", "dp4"), ("dp2", "tp2"), ("dp1", "cp4"),
]


def _main(argv: list[str]) -> int:
    return launch_train.main(argv)


def train(out: Path, layout: str, *overrides: str) -> list[dict]:
    world, options = LAYOUTS[layout]
    argv = [*COMMON, f"output_dir={out}", f"train.steps={STEPS}", f"checkpoint.interval={SAVED}", *options, *overrides]
    codes = run_distributed(_main, world_size=world, args=(argv,), timeout=300) if world > 1 else [_main(argv)]
    assert codes == [0] * world
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Each source layout's run to STEPS (its losses) with its checkpoint at SAVED, computed once."""
    runs: dict[str, tuple[Path, list[dict]]] = {}

    def get(layout: str) -> tuple[Path, list[dict]]:
        if layout not in runs:
            out = tmp_path_factory.mktemp(layout) / "run"
            rows = train(out, layout)
            for step, path in list_checkpoints(out):
                if step > SAVED:
                    shutil.rmtree(path)
            runs[layout] = out, rows
        return runs[layout]

    return get


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_reshard(source, tmp_path, a, b):
    base, ref = source(a)
    out = tmp_path / "run"
    shutil.copytree(base, out)
    got = train(out, b, "checkpoint.resume=auto")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert got[:SAVED] == ref[:SAVED]  # records before the checkpoint are kept as they were
    print(f"{a} -> {b}: relative loss differences " + ", ".join(  # the table in the report (pytest -s)
        f"step {g['step']}: {abs(g['loss'] - r['loss']) / abs(r['loss']):.1e}" for g, r in zip(got, ref, strict=True)
        if g["step"] > SAVED))
    for g, r in zip(got[SAVED:], ref[SAVED:], strict=True):
        tol = 1e-6 if g["step"] == SAVED + 1 else 1e-3
        assert g["loss"] == pytest.approx(r["loss"], rel=tol), (a, b, g["step"], g["loss"], r["loss"])


def test_dualpipe_stores_each_stage_once(source):
    """DualPipe holds every stage on two ranks; its checkpoint is no larger than the single-process one."""
    def shard_bytes(layout: str) -> int:
        path = source(layout)[0] / "checkpoints" / f"step_{SAVED}"
        return sum(p.stat().st_size for p in path.glob("*.distcp"))

    assert shard_bytes("pp2-dualpipe") <= 1.02 * shard_bytes("dp1")
