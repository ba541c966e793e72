"""MoE layer forward + backward with the routed experts stored stacked (``GroupedExperts``: three grouped
GEMMs) against the two implementations it replaced, in one process on the same weights and tokens:

- ``loop``: one ``MLP`` module per expert, called on its rows (``counts.tolist()`` split): what ran at
  ``small`` and on every GPU before;
- ``restacked``: the same per-expert modules, their weights stacked for three ``torch._grouped_mm`` calls
  on every forward (and the stacks' gradients un-stacked): what ran on CPU at ``tiny``.

    python bench/moe_experts.py [--presets tiny small] [--threads 2] [--steps 20]

One step is the training forward of one MoE layer (gate, balance loss, dispatch, experts, combine, shared
experts) on ``batch x seq_len`` tokens (``bench/model_throughput.py``'s shapes) plus its backward. Timed
steps are interleaved one at a time across the variants; reported are median wall and CPU (process) time
per step and the ratio of each baseline to ``stacked`` from the medians (> 1: stacked is faster). The
outputs and gradients of every variant are checked against ``stacked`` first.
"""

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from haillm.models.deepseek_v3 import get_preset
from haillm.models.deepseek_v3.model import init_weights
from haillm.models.deepseek_v3.moe import MLP, LocalDispatcher, MoE

SHAPES = {"tiny": (8, 128), "small": (4, 256)}  # (batch, seq_len) as in bench/model_throughput.py


class PerExpertDispatcher(LocalDispatcher):
    """``LocalDispatcher`` computing with per-expert ``MLP`` modules (copies of the stacked weights)."""

    def __init__(self, experts, restack: bool) -> None:
        self.mlps = nn.ModuleList()
        for view in (experts[str(gid)] for gid in experts.ids):
            mlp = MLP(experts.w1.shape[2], experts.w1.shape[1])
            with torch.no_grad():
                for linear, weight in zip((mlp.w1, mlp.w2, mlp.w3), view.parameters(), strict=True):
                    linear.weight.copy_(weight)
            self.mlps.append(mlp)
        self.restack = restack

    def compute(self, experts, routed_x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self.restack:
            busy = counts > 0
            offs = counts[busy].cumsum(0).to(torch.int32)
            mlps = [m for m, b in zip(self.mlps, busy.tolist(), strict=True) if b]
            w1, w2, w3 = (torch.stack([getattr(m, n).weight for m in mlps]).transpose(1, 2) for n in ("w1", "w2", "w3"))
            h = F.silu(torch._grouped_mm(routed_x, w1, offs=offs)) * torch._grouped_mm(routed_x, w3, offs=offs)
            return torch._grouped_mm(h, w2, offs=offs)
        chunks = routed_x.split(counts.tolist())
        return torch.cat([mlp(c) if c.shape[0] else c for mlp, c in zip(self.mlps, chunks, strict=True)])


def step(moe: MoE, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    moe.zero_grad(set_to_none=True)
    if isinstance(moe.dispatcher, PerExpertDispatcher):
        moe.dispatcher.mlps.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = moe(x)
    loss = (y * g).sum()
    (loss if moe.balance_loss is None else loss + moe.balance_loss).backward()
    moe.tokens_per_expert.zero_()
    return [y, x.grad]


def expert_grads(moe: MoE) -> torch.Tensor:
    d = moe.dispatcher
    if isinstance(d, PerExpertDispatcher):  # an expert without tokens has no gradient here, zero when stacked
        grads = [m.w1.weight.grad if m.w1.weight.grad is not None else torch.zeros_like(m.w1.weight) for m in d.mlps]
        return torch.cat([grad.flatten() for grad in grads])
    return moe.experts.w1.grad.flatten()


def bench(preset: str, steps: int) -> None:
    args = get_preset(preset)
    batch, seq_len = SHAPES[preset]
    variants = {}
    for name in ("stacked", "loop", "restacked"):
        moe = MoE(args)
        init_weights(moe, 0, args.init_std, prefix="layers.1.ffn")
        if name != "stacked":
            moe.dispatcher = PerExpertDispatcher(moe.experts, restack=name == "restacked")
            moe.experts.requires_grad_(False)  # the copies in the MLPs are the trained weights
        variants[name] = moe.train()
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(batch, seq_len, args.dim, generator=gen), torch.randn(batch, seq_len, args.dim, generator=gen)
    ref = step(variants["stacked"], x, g) + [expert_grads(variants["stacked"])]
    for name, moe in variants.items():
        got = step(moe, x, g) + [expert_grads(moe)]
        err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref, strict=True))
        assert err < 1e-5, f"{name} disagrees with stacked: {err:.2g}"
    wall = {n: [] for n in variants}
    cpu = {n: [] for n in variants}
    for _ in range(steps):
        for name, moe in variants.items():
            w, c = time.perf_counter(), time.process_time()
            step(moe, x, g)
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    per_expert = 3 * args.dim * args.moe_inter_dim
    print(f"\n{preset}: {args.n_routed_experts} experts of {per_expert / 1e3:.0f}K parameters, "
          f"top-{args.n_activated_experts}, {batch} x {seq_len} tokens, {steps} timed steps")
    print(f"{'variant':<10} {'wall ms':>8} {'cpu ms':>8}   {'stacked speedup: wall':>21} {'cpu':>6}")
    base_w, base_c = statistics.median(wall["stacked"]), statistics.median(cpu["stacked"])
    for name in variants:
        mw, mc = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"{name:<10} {mw * 1e3:8.2f} {mc * 1e3:8.2f}   {mw / base_w:20.2f}x {mc / base_c:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(SHAPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, fp32")
    for preset in opts.presets:
        bench(preset, opts.steps)


if __name__ == "__main__":
    main()
