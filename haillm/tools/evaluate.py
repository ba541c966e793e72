"""LM loss and perplexity of a checkpoint: `python -m haillm.tools.evaluate CHECKPOINT [--data SOURCE]
[--batches N] [--device cuda] [--json] [--ema]`.

CHECKPOINT is a `checkpoints/step_<N>` directory of any layout (read whole, as `haillm.tools.export` does, in
the run's parameter dtype: a bf16 run evaluates with bf16 parameters, as its trainer did). Without `--data`
it evaluates the run's own held-out set exactly as the trainer's `eval_loss` does (`data.eval_source` or
`data.eval_holdout`, the first `train.eval_batches` global batches, in the run's micro-batches), so the
result equals the `eval_loss` of that step in `metrics.jsonl`. With `--data SOURCE` (anything `data.source`
accepts: a corpus, compressed or not, or preprocessed shards, read with the run's tokenizer) it evaluates
SOURCE's sequences of the run's `train.seq_len`, the first `--batches` global batches (all by default). The
LM loss is the mean next-token cross-entropy of the main head (no MTP, no balance term); perplexity is its
exponential. `--ema` evaluates the checkpoint's EMA of the parameters (`train.ema_decay`) instead of its
weights. Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from haillm.data import DataConfig, DataError, build_dataset
from haillm.data.loader import build_training_data, eval_row_ids
from haillm.ops.precision import cast_parameters
from haillm.tools.export import ExportError, config_path, load_checkpoint_model
from haillm.train.evaluate import evaluate


def evaluate_checkpoint(checkpoint: str | Path, data: str | None = None, batches: int | None = None,
                        device: str = "cpu", progress: bool = False, ema: bool = False) -> dict:
    """{"lm_loss", "perplexity", "sequences", "seq_len", "data"} of the checkpoint (with `ema`: its EMA of the
    parameters) on its run's held-out set or on `data`."""
    checkpoint = Path(checkpoint)
    model = load_checkpoint_model(checkpoint, ema)
    cfg = OmegaConf.load(config_path(checkpoint))
    if cfg.train.dtype == "bf16":
        cast_parameters(model, torch.bfloat16)
    t = cfg.train
    data_cfg = DataConfig(**OmegaConf.to_container(cfg.data, resolve=True))
    if data is None:
        n = batches or t.eval_batches
        if not (data_cfg.eval_source or data_cfg.eval_holdout):
            raise DataError(f"the run of {checkpoint} held no data out (data.eval_source, data.eval_holdout): "
                            "pass --data SOURCE")
        held = build_training_data(data_cfg, t.seq_len, t.global_batch_size, cfg.seed, n * t.global_batch_size)
        dataset, what = held.eval_dataset, "the run's held-out set"
    else:
        dataset = build_dataset(dataclasses.replace(data_cfg, source=data, eval_source="", eval_holdout=0.0,
                                                    blend=[]), t.seq_len)
        available = dataset.num_samples // t.global_batch_size
        if available < 1:
            raise DataError(f"--data {data} packs into {dataset.num_samples} sequences of {t.seq_len + 1} tokens, "
                            f"fewer than one global batch ({t.global_batch_size})")
        n, what = min(batches or available, available), data
    micro = eval_row_ids(n, t.global_batch_size, 0, 1, t.micro_batch_size)
    loader = (dataset.gather(ids) for ids in micro)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, total=len(micro), unit="micro-batch", file=sys.stderr)
    loss = evaluate(model.to(device), loader, torch.device(device))
    return {"lm_loss": loss, "perplexity": math.exp(loss), "sequences": n * t.global_batch_size,
            "seq_len": t.seq_len, "data": what}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m haillm.tools.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoints/step_<N> directory")
    parser.add_argument("--data", help="a corpus or preprocessed directory (default: the run's held-out set)")
    parser.add_argument("--batches", type=int, help="global batches to evaluate (default: the run's "
                        "train.eval_batches, or all of --data)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA of the parameters (train.ema_decay)")
    args = parser.parse_args(argv)
    if args.batches is not None and args.batches < 1:
        parser.exit(2, f"{parser.prog}: error: --batches={args.batches} must be >= 1\n")
    try:
        result = evaluate_checkpoint(args.checkpoint, args.data, args.batches, args.device,
                                     progress=sys.stderr.isatty() and not args.json, ema=args.ema)
    except (ExportError, DataError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(f"lm_loss {result['lm_loss']:.6f} | perplexity {result['perplexity']:.4g} | {result['sequences']} "
              f"sequences x {result['seq_len']} tokens of {result['data']} | {args.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
