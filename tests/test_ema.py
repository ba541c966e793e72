"""The EMA of the parameters in host memory (`train.ema_decay`, haillm/train/ema.py): the blend is bitwise the
plain torch expression, the background update equals the synchronous one and reads a snapshot of the
parameters, checkpoints round-trip it, and a bad decay is refused in one line."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from haillm.config import ConfigError, compose_config, validate
from haillm.models.deepseek_v3 import DeepSeekV3, get_preset
from haillm.train import checkpoint
from haillm.train.ema import ParameterEMA, parameter_keys

DECAY = 0.9


class Small(nn.Module):
    """fp32 and bf16 parameters and a buffer (which is not averaged)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(5, 3, generator=gen))
        self.h = nn.Parameter(torch.randn(7, generator=gen).bfloat16())
        self.register_buffer("bias", torch.zeros(3))


def _move(model: nn.Module, step: int) -> None:
    """What an optimizer step does to the parameters (and the balancing to the buffer)."""
    gen = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype))
        model.bias.add_(1.0)


def reference(model: nn.Module, steps: int, decay: float) -> dict[str, torch.Tensor]:
    """The EMA in a few lines of plain torch: ema = decay * ema + (1 - decay) * param, after each step."""
    ema = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    for step in range(steps):
        _move(model, step)
        ema = {name: decay * ema[name] + (1 - decay) * p.detach().float() for name, p in model.named_parameters()}
    return ema


def test_the_blend_is_bitwise_the_plain_torch_expression():
    ema = ParameterEMA(Small(), DECAY)
    assert sorted(ema.ema) == ["h", "w"] and all(t.dtype == torch.float32 for t in ema.ema.values())
    for step in range(5):
        _move(ema.model, step)
        ema.update()
    expected = reference(Small(), 5, DECAY)
    got = ema.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not torch.equal(got["w"], ema.model.w)  # an average, not the last value
    ema.close()


def test_the_background_update_reads_a_snapshot_and_equals_the_synchronous_one(monkeypatch):
    """update() returns before the blend is done; the next step may overwrite the parameters meanwhile; readers
    (state_dict) wait. The result equals updating and waiting step by step."""
    sync = ParameterEMA(Small(), DECAY)
    for step in range(3):
        _move(sync.model, step)
        sync.update()
        sync.wait()

    background = ParameterEMA(Small(), DECAY)
    release, blend = threading.Event(), background._blend

    def held_blend(copied):
        release.wait(timeout=60)
        blend(copied)

    monkeypatch.setattr(background, "_blend", held_blend)
    for step in range(3):
        _move(background.model, step)
        params = {name: p.detach().clone() for name, p in background.model.named_parameters()}
        background.update()  # returns while the blend waits for `release`
        assert background._pending is not None and not background._pending.done()
        with torch.no_grad():
            for p in background.model.parameters():  # the next optimizer step overwrites what was copied
                p.fill_(float("nan"))
        release.set()
        background.wait()
        release.clear()
        with torch.no_grad():
            for name, p in background.model.named_parameters():
                p.copy_(params[name])
    assert all(torch.equal(background.state_dict()[k], sync.state_dict()[k]) for k in sync.ema)
    sync.close()
    background.close()


def test_parameter_keys_name_each_expert_and_leave_out_buffers():
    model = DeepSeekV3(get_preset("tiny"), init_seed=0)
    keys = parameter_keys(model)
    assert "layers.1.ffn.experts.3.w2.weight" in keys and "layers.1.ffn.experts.w2" not in keys
    assert "layers.1.ffn.gate.bias" not in keys  # the routing bias is a buffer
    ema = ParameterEMA(model, DECAY)
    assert list(ema.ema) == keys
    assert torch.equal(ema.ema["layers.1.ffn.experts.3.w2.weight"], model.layers["1"].ffn.experts.w2[3])


class _NoState:
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_checkpoint_round_trip(tmp_path, caplog):
    """Saved as ema.<name> next to model.<name>; loaded back exactly; a checkpoint without one leaves
    `restored` False (the trainer restarts it from the parameters); without an EMA to load into it is ignored."""
    ema = ParameterEMA(Small(), DECAY)
    for step in range(3):
        _move(ema.model, step)
        ema.update()
    path = checkpoint.save(tmp_path / "with", 3, ema.model, _NoState(), {"step": 3}, keep=0, ema=ema)
    names = checkpoint._metadata(path)
    assert {"ema.w", "ema.h", "model.w", "model.h", "model.bias"} <= set(names) and "ema.bias" not in names

    other = ParameterEMA(Small(seed=1), DECAY)
    checkpoint.load(path, other.model, _NoState(), rng=False, ema=other)
    assert other.restored
    assert all(torch.equal(other.state_dict()[k], ema.state_dict()[k]) for k in ema.ema)
    assert torch.equal(other.model.w, ema.model.w)

    with caplog.at_level(logging.INFO, logger="haillm.train.checkpoint"):
        checkpoint.load(path, Small(seed=2), _NoState(), rng=False)
    assert "train.ema_decay=0: not used" in caplog.text

    plain = checkpoint.save(tmp_path / "without", 3, ema.model, _NoState(), {"step": 3}, keep=0)
    checkpoint.load(plain, other.model, _NoState(), rng=False, ema=other)
    assert not other.restored
    ema.close()
    other.close()


def test_a_bad_decay_is_refused_in_one_line():
    """0 (off) and [0, 1) are valid; anything else names the value and the valid range."""
    cfg = compose_config(["train.ema_decay=0.999"])
    validate(cfg)
    for decay in (1.0, -0.1, 1.5, float("nan")):
        OmegaConf.update(cfg, "train.ema_decay", decay)
        with pytest.raises(ConfigError) as info:
            validate(cfg)
        assert str(info.value) == f"train.ema_decay={decay!r} must be in [0, 1)"


@pytest.mark.gpu
def test_on_a_gpu_the_side_stream_copy_gives_the_cpu_result():
    """CUDA parameters: non_blocking copies into pinned buffers on a side stream, blended on the host thread,
    equal bitwise to the same parameters averaged on CPU; the step's stream only waits on an event."""
    cpu, gpu = Small(), Small().cuda()
    ema_cpu, ema_gpu = ParameterEMA(cpu, DECAY), ParameterEMA(gpu, DECAY)
    assert all(t.is_pinned() for t in ema_gpu.ema.values())
    for step in range(4):
        _move(cpu, step)
        ema_gpu.before_optimizer_step()
        _move(gpu, step)
        ema_cpu.update()
        ema_gpu.update()
    assert all(torch.equal(ema_gpu.state_dict()[k], ema_cpu.state_dict()[k]) for k in ema_cpu.ema)
    ema_cpu.close()
    ema_gpu.close()
