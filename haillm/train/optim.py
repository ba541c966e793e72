"""AdamW parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to matrices only: never to norms, biases or other 1-D parameters."""
    return param.ndim >= 2 and not name.endswith(".bias")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices with weight decay, everything else without."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append((name, param))
    return [
        {"params": [p for _, p in group], "weight_decay": wd}
        for group, wd in ((decay, weight_decay), (no_decay, 0.0))
        if group
    ]


def build_adamw(model: torch.nn.Module, cfg: DictConfig) -> torch.optim.AdamW:
    o = cfg.optim
    return torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=cfg.train.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=True
    )


def lr_at(step: int, cfg: DictConfig) -> float:
    """LR for 1-based optimizer step `step`: linear warmup, then cosine (or constant, then cosine) to the floor.

    `constant_then_decay` is DeepSeek-V3's shape: hold the peak until `decay_start` of the run, then a
    cosine down to `min_lr_ratio * lr` at the last step.
    """
    o, peak, total = cfg.optim, cfg.train.lr, cfg.train.steps
    if o.warmup_steps and step <= o.warmup_steps:
        return peak * step / o.warmup_steps
    floor = peak * o.min_lr_ratio
    if o.schedule == "constant":
        return peak
    start = o.warmup_steps if o.schedule == "cosine" else max(o.warmup_steps, int(o.decay_start * total))
    if step <= start:
        return peak
    progress = min(1.0, (step - start) / max(1, total - start))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
