"""Checkpoints through torch.distributed.checkpoint (DCP), written atomically and verified on resume.

Layout of ``<output_dir>/checkpoints/step_<N>/``:
- DCP files (``.metadata`` + ``__<rank>_<i>.distcp``) holding ``model`` and ``optim`` keyed by parameter
  FQNs with global shapes, so a later layout can reshard them, and with ``train.ema_decay`` > 0 ``ema`` (the fp32
  EMA of the parameters, haillm.train.ema) under the same FQNs. A tensor-parallel block of a parameter, its
  ZeRO state and its EMA are saved in the whole tensor's shape (ShardedTensors over the tp peers' blocks), so a
  checkpoint reads the same whatever tp wrote it;
- ``trainer_state.json``: step, data position (global ``consumed_samples``), skip counters;
- ``rng_rank<r>.pt``: each rank's RNG states;
- ``config.yaml``: the resolved run configuration (what `haillm.tools.export` rebuilds the model from);
- ``manifest.json``: every file with its size and CRC-32, written last; a directory without a matching
  manifest is incomplete, one whose files differ from it (size, or content: a flipped byte) is corrupt.
  The whole directory is first written as ``.tmp_step_<N>`` and renamed when complete; a checkpoint of the
  same step (written before a resume went back past it) is moved aside as ``.old_step_<N>`` first and removed
  after, and pruning (``checkpoint.keep``) removes only steps older than the one just written.

`Checkpointer` writes them either in the training thread or, with ``checkpoint.async_save``, from a copy in
CPU memory on a background thread (with its own gloo process group, so its collectives never interleave with
training's), while the next steps run. The commit is the same in both cases: the manifest and the rename come
after every rank has written its part.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import warnings
import zlib
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from haillm.parallel.tensor_plan import tp_blocks
from haillm.parallel.zero_state import Block, in_blocks
from haillm.train import faults
from haillm.train.ema import ParameterEMA
from haillm.train.setup import gather_object, rng_state, set_rng_state

if TYPE_CHECKING:
    from haillm.parallel.zero import ZeroAdamW

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.yaml"
WRITER_THREAD = "haillm-checkpoint"  # the background writer of async saves (the fault hooks wait for it)
# DCP warns on every call that it assumes one process when there is no process group: that is the intent of a
# single-process run. A filter for the process, not catch_warnings, which is not thread-safe (async saves).
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run (one-line message naming it and why)."""


def _barrier(group: dist.ProcessGroup | None = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


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


def verify(path: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """Why `path` is not a complete checkpoint, or None when every file matches the manifest: sizes, and the
    CRC-32 of files number `share[0]` modulo `share[1]` (the ranks of a job verify a share each; checkpoints
    written before checksums were recorded are checked by size only)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the write did not finish)"
    try:
        content = json.loads(manifest.read_text())
        files, crcs = dict(content["files"]), dict(content.get("crc32", {}))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable manifest ({type(exc).__name__}: {exc})"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"missing file {name}"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, expected {size} (truncated or corrupt)"
    for i, name in enumerate(sorted(crcs)):
        if i % share[1] == share[0] and (not (path / name).is_file() or _crc32(path / name) != crcs[name]):
            return f"{name} does not match its checksum (corrupt)"
    return None


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


class _InBlocks:
    """A Stateful (ZeroAdamW, ParameterEMA) whose state dict holds the tensors of `blocks` in their whole shapes."""

    def __init__(self, inner: ZeroAdamW | ParameterEMA, blocks: dict[str, Block]) -> None:
        self.inner, self.blocks = inner, blocks

    def state_dict(self) -> dict:
        return self.inner.state_dict(blocks=self.blocks)

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state, blocks=self.blocks)


def _state(model: torch.nn.Module, optimizer: Stateful, ema: ParameterEMA | None = None) -> dict:
    """What DCP saves and loads in place: parameters by FQN, the optimizer as a Stateful, and the EMA of the
    parameters (a Stateful too, under the parameters' FQNs) when there is one. Every tensor in its whole shape:
    a tensor-parallel block (``tp_blocks``) is a view in it, and the optimizer's and EMA's state dicts take them."""
    blocks = tp_blocks(model)
    stateful = {"optim": optimizer, **({"ema": ema} if ema is not None else {})}
    return {"model": in_blocks(model.state_dict(), blocks),
            **{key: _InBlocks(value, blocks) if blocks else value for key, value in stateful.items()}}


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer: Stateful, trainer_state: dict,
         keep: int, config: str | None = None, ema: ParameterEMA | None = None) -> Path:
    """Write `step_<step>` atomically on all ranks; prune to the newest `keep` (0 keeps all)."""
    return _write(run_dir, step, _state(model, optimizer, ema), rng_state(), trainer_state, keep, config, None)


def _write(run_dir: Path, step: int, state: dict, rng: dict, trainer_state: dict, keep: int, config: str | None,
           group: dist.ProcessGroup | None) -> Path:
    """Every rank writes its part into ``.tmp_step_<step>``; rank 0 commits once all are done."""
    root = checkpoint_root(run_dir)
    final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(group)
    dcp.save(state, checkpoint_id=str(tmp), process_group=group, no_dist=not dist.is_initialized())
    faults.inject("checkpoint", step)
    torch.save(rng, tmp / f"rng_rank{_rank()}.pt")
    # Each rank checksums the files it wrote (still in the page cache); rank 0 the rest.
    mine = [p for p in tmp.iterdir() if p.name.startswith(f"__{_rank()}_") or p.name == f"rng_rank{_rank()}.pt"]
    (tmp / f".crc_rank{_rank()}.json").write_text(json.dumps({p.name: _crc32(p) for p in mine}))
    _barrier(group)
    if _rank() == 0:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        if config is not None:
            (tmp / CONFIG).write_text(config)
        crcs = {}
        for part in tmp.glob(".crc_rank*.json"):
            crcs |= json.loads(part.read_text())
            part.unlink()
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        crcs = {name: crcs[name] if name in crcs else _crc32(tmp / name) for name in files}
        _write_synced(tmp / MANIFEST, json.dumps({"step": step, "files": files, "crc32": crcs}, indent=1))
        aside = root / f".old_step_{step}"
        if final.exists():  # a re-run of the same step after a resume: moved aside until the new one is in place
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
        if keep:  # older steps only: newer ones belong to a history this run went back from (and may rewrite)
            for old in [path for n, path in list_checkpoints(run_dir) if n < step][keep - 1:]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(group)
    return final


class Checkpointer:
    """Writes the trainer's checkpoints, synchronously or (`async_save`) in the background.

    An asynchronous save copies this rank's state (parameters and ZeRO shards) into CPU buffers -- allocated
    at the first save and reused, pinned on GPU -- and returns; a thread writes and commits the copy. At most
    one write is in flight (the next save, and the end of training, wait for it), so the staging memory is one
    rank's share of one checkpoint; its size is logged.
    """

    def __init__(self, run_dir: Path, keep: int, async_save: bool = False, config: str | None = None,
                 timeout: timedelta | None = None):
        self.run_dir, self.keep, self.async_save, self.config = Path(run_dir), keep, async_save, config
        self.staging_bytes = 0
        self._buffers: dict[str, torch.Tensor] = {}
        # The background writer's own group (CPU tensors, apart from training's collectives), created here:
        # group creation is collective, and every rank builds its Checkpointer at the same point.
        self.group: dist.ProcessGroup | None = None
        if async_save and dist.is_initialized():
            self.group = dist.new_group(backend="gloo", timeout=timeout)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending: Path | None = None
        self.latest: Path | None = None  # the newest committed checkpoint this process wrote

    def save(self, step: int, model: torch.nn.Module, optimizer: Stateful, trainer_state: dict,
             ema: ParameterEMA | None = None) -> Path:
        """Start (async) or do the save of `step_<step>`; returns its final path."""
        self.wait()
        if not self.async_save:
            self.latest = save(self.run_dir, step, model, optimizer, trainer_state, self.keep, self.config, ema)
            return self.latest
        start = time.perf_counter()
        state = _to_cpu(_state_dict(model, optimizer, ema), self._buffers, "")  # the EMA too: the next step blends
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.staging_bytes = sum(t.numel() * t.element_size() for t in self._buffers.values())
        log.info("async checkpoint step_%d: %.1f MiB of this rank's state staged in CPU memory in %.2f s; "
                 "writing in the background", step, self.staging_bytes / 2**20, time.perf_counter() - start)
        args = (self.run_dir, step, state, rng_state(), trainer_state, self.keep, self.config, self.group)
        self._pending = checkpoint_root(self.run_dir) / f"step_{step}"
        self._thread = threading.Thread(target=self._write, args=args, name=WRITER_THREAD, daemon=True)
        self._thread.start()
        return self._pending

    def _write(self, *args) -> None:
        try:
            _write(*args)
        except BaseException as exc:  # handed to the training thread at the next wait()
            self._error = exc

    def wait(self) -> Path | None:
        """Block until the write in flight is committed; the newest committed checkpoint (None: none yet)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            self.latest = self._pending
        return self.latest


def _state_dict(model: torch.nn.Module, optimizer: Stateful, ema: ParameterEMA | None = None) -> dict:
    state = _state(model, optimizer, ema)
    return {key: value if key == "model" else value.state_dict() for key, value in state.items()}


def _to_cpu(obj, buffers: dict[str, torch.Tensor], path: str):
    """A copy of a nested state dict whose tensors (ShardedTensors: local shards) live in reused CPU buffers."""
    if isinstance(obj, dict):
        return {k: _to_cpu(v, buffers, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, ShardedTensor):
        shards = [Shard(_to_cpu(s.tensor, buffers, f"{path}#{i}"), _on_cpu(s.metadata))
                  for i, s in enumerate(obj.local_shards())]
        md = obj.metadata()
        meta = ShardedTensorMetadata([_on_cpu(m) for m in md.shards_metadata], md.size, md.tensor_properties)
        return ShardedTensor._init_from_local_shards_and_global_metadata(shards, meta, process_group=obj._process_group)
    if isinstance(obj, torch.Tensor):
        buf = buffers.get(path)
        if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
            buf = buffers[path] = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
        return buf.copy_(obj.detach(), non_blocking=obj.is_cuda)
    return obj


def _on_cpu(md: ShardMetadata) -> ShardMetadata:
    return ShardMetadata(md.shard_offsets, md.shard_sizes, f"rank:{md.placement.rank()}/cpu")


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _metadata(path: Path) -> dict:
    return dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata


def has_ema(metadata: dict, keys: list[str]) -> bool:
    """Whether a checkpoint (its DCP metadata) holds the EMA of every parameter named in `keys`."""
    return bool(keys) and all(f"ema.{key}" in metadata for key in keys)


def check_shapes(path: Path, model: torch.nn.Module, metadata: dict | None = None) -> None:
    """Raise CheckpointError when the checkpoint's model tensors differ from the model's (other config)."""
    metadata = _metadata(path) if metadata is None else metadata
    for name, tensor in in_blocks(model.state_dict(), tp_blocks(model)).items():
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


def load(path: Path, model: torch.nn.Module, optimizer: Stateful, rng: bool = True,
         ema: ParameterEMA | None = None) -> dict:
    """Load model, optimizer and (with `rng`) this rank's RNG from `path` (any data-parallel layout wrote it).

    With `ema`, its average too when the checkpoint holds one (``ema.restored`` says whether it did; if not, the
    caller restarts it from the loaded parameters); a checkpoint's EMA is left unread without `ema`."""
    metadata = _metadata(path)
    check_shapes(path, model, metadata)
    with_ema = ema is not None and has_ema(metadata, list(ema.ema))
    if ema is None and any(key.startswith("ema.") for key in metadata):
        log.info("checkpoint %s holds an EMA of the parameters; train.ema_decay=0: not used", path)
    dcp.load(_state(model, optimizer, ema if with_ema else None), checkpoint_id=str(path),
             no_dist=not dist.is_initialized())
    if ema is not None:
        ema.restored = with_ema
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / TRAINER_STATE).read_text())


def describe(exc: BaseException) -> str:
    """`Type: first line` of an error reading a checkpoint; DCP's CheckpointException is unwrapped to the
    first rank's own error (its text is a list of tracebacks)."""
    if isinstance(exc, CheckpointException) and exc.failures:
        exc = next(iter(exc.failures.values()))[0]
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def clean_up(run_dir: Path) -> None:
    """Undo what a crash during a commit left: remove incomplete writes (``.tmp_step_<N>``), and put back a
    complete checkpoint moved aside for a rewrite of its step (``.old_step_<N>``) unless the rewrite landed."""
    root = checkpoint_root(run_dir)
    for partial in root.glob(".tmp_step_*"):
        log.warning("removing %s: an incomplete checkpoint write", partial)
        shutil.rmtree(partial, ignore_errors=True)
    for aside in root.glob(".old_step_*"):
        final = root / aside.name.removeprefix(".old_")
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            log.warning("restoring %s: its rewrite did not finish", final)
            os.replace(aside, final)


def peek_trainer_state(run_dir: Path, resume: str) -> dict | None:
    """The trainer state of the checkpoint `checkpoint.resume=<resume>` will load, read without loading it (the
    newest one with a manifest for `auto`; a corrupt one is found, and passed over, at the real resume), or None."""
    if resume == "none":
        return None
    paths = [Path(resume)] if resume != "auto" else [p for _, p in list_checkpoints(run_dir)]
    for path in paths:
        try:
            if (path / MANIFEST).is_file():
                return json.loads((path / TRAINER_STATE).read_text())
        except (OSError, ValueError):
            continue
    return None


def resume_from(path: Path, model: torch.nn.Module, optimizer: Stateful, rng: bool = True,
                ema: ParameterEMA | None = None) -> dict:
    """Load the checkpoint at ``path`` (``checkpoint.resume=<path>``); CheckpointError when it is unusable."""
    reasons = gather_object(verify(path, (_rank(), dist.get_world_size() if dist.is_initialized() else 1)))
    reason = next((r for r in reasons if r is not None), None)
    if reason is not None:
        raise CheckpointError(f"checkpoint.resume={path} is unusable: {reason}")
    try:
        return load(path, model, optimizer, rng, ema)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(f"checkpoint.resume={path} is unusable: {describe(exc)}") from None


def resume(run_dir: Path, model: torch.nn.Module, optimizer: Stateful,
           ema: ParameterEMA | None = None) -> dict | None:
    """Load the newest complete checkpoint, falling back past incomplete or unreadable ones (said in the log).

    Returns the trainer state, or None when `run_dir` has no checkpoint at all. Raises CheckpointError
    when checkpoints exist but none is usable, so a run never silently restarts from scratch over them.
    """
    if _rank() == 0:
        clean_up(run_dir)
    _barrier()  # every rank lists the checkpoints after the clean-up
    candidates = list_checkpoints(run_dir)
    for _, path in candidates:
        reasons = gather_object(verify(path, (_rank(), dist.get_world_size() if dist.is_initialized() else 1)))
        reason = next((r for r in reasons if r is not None), None)  # every rank takes the same decision
        if reason is None:
            try:
                return load(path, model, optimizer, ema=ema)
            except CheckpointError:
                raise
            except (Exception, CheckpointException) as exc:  # a corrupt file that still has the right size
                reason = describe(exc)
        log.warning("checkpoint %s is unusable (%s); falling back to the previous one", path, reason)
    if candidates:
        raise CheckpointError(f"no usable checkpoint in {checkpoint_root(run_dir)}: all are incomplete or corrupt")
    return None
