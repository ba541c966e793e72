"""Layout planner: memory per GPU, FLOPs, communication and step time of a configuration, before any run.

    python -m haillm.tools.plan model=v3_671b parallel.pp=16 parallel.ep=64 parallel.dp=128 \\
        parallel.pp_schedule=dualpipe train.global_batch_size=15360 train.seq_len=4096 --gpus 2048 --gpu h800 \\
        [--step-time 19.926 | --mfu 0.4] [--nvlink-gbps 153] [--ib-gbps 43] [--json]
    python -m haillm.tools.plan model=v2_lite_16b train.global_batch_size=512 train.seq_len=4096 \\
        --gpus 64 --gpu h100 --search [--top 10] [--json]

Overrides are the trainer's (``launch/train.py``), composed, resolved and validated by the same code with
the world size ``--gpus``: ``train.dtype=auto`` (the default) resolves for the target as a run does (BF16
parameters on a GPU, fp32 for ``--gpu cpu``), ``train.micro_batch_size`` as ``compose_config`` does (one
sequence with pp > 1). Parameter counts and FLOPs per token are the model's own (``flops.py``); memory comes from
``haillm.tools.memory``. The step time (``plan_time``) is the sum of printed terms: the compute, FLOPs per step at
a stated ``--mfu`` of the peak the trainer's MFU uses (``metrics.named_peak_flops``); the pipeline bubble from the
schedule simulator; and the all-to-all, pipeline P2P, ZeRO-1 reduce-scatter and all-gather and partner all-reduce
time that overlap does not hide, at ``--nvlink-gbps`` within a node and ``--ib-gbps`` across nodes (defaults:
DeepEP's published figures). A measured ``--step-time`` gives the MFU instead (the terms are still modelled).
A layout that does not fit comes with a hint: the memory with recompute, a smaller micro-batch, bf16 Adam moments,
and the ``--search`` command. ``--search`` (``plan_search``) lists the layouts of ``--gpus`` GPUs that validate
and fit, fastest first. Exit code 0 when the layout fits the GPU's memory (with ``--search``: when one does), 1 when
it does not, 2 for bad input (one line on stderr).
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
from haillm.tools import plan_time
from haillm.tools.activations import ActivationSetup
from haillm.tools.memory import Layout, RankMemory, all_ranks
from haillm.tools.plan_time import Bandwidths, schedule_of
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
    ranks = p.dp * p.pp * p.cp * p.tp
    if gpus is not None and gpus != ranks:
        raise ConfigError(f"--gpus={gpus} but parallel.dp*pp*cp*tp = {p.dp}*{p.pp}*{p.cp}*{p.tp} = {ranks}; "
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
    sequence_parallel = p.tp > 1 and bool(p.sequence_parallel)
    setup = ActivationSetup(act_bytes=param_dtype.itemsize, recompute=t.recompute, swiglu=t.recompute_swiglu,
                            fp8=fp8_linears(cfg, gpu, capability), cpu=gpu == "cpu", ep=p.ep, tp=p.tp,
                            sequence_parallel=sequence_parallel, cp=p.cp)
    return Layout(dp=p.dp, pp=p.pp, ep=p.ep, schedule=p.pp_schedule, ranks_per_node=p.ranks_per_node,
                  micro_batch=t.micro_batch_size, seq_len=t.seq_len,
                  n_microbatches=t.global_batch_size // (t.micro_batch_size * p.dp), param_dtype=param_dtype,
                  moment_dtype=config_dtype(o.moment_dtype), reduce_dtype=config_dtype(o.grad_reduce_dtype),
                  setup=setup, bucket_mb=o.bucket_mb, fp8_cache_transposed=cfg.fp8.cache_transposed, tp=p.tp,
                  sequence_parallel=sequence_parallel, cp=p.cp)


def timing(cfg: DictConfig, args: ModelArgs, lay: Layout, ranks: list[RankMemory], gpus: int, gpu: str,
           mfu: float, bw: Bandwidths) -> dict:
    """Traffic (``plan_time.traffic``) and the modelled step time (``plan_time.step_time``) at ``mfu`` for the
    compute."""
    comm = plan_time.traffic(args, lay, ranks, cfg.fp8.enabled and lay.ep > 1)
    fpt = flops_per_token(args, lay.seq_len)
    peak, peak_source = named_peak_flops(None if gpu == "cpu" else gpu.upper(), cfg.train.peak_flops)
    tokens = cfg.train.global_batch_size * lay.seq_len
    extra = plan_time.context_parallel_flops(args, lay, lay.n_microbatches)  # per rank
    compute_s = (tokens * fpt / gpus + extra) / (peak * mfu)
    return {**plan_time.step_time(lay, ranks, comm, compute_s, args.dim, bw), "comm": comm, "peak": peak,
            "peak_source": peak_source, "tokens": tokens, "flops_per_token": fpt}


def tp_breakdown(args: ModelArgs, lay: Layout, ranks: list[RankMemory], comm: list[dict[str, float]]
                 ) -> dict | None:
    """The tensor-parallel bytes of the pipeline rank that sends the most, by layer kind and direction."""
    if lay.tp == 1:
        return None
    busiest = max(range(len(ranks)), key=lambda i: comm[i]["tensor_parallel"])
    kinds = plan_time.rank_tp_traffic(args, lay, ranks[busiest])
    return {"pp_rank": ranks[busiest].pp_rank, "mode": "sequence parallel" if lay.sequence_parallel else "replicated",
            **{kind: {"forward": f, "backward": b} for kind, (f, b) in kinds.items()}}


def usable_bytes(gpu: str) -> tuple[float | None, float | None]:
    """(HBM, what a layout may plan to use) of ``gpu``; (None, None) for the CPU."""
    if gpu == "cpu":
        return None, None
    capacity = GPU_SPECS[gpu.upper()].memory_gib * GIB
    return capacity, capacity * (1 - MEMORY_RESERVE)


def make_plan(overrides: list[str], gpus: int | None = None, gpu: str = "h100", step_time: float | None = None,
              mfu: float = DEFAULT_MFU, bandwidths: Bandwidths | None = None) -> dict:
    """Everything the planner prints, as one JSON-ready dict (see ``python -m haillm.tools.plan --help``)."""
    cfg, gpus = compose(overrides, gpus, gpu)
    return plan_of(cfg, gpus, gpu, step_time, mfu, bandwidths or Bandwidths(), overrides)


def plan_of(cfg: DictConfig, gpus: int, gpu: str, step_time: float | None, mfu: float, bw: Bandwidths,
            overrides: list[str] = ()) -> dict:
    """``make_plan`` of a composed and validated ``cfg``; ``overrides``: what composed it (for the hint)."""
    args, lay = to_model_args(cfg.model), layout_of(cfg, gpu)
    ranks = all_ranks(args, lay, schedule_of(lay.schedule, lay.pp, lay.n_microbatches)[0] if lay.pp > 1 else None)
    worst = max(ranks, key=lambda r: r.total)
    total, active = count_params(args)
    t = timing(cfg, args, lay, ranks, gpus, gpu, mfu, bw)
    fpt, tokens, peak = t["flops_per_token"], t["tokens"], t["peak"]
    step_flops = tokens * fpt
    if step_time is None:
        step_time = t["step_time_s"]
        mfu_source = "assumed (--mfu) for the compute"
    else:
        mfu_source = "from the measured step time (--step-time)"
    capacity, usable = usable_bytes(gpu)
    fits = None if usable is None else worst.total <= usable
    hint = None
    if fits is False:
        from haillm.tools.plan_search import fit_hint  # plan_search builds on this module

        hint = fit_hint(cfg, args, lay, ranks, gpus, gpu, usable, list(overrides))
    return {
        "model": cfg.model.name,
        "total_params": total,
        "active_params": active,
        "active_params_with_embedding": active + args.vocab_size * args.dim,
        "mtp_params": mtp_params(args)[0],
        "flops_per_token": fpt,
        "flops_per_token_without_mtp": flops_per_token(args.replace(mtp_depth=0), lay.seq_len),
        "layout": {"gpus": gpus, "gpu": gpu, "dp": lay.dp, "pp": lay.pp, "ep": lay.ep, "tp": lay.tp, "cp": lay.cp,
                   "sequence_parallel": lay.sequence_parallel,
                   "pp_schedule": lay.schedule if lay.pp > 1 else None, "micro_batch_size": lay.micro_batch,
                   "microbatches_per_step": lay.n_microbatches, "seq_len": lay.seq_len,
                   "global_batch_size": cfg.train.global_batch_size, "param_dtype": cfg.train.dtype,
                   "moment_dtype": cfg.optim.moment_dtype, "grad_reduce_dtype": cfg.optim.grad_reduce_dtype,
                   "recompute": bool(cfg.train.recompute), "ranks_per_node": lay.ranks_per_node,
                   "fp8": bool(cfg.fp8.enabled), "fp8_linears": lay.setup.fp8},
        "memory_bytes_per_rank": {**worst.as_dict(), "capacity": capacity, "usable": usable, "fits": fits},
        "memory_bytes_per_pp_rank": [r.as_dict() for r in ranks],
        "fit_hint": hint,
        "comm_bytes_per_rank_per_step": {kind: max(c[kind] for c in t["comm"]) for kind in t["comm"][0]},
        "comm_bytes_per_pp_rank_per_step": t["comm"],
        "tensor_parallel_bytes_per_rank_per_step": tp_breakdown(args, lay, ranks, t["comm"]),
        "comm_time_s": t["comm_time_s"],
        "links": t["links"],
        "bandwidths_gbps": {"nvlink": bw.nvlink_gbps, "ib": bw.ib_gbps},
        "overlap": t["overlap"],
        "tokens_per_step": tokens,
        "peak_flops_per_gpu": peak,
        "peak_flops_source": t["peak_source"],
        "step_time_s": step_time,
        "step_time_terms_s": t["terms"],
        "modelled_step_time_s": t["step_time_s"],
        "compute_mfu": mfu,
        "mfu": step_flops / (step_time * gpus * peak),
        "mfu_source": mfu_source,
        "pipeline_bubble_fraction": t["bubble_fraction"],
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
    context = f" x cp {lay['cp']}" if lay["cp"] > 1 else ""
    lines = [
        f"model {plan['model']}: {_si(plan['total_params'])} parameters, {_si(plan['active_params'])} activated per "
        f"token ({_si(plan['active_params_with_embedding'])} counting the embedding row), MTP modules "
        f"{_si(plan['mtp_params'])} more",
        f"FLOPs per token (forward+backward, seq_len {lay['seq_len']}, causal): {_si(plan['flops_per_token'], 'FLOP')}"
        f" ({_si(plan['flops_per_token_without_mtp'], 'FLOP')} without MTP)",
        f"layout: {lay['gpus']} x {lay['gpu'].upper()} = dp {lay['dp']}{pipeline}{context} x tp {lay['tp']}, "
        f"ep {lay['ep']}; "
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
    if plan["fit_hint"]:
        from haillm.tools.plan_search import render_hint

        lines += render_hint(plan["fit_hint"])
    busiest = " (each kind's busiest pipeline rank)" if lay["pp"] > 1 else ""
    lines.append(f"communication per rank and step{busiest}: " + (", ".join(
        f"{k.replace('_', ' ')} {_si(v, 'B')}" for k, v in comm.items() if v) or "none"))
    tp = plan["tensor_parallel_bytes_per_rank_per_step"]
    if tp:
        lines.append(f"tensor parallel per rank and step ({tp['mode']}; pipeline rank {tp['pp_rank']}): " + ", ".join(
            f"{kind.replace('_', ' ')} {_si(v['forward'], 'B')} forward + {_si(v['backward'], 'B')} backward"
            for kind, v in tp.items() if isinstance(v, dict) and v["forward"] + v["backward"]))
    lines += _render_time(plan)
    return "\n".join(lines)


def _render_time(plan: dict) -> list[str]:
    """One line per term of the step time, with the whole transfer, the link and how much overlap hides."""
    lay, terms, whole, links = plan["layout"], plan["step_time_terms_s"], plan["comm_time_s"], plan["links"]
    bw, bubble = plan["bandwidths_gbps"], plan["pipeline_bubble_fraction"]
    zero = f"dense {links['zero_dense']}, experts {links['zero_experts']}"
    how = {
        "compute": f"FLOPs at MFU {100 * plan['compute_mfu']:.1f}% of {plan['peak_flops_per_gpu'] / 1e12:g} TFLOP/s "
                   f"per GPU ({plan['peak_flops_source']})",
        "pipeline_bubble": "no pipeline" if bubble is None else
                           f"simulated {lay['pp_schedule']}, F:B:W = 1:2:1 plus exposed all-to-all: "
                           f"{100 * bubble:.1f}% of the pipeline's time",
        "tensor_parallel": "no tensor parallelism" if lay["tp"] == 1 else
                           f"{links['tensor_parallel']}; synchronous collectives at the regions' edges, exposed",
        "context_parallel": "no context parallelism" if lay["cp"] == 1 else
                            f"{links['context_parallel']}; the latents' all-gather before each attention (and the "
                            "gradients' reduce-scatter after it in backward), exposed",
        "all_to_all": f"{links['all_to_all']}; {plan['overlap']}",
        "pipeline_p2p": f"{links['pipeline_p2p']}; what the simulated makespan grows by when each transfer takes "
                        "its time",
        "zero_reduce_scatter": f"{zero}; " + ("after the pipeline (it runs under no_sync)" if lay["pp"] > 1 else
                                              "during the last micro-batch's backward, but the last bucket"),
        "zero_all_gather": f"{zero}; during the next step's first forward, bucket by bucket",
        "partner_all_reduce": f"{links['partner_all_reduce']}; sum_partner_grads, blocking",
    }
    if plan["mfu_source"].startswith("from the measured"):
        head = (f"time: step {plan['step_time_s']:.3f} s measured (--step-time), MFU {100 * plan['mfu']:.1f}% of "
                f"{plan['peak_flops_per_gpu'] / 1e12:g} TFLOP/s per GPU; modelled {plan['modelled_step_time_s']:.3f} s "
                "as the sum of")
    else:
        head = f"time: step {plan['step_time_s']:.3f} s, MFU {100 * plan['mfu']:.1f}% over the whole step; the sum of"
    lines = [head + f" (NVLink {bw['nvlink']:g} GB/s, InfiniBand {bw['ib']:g} GB/s per GPU and direction):"]
    for key, value in terms.items():
        exposed = f"exposed of {whole[key]:.3f} s; " if whole.get(key) else ""
        lines.append(f"  {key.replace('_', ' '):<20}{value:9.3f} s  ({exposed}{how[key]})")
    lines.append(f"{_si(plan['gpu_hours_per_trillion_tokens'])} GPU-hours per trillion tokens")
    return lines


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m haillm.tools.plan", description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="the trainer's config overrides (model=..., parallel.pp=..., ...)")
    p.add_argument("--gpus", type=int, help="world size (default: parallel.dp * pp * cp * tp; required by --search)")
    p.add_argument("--gpu", default="h100", choices=GPUS, help="peak FLOP/s and memory per device")
    time = p.add_mutually_exclusive_group()
    time.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                      help=f"assumed MFU of the compute term (default {DEFAULT_MFU})")
    time.add_argument("--step-time", type=float,
                      help="a measured step time (s): gives the MFU instead (the terms are still modelled at --mfu's "
                           "default)")
    p.add_argument("--nvlink-gbps", type=float, default=plan_time.DEFAULT_NVLINK_GBPS,
                   help="NVLink GB/s per GPU and direction, within a node (default: DeepEP's intranode %(default)g)")
    p.add_argument("--ib-gbps", type=float, default=plan_time.DEFAULT_IB_GBPS,
                   help="InfiniBand GB/s per GPU and direction, across nodes (default: DeepEP's internode %(default)g)")
    p.add_argument("--search", action="store_true",
                   help="list the layouts of --gpus GPUs that validate and fit, fastest first")
    p.add_argument("--top", type=int, help="with --search: list only the fastest N")
    p.add_argument("--longest", action="store_true",
                   help="the longest train.seq_len whose fullest rank fits the GPU in this layout")
    p.add_argument("--json", action="store_true", help="print one JSON object (with --search: a list)")
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
    for flag in ("nvlink_gbps", "ib_gbps"):
        if not getattr(args, flag) > 0:  # rejects NaN too
            parser.error(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be positive")
    if args.top is not None and args.top < 1:
        parser.error(f"--top={args.top} must be >= 1")
    if args.search and args.gpus is None:
        parser.error("--search needs --gpus (the world size to lay out)")
    if args.search and args.step_time is not None:
        parser.error("--search models the step time: leave out --step-time")
    bw = plan_time.Bandwidths(args.nvlink_gbps, args.ib_gbps)
    try:
        if args.longest:
            from haillm.tools.plan_search import longest

            cfg, gpus = compose(args.overrides, args.gpus, args.gpu)
            found = longest(cfg, gpus, args.gpu)
            print(json.dumps(found) if args.json else
                  f"longest sequence that fits: {found['seq_len']} tokens (a multiple of {found['unit']}): "
                  f"{_gib(found['total'])} of {_gib(found['usable'])} usable per rank")
            return 0 if found["seq_len"] else 1
        if args.search:
            from haillm.tools.plan_search import render_search, search

            result = search(args.overrides, args.gpus, args.gpu, args.mfu, bw)
            layouts = result["layouts"][:args.top] if args.top else result["layouts"]
            print(json.dumps(layouts) if args.json else render_search(result, args.top))
            return 0 if layouts else 1
        plan = make_plan(args.overrides, args.gpus, args.gpu, args.step_time, args.mfu, bw)
    except (ConfigError, ParallelConfigError) as exc:
        parser.error(str(exc))
    print(json.dumps(plan) if args.json else render(plan))
    return 1 if plan["memory_bytes_per_rank"]["fits"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
