"""ZeRO-1 (haillm ZeroAdamW) against DistributedDataParallel + torch AdamW on forked gloo CPU ranks, plus
DeepSpeed ZeRO stage 1 when `deepspeed` imports. Same model, global batch, micro-batches and clipping.

    python bench/zero1.py --world 2 4
    PYTHONPATH=<deepspeed install> TORCH_EXTENSIONS_DIR=<cache> python bench/zero1.py   # + DeepSpeed

Prints per variant and world size: median step time (max over ranks), peak RSS growth per rank (max
over ranks, from VmHWM after resetting it), optimizer-state bytes per rank, and ratios against DDP.
CPU timings share two cores with everything else running: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from dist import run_distributed  # noqa: E402  (the forked gloo launcher shared with the tests)

from haillm.parallel.zero import ZeroAdamW, default_no_decay  # noqa: E402


def _status_kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def build_model(hidden: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden)) for _ in range(layers)]
    return nn.Sequential(*blocks, nn.Linear(hidden, hidden))


def _torch_groups(model: nn.Module, wd: float) -> list[dict]:
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if not default_no_decay(n, p)], "weight_decay": wd},
        {"params": [p for n, p in named if default_no_decay(n, p)], "weight_decay": 0.0},
    ]


def _setup(variant: str, model: nn.Module, a: argparse.Namespace, local: int) -> tuple[nn.Module, object]:
    """(module to call, optimizer) for one variant, all with AdamW(lr 1e-4, betas .9/.95, wd .1 on matrices)."""
    hp = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    if variant == "ddp":
        net = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True, bucket_cap_mb=a.bucket_mb)
        return net, torch.optim.AdamW(_torch_groups(model, 0.1), **hp, foreach=True)
    if variant == "zero1":
        group = dist.group.WORLD
        opt = ZeroAdamW(model.named_parameters(), **hp, weight_decay=0.1, process_group=group, bucket_mb=a.bucket_mb)
        opt.register_forward_wait(model)
        return model, opt
    import deepspeed

    os.environ["LOCAL_RANK"] = str(dist.get_rank())  # DeepSpeed insists on its launcher's variables
    config = {
        "train_micro_batch_size_per_gpu": local // a.micro,
        "gradient_accumulation_steps": a.micro,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 1, "reduce_bucket_size": int(a.bucket_mb * 2**18)},
        "zero_allow_untested_optimizer": True,
    }
    engine, opt, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(_torch_groups(model, 0.1), **hp), config=config
    )
    return engine, opt


def _train_step(variant: str, net: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, micro: int) -> None:
    """Accumulate `micro` micro-batches (communication on the last only), clip to 1.0, step."""
    for m, (xm, ym) in enumerate(zip(x.chunk(micro), y.chunk(micro), strict=True)):
        loss = F.mse_loss(net(xm), ym)
        if variant == "deepspeed":
            net.backward(loss)  # DeepSpeed scales by 1/gradient_accumulation_steps itself
            net.step()  # reduces, clips and steps at the accumulation boundary only
            continue
        last = m == micro - 1
        with contextlib.nullcontext() if last else (net.no_sync() if variant == "ddp" else opt.no_sync()):
            (loss / micro).backward()
    if variant == "deepspeed":
        return
    if variant == "ddp":
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    else:
        opt.clip_grad_norm_(1.0)
    opt.step()
    opt.zero_grad(set_to_none=False)  # DDP's grads stay views of its buckets (counted in held MB)


def _held_and_state(variant: str, model: nn.Module, opt) -> tuple[float, float]:
    """MB of params + grads + optimizer state (shared storage counted once; n/a for DeepSpeed, whose
    buffers are internal), and MB of optimizer state (moments, plus the master shard where kept)."""
    if variant == "zero1":
        opt.wait_params()
        held = [*model.parameters()] + [t for b in opt._buckets for t in (b.grad_buf, *b.state.values())]
        return _unique_mb(held), opt.state_bytes() / 2**20
    moments = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    if variant == "deepspeed":
        masters = list(opt.single_partition_of_fp32_groups)
        return float("nan"), sum(t.numel() * t.element_size() for t in moments + masters) / 2**20
    held = [*model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None] + moments
    return _unique_mb(held), sum(t.numel() * t.element_size() for t in moments) / 2**20


def _unique_mb(tensors: list[torch.Tensor]) -> float:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values()) / 2**20


def _worker(variant: str, a: argparse.Namespace) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    local = a.batch // world
    g = torch.Generator().manual_seed(rank)
    data = [(torch.randn(local, a.hidden, generator=g), torch.randn(local, a.hidden, generator=g)) for _ in range(2)]
    # one step on a tiny model first pays the one-time costs (imports, extension loads, first collectives:
    # ≈85 MB RSS for DDP) before the memory baseline, so peak growth measures what scales with the model
    tiny, tiny_x = build_model(8, 1), torch.randn(local, 8)
    net, opt = _setup(variant, tiny, a, local)
    _train_step(variant, net, opt, tiny_x, tiny_x, a.micro)
    Path("/proc/self/clear_refs").write_text("5")  # reset this process's peak RSS
    base_kb = _status_kb("VmRSS")
    model = build_model(a.hidden, a.layers)
    net, opt = _setup(variant, model, a, local)
    times = []
    for step in range(a.warmup + a.steps):
        dist.barrier()
        start = time.perf_counter()
        _train_step(variant, net, opt, *data[step % 2], a.micro)
        times.append(time.perf_counter() - start)
    held_mb, state_mb = _held_and_state(variant, model, opt)
    peak_mb = (_status_kb("VmHWM") - base_kb) / 1024
    return {
        "step_s": statistics.median(times[a.warmup :]),
        "peak_mb": peak_mb,
        "held_mb": held_mb,
        "state_mb": state_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="global samples per step")
    parser.add_argument("--micro", type=int, default=2, help="micro-batches per step (gradient accumulation)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    a = parser.parse_args()
    variants = ["ddp", "zero1"]
    try:
        import deepspeed  # noqa: F401

        variants.append("deepspeed")
    except ImportError as exc:
        print(
            f"DeepSpeed ZeRO-1 skipped: `import deepspeed` failed ({exc}); "
            "install with DS_BUILD_OPS=0 pip install deepspeed"
        )
    n_params = sum(p.numel() for p in build_model(a.hidden, a.layers).parameters())
    print(
        f"model: {a.layers} x Linear({a.hidden})+GELU+LayerNorm, {n_params / 1e6:.1f}M fp32 params; global batch "
        f"{a.batch} in {a.micro} micro-batches; {a.bucket_mb:g} MB buckets; median of {a.steps} steps; gloo, "
        f"1 thread per rank, {os.cpu_count()} CPU cores"
    )
    columns = {"step_s": "step s", "peak_mb": "peak MB", "held_mb": "held MB", "state_mb": "state MB"}
    print(
        f"{'world':>5} {'variant':>9} "
        + " ".join(f"{c:>9}" for c in columns.values())
        + "   vs ddp: "
        + ", ".join(columns.values())
    )
    for world in a.world:
        rows = {}
        for variant in variants:
            res = run_distributed(_worker, world_size=world, args=(variant, a), timeout=1800, pg_timeout=600)
            rows[variant] = r = {k: max(x[k] for x in res) for k in res[0]}  # the worst rank
            values = " ".join(f"{r[k]:>9.3f}" if k == "step_s" else f"{r[k]:>9.1f}" for k in columns)
            ratios = ", ".join(f"{r[k] / rows['ddp'][k]:.2f}x" for k in columns).replace("nanx", "n/a")
            print(f"{world:>5} {variant:>9} {values}   {ratios}", flush=True)
    print(
        "peak MB: growth of peak RSS per rank over the run; held MB: params + grads + optimizer state tensors "
        "(shared storage counted once); state MB: optimizer state (ZeRO: fp32 master + moments, the master "
        "aliasing fp32 params; DeepSpeed: its fp32 partition + moments). gloo allocates a temporary the size "
        "of the whole buffer for every reduce_scatter / all_gather (not for all_reduce), which raises the CPU "
        "peak of both ZeRO-1s; NCCL runs them in place."
    )


if __name__ == "__main__":
    main()
