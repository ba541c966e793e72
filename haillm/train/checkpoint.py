"""Checkpoints through torch.distributed.checkpoint (DCP), written atomically and verified on resume.

Layout of ``<output_dir>/checkpoints/step_<N>/``:
- DCP files (``.metadata`` + ``__<rank>_<i>.distcp``) holding ``model`` and ``optim`` keyed by parameter
  FQNs with global shapes, so a later layout can reshard them;
- ``trainer_state.json``: step, data position (global ``consumed_samples``), skip counters;
- ``rng_rank<r>.pt``: each rank's RNG states;
- ``manifest.json``: every file with its size, written last; a directory without a matching manifest is
  incomplete. The whole directory is first written as ``.tmp_step_<N>`` and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from haillm.train.setup import broadcast_object, rng_state, set_rng_state

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run (one-line message naming it and why)."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Finished checkpoint directories (`step_<N>`), newest first; temporary ones are ignored."""
    root = checkpoint_root(run_dir)
    found = []
    if root.is_dir():
        for path in root.iterdir():
            suffix = path.name.removeprefix("step_")
            if path.is_dir() and path.name.startswith("step_") and suffix.isdigit():
                found.append((int(suffix), path))
    return sorted(found, reverse=True)


def verify(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None when every file matches the manifest."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the write did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest ({exc})"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"missing file {name}"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, expected {size} (truncated or corrupt)"
    return None


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call that it assumes one process when there is no process group; that is the
    intent of a single-process run, so keep the console clean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state(model: torch.nn.Module, optimizer: Stateful) -> dict:
    """What DCP saves and loads in place: parameters by FQN, and the optimizer as a Stateful."""
    return {"model": model.state_dict(), "optim": optimizer}


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer: Stateful, trainer_state: dict,
         keep: int) -> Path:
    """Write `step_<step>` atomically on all ranks; prune to the newest `keep` (0 keeps all)."""
    root = checkpoint_root(run_dir)
    final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    with _quiet_single_process():
        dcp.save(_state(model, optimizer), checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        _write_synced(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
        if final.exists():  # a re-run of the same step after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep:
            for _, old in list_checkpoints(run_dir)[keep:]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def check_shapes(path: Path, model: torch.nn.Module) -> None:
    """Raise CheckpointError when the checkpoint's model tensors differ from the model's (other config)."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for name, tensor in model.state_dict().items():
        entry = metadata.get(f"model.{name}")
        if entry is None:
            raise CheckpointError(
                f"checkpoint {path} has no tensor {name}: it was written for a different model config"
            )
        saved = list(getattr(entry, "size", []))
        if saved != list(tensor.shape):
            raise CheckpointError(
                f"checkpoint {path} holds {name} with shape {saved} but the model has {list(tensor.shape)}: "
                "it was written for a different model config"
            )


def load(path: Path, model: torch.nn.Module, optimizer: Stateful) -> dict:
    """Load model, optimizer and this rank's RNG from `path` (any data-parallel layout wrote it)."""
    check_shapes(path, model)
    with _quiet_single_process():
        dcp.load(_state(model, optimizer), checkpoint_id=str(path), no_dist=not dist.is_initialized())
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / TRAINER_STATE).read_text())


def resume(run_dir: Path, model: torch.nn.Module, optimizer: Stateful) -> dict | None:
    """Load the newest complete checkpoint, falling back past incomplete or unreadable ones (said in the log).

    Returns the trainer state, or None when `run_dir` has no checkpoint at all. Raises CheckpointError
    when checkpoints exist but none is usable, so a run never silently restarts from scratch over them.
    """
    candidates = list_checkpoints(run_dir)
    for _, path in candidates:
        reason = broadcast_object(verify(path) if _rank() == 0 else None)
        if reason is None:
            try:
                return load(path, model, optimizer)
            except CheckpointError:
                raise
            except (Exception, CheckpointException) as exc:  # a corrupt file that still has the right size
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.warning("checkpoint %s is unusable (%s); falling back to the previous one", path, reason)
    if candidates:
        raise CheckpointError(f"no usable checkpoint in {checkpoint_root(run_dir)}: all are incomplete or corrupt")
    return None
