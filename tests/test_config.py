"""Config composition, validation messages and the LR schedule."""

from __future__ import annotations

import dataclasses

import pytest

from haillm.config import ConfigError, compose_config, to_model_args, validate
from haillm.models.deepseek_v3.args import PRESETS
from haillm.train.optim import lr_at


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_presets_compose_to_the_python_presets(name):
    cfg = compose_config([f"model={name}"])
    assert cfg.model.name == name
    assert to_model_args(cfg.model) == PRESETS[name]


def test_defaults_validate_and_overrides_apply():
    cfg = compose_config(["train.steps=7", "model.dim=96", "parallel.pp_schedule=dualpipe"])
    validate(cfg)
    assert cfg.train.steps == 7 and to_model_args(cfg.model).dim == 96
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["train.foo=1"], 1, "unknown config key 'train.foo'; valid keys under train: steps"),
        (["train.steps=0"], 1, "train.steps=0 must be a positive integer"),
        (["train.global_batch_size=10", "train.micro_batch_size=4"], 1, "must be divisible by"),
        ([], 2, "world size is 2"),
        (["parallel.dp=4", "parallel.ep=3", "train.micro_batch_size=2"], 4, "parallel.ep=3 must divide parallel.dp=4"),
        (["optim.schedule=linear"], 1, "optim.schedule='linear' is not valid"),
        (["model.n_limited_groups=9"], 1, "model:"),
        (["train.seq_len=100000"], 1, "exceeds model.max_seq_len"),
        (["model.init_from=/x"], 1, "hf:<path>"),
    ],
)
def test_validation_errors_are_one_line(overrides, world, message):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides), world_size=world)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_lr_schedules():
    cfg = compose_config(["train.steps=100", "train.lr=1.0", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    assert lr_at(1, cfg) == pytest.approx(0.1)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    values = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    cfg.optim.schedule = "constant_then_decay"
    cfg.optim.decay_start = 0.5
    assert lr_at(50, cfg) == pytest.approx(1.0)
    assert lr_at(75, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_model_config_fields_cover_model_args():
    cfg = compose_config([])
    for f in dataclasses.fields(type(PRESETS["tiny"])):
        assert f.name in cfg.model
