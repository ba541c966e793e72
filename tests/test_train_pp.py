"""Pipeline parallelism end to end: every schedule at pp=2 and pp=4, DualPipe and DualPipeV at pp=8, and pp=4 x
dp=2 and pp=2 x dp=2 x ep=2 with DualPipe reproduce the single-process losses over 5 optimizer steps from the
same seed and global batch, under NCCL's matching and completion rules (tests/nccl_rules.py): at pp >= 4 the
activations and gradients between two ranks are not produced in the order they are consumed, and a runtime
matching them by tag, not by one posting order, swaps them silently on NCCL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from dist import run_distributed
from nccl_rules import check_logs, subprocess_env
from test_train import launch_train
from test_train_dp import CHECKPOINTS_OFF, COMMON

STEPS = "train.steps=5"  # the default run length of losses(): past warm-up, four optimizer steps in
DENSE = "model.n_dense_layers=4"  # no routing: nothing can flip on a near-tie
EIGHT_LAYERS = "model.n_layers=8"  # DualPipeV on 4 ranks runs 8 stages
# 16 layers and 16 micro-batches of one sequence: DualPipeV on 8 ranks runs 16 stages, DualPipe 2 layers a stage.
# Two steps (8 ranks on 2 cores are slow): a swapped transfer shows in step 1's loss already, and step 2's loss
# follows the first optimizer step (ZeRO-1's gathers, DualPipe's partner sums).
WIDE = ["model.n_layers=16", "train.global_batch_size=16", "train.micro_batch_size=1", "train.steps=2"]


def _main(argv: list[str]) -> int:
    return launch_train.main(argv)


def losses(out: Path, world: int, *overrides: str) -> list[float]:
    argv = [*COMMON, f"output_dir={out}", STEPS, *CHECKPOINTS_OFF, *overrides]
    codes = run_distributed(_main, world_size=world, args=(argv,), timeout=300) if world > 1 else [_main(argv)]
    assert codes == [0] * world
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = int(next(o for o in reversed(argv) if o.startswith("train.steps=")).split("=")[1])
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    return [r["loss"] for r in rows]


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """Single-process losses per model variant, computed once for every module that compares with them."""
    cache: dict[tuple[str, ...], list[float]] = {}

    def get(*model: str) -> list[float]:
        if model not in cache:
            cache[model] = losses(tmp_path_factory.mktemp("ref") / "run", 1, *model)
        return cache[model]

    return get


CASES = [
    # (world, layout overrides, model overrides, tolerance after step 1)
    (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"], [], 1e-3),
    (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipe"], [], 1e-3),
    (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipev"], [], 1e-3),
    (4, ["parallel.pp=4", "parallel.pp_schedule=1f1b", "train.micro_batch_size=1"], [], 1e-3),
    (4, ["parallel.pp=4", "parallel.pp_schedule=dualpipe", "train.micro_batch_size=1"], [], 1e-3),
    (4, ["parallel.pp=4", "parallel.pp_schedule=dualpipev", "train.micro_batch_size=1"], [EIGHT_LAYERS], 1e-3),
    (4, ["parallel.pp=2", "parallel.dp=2", "parallel.ep=2", "parallel.pp_schedule=dualpipe",
         "train.micro_batch_size=1"], [], 1e-3),
    (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipe"], [DENSE], 1e-5),
    (4, ["parallel.pp=4", "parallel.pp_schedule=1f1b", "train.micro_batch_size=1"], [DENSE], 1e-5),
    (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipev"], [DENSE], 1e-5),
    (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipe", "train.recompute=true"], [DENSE], 1e-5),
    (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b", "train.recompute=true"], [], 1e-3),
    (1, ["train.recompute=true"], [], 1e-6),
    (8, ["parallel.pp=8", "parallel.pp_schedule=dualpipe"], WIDE, 1e-3),
    (8, ["parallel.pp=8", "parallel.pp_schedule=dualpipev"], WIDE, 1e-3),
    (8, ["parallel.pp=4", "parallel.dp=2", "parallel.pp_schedule=dualpipe"], WIDE, 1e-3),
]


@pytest.mark.parametrize(("world", "layout", "model", "tol"), CASES,
                         ids=["-".join(o.split("=")[1] for o in c[1] + c[2][:1]) for c in CASES])
def test_pipeline_matches_single_process(reference, tmp_path, world, layout, model, tol):
    ref = reference(*model)
    got = losses(tmp_path / "run", world, *layout, *model)
    assert got[0] == pytest.approx(ref[0], rel=1e-6)
    for step, (g, r) in enumerate(zip(got[1:], ref[1:], strict=True), start=2):
        assert g == pytest.approx(r, rel=tol), (step, g, r)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.pp=3", "parallel.pp_schedule=dualpipe"], "even"),
        (["parallel.pp=2", "parallel.pp_schedule=dualpipe", "train.micro_batch_size=4"], "micro-batches"),
        (["parallel.pp=4", "parallel.pp_schedule=dualpipev", "train.micro_batch_size=1"], "n_layers"),
    ],
)
def test_bad_pipeline_layouts(overrides, message):
    from haillm.config import ConfigError, compose_config, validate

    cfg = compose_config([*COMMON, *overrides])
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=cfg.parallel.pp)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("schedule", ["dualpipe", "dualpipev"])
def test_pipeline_resume_and_reshard(tmp_path, schedule):
    """A checkpoint written by a pp=2 run at step 3 (DualPipe: each stage held twice) continues at pp=2 and
    at pp=1 exactly like the uninterrupted pp=2 run: parameters, ZeRO state, data position and RNG, and the EMA
    of the parameters (each rank's stages, under full-model names)."""
    from haillm.tools.export import load_checkpoint_model

    base = tmp_path / "pp2"
    layout = ["parallel.pp=2", f"parallel.pp_schedule={schedule}", DENSE]
    ema = "train.ema_decay=0.5"
    argv = [*COMMON, f"output_dir={base}", "train.steps=6", ema, *layout]
    assert run_distributed(_main, world_size=2, args=(argv,), timeout=300) == [0, 0]
    ref = [json.loads(line) for line in (base / "metrics.jsonl").read_text().splitlines()]
    ref_ema = load_checkpoint_model(base / "checkpoints" / "step_6", ema=True).state_dict()
    shutil.rmtree(base / "checkpoints" / "step_6")
    for world, overrides in ((2, layout), (1, [DENSE])):
        out = tmp_path / f"to_pp{world}"
        shutil.copytree(base, out)
        argv = [*COMMON, f"output_dir={out}", "train.steps=6", "checkpoint.resume=auto", ema, *overrides]
        codes = run_distributed(_main, world_size=world, args=(argv,), timeout=300) if world > 1 else [_main(argv)]
        assert codes == [0] * world
        got = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in got] == list(range(1, 7))
        for g, r in zip(got[3:], ref[3:], strict=True):
            assert g["loss"] == pytest.approx(r["loss"], rel=1e-5), (world, g["step"], g["loss"], r["loss"])
        for name, value in load_checkpoint_model(out / "checkpoints" / "step_6", ema=True).state_dict().items():
            assert (value - ref_ema[name]).abs().max() <= 1e-5 * ref_ema[name].abs().max(), (world, name)


def test_torchrun_pp4_every_rank_exits_0(tmp_path):
    """The real launcher at pp=4 (`torchrun --nproc_per_node=4 launch/train.py parallel.pp=4`), its workers under
    NCCL's rules: every rank exits 0 after the last step. The watchdog thread used to outlive the training loop
    holding the pipeline's process groups; dropped during interpreter shutdown, a group aborted the process
    ("terminate called without an active exception", SIGABRT) after a complete run."""
    import subprocess
    import sys

    out, logs = tmp_path / "run", tmp_path / "nccl_logs"
    logs.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           str(Path(launch_train.__file__)), *COMMON, "parallel.pp=4", "parallel.pp_schedule=1f1b",
           "train.micro_batch_size=1", EIGHT_LAYERS, "train.steps=2", f"output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=subprocess_env(logs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    check_logs(logs, 4)
