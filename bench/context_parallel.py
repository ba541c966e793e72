"""Context parallelism's exchange: MLA's compressed latents against per-head keys and values, in bytes and time.

    python bench/context_parallel.py [--model tiny|small] [--seq-len 8192] [--cp 2 4] [--dtype fp32|bf16]
                                     [--reps 5] [--warmup 1]

One step is forward + backward (a fixed random output gradient) of ONE ``MLA`` layer on a ``[1, seq_len]``
sequence split over ``cp`` forked gloo ranks with 1 thread each, in two variants taken in turn in the same
process group (so machine noise hits both alike):

- ``latent``: the product path (``mla.cp = ContextParallel(...)``): each rank all-gathers ``[latent ; k_rope]``
  (``kv_lora_rank + qk_rope_head_dim`` numbers per token) and up-projects every key chunk itself, in forward
  and again in backward (the chunk's keys and values are recomputed, never kept);
- ``kv``: what ring attention passes (``kv_exchange`` below): each rank up-projects its own tokens only and
  all-gathers the per-head ``k`` and ``v`` (``n_heads * (qk_head_dim + v_head_dim)`` numbers per token; the
  zero columns CPU's fused kernel wants on ``v`` are added after the exchange), then the same block attention.

Plus ``cp=1``: the layer on the whole sequence in one process of 1 thread (the baseline of ``/cp1``). Printed
per row: seconds per step (median of ``--reps`` after ``--warmup``, ranks' mean; ``best``: fastest step),
``comm``: seconds inside the collectives (the all-gather's wait and the waits for other ranks included), ``CPU``:
the rank's process time; ratios against cp=1 and against ``latent`` at the same cp; bytes each rank sends per
step (forward all-gather: input bytes x (cp-1); backward reduce-scatter: input bytes x (cp-1)/cp; wrapped at
``haillm.parallel.context``'s module names, as tests/test_context_parallel.py counts them); ``max|dy|``: the
``kv`` output's distance to ``latent``'s (the same weights and tokens). Then the analytic figures per token per
layer at the preset's and at DeepSeek-V3's dimensions (``v3_671b``): the numbers each exchange sends, and the
extra up-projection FLOPs the latent exchange pays per byte it saves, the break-even compute-to-bandwidth ratio.

One run on the 2-core test machine (load 4.4 before, 65 s; ``python bench/context_parallel.py``; the
analytic table below it):

    variant   cp  step s  best s  comm s  CPU s   /cp1 /latent CPU/lat  fwd MiB  bwd MiB B/latent  max|dy|
    latent     1   1.844   1.600   0.000  1.759  1.00x   1.00x   1.00x     0.00     0.00        -        -
    latent     2   1.919   1.601   0.035  0.958  1.04x   1.00x   1.00x     2.25     2.25    1.00x        -
    kv         2   1.926   1.784   0.095  0.943  1.04x   1.00x   0.98x     7.50     7.50    3.33x  0.0e+00
    latent     4   2.257   1.947   0.122  0.544  1.22x   1.00x   1.00x     3.38     3.38    1.00x        -
    kv         4   2.080   1.517   0.221  0.547  1.13x   0.92x   1.00x    11.25    11.25    3.33x  0.0e+00

    preset   latent    k+v  ratio B/num  cp  saved B lat up  kv up extra MFLOP break-even FLOP/B
    small       144    480   3.3x     4   2     1344  3.50x  1.50x        0.20               146
    small       144    480   3.3x     4   4     2016  3.25x  0.75x        0.25               122
    v3_671b     576  40960  71.1x     2   2    80768  3.50x  1.50x       67.11               831
    v3_671b     576  40960  71.1x     2   4   121152  3.25x  0.75x       83.89               692

Reading. The two exchanges give bitwise the same output; bytes are what the layout implies (8192 x 1/2 x 144 x 4 B
= 2.25 MiB each way at cp=2, 3.33x for the per-head 480). Time is a tie on this CPU: kv/latent 0.92-1.17x in wall
time and 0.98-1.06x in CPU time over four runs (bf16: 0.90-0.97x; tiny: kv 1.03-1.20x), because both costs are
small beside attention's: the latent's extra up-projections are 0.2 MFLOP a token here (a few % of a rank's CPU)
and the per-head bytes add 0.05-0.18 s inside the collectives in fp32 (waits for the other ranks included). At V3's
dimensions the latent exchange sends 71x fewer bytes for 67-84 MFLOP more a token: ~700-830 FLOP per byte saved. An
H100 (~990 dense BF16 TFLOP/s) has ~2,200 FLOP per byte of NVLink (~450 GB/s a direction; about the break-even at
40% utilisation) and ~20,000 per byte of InfiniBand (~50 GB/s): there the latent exchange wins, and the per-head
one only on machines whose compute is dear against their links (below the break-even) or where its transfers hide
behind attention (ring attention's overlap, which this bench does not do).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from dist import run_distributed  # noqa: E402  (the forked gloo launcher shared with the tests)

import haillm.parallel.context as context_mod  # noqa: E402
from haillm.models.deepseek_v3 import get_preset  # noqa: E402
from haillm.models.deepseek_v3.args import ModelArgs  # noqa: E402
from haillm.models.deepseek_v3.mla import MLA, rope_tables  # noqa: E402
from haillm.models.deepseek_v3.model import init_weights  # noqa: E402
from haillm.parallel.context import ContextParallel  # noqa: E402

DEFAULT_SEQ = {"tiny": 2048, "small": 8192}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = ("latent", "kv")
MIB = 2**20


def kv_exchange(mla: MLA, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``MLA.forward`` (``q_lora_rank > 0``, no TP, no FP8) with the per-head exchange of ring attention: the
    local ``k, v`` made from the local latents, all-gathered, and attended to as ready key chunks."""
    cp = mla.cp
    latent, _, k_rope = mla._latents(mla.wkv_a(x), cos, sin)
    k, v = mla._key_heads(latent, None, k_rope)  # [B, H, T / cp, d]
    gather = lambda t: cp.gather_sequence(t.transpose(1, 2)).transpose(1, 2)  # noqa: E731  (sequence at dim 1)
    k, v = gather(k), gather(v[..., : mla.v_dim])  # only the real columns travel
    v = F.pad(v, (0, k.shape[-1] - mla.v_dim))  # CPU's fused kernel: v as wide as k (zeros leave o exact)
    q = mla._joined_queries(mla.wq_a(x), cos, sin).transpose(1, 2)
    chunks = list(zip(k.chunk(2 * cp.size, dim=2), v.chunk(2 * cp.size, dim=2), strict=True))
    o = cp.attention(q, chunks, lambda k, v: (k, v), mla.softmax_scale)
    return mla.wo(o[..., : mla.v_dim].transpose(1, 2).flatten(2))


def _case(opts: argparse.Namespace) -> tuple[MLA, Tensor, Tensor, Tensor, Tensor]:
    """The layer, input, output gradient and rope tables every process builds alike."""
    args = get_preset(opts.model)
    args = args.replace(max_seq_len=max(opts.seq_len, args.max_seq_len))
    mla = MLA(args)
    init_weights(mla, 0, args.init_std, prefix="attn.")
    dtype = DTYPES[opts.dtype]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, opts.seq_len, args.dim, generator=gen).to(dtype)
    grad = torch.randn(1, opts.seq_len, args.dim, generator=gen).to(dtype)
    cos, sin = rope_tables(args)
    return mla.to(dtype), x, grad, cos[: opts.seq_len], sin[: opts.seq_len]


def _worker(opts: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    """Per variant, the timed steps of one rank: seconds and bytes sent (forward, backward)."""
    size, rank = dist.get_world_size(), dist.get_rank()
    cp = ContextParallel(dist.group.WORLD, size, rank) if size > 1 else ContextParallel()
    mla, x, grad, cos, sin = _case(opts)
    mla.cp = cp
    where = cp.positions(opts.seq_len)
    x, grad, cos, sin = cp.local(x), cp.local(grad), cos[where], sin[where]
    meter = dict.fromkeys(("fwd", "bwd", "comm"), 0.0)

    def timed(fn: Callable, key: str | None = None, share: float = 0.0) -> Callable:
        def wrapped(*args: object, **kwargs: object) -> object:
            if key is not None:
                meter[key] += args[1].nbytes * share  # type: ignore[attr-defined]  (the collective's input)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            meter["comm"] += time.perf_counter() - start
            return out
        return wrapped

    context_mod.all_gather_single = timed(context_mod.all_gather_single, "fwd", size - 1)
    context_mod.reduce_scatter_single = timed(context_mod.reduce_scatter_single, "bwd", (size - 1) / size)
    ContextParallel.finish_gather = timed(ContextParallel.finish_gather)  # the all-gather's wait
    run: dict[str, Callable[[Tensor], Tensor]] = {"latent": lambda t: mla(t, cos, sin),
                                                  "kv": lambda t: kv_exchange(mla, t, cos, sin)}
    variants = VARIANTS if cp.enabled else VARIANTS[:1]
    records: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    outputs: dict[str, Tensor] = {}
    for step in range(opts.warmup + opts.reps):
        for variant in variants:
            mla.zero_grad(set_to_none=True)
            inp = x.detach().requires_grad_()
            dist.barrier()
            meter.update(fwd=0.0, bwd=0.0, comm=0.0)
            start, cpu = time.perf_counter(), time.process_time()
            y = run[variant](inp)
            y.backward(grad)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            outputs[variant] = y.detach().float()
            if step >= opts.warmup:
                records[variant].append({"step": seconds, "cpu": cpu, **meter})
    if cp.enabled:  # the two exchanges compute the same layer
        dy = (outputs["kv"] - outputs["latent"]).abs().max()
        dist.all_reduce(dy, op=dist.ReduceOp.MAX)
        for r in records["kv"]:
            r["dy"] = dy.item()
    return records


def _summary(per_rank: list[dict[str, list[dict[str, float]]]], variant: str) -> dict[str, float]:
    """Median over the steps of the ranks' mean, and the fastest step as ``best``."""
    steps = [[ranks[variant][i] for ranks in per_rank] for i in range(len(per_rank[0][variant]))]
    means = [{k: statistics.fmean(r[k] for r in ranks) for k in ranks[0]} for ranks in steps]
    return {**{k: statistics.median(m[k] for m in means) for k in means[0]}, "best": min(m["step"] for m in means)}


def _analytic(presets: dict[str, tuple[ModelArgs, int]], cps: list[int]) -> None:
    """Per token per layer: the numbers each exchange sends, and the latent exchange's extra ``wkv_b`` FLOPs per
    byte it saves (forward + backward; ``presets``: name -> (args, bytes a number on the wire))."""
    print("\nper token per layer (of the sequence, per rank, forward + backward): numbers sent by latent and per-head "
          "k+v, wkv_b passes\nover the tokens (latent: fwd + recompute + 2 bwd over the key chunks a rank's queries "
          "see; kv: fwd + 2 bwd over its own)")
    print(f"{'preset':8s} {'latent':>6s} {'k+v':>6s} {'ratio':>6s} {'B/num':>5s} {'cp':>3s} {'saved B':>8s} "
          f"{'lat up':>6s} {'kv up':>6s} {'extra MFLOP':>11s} {'break-even FLOP/B':>17s}")
    for name, (args, width) in presets.items():
        latent = args.kv_lora_rank + args.qk_rope_head_dim
        heads = args.n_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim + args.v_head_dim)
        up = 2 * args.kv_lora_rank * args.n_heads * (args.qk_nope_head_dim + args.v_head_dim)  # wkv_b, a token
        for cp in cps:
            used = (2 * cp - (cp - 1) / 2) / (2 * cp)  # mean share of the key chunks a rank's queries see
            saved = 2 * (heads - latent) * width * (cp - 1) / cp  # all-gather + reduce-scatter
            lat_up, kv_up = 4 * used, 3 / cp
            extra = (lat_up - kv_up) * up
            print(f"{name:8s} {latent:6d} {heads:6d} {heads / latent:5.1f}x {width:5d} {cp:3d} {saved:8.0f} "
                  f"{lat_up:5.2f}x {kv_up:5.2f}x {extra / 1e6:11.2f} {extra / saved:17.0f}")
    print("the latent exchange saves time where a rank's FLOP/s over its link's bytes/s exceeds the break-even")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(DEFAULT_SEQ), default="small", help="get_preset name")
    parser.add_argument("--seq-len", type=int, help="tokens (divisible by 2 cp); default 8192 (small), 2048 (tiny)")
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4], help="context-parallel sizes (>= 2)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameters and inputs")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    opts = parser.parse_args()
    opts.seq_len = opts.seq_len or DEFAULT_SEQ[opts.model]
    if any(cp < 2 or opts.seq_len % (2 * cp) for cp in opts.cp):
        parser.error("every --cp must be >= 2 and divide --seq-len / 2")
    load = os.getloadavg()[0]
    print(f"{opts.model} preset, one MLA layer, 1 x {opts.seq_len} tokens, {opts.dtype}, forward + backward; "
          f"{opts.reps} steps (+{opts.warmup} warmup) per config, 1 thread per rank; gloo; load average {load:.2f} "
          f"on {os.cpu_count()} CPUs")
    rows: list[tuple[str, int, dict[str, float]]] = []
    for cp in [1, *opts.cp]:
        per_rank = run_distributed(_worker, cp, args=(opts,), timeout=1800, pg_timeout=600, nccl_rules=False)
        rows += [(v, cp, _summary(per_rank, v)) for v in per_rank[0]]
    base = rows[0][2]
    latent = {cp: r for v, cp, r in rows if v == "latent"}
    print(f"\n{'variant':8s} {'cp':>3s} {'step s':>7s} {'best s':>7s} {'comm s':>7s} {'CPU s':>6s} {'/cp1':>6s} "
          f"{'/latent':>7s} {'CPU/lat':>7s} {'fwd MiB':>8s} {'bwd MiB':>8s} {'B/latent':>8s} {'max|dy|':>8s}")
    for variant, cp, r in rows:
        ref = latent[cp]
        nbytes = r["fwd"] + r["bwd"]
        byte_ratio = f"{nbytes / (ref['fwd'] + ref['bwd']):7.2f}x" if nbytes else f"{'-':>8s}"
        print(f"{variant:8s} {cp:3d} {r['step']:7.3f} {r['best']:7.3f} {r['comm']:7.3f} {r['cpu']:6.3f} "
              f"{r['step'] / base['step']:5.2f}x {r['step'] / ref['step']:6.2f}x {r['cpu'] / ref['cpu']:6.2f}x "
              f"{r['fwd'] / MIB:8.2f} {r['bwd'] / MIB:8.2f} {byte_ratio} "
              + (f"{r['dy']:8.1e}" if "dy" in r else f"{'-':>8s}"))
    width = DTYPES[opts.dtype].itemsize
    _analytic({opts.model: (get_preset(opts.model), width), "v3_671b": (get_preset("v3_671b"), 2)}, opts.cp)


if __name__ == "__main__":
    main()
