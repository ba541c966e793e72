"""The metric sinks, read back by their own tools: TensorBoard event files through tensorboard's loader."""

from __future__ import annotations

import pytest

from haillm.train.metrics import TensorBoardSink

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_holds_each_step_once_after_a_resume(tmp_path):
    """Steps 1-5 written, the run resumed from its step-3 checkpoint: steps 4-5 of the first attempt are purged,
    so tensorboard's loader sees one value per step, the resumed ones after step 3; flags and text are left out."""
    sink = TensorBoardSink(tmp_path)
    for step in range(1, 6):
        sink.write({"step": step, "lm_loss": float(step), "tokens": 128, "skipped": False, "note": "x"})
    sink.close()
    assert scalars(tmp_path, "lm_loss") == [(s, float(s)) for s in range(1, 6)]
    sink = TensorBoardSink(tmp_path, after_step=3)
    for step in (4, 5):
        sink.write({"step": step, "lm_loss": 10.0 + step, "tokens": 128})
    sink.close()
    assert scalars(tmp_path, "lm_loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["lm_loss", "tokens"]
