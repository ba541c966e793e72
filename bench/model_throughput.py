"""Training throughput (forward + backward tokens/s) of our DeepSeek-V3 against transformers' DeepseekV3.

    python bench/model_throughput.py --preset tiny [--threads 2] [--steps 30] [--profile]

Both models get the same weights (ours saved with ``save_hf``, loaded by transformers' ``from_pretrained``
with its default attention and experts implementations) and the same token batch, in one process. One step
is next-token cross-entropy on ``[B, T]`` inputs plus ``backward``; ours runs ``compute_loss`` (balance loss
and load counting included) with MTP on (the preset's depth) and off, transformers has no MTP. Timed steps
are interleaved one at a time across the three models, so load from other processes hits all of them alike.

Reported per model: median tokens/s with its interquartile range, the best step, and the ratio to
transformers from the medians of wall time, of CPU time (``process_time``: less disturbed by other
processes on a shared machine, with one thread it tracks the work done) and from the best steps. MTP does
more work per token than a model without it (an extra block and a second pass through the output head),
so its line also gives model GFLOP/s (``flops_per_token``; transformers counted as our MTP-off model):
the like-for-like speed comparison when the amount of work differs. Needs transformers.
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
from haillm.models.deepseek_v3.flops import flops_per_token
from haillm.models.deepseek_v3.hf import load_hf_state, save_hf
from haillm.models.deepseek_v3.model import DeepSeekV3

DEFAULT_SHAPE = {"tiny": (8, 128), "small": (4, 256)}  # (batch, seq_len)
HF = "transformers"


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
        HF: (hf.train(), hf_step),
    }


def profile(name: str, model: torch.nn.Module, step, batch: torch.Tensor) -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(model, batch)
    print(f"\n--- profile: {name} (one step, by self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def report(times: dict[str, dict[str, list[float]]], tokens: int, flops: dict[str, float]) -> None:
    def tok_s(seconds: float) -> float:
        return tokens / seconds

    wall, cpu = times["wall"], times["cpu"]
    print(f"\n{'model':<20} {'median tok/s':>12} {'IQR tok/s':>15} {'best':>7}   {'vs transformers: wall':>21} "
          f"{'cpu':>6} {'best':>6}   {'GFLOP/s':>7}")
    for name in wall:
        q1, _, q3 = statistics.quantiles(wall[name], n=4)
        ratios = [statistics.median(t[HF]) / statistics.median(t[name]) for t in (wall, cpu)]
        ratios.append(min(wall[HF]) / min(wall[name]))
        gflops = flops[name] / statistics.median(wall[name]) / 1e9
        print(f"{name:<20} {tok_s(statistics.median(wall[name])):12.0f} {tok_s(q3):7.0f}-{tok_s(q1):<7.0f} "
              f"{tok_s(min(wall[name])):7.0f}   {ratios[0]:20.2f}x {ratios[1]:5.2f}x {ratios[2]:5.2f}x   {gflops:7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(DEFAULT_SHAPE))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, help="sequences per step (default per preset)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default per preset)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per model")
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
    args = get_preset(opts.preset)
    batch = torch.randint(args.vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(1))
    tokens = batch_size * seq_len
    flops = {name: tokens * flops_per_token(args.replace(mtp_depth=0), seq_len) for name in models}
    flops[f"ours (MTP depth {args.mtp_depth})"] = tokens * flops_per_token(args, seq_len)

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, transformers {transformers.__version__}, fp32")
    print(f"preset {opts.preset}, batch {batch_size} x {seq_len} tokens, {opts.steps} timed steps per model, "
          "interleaved one step at a time")
    first_loss = {}  # the same weights and batch: the lm losses must agree
    for name, (model, step) in models.items():
        first_loss[name] = [step(model, batch) for _ in range(max(opts.warmup, 1))][0]
    times: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in models}, "cpu": {n: [] for n in models}}
    for _ in range(opts.steps):
        for name, (model, step) in models.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step(model, batch)
            times["wall"][name].append(time.perf_counter() - wall)
            times["cpu"][name].append(time.process_time() - cpu)
    report(times, tokens, flops)
    print("lm loss of the first step: " + ", ".join(f"{name} {loss:.5f}" for name, loss in first_loss.items()))
    if opts.profile:
        for name, (model, step) in models.items():
            profile(name, model, step, batch)


if __name__ == "__main__":
    main()
