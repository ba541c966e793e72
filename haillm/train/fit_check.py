"""Refuse at once a run that cannot fit this machine, with the layout planner's estimate and the memory there is.

Without it a model too large for the machine allocates until the kernel's out-of-memory killer ends the job,
minutes later, or CUDA fails deep inside the first step. The estimate is the planner's for this rank
(``haillm.tools.memory.rank_memory``: parameters, gradients, optimizer state, FP8 weight cache and the
activations of the schedule's peak), which tests/test_plan_memory.py holds to measured memory. What is
available: the GPU's free memory, or on CPU the kernel's ``MemAvailable`` shared by this node's ranks.
``train.check_memory=false`` skips the check (the estimate leaves out the allocator's and the libraries' own
overhead, and a machine may have swap).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from haillm.config import ConfigError, to_model_args
from haillm.parallel.mesh import ParallelDims

GIB = 2**30


def available_bytes(device: torch.device) -> tuple[int, str]:
    """Memory this rank may use, and where the figure comes from."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on the {torch.cuda.get_device_name(device)}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    available = _mem_available()
    share = f" shared by {local} ranks on this node" if local > 1 else ""
    return available // local, f"CPU RAM: MemAvailable{share}"


def _mem_available() -> int:
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(cfg: DictConfig, world: int, rank: int, device: torch.device) -> None:
    """Raise a one-line ConfigError on every rank when the planner's estimate for any rank exceeds the memory
    available to it (collective: pipeline ranks differ, and all must stop together)."""
    from haillm.train.setup import gather_object

    problem = next((p for p in gather_object(fit_problem(cfg, world, rank, device)) if p), None)
    if problem:
        raise ConfigError(problem)


def fit_problem(cfg: DictConfig, world: int, rank: int, device: torch.device) -> str | None:
    """Why this rank cannot hold the run, in one line, or None."""
    if not cfg.train.check_memory:
        return None
    from haillm.tools.memory import rank_memory
    from haillm.tools.plan import layout_of

    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    lay = layout_of(cfg, "cpu" if device.type == "cpu" else "cuda", capability)
    pp_rank = ParallelDims.from_config(cfg.parallel, world).coords(rank)["pp"]
    need = rank_memory(to_model_args(cfg.model), lay, pp_rank)
    have, where = available_bytes(device)
    if need.total <= have:
        return None
    return (
        f"model={cfg.model.name} does not fit: the layout planner estimates {need.total / GIB:.1f} GiB for rank "
        f"{rank} (parameters {need.parameters / GIB:.1f}, gradients {need.gradients / GIB:.1f}, optimizer "
        f"{need.optimizer / GIB:.1f}, activations {need.activations / GIB:.1f} GiB) but {have / GIB:.1f} GiB is "
        f"available ({where}); use more ranks (parallel.*), a smaller model or train.seq_len, or "
        "train.check_memory=false to try anyway (python -m haillm.tools.plan shows a layout's memory)")
