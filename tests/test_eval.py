"""Held-out evaluation: eval_loss every train.eval_interval steps, equal to a separate evaluation of the saved
checkpoint on the same batches; it leaves training unchanged; dp=2 evaluates like dp=1; bad settings."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from dist import run_distributed
from test_train import FAST, launch_train

from haillm.config import ConfigError, compose_config, to_model_args, validate
from haillm.data import DataConfig, DataError
from haillm.data.loader import build_training_data, eval_row_ids
from haillm.data.synthetic import write_corpus
from haillm.models.deepseek_v3.model import DeepSeekV3
from haillm.ops.precision import cast_parameters
from haillm.tools.preprocess import preprocess
from haillm.train.evaluate import evaluate

EVAL = ["train.steps=4", "train.eval_interval=2", "train.eval_batches=2", "data.eval_holdout=0.05",
        "optim.schedule=constant", "checkpoint.interval=2", "checkpoint.keep=0"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    assert launch_train.main([*FAST, *EVAL, f"output_dir={out}"]) == 0
    return out


def evaluate_checkpoint(run_dir: Path, overrides: list[str], step: int) -> float:
    """The separate evaluation README "Data" documents: the run's model from its step checkpoint (in its
    dtype: a bf16 run trains and saves bf16 parameters), `evaluate` on the same held-out batches."""
    cfg = compose_config([*FAST, *EVAL, *overrides])
    t = cfg.train
    data = build_training_data(cfg.data, t.seq_len, t.global_batch_size, cfg.seed, 2 * t.global_batch_size)
    ids = eval_row_ids(t.eval_batches, t.global_batch_size, 0, 1, t.micro_batch_size)
    model = DeepSeekV3(to_model_args(cfg.model), init_seed=None)
    if t.dtype == "bf16":
        cast_parameters(model, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"model": model.state_dict()}, checkpoint_id=str(run_dir / "checkpoints" / f"step_{step}"),
                 no_dist=True)
    return evaluate(model, (data.eval_dataset.gather(m) for m in ids), torch.device("cpu"))


def test_eval_loss_equals_a_separate_evaluation_of_the_checkpoint(single):
    """Acceptance 5: eval_loss at steps 2 and 4 only, each equal to evaluating that step's checkpoint."""
    rows = records(single)
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    assert all("data_time_s" in r and r["data_time_s"] >= 0 for r in rows)
    for step in (2, 4):
        assert evaluate_checkpoint(single, [], step) == rows[step - 1]["eval_loss"]
    assert rows[1]["eval_loss"] != rows[3]["eval_loss"]


def test_evaluate_tool_equals_the_trainers_eval_loss(single, tmp_path, capsys):
    """`python -m haillm.tools.evaluate CHECKPOINT` gives the step's eval_loss (==); `--data` evaluates another
    corpus with the run's tokenizer and seq_len; bad input is one line."""
    from haillm.tools.evaluate import evaluate_checkpoint
    from haillm.tools.evaluate import main as evaluate_main

    rows = records(single)
    for step in (2, 4):
        assert evaluate_checkpoint(single / "checkpoints" / f"step_{step}")["lm_loss"] == rows[step - 1]["eval_loss"]
    corpus = tmp_path / "other.jsonl"
    write_corpus(corpus, 30_000, seed=5)
    assert evaluate_main([str(single / "checkpoints" / "step_4"), "--data", str(corpus), "--batches", "2",
                          "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sequences"] == 2 * 4 and 0 < result["lm_loss"] < 10
    assert result["perplexity"] == pytest.approx(math.exp(result["lm_loss"]))
    assert evaluate_main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_generate_tool_samples_and_refuses_bad_input(single, capsys):
    """`python -m haillm.tools.generate CHECKPOINT --prompt ...`: greedy is deterministic, sampling follows its
    seed, the output starts with the prompt; bad arguments are one line."""
    from haillm.tools.generate import main as generate_main

    step_4 = str(single / "checkpoints" / "step_4")
    outs = []
    for extra in (["--greedy"], ["--greedy"], ["--seed", "3"], ["--seed", "3"]):
        assert generate_main([step_4, "--prompt", "def main(", "--max-new-tokens", "12", *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[2] == outs[3] and all(o.startswith("def main(") for o in outs)
    for bad in (["--max-new-tokens", "0"], ["--top-p", "1.5"], ["--max-new-tokens", "100000"]):
        with contextlib.suppress(SystemExit):
            assert generate_main([step_4, "--prompt", "x", *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err, err


def test_bf16_eval_loss_equals_a_separate_evaluation(tmp_path):
    """In a bf16 run too: evaluation computes as training does (bf16 parameters, no autocast)."""
    bf16 = ["train.dtype=bf16", "train.steps=1", "train.eval_interval=1", "checkpoint.interval=1"]
    assert launch_train.main([*FAST, *EVAL, *bf16, f"output_dir={tmp_path}"]) == 0
    assert evaluate_checkpoint(tmp_path, bf16, 1) == records(tmp_path)[0]["eval_loss"]


def test_evaluation_leaves_training_unchanged(single, tmp_path):
    out = tmp_path / "run"
    assert launch_train.main([*FAST, *EVAL, "train.eval_interval=0", f"output_dir={out}"]) == 0
    assert [r["loss"] for r in records(out)] == [r["loss"] for r in records(single)]
    assert all("eval_loss" not in r for r in records(out))


def test_dp2_evaluates_like_dp1(single, tmp_path):
    out = tmp_path / "run"
    argv = [*FAST, *EVAL, "parallel.dp=2", f"output_dir={out}"]
    assert run_distributed(launch_train.main, world_size=2, args=(argv,), timeout=240) == [0, 0]
    for got, ref in zip(records(out), records(single), strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got.get("eval_loss", 0) == pytest.approx(ref.get("eval_loss", 0), rel=1e-6)


def test_separate_eval_source(tmp_path):
    """data.eval_source: its first rows are the held-out batches; training keeps all of data.source."""
    write_corpus(tmp_path / "valid.jsonl", 20_000, seed=7)
    cfg = DataConfig(max_bytes=100_000, eval_source=str(tmp_path / "valid.jsonl"))
    data = build_training_data(cfg, 32, 4, 0, eval_samples=8)
    alone = build_training_data(DataConfig(max_bytes=100_000), 32, 4, 0)
    assert data.dataset.num_samples == alone.dataset.num_samples
    assert data.eval_dataset.num_samples >= 8 and "valid.jsonl" in data.eval_dataset.source
    with pytest.raises(DataError, match="evaluation"):
        build_training_data(cfg, 32, 4, 0, eval_samples=10**6)
    with pytest.raises(DataError, match="holds out"):
        build_training_data(DataConfig(max_bytes=100_000, eval_holdout=0.001), 32, 4, 0, eval_samples=64)


@pytest.mark.parametrize("blend", [False, True])
def test_eval_source_from_the_command_line(tmp_path, blend):
    """data.eval_source through the launcher (whose `data` is an OmegaConf node), with one data.source and
    with a blend, which cannot hold rows out of its datasets."""
    write_corpus(tmp_path / "valid.jsonl", 20_000, seed=7)
    data = []
    if blend:
        for name in ("web", "code"):
            write_corpus(tmp_path / f"{name}.jsonl", 60_000, seed=len(name))
            preprocess(DataConfig(source=str(tmp_path / f"{name}.jsonl"), max_bytes=0), tmp_path / name,
                       workers=0, progress=False)
        data = ["data=blend", f"data.blend=[0.7:{tmp_path / 'web'},0.3:{tmp_path / 'code'}]"]
    out = tmp_path / "run"
    argv = [*FAST, *data, "train.steps=2", "train.eval_interval=1", "train.eval_batches=2",
            f"data.eval_source={tmp_path / 'valid.jsonl'}", f"output_dir={out}"]
    assert launch_train.main(argv) == 0
    assert [r["step"] for r in records(out) if r["eval_loss"] > 0] == [1, 2]


@pytest.mark.parametrize(("overrides", "expected"), [
    (["train.eval_interval=5"], "needs held-out data"),
    (["train.eval_interval=-1"], "train.eval_interval=-1"),
    (["train.eval_batches=0", "train.eval_interval=1", "data.eval_holdout=0.1"], "train.eval_batches=0"),
    (["data.eval_holdout=1.0"], "data.eval_holdout=1.0"),
    (["train.eval_interval=2", "data.eval_holdout=0.1", "parallel.pp=2", "train.micro_batch_size=1"],
     "parallel.pp=2"),
])
def test_bad_eval_settings(overrides, expected):
    world = 2 if "parallel.pp=2" in overrides else 1
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides), world)
    assert expected in str(err.value) and "\n" not in str(err.value)
