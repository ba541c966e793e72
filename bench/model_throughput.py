"""Training throughput (forward + backward tokens/s) of our DeepSeek-V3 against transformers' DeepseekV3.

    python bench/model_throughput.py --preset tiny [--threads 2] [--profile]

Both models get the same weights (ours saved with ``save_hf``, loaded by transformers' ``from_pretrained``
with its default attention and experts implementations) and the same token batch, in one process. One step
is next-token cross-entropy on ``[B, T]`` inputs plus ``backward``; ours runs ``compute_loss`` (balance loss
and load counting included) with MTP on (the preset's depth) and off, transformers has no MTP. Timed steps
are interleaved one at a time across the three models; tokens/s is reported for the median and the best
step, and so is the ratio to transformers (median / best). Needs transformers.
"""

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers

from haillm.models.deepseek_v3.args import get_preset
from haillm.models.deepseek_v3.hf import load_hf_state, save_hf
from haillm.models.deepseek_v3.model import DeepSeekV3

DEFAULT_SHAPE = {"tiny": (8, 128), "small": (4, 256)}  # (batch, seq_len)


def ours_step(model: DeepSeekV3, batch: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    losses = model.compute_loss(batch)
    losses["loss"].backward()
    model.reset_moe_loads()
    return losses["lm_loss"].item()


def hf_step(model: torch.nn.Module, batch: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch[:, :-1]).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
    loss.backward()
    return loss.item()


def build_models(preset: str, tmp: str) -> dict[str, tuple[torch.nn.Module, Callable]]:
    args = get_preset(preset)
    ours_mtp = DeepSeekV3(args, init_seed=0)
    save_hf(ours_mtp, tmp)
    ours = DeepSeekV3(args.replace(mtp_depth=0), init_seed=None)
    load_hf_state(ours, tmp)  # the checkpoint's MTP layer is ignored by a model without MTP
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return {
        "ours (MTP off)": (ours.train(), ours_step),
        f"ours (MTP depth {args.mtp_depth})": (ours_mtp.train(), ours_step),
        "transformers": (hf.train(), hf_step),
    }


def profile(name: str, model: torch.nn.Module, step, batch: torch.Tensor) -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(model, batch)
    print(f"\n--- profile: {name} (one step, by self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(DEFAULT_SHAPE))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, help="sequences per step (default per preset)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default per preset)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    parser.add_argument("--steps", type=int, default=9, help="timed steps per model")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per model")
    opts = parser.parse_args()
    batch_size, seq_len = DEFAULT_SHAPE[opts.preset]
    batch_size, seq_len = opts.batch or batch_size, opts.seq_len or seq_len

    torch.set_num_threads(opts.threads)
    transformers.logging.set_verbosity_error()  # the MTP layer is "unexpected" for transformers
    logging.getLogger("haillm").setLevel(logging.ERROR)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(opts.preset, tmp)
    vocab = get_preset(opts.preset).vocab_size
    batch = torch.randint(vocab, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(1))

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, transformers {transformers.__version__}, fp32")
    print(f"preset {opts.preset}, batch {batch_size} x {seq_len} tokens, {opts.steps} timed steps per model, "
          "interleaved one step at a time")
    first_loss = {}  # the same weights and batch: the lm losses must agree
    for name, (model, step) in models.items():
        first_loss[name] = [step(model, batch) for _ in range(max(opts.warmup, 1))][0]
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(opts.steps):
        for name, (model, step) in models.items():
            start = time.perf_counter()
            step(model, batch)
            times[name].append(time.perf_counter() - start)

    tokens = batch_size * seq_len
    median = {name: tokens / statistics.median(t) for name, t in times.items()}
    best = {name: tokens / min(t) for name, t in times.items()}
    print(f"\n{'model':<20} {'median tok/s':>12} {'best tok/s':>10} {'ratio to transformers':>22} {'lm loss':>9}")
    for name in times:
        ratios = f"{median[name] / median['transformers']:.2f}x / {best[name] / best['transformers']:.2f}x"
        print(f"{name:<20} {median[name]:12.0f} {best[name]:10.0f} {ratios:>22} {first_loss[name]:9.5f}")
    if opts.profile:
        for name, (model, step) in models.items():
            profile(name, model, step, batch)


if __name__ == "__main__":
    main()
