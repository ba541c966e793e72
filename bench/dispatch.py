"""All-to-all dispatch + combine of a DeepSeek-V3-like MoE layer slice on forked gloo CPU ranks.

    python bench/dispatch.py [--ep 2 4] [--tokens 256 1024] [--iters 3]

Hidden 7168, 256 routed experts in 8 groups, top-8 from 4 groups (the V3 gate with random weights, so
loads are near uniform), tokens per rank scaled down to fit. Payloads: bf16 both ways, and FP8 dispatch
(e4m3 + 1x128 fp32 scales) with bf16 combine as in DeepSeek-V3. Experts are the identity: only token
movement is timed (forward, no autograd). Per configuration it prints, per rank and iteration:
seconds (median over iterations of the slowest rank), bytes sent off-rank as counted from the split sizes,
the theoretical bytes ``tokens * top_k * hidden * bytes * (ep-1)/ep`` (one copy per chosen expert, the
share that leaves the rank under uniform routing), the bytes a per-rank deduplicating dispatcher
(DeepEP-style, one copy per destination rank) would send for the same routing, effective GB/s, and the
ratio to a plain equal-split ``all_to_all_single`` of the same bytes measured in the same run. A second
table shows how much of the bf16 dispatch transfer hides behind compute issued between ``start_dispatch``
and ``finish_dispatch``.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from dist import run_distributed  # noqa: E402  (the forked gloo launcher shared with the tests)

from haillm.models.deepseek_v3 import get_preset  # noqa: E402
from haillm.models.deepseek_v3.moe import Gate  # noqa: E402
from haillm.parallel.expert import AllToAllDispatcher, ExpertPlacement  # noqa: E402


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    return slowest(time.perf_counter() - start)


def overlap(dispatcher: AllToAllDispatcher, x: torch.Tensor, indices: torch.Tensor, iters: int) -> dict:
    """Wait in ``finish_dispatch`` with nothing between start and finish, then with about as much fp32
    matmul work as that wait took: how much of the transfer the background exchange hides."""
    a = torch.randn(256, 256)

    def wait_after(work) -> tuple[float, float]:
        dist.barrier()
        handle = dispatcher.start_dispatch(x, indices)
        start = time.perf_counter()
        work()
        mid = time.perf_counter()
        handle.transfer.work.wait()
        end = time.perf_counter()
        dispatcher.finish_dispatch(handle)
        return slowest(mid - start), slowest(end - mid)

    alone = statistics.median(wait_after(lambda: None)[1] for _ in range(iters))
    a @ a  # warm-up, then calibrate the number of matmuls
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    n_matmuls = max(1, round(10 * slowest(alone) / slowest(time.perf_counter() - start)))
    runs = [wait_after(lambda: [a @ a for _ in range(n_matmuls)]) for _ in range(iters)]
    return {"wait_alone": alone, "compute": statistics.median(r[0] for r in runs),
            "wait_after_compute": statistics.median(r[1] for r in runs)}


def bench_rank(n_tokens: int, iters: int) -> dict:
    args = get_preset("v3_671b")
    ep, rank = dist.get_world_size(), dist.get_rank()
    placement = ExpertPlacement(args.n_routed_experts, ep, rank, n_expert_groups=args.n_expert_groups)
    gen = torch.Generator().manual_seed(rank)
    gate = Gate(args)
    gate.weight.data = torch.randn(args.n_routed_experts, args.dim, generator=torch.Generator().manual_seed(0))
    gate.weight.data *= args.dim**-0.5  # unit-variance logits: scores spread, loads near uniform
    x = torch.randn(n_tokens, args.dim, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        weights, indices, _ = gate(x)
    remote = torch.zeros(n_tokens, ep, dtype=torch.bool).scatter_(1, placement.rank_of(indices), True)
    remote[:, rank] = False
    row = args.dim * x.element_size()
    out = {"remote_ranks_per_token": remote.sum().item() / n_tokens}
    for name, fp8 in (("bf16", False), ("fp8", True)):
        dispatcher = AllToAllDispatcher(dist.group.WORLD, placement, fp8=fp8)

        def step(d=dispatcher) -> None:
            routed, counts, _, handle = d.dispatch(x, indices)
            d.combine(routed.to(x.dtype), weights, handle)

        with torch.no_grad():
            step()  # warm-up
            dispatcher.reset_stats()
            seconds = [timed(step) for _ in range(iters)]
        stats = dispatcher.stats(dist.group.WORLD)
        out[name] = {
            "seconds": statistics.median(seconds),
            "dispatch_bytes": stats["dispatch_bytes"] / (iters * ep),
            "combine_bytes": stats["combine_bytes"] / (iters * ep),
            "ranks_per_token": stats["ranks_per_token"],
        }
        if not fp8:
            with torch.no_grad():
                out["overlap"] = overlap(dispatcher, x, indices, iters)
    # Baseline: an equal-split exchange of the bf16 dispatch's off-rank bytes (plus the rank's own share).
    per_peer = max(int(out["bf16"]["dispatch_bytes"]) // max(ep - 1, 1) // row, 1)
    send = torch.zeros(per_peer * ep, args.dim, dtype=torch.bfloat16)
    recv = torch.empty_like(send)
    raw = [timed(lambda: dist.all_to_all_single(recv, send)) for _ in range(iters)]
    out["raw_seconds"] = 2 * statistics.median(raw)  # both directions
    out["raw_bytes"] = 2 * per_peer * (ep - 1) * row
    out["row_bytes"] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024], help="tokens per rank")
    parser.add_argument("--iters", type=int, default=3)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    args = get_preset("v3_671b")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, gloo "
          f"loopback; hidden {args.dim}, top-{args.n_activated_experts} of {args.n_routed_experts} experts "
          f"({args.n_limited_groups} of {args.n_expert_groups} groups); per rank, dispatch+combine")
    head = (f"{'ep':>3} {'tokens':>6} {'payload':>9} {'seconds':>8} {'meas MB':>8} {'theory MB':>9} "
            f"{'dedup MB':>8} {'GB/s':>6} {'vs raw a2a':>10} {'ranks/tok':>9}")
    print(head)
    overlaps = []
    for ep in opts.ep:
        for n_tokens in opts.tokens:
            r = run_distributed(bench_rank, ep, args=(n_tokens, opts.iters), timeout=1800, pg_timeout=600)[0]
            copies_out = n_tokens * args.n_activated_experts * (ep - 1) / ep
            raw_gbs = r["raw_bytes"] / r["raw_seconds"] / 1e9
            for name, disp_row in (("bf16", r["row_bytes"]), ("fp8+bf16", args.dim + 4 * args.dim // 128)):
                m = r["bf16" if name == "bf16" else "fp8"]
                measured = m["dispatch_bytes"] + m["combine_bytes"]
                theory = copies_out * (disp_row + r["row_bytes"])
                dedup = n_tokens * r["remote_ranks_per_token"] * (disp_row + r["row_bytes"])
                gbs = measured / m["seconds"] / 1e9
                print(f"{ep:>3} {n_tokens:>6} {name:>9} {m['seconds']:>8.3f} {measured / 1e6:>8.1f} "
                      f"{theory / 1e6:>9.1f} {dedup / 1e6:>8.1f} {gbs:>6.3f} {gbs / raw_gbs:>10.2f} "
                      f"{m['ranks_per_token']:>9.2f}")
            print(f"{'':>3} {'':>6} {'raw a2a':>9} {r['raw_seconds']:>8.3f} {r['raw_bytes'] / 1e6:>8.1f} "
                  f"{'':>9} {'':>8} {raw_gbs:>6.3f} {1.0:>10.2f}")
            overlaps.append((ep, n_tokens, r["overlap"]))
    print("\nbf16 dispatch, split phases: wait in finish_dispatch alone vs after fp32 matmuls started behind it")
    print(f"{'ep':>3} {'tokens':>6} {'wait alone s':>12} {'compute s':>9} {'wait after s':>12} {'hidden':>6}")
    for ep, n_tokens, o in overlaps:
        hidden = 1 - o["wait_after_compute"] / o["wait_alone"]
        print(f"{ep:>3} {n_tokens:>6} {o['wait_alone']:>12.3f} {o['compute']:>9.3f} "
              f"{o['wait_after_compute']:>12.3f} {hidden:>6.0%}")


if __name__ == "__main__":
    main()
