"""Layout planner: memory per GPU, FLOPs, communication and step time of a configuration, before any run.

    python -m haillm.tools.plan model=v3_671b parallel.pp=16 parallel.ep=64 parallel.dp=128 \\
        parallel.pp_schedule=dualpipe train.global_batch_size=15360 train.seq_len=4096 --gpus 2048 --gpu h800 \\
        [--step-time 19.926 | --mfu 0.4] [--json]

Overrides are the trainer's (``launch/train.py``), composed, resolved and validated by the same code with
the world size ``--gpus``: ``train.dtype=auto`` (the default) resolves for the target as a run does (BF16
parameters on a GPU, fp32 for ``--gpu cpu``), ``train.micro_batch_size`` as ``compose_config`` does (one
sequence with pp > 1). Parameter counts and FLOPs per token are the model's own (``flops.py``); memory comes from
``haillm.tools.memory``; the step time from FLOPs per step at a stated MFU of the peak the trainer's MFU uses
(``metrics.named_peak_flops``), or the MFU from a measured ``--step-time``. Exit code 0 when the layout fits
the GPU's memory, 1 when it does not, 2 for bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import NamedTuple

from omegaconf import DictConfig

from haillm.config import ConfigError, compose_config, resolve_dtype, to_model_args, validate
from haillm.fp8 import blockwise_fp8_available
from haillm.models.deepseek_v3.args import ModelArgs
from haillm.models.deepseek_v3.flops import count_params, flops_per_token, mtp_params
from haillm.parallel.mesh import ParallelConfigError
from haillm.parallel.pipeline.schedules import build, halves, p2p_messages
from haillm.parallel.pipeline.simulate import simulate
from haillm.tools.activations import ActivationSetup
from haillm.tools.memory import Layout, RankMemory, all_ranks
from haillm.tools.schedule import OneLineParser
from haillm.train.metrics import GPU_PEAK_FLOPS, named_peak_flops
from haillm.train.optim import config_dtype

GIB = 2**30


class GpuSpec(NamedTuple):
    """What the planner needs of a GPU besides its peak FLOP/s."""

    memory_gib: int
    capability: tuple[int, int]


# Per GPU: HBM in GiB, nominal (the vendors' "80 GB" parts carry 80 GiB; the driver reports up to ~1% less),
# and the CUDA compute capability, which decides whether FP8 linears run (``fp8.blockwise_fp8_available``, the
# rule ``apply_fp8`` uses). The peak FLOP/s is the trainer's (``metrics.GPU_PEAK_FLOPS``).
GPU_SPECS = {"H100": GpuSpec(80, (9, 0)), "H800": GpuSpec(80, (9, 0)), "H200": GpuSpec(141, (9, 0)),
             "H20": GpuSpec(96, (9, 0)), "A100": GpuSpec(80, (8, 0)), "A800": GpuSpec(80, (8, 0))}
# What a layout may not plan to use: the CUDA context, NCCL's buffers and the caching allocator's fragmentation
# live outside the tensors modelled here (and outside torch's max_memory_allocated, the trainer's figure).
MEMORY_RESERVE = 0.10
GPUS = sorted(name.lower() for name in GPU_PEAK_FLOPS) + ["cpu"]
DEFAULT_MFU = 0.40


def compose(overrides: list[str], gpus: int | None, gpu: str) -> tuple[DictConfig, int]:
    """The trainer's configuration (``compose_config``, defaults resolved as for a run), validated for
    ``gpus`` ranks."""
    cfg = compose_config(overrides)
    resolve_dtype(cfg, "cpu" if gpu == "cpu" else "cuda")  # train.dtype=auto: bf16 on a GPU, as a run does
    p = cfg.parallel
    ranks = p.dp * p.pp * p.tp
    if gpus is not None and gpus != ranks:
        raise ConfigError(f"--gpus={gpus} but parallel.dp*pp*tp = {p.dp}*{p.pp}*{p.tp} = {ranks}; "
                          "make them equal (ep divides dp and adds no GPUs)")
    gpus = ranks
    validate(cfg, gpus)
    return cfg, gpus


def fp8_linears(cfg: DictConfig, gpu: str, capability: tuple[int, int] | None = None) -> bool:
    """Whether the run's linears go FP8: ``fp8.enabled`` on a device with blockwise FP8 GEMMs (SM90, or the
    CPU's reference GEMM), as ``apply_fp8`` decides at run time. Elsewhere only the dispatch payload is FP8.
    ``capability``: the CUDA device's own (a run planning for the GPU it is on), instead of ``gpu``'s."""
    if capability is None and gpu != "cpu":
        capability = GPU_SPECS[gpu.upper()].capability
    return bool(cfg.fp8.enabled) and blockwise_fp8_available(capability)


def layout_of(cfg: DictConfig, gpu: str, capability: tuple[int, int] | None = None) -> Layout:
    """What memory depends on, for a run of ``cfg`` on ``gpu`` (a name of GPU_SPECS, or "cpu")."""
    t, p, o = cfg.train, cfg.parallel, cfg.optim
    param_dtype = config_dtype(t.dtype)  # every parameter, as cast_parameters
    setup = ActivationSetup(act_bytes=param_dtype.itemsize, recompute=t.recompute,
                            fp8=fp8_linears(cfg, gpu, capability),
                            cpu=gpu == "cpu", ep=p.ep)
    return Layout(dp=p.dp, pp=p.pp, ep=p.ep, schedule=p.pp_schedule, ranks_per_node=p.ranks_per_node,
                  micro_batch=t.micro_batch_size, seq_len=t.seq_len,
                  n_microbatches=t.global_batch_size // (t.micro_batch_size * p.dp), param_dtype=param_dtype,
                  moment_dtype=config_dtype(o.moment_dtype), reduce_dtype=config_dtype(o.grad_reduce_dtype),
                  setup=setup, bucket_mb=o.bucket_mb)


def traffic(args: ModelArgs, lay: Layout, ranks: list[RankMemory], fp8_dispatch: bool) -> list[dict[str, float]]:
    """Bytes one rank of each pipeline rank sends per step, by kind. All-to-all: every routed copy of a token
    that lands on another EP rank (uniform routing: (ep-1)/ep of them), dispatched (FP8 with 1x128 scales
    under ``fp8.enabled``) and combined forward, and both again as gradients in backward. P2P: activations
    and gradients between pipeline ranks. ZeRO-1: ring reduce-scatter of the gradient buckets (in
    ``optim.grad_reduce_dtype``) and all-gather of the parameters. Partner: the fp32 all-reduce of
    ``sum_partner_grads`` between two ranks (a ring of two sends the buffer once): every gradient of a
    DualPipe mirror pair, the embedding's between the first and the last rank of 1F1B with MTP."""
    act, dim, k = lay.setup.act_bytes, args.dim, args.n_activated_experts
    copy_out = dim + 4 * -(-dim // 128) if fp8_dispatch else dim * act
    per_copy = (copy_out + 3 * dim * act) * (lay.ep - 1) / lay.ep
    if lay.pp > 1:
        schedule, topo = build(lay.schedule, lay.pp, lay.n_microbatches)
        sends = p2p_messages(schedule, topo)[0]
    out = []
    for rank in ranks:
        if lay.pp > 1:
            forwards = [sum(1 for s in schedule[rank.pp_rank] for a in halves(s) if a.kind == "F" and a.chunk == c)
                        for c in range(len(rank.specs))]
            p2p = len(sends[rank.pp_rank]) * lay.micro_batch * lay.seq_len * dim * act
        else:
            forwards, p2p = [lay.n_microbatches], 0
        a2a = 0.0
        for spec, n in zip(rank.specs, forwards, strict=True):
            tokens = sum(lay.seq_len for i in spec.layers if i >= args.n_dense_layers)
            if spec.last:
                tokens += sum(lay.seq_len - d for d in range(1, args.mtp_depth + 1))
            a2a += n * lay.micro_batch * tokens * k * per_copy
        zero = {"zero_reduce_scatter": 0.0, "zero_all_gather": 0.0}
        for b in rank.plans:
            share = (b.world - 1) / b.world
            zero["zero_reduce_scatter"] += b.reduce_bytes(lay.reduce_dtype) * share
            zero["zero_all_gather"] += b.param_bytes() * share
        out.append({"all_to_all": a2a, "pipeline_p2p": float(p2p), **zero,
                    "partner_all_reduce": float(rank.partner_grads)})
    return out


def make_plan(overrides: list[str], gpus: int | None = None, gpu: str = "h100", step_time: float | None = None,
              mfu: float = DEFAULT_MFU) -> dict:
    """Everything the planner prints, as one JSON-ready dict (see ``python -m haillm.tools.plan --help``)."""
    cfg, gpus = compose(overrides, gpus, gpu)
    args, lay = to_model_args(cfg.model), layout_of(cfg, gpu)
    ranks = all_ranks(args, lay)
    worst = max(ranks, key=lambda r: r.total)
    comm = traffic(args, lay, ranks, cfg.fp8.enabled and lay.ep > 1)
    total, active = count_params(args)
    fpt = flops_per_token(args, lay.seq_len)
    tokens = cfg.train.global_batch_size * lay.seq_len
    peak, peak_source = named_peak_flops(None if gpu == "cpu" else gpu.upper(), cfg.train.peak_flops)
    step_flops = tokens * fpt
    if step_time is None:
        step_time = step_flops / (gpus * peak * mfu)
        mfu_source = "assumed (--mfu)"
    else:
        mfu = step_flops / (step_time * gpus * peak)
        mfu_source = "from the measured step time (--step-time)"
    capacity = GPU_SPECS[gpu.upper()].memory_gib * GIB if gpu != "cpu" else None
    usable = None if capacity is None else capacity * (1 - MEMORY_RESERVE)
    bubble = None
    if lay.pp > 1:
        sim = simulate(*build(lay.schedule, lay.pp, lay.n_microbatches))
        bubble = sim.bubble / sim.makespan
    return {
        "model": cfg.model.name,
        "total_params": total,
        "active_params": active,
        "active_params_with_embedding": active + args.vocab_size * args.dim,
        "mtp_params": mtp_params(args)[0],
        "flops_per_token": fpt,
        "flops_per_token_without_mtp": flops_per_token(args.replace(mtp_depth=0), lay.seq_len),
        "layout": {"gpus": gpus, "gpu": gpu, "dp": lay.dp, "pp": lay.pp, "ep": lay.ep, "tp": cfg.parallel.tp,
                   "pp_schedule": lay.schedule if lay.pp > 1 else None, "micro_batch_size": lay.micro_batch,
                   "microbatches_per_step": lay.n_microbatches, "seq_len": lay.seq_len,
                   "global_batch_size": cfg.train.global_batch_size, "param_dtype": cfg.train.dtype,
                   "moment_dtype": cfg.optim.moment_dtype, "grad_reduce_dtype": cfg.optim.grad_reduce_dtype,
                   "recompute": bool(cfg.train.recompute),
                   "fp8": bool(cfg.fp8.enabled), "fp8_linears": lay.setup.fp8},
        "memory_bytes_per_rank": {**worst.as_dict(), "capacity": capacity, "usable": usable,
                                  "fits": None if usable is None else worst.total <= usable},
        "memory_bytes_per_pp_rank": [r.as_dict() for r in ranks],
        "comm_bytes_per_rank_per_step": {kind: max(c[kind] for c in comm) for kind in comm[0]},
        "comm_bytes_per_pp_rank_per_step": comm,
        "tokens_per_step": tokens,
        "peak_flops_per_gpu": peak,
        "peak_flops_source": peak_source,
        "step_time_s": step_time,
        "mfu": mfu,
        "mfu_source": mfu_source,
        "pipeline_bubble_fraction": bubble,
        "gpu_hours_per_trillion_tokens": gpus * step_time / 3600 * 1e12 / tokens,
    }


def _gib(x: float) -> str:
    for scale, unit in ((GIB, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"


def _si(x: float, unit: str = "") -> str:
    """1.23B / 45.6M / 7.89K style, for parameter counts, FLOPs and GPU-hours of any model size."""
    for scale, prefix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{' ' if unit else ''}{prefix}{unit}"
    return f"{x:.3g}{' ' if unit else ''}{unit}"


def _fp8(lay: dict) -> str:
    if lay["fp8"] and not lay["fp8_linears"]:
        return (f"on for the dispatch only ({lay['gpu'].upper()} has no blockwise FP8 GEMMs: linears in "
                f"{lay['param_dtype']})")
    return "on" if lay["fp8"] else "off"


def render(plan: dict) -> str:
    """The plan as a few lines of text."""
    lay, mem, comm = plan["layout"], plan["memory_bytes_per_rank"], plan["comm_bytes_per_rank_per_step"]
    pipeline = f" x pp {lay['pp']} ({lay['pp_schedule']})" if lay["pp"] > 1 else ""
    lines = [
        f"model {plan['model']}: {_si(plan['total_params'])} parameters, {_si(plan['active_params'])} activated per "
        f"token ({_si(plan['active_params_with_embedding'])} counting the embedding row), MTP modules "
        f"{_si(plan['mtp_params'])} more",
        f"FLOPs per token (forward+backward, seq_len {lay['seq_len']}, causal): {_si(plan['flops_per_token'], 'FLOP')}"
        f" ({_si(plan['flops_per_token_without_mtp'], 'FLOP')} without MTP)",
        f"layout: {lay['gpus']} x {lay['gpu'].upper()} = dp {lay['dp']}{pipeline} x tp {lay['tp']}, ep {lay['ep']}; "
        f"{lay['global_batch_size']} sequences x {lay['seq_len']} tokens per step, micro-batch "
        f"{lay['micro_batch_size']} ({lay['microbatches_per_step']} per data-parallel rank); "
        f"{lay['param_dtype']} parameters, "
        f"{lay['moment_dtype']} Adam moments, recompute {'on' if lay['recompute'] else 'off'}, "
        f"fp8 {_fp8(lay)}",
        f"memory per rank (the largest: pipeline rank {mem['pp_rank']}):",
    ]
    for key in ("parameters", "gradients", "optimizer", "fp8_weight_cache", "activations"):
        lines.append(f"  {key.replace('_', ' '):<17}{_gib(mem[key]):>12}")
    per_mb = ", ".join(_gib(x) for x in mem["activations_per_microbatch"])
    lines[-1] += f"  (peak in flight; per micro-batch of each local stage: {per_mb})"
    for key, what in (("partner_grads", "sum_partner_grads' fp32 copy"),
                      ("reduce_copies", f"{lay['grad_reduce_dtype']} copies of the gradient buckets")):
        if mem[key]:
            lines.append(f"  {key.replace('_', ' '):<17}{_gib(mem[key]):>12}  (transient: {what})")
    lines.append(f"  {'total':<17}{_gib(mem['total']):>12}  (the larger of: with the activations "
                 f"{_gib(mem['static'] + mem['activations'])}, at the end of the step {_gib(mem['end_of_step'])})")
    if mem["capacity"] is not None:
        lines.append(f"  {'usable':<17}{_gib(mem['usable']):>12}  ({_gib(mem['capacity'])} less a "
                     f"{MEMORY_RESERVE:.0%} reserve for the CUDA context, NCCL and the allocator): "
                     + ("fits" if mem["fits"] else "DOES NOT FIT"))
    if lay["pp"] > 1:
        lines.append("  per pipeline rank: " + ", ".join(
            f"{r['pp_rank']}: {_gib(r['total'])}" for r in plan["memory_bytes_per_pp_rank"]))
    busiest = " (each kind's busiest pipeline rank)" if lay["pp"] > 1 else ""
    lines.append(f"communication per rank and step{busiest}: " + (", ".join(
        f"{k.replace('_', ' ')} {_si(v, 'B')}" for k, v in comm.items() if v) or "none"))
    bubble = plan["pipeline_bubble_fraction"]
    lines.append(
        f"time: step {plan['step_time_s']:.3f} s at MFU {100 * plan['mfu']:.1f}% ({plan['mfu_source']}) of "
        f"{plan['peak_flops_per_gpu'] / 1e12:g} TFLOP/s per GPU ({plan['peak_flops_source']}); "
        f"{_si(plan['gpu_hours_per_trillion_tokens'])} GPU-hours per trillion tokens"
        + (f"; simulated pipeline bubble {100 * bubble:.1f}% (F=1, B=2, W=1, F&B=2.5)" if bubble is not None else "")
    )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m haillm.tools.plan", description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="the trainer's config overrides (model=..., parallel.pp=..., ...)")
    p.add_argument("--gpus", type=int, help="world size (default: parallel.dp * pp * tp)")
    p.add_argument("--gpu", default="h100", choices=GPUS, help="peak FLOP/s and memory per device")
    time = p.add_mutually_exclusive_group()
    time.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="assumed MFU for the step time")
    time.add_argument("--step-time", type=float, help="a measured step time (s): gives the MFU instead")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    if args.gpus is not None and args.gpus < 1:
        parser.error(f"--gpus={args.gpus} must be >= 1")
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu={args.mfu} must be in (0, 1]")
    if args.step_time is not None and args.step_time <= 0:
        parser.error(f"--step-time={args.step_time} must be positive")
    try:
        plan = make_plan(args.overrides, args.gpus, args.gpu, args.step_time, args.mfu)
    except (ConfigError, ParallelConfigError) as exc:
        parser.error(str(exc))
    print(json.dumps(plan) if args.json else render(plan))
    return 1 if plan["memory_bytes_per_rank"]["fits"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
