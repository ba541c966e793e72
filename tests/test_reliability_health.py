"""Training health: loss spikes are skipped like non-finite steps, identically on every rank, counted, and too
many in a row abort the run with a checkpoint."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from dist import run_distributed
from test_train import launch_train
from test_train_dp import COMMON

from haillm.config import compose_config, validate
from haillm.train.checkpoint import verify
from haillm.train.health import LossHealth

# The tiny model's loss wobbles by a few per mille after the first ten steps: with this threshold a step whose
# loss exceeds the median of the last 3 applied steps by 0.1% is a "spike", which happens a few times in 16.
TOUCHY = ["train.loss_spike_factor=1.001", "train.loss_spike_window=3", "optim.schedule=constant"]


def test_verdicts():
    health = LossHealth(spike_factor=2.0, window=3)
    assert health.verdict(math.nan, 1.0) == health.verdict(1.0, math.inf) == "non-finite loss or gradient norm"
    assert health.verdict(100.0, 1.0) is None  # no judgement before the window is full
    for loss in (1.0, 1.2, 0.9):
        health.applied(loss)
    assert health.verdict(1.99, 1.0) is None
    assert health.verdict(2.01, 1.0).startswith("loss spike (2.01 > 2 x median 1")
    restored = LossHealth(spike_factor=2.0, window=3)
    restored.load_state_dict(json.loads(json.dumps(health.state_dict())))
    assert restored.verdict(2.01, 1.0) == health.verdict(2.01, 1.0)
    assert LossHealth(0.0, 3).verdict(1e9, 1.0) is None  # factor 0: off


def _train(argv: list[str]) -> dict:
    rank, world, device = launch_train.init_distributed()
    cfg = compose_config(argv)
    validate(cfg, world)
    trainer = launch_train.run(cfg, rank, world, device)
    return {"skipped_steps": trainer.state.skipped_steps, "recent": list(trainer.health.recent)}


def test_spikes_are_skipped_alike_on_every_rank(tmp_path):
    """pp=2 x dp=2: only the last stage computes the loss, yet every rank skips the same steps."""
    out = tmp_path / "run"
    argv = [*COMMON, f"output_dir={out}", "train.steps=16", "train.max_skipped_steps=100", *TOUCHY,
            "parallel.pp=2", "parallel.dp=2", "train.micro_batch_size=1"]
    states = run_distributed(_train, world_size=4, args=(argv,), timeout=300)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = sum(r["skipped"] for r in rows)
    assert skipped >= 1 and rows[-1]["skipped_steps"] == skipped
    assert all(state == states[0] for state in states) and states[0]["skipped_steps"] == skipped


def test_too_many_spikes_abort_with_a_checkpoint(capsys, tmp_path):
    out = tmp_path / "run"
    argv = [*COMMON, f"output_dir={out}", "train.steps=30", "train.max_skipped_steps=0", *TOUCHY]
    assert launch_train.main(argv) == 3
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("haillm: training aborted:")]
    assert "1 consecutive steps were skipped, the last for a loss spike" in line, line
    step, path = re.search(r"the state after step (\d+) is in (\S+)$", line).groups()
    assert Path(path) == out / "checkpoints" / f"step_{step}" and verify(Path(path)) is None
    # One data position: the aborted step's batch was consumed, the step counted and recorded.
    state = json.loads((Path(path) / "trainer_state.json").read_text())
    assert state["step"] == int(step) and state["consecutive_skipped"] == 1
    assert state["consumed_samples"] == state["data"]["consumed_samples"] == int(step) * 8
    rows = [json.loads(row) for row in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == int(step) and rows[-1]["skipped"] and rows[-1]["consumed_samples"] == int(step) * 8
    # The user lowers the alarm and continues from that checkpoint, past the data that spiked.
    resumed = [*argv, "checkpoint.resume=auto", "train.loss_spike_factor=0", f"train.steps={int(step) + 2}"]
    assert launch_train.main(resumed) == 0
