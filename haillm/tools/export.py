"""Export a training checkpoint as a Hugging Face DeepseekV3 checkpoint: `python -m haillm.tools.export
CHECKPOINT OUT_DIR [--dtype bfloat16] [--ema]`.

CHECKPOINT is a `checkpoints/step_<N>` directory written by any layout (dp, ep, tp, pp with any schedule): its
tensors are stored under the full model's names and global shapes, so one process reads them whole. Weights
come from the optimizer's fp32 master copies when the checkpoint holds them (the model entries may be a
lower-precision copy), else from the model entries; buffers (the routing bias) from the model entries. With
`--ema` the weights are the exponential moving average of the parameters that a run with `train.ema_decay` > 0
keeps (the checkpoint's `ema.<name>` entries; a checkpoint without them is refused), the buffers still the model
entries. The model configuration is the checkpoint's `config.yaml` (or, for checkpoints written before it was
stored there, the run directory's). The run's tokenizer goes along: its `tokenizer.json` is copied (the `byte`
tokenizer has none), and config.json's `bos_token_id`/`eos_token_id` are its end-of-document id, which also
separates documents in training, so that `generate` stops where the model learnt documents end. OUT_DIR is
written under a temporary name, made readable by the group, and renamed when complete; an existing non-empty
OUT_DIR is refused.
"""

from __future__ import annotations

import argparse
import shutil
import stat
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import yaml
from omegaconf import OmegaConf
from torch.distributed.checkpoint.api import CheckpointException

from haillm.config import to_model_args
from haillm.data import DataError
from haillm.data.tokenizer import build_tokenizer
from haillm.models.deepseek_v3.hf import save_hf
from haillm.models.deepseek_v3.model import DeepSeekV3
from haillm.train.checkpoint import CONFIG, describe, has_ema, verify
from haillm.train.ema import parameter_keys

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ExportError(ValueError):
    """The checkpoint or the output directory cannot be used (one-line message)."""


def config_path(checkpoint: Path) -> Path:
    for path in (checkpoint / CONFIG, checkpoint.parent.parent / CONFIG):
        if path.is_file():
            return path
    raise ExportError(f"{checkpoint} has no {CONFIG}, nor has its run directory: cannot tell the model's shape")


def load_checkpoint_model(checkpoint: str | Path, ema: bool = False) -> DeepSeekV3:
    """The full model (fp32, CPU) held by a training checkpoint of any layout; with `ema`, its parameters are the
    checkpoint's EMA of the parameters (`train.ema_decay`) instead of the trained values."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ExportError(f"{checkpoint} is not a directory")
    problem = verify(checkpoint)
    if problem:
        raise ExportError(f"{checkpoint} is not a complete checkpoint: {problem}")
    try:
        args = to_model_args(OmegaConf.load(config_path(checkpoint)).model)
    except (ValueError, TypeError, AttributeError, yaml.YAMLError) as exc:  # YAML's messages span lines
        raise ExportError(f"{config_path(checkpoint)}: unusable model config ({' '.join(str(exc).split())[:300]})"
                          ) from None
    with torch.device("meta"):
        model = DeepSeekV3(args, init_seed=None)
    model.to_empty(device="cpu")
    model.rebuild_unsaved()  # the rope tables are in no checkpoint: without them the logits were garbage
    state = model.state_dict()
    metadata = _read(checkpoint, lambda: dcp.FileSystemReader(str(checkpoint)).read_metadata()).state_dict_metadata
    for name, tensor in state.items():
        saved = metadata.get(f"model.{name}")
        if saved is None or list(getattr(saved, "size", [])) != list(tensor.shape):
            raise ExportError(f"{checkpoint} holds no tensor {name} of shape {list(tensor.shape)}: "
                              "it does not match its config.yaml")
    if ema:  # the averaged parameters straight into the model's tensors; buffers from the model entries
        keys = parameter_keys(model)
        if not has_ema(metadata, keys):
            raise ExportError(f"{checkpoint} holds no EMA of the parameters (its run had train.ema_decay=0); "
                              "export it without --ema")
        request = {"model": {k: t for k, t in state.items() if k not in set(keys)}, "ema": {k: state[k] for k in keys}}
        _read(checkpoint, lambda: dcp.load(request, checkpoint_id=str(checkpoint), no_dist=True))
        return model
    params = dict(model.named_parameters())
    masters = {name: torch.empty_like(p, dtype=torch.float32) for name, p in params.items()
               if f"optim.state.{name}.master" in metadata}
    request = {"model": state, "optim": {"state": {name: {"master": t} for name, t in masters.items()}}}
    _read(checkpoint, lambda: dcp.load(request, checkpoint_id=str(checkpoint), no_dist=True))
    with torch.no_grad():
        for name, master in masters.items():
            params[name].copy_(master)
    return model


def _read(checkpoint: Path, read):
    """`read()`, with a corrupt file (of the right size, so the manifest passed) as an ExportError."""
    try:
        return read()
    except (Exception, CheckpointException) as exc:
        raise ExportError(f"{checkpoint} cannot be read ({describe(exc)})") from None


def export(checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32, ema: bool = False) -> Path:
    """Write `checkpoint` (with `ema`: its EMA of the parameters) as a Hugging Face DeepseekV3 checkpoint directory
    `out_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} exists and is not an empty directory; choose another OUT_DIR")
    model = load_checkpoint_model(checkpoint, ema)
    spec = OmegaConf.load(config_path(Path(checkpoint))).data.tokenizer
    try:
        tokenizer = build_tokenizer(spec)
    except DataError as exc:
        raise ExportError(f"the run's tokenizer cannot be read: {exc}") from None
    for p in model.parameters():  # buffers (the routing bias) stay fp32
        p.data = p.data.to(dtype)
    tmp = out_dir.with_name(f".tmp_{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(model, tmp, eos_token_id=tokenizer.eod_id)
    if spec != "byte":
        source = Path(spec) / "tokenizer.json" if Path(spec).is_dir() else Path(spec)
        shutil.copyfile(source, tmp / "tokenizer.json")
    for path in [tmp, *tmp.iterdir()]:  # the group may read it (a shared cluster's umask is often 077)
        path.chmod(path.stat().st_mode | stat.S_IRGRP | (stat.S_IXGRP if path.is_dir() else 0))
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m haillm.tools.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoints/step_<N> directory")
    parser.add_argument("out_dir", help="the Hugging Face checkpoint directory to create")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="stored weight dtype")
    parser.add_argument("--ema", action="store_true",
                        help="export the EMA of the parameters (a run with train.ema_decay > 0) instead of the weights")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out_dir, DTYPES[args.dtype], args.ema)
    except (ExportError, OSError) as exc:
        print(f"haillm.tools.export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint}{' (EMA of the parameters)' if args.ema else ''} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
