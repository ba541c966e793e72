"""The layout planner's search and its hints: which layouts of N GPUs fit, fastest first (``python -m
haillm.tools.plan --search --gpus N ...``), and what to change when a layout does not fit.

Search: every (parallel.pp, parallel.dp = N / (pp tp), parallel.ep dividing dp, parallel.pp_schedule among 1f1b,
dualpipe and dualpipev when pp > 1) that the trainer's ``validate`` accepts for N ranks, at the configured
``parallel.tp`` (1 unless given: searching tp too would multiply the layouts, and a tp rank's micro-batches per step,
hence the schedules simulated, by tp); without a pipeline
each ``train.micro_batch_size`` up to 8 that divides dp's share of the batch, with one 1 (the trainer's default: a
larger one only adds bubble, exposed warm-up all-to-all and activations); recompute off, or on where off does
not fit. Keys given on the command line (``parallel.ep=8``, ``train.recompute=true``, ...) stay
fixed. A layout is listed once, with its fastest fitting variant (recompute off when that fits: the time model
does not charge recomputation), sorted by modelled step time; memory per rank is its fullest pipeline rank's.

The memory of a variant reuses the layout's model build and ZeRO buckets (``memory.all_ranks``) and recomputes
only what the variant changes (activations, Adam moments), with the same functions ``memory.rank_memory`` uses.
"""

from __future__ import annotations

import contextlib
import functools
import shlex
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from omegaconf import DictConfig

from haillm.config import (
    DEFAULT_MICRO_BATCH,
    PP_SCHEDULES,
    ConfigError,
    compose_config,
    resolve_dtype,
    to_model_args,
    validate,
)
from haillm.models.deepseek_v3.args import ModelArgs
from haillm.parallel.mesh import ParallelConfigError
from haillm.parallel.pipeline.schedules import peak_activations
from haillm.tools.activations import chunk_bytes
from haillm.tools.memory import Layout, RankMemory, all_ranks
from haillm.tools.plan import GIB, _gib, layout_of, timing, usable_bytes
from haillm.tools.plan_time import Bandwidths, schedule_of
from haillm.train.optim import config_dtype

SEARCHED = ("parallel.dp", "parallel.pp", "parallel.ep", "parallel.pp_schedule", "train.micro_batch_size",
            "train.recompute")


def variant(args: ModelArgs, lay: Layout, ranks: list[RankMemory], micro: int | None = None,
            recompute: bool | None = None, moment_dtype: str | None = None, seq_len: int | None = None
            ) -> tuple[Layout, list[RankMemory]]:
    """``lay`` and its ranks' memory with another micro-batch size, recompute, Adam moment dtype or sequence
    length."""
    micro = lay.micro_batch if micro is None else micro
    n = lay.n_microbatches * lay.micro_batch // micro
    setup = lay.setup if recompute is None else replace(lay.setup, recompute=recompute)
    moments = lay.moment_dtype if moment_dtype is None else config_dtype(moment_dtype)
    seq_len = lay.seq_len if seq_len is None else seq_len
    new = replace(lay, micro_batch=micro, n_microbatches=n, setup=setup, moment_dtype=moments, seq_len=seq_len)
    out = []
    for r in ranks:
        per_mb = [chunk_bytes(args, s, micro, seq_len, setup, shared_embedding=lay.pp == 1) for s in r.specs]
        if lay.pp > 1:
            activations = peak_activations(schedule_of(lay.schedule, lay.pp, n)[0][r.pp_rank], per_mb)
        else:
            activations = per_mb[0]
        out.append(replace(r, activations=activations, activations_per_microbatch=per_mb,
                           optimizer=sum(b.state_bytes(moments) for b in r.plans)))
    return new, out


@contextlib.contextmanager
def setting(cfg: DictConfig, **values: Any) -> Iterator[DictConfig]:
    """``cfg`` with dotted keys (``train__recompute``) set for the block, restored after."""
    saved = []
    for key, value in values.items():
        group, name = key.split("__")
        saved.append((group, name, cfg[group][name]))
        cfg[group][name] = value
    try:
        yield cfg
    finally:
        for group, name, value in reversed(saved):
            cfg[group][name] = value


def valid_micro_batches(cfg: DictConfig, gpus: int, sizes: list[int]) -> tuple[list[int], str | None]:
    """Those of ``sizes`` the trainer's ``validate`` accepts for ``cfg`` (and the first refusal's reason)."""
    ok, why = [], None
    for m in sizes:
        with setting(cfg, train__micro_batch_size=m):
            try:
                validate(cfg, gpus)
                ok.append(m)
            except ConfigError as exc:
                why = why or str(exc)
    return ok, why


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _micro_sizes(cfg: DictConfig, dp: int, pp: int) -> list[int]:
    """Candidate micro-batch sizes, largest first. Without a pipeline: up to 8, dividing each data-parallel rank's
    share. With one: 1, the trainer's default, the most micro-batches: a larger one only grows the bubble, the
    exposed all-to-all of the warm-up and the activations in flight."""
    share, rest = divmod(cfg.train.global_batch_size, dp)
    if rest or share < 1:
        return [DEFAULT_MICRO_BATCH]  # validation says why
    if pp > 1:
        return [1]
    return [m for m in reversed(_divisors(share)) if m <= DEFAULT_MICRO_BATCH]


def _total(ranks: list[RankMemory]) -> float:
    return max(r.total for r in ranks)


def search_command(overrides: list[str], gpus: int, gpu: str) -> str:
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in SEARCHED]
    return shlex.join(["python", "-m", "haillm.tools.plan", *keep, "--gpus", str(gpus), "--gpu", gpu, "--search"])


def fit_hint(cfg: DictConfig, args: ModelArgs, lay: Layout, ranks: list[RankMemory], gpus: int, gpu: str,
             usable: float, overrides: list[str]) -> dict:
    """What brings a layout that does not fit under ``usable`` bytes: each of recompute, a smaller micro-batch
    and bf16 Adam moments alone, then together, with the memory each gives; and the search for other layouts."""
    worst = max(ranks, key=lambda r: r.total)
    terms = {k: getattr(worst, k) for k in ("parameters", "gradients", "optimizer", "fp8_weight_cache", "activations")}
    changes: list[dict[str, Any]] = []
    if not lay.setup.recompute:
        changes.append({"train.recompute": True})
    if cfg.optim.moment_dtype == "fp32":
        changes.append({"optim.moment_dtype": "bf16"})
    share = cfg.train.global_batch_size // lay.dp
    smaller = [m for m in reversed(_divisors(share)) if m < lay.micro_batch and _runs(cfg, m)]

    def evaluate(change: dict[str, Any]) -> dict:
        knobs = {"recompute": change.get("train.recompute"), "moment_dtype": change.get("optim.moment_dtype")}
        for m in smaller if "train.micro_batch_size" in change else [None]:  # the largest that fits, else the least
            total = _total(variant(args, lay, ranks, micro=m, **knobs)[1])
            if m is not None:
                change["train.micro_batch_size"] = m
            if total <= usable:
                break
        return {"overrides": [f"{k}={str(v).lower()}" for k, v in change.items()], "total": total,
                "fits": total <= usable}

    if smaller:
        changes.insert(1, {"train.micro_batch_size": smaller[0]})
    options = [evaluate(dict(c)) for c in changes]
    if len(changes) > 1:
        options.append(evaluate({k: v for c in changes for k, v in c.items()}))
    nearest = next((o["overrides"] for o in options if o["fits"]), None)
    return {"largest_term": max(terms, key=terms.get), "options": options, "nearest": nearest,
            "search": search_command(overrides, gpus, gpu)}


def render_hint(hint: dict) -> list[str]:
    lines = [f"hint: {hint['largest_term'].replace('_', ' ')} take the most; the fullest rank would hold"]
    for o in hint["options"]:
        lines.append(f"  {_gib(o['total'])} with {' '.join(o['overrides'])}: "
                     + ("fits" if o["fits"] else "does not fit"))
    if hint["nearest"]:
        lines.append(f"  nearest fitting change: {' '.join(hint['nearest'])}")
    else:
        lines.append("  none of these fits: raise parallel.ep (fewer experts per rank) or parallel.pp (fewer layers "
                     "per rank), shorten train.seq_len, or use more GPUs")
    lines.append(f"  layouts that fit this many GPUs: {hint['search']}")
    return lines


def search(overrides: list[str], gpus: int, gpu: str, mfu: float, bw: Bandwidths) -> dict:
    """Every layout of ``gpus`` ranks that validates and fits, fastest first (see the module docstring)."""
    cfg = compose_config(overrides)
    resolve_dtype(cfg, "cpu" if gpu == "cpu" else "cuda")
    given = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    p = cfg.parallel
    fixed = given.get("train.micro_batch_size", "0") not in ("0", "null")  # 0: the trainer's default, searched
    fixed_micro = cfg.train.micro_batch_size if fixed else None
    recomputes = [bool(cfg.train.recompute)] if "train.recompute" in given else [False, True]
    _, usable = usable_bytes(gpu)
    layouts, refused, too_big, considered = [], [], 0, 0
    for pp in [p.pp] if "parallel.pp" in given else _divisors(gpus):
        if gpus % (pp * p.tp):
            continue
        dp = gpus // (pp * p.tp)
        if "parallel.dp" in given and p.dp != dp:
            continue
        schedules = [p.pp_schedule] if "parallel.pp_schedule" in given or pp == 1 else list(PP_SCHEDULES)
        for ep in [p.ep] if "parallel.ep" in given else _divisors(dp):
            for schedule in schedules:
                considered += 1
                with setting(cfg, parallel__dp=dp, parallel__pp=pp, parallel__ep=ep, parallel__pp_schedule=schedule):
                    found = _best_variant(cfg, gpus, gpu, mfu, bw, fixed_micro, recomputes, usable)
                if isinstance(found, str):
                    refused.append(found)
                elif found is None:
                    too_big += 1
                else:
                    layouts.append(found)
    layouts.sort(key=lambda e: (e["step_time_s"], e["memory_bytes_per_rank"]))
    return {"model": cfg.model.name, "gpus": gpus, "gpu": gpu, "global_batch_size": cfg.train.global_batch_size,
            "seq_len": cfg.train.seq_len, "tp": p.tp, "compute_mfu": mfu,
            "bandwidths_gbps": {"nvlink": bw.nvlink_gbps, "ib": bw.ib_gbps}, "considered": considered,
            "invalid": len(refused), "invalid_example": refused[0] if refused else None, "do_not_fit": too_big,
            "usable_bytes": usable, "base_overrides": list(overrides), "layouts": layouts}


def _runs(cfg: DictConfig, micro: int) -> bool:
    """The micro-batch checks of ``validate``, cheaply: a whole number of micro-batches per data-parallel rank that
    the schedule accepts (the schedules are cached); ``validate`` still passes on what is listed."""
    p, t = cfg.parallel, cfg.train
    n, rest = divmod(t.global_batch_size, micro * p.dp)
    if rest or n < 1:
        return False
    if p.pp > 1:
        try:
            schedule_of(p.pp_schedule, p.pp, n)
        except ValueError:
            return False
    return True


def _best_variant(cfg: DictConfig, gpus: int, gpu: str, mfu: float, bw: Bandwidths, fixed_micro: int | None,
                  recomputes: list[bool], usable: float | None) -> dict | str | None:
    """The fastest fitting variant of ``cfg``'s layout; a string: why it is invalid; None: nothing fits."""
    sizes = [fixed_micro] if fixed_micro else _micro_sizes(cfg, cfg.parallel.dp, cfg.parallel.pp)
    micros = [m for m in sizes if _runs(cfg, m)]
    with setting(cfg, train__micro_batch_size=(micros or sizes)[0], train__recompute=recomputes[0]):
        valid, why = valid_micro_batches(cfg, gpus, (micros or sizes)[:1])  # the layout itself
        if not valid:
            return why or "no valid micro-batch size"
        lay = layout_of(cfg, gpu)
    checked = {(valid[0], recomputes[0])}
    args = to_model_args(cfg.model)
    try:
        ranks = all_ranks(args, lay, schedule_of(lay.schedule, lay.pp, lay.n_microbatches)[0] if lay.pp > 1 else None)
    except (ParallelConfigError, ValueError) as exc:
        return str(exc)
    found = []
    for m in micros:
        for recompute in recomputes:
            lay_v, ranks_v = variant(args, lay, ranks, micro=m, recompute=recompute)
            total = _total(ranks_v)
            if usable is not None and total > usable:
                continue
            with setting(cfg, train__micro_batch_size=m, train__recompute=recompute):
                t = timing(cfg, args, lay_v, ranks_v, gpus, gpu, mfu, bw)
            p = cfg.parallel
            found.append({
                "overrides": [f"parallel.dp={p.dp}", f"parallel.pp={p.pp}", f"parallel.ep={p.ep}",
                              f"parallel.pp_schedule={p.pp_schedule}", f"train.micro_batch_size={m}",
                              f"train.recompute={str(recompute).lower()}"],
                "dp": p.dp, "pp": p.pp, "tp": p.tp, "ep": p.ep, "pp_schedule": p.pp_schedule if p.pp > 1 else None,
                "micro_batch_size": m, "recompute": recompute, "step_time_s": t["step_time_s"],
                "step_time_terms_s": t["terms"],
                "mfu": t["tokens"] * t["flops_per_token"] / (t["step_time_s"] * gpus * t["peak"]),
                "memory_bytes_per_rank": total, "usable_bytes": usable,
                "pp_rank": max(ranks_v, key=lambda r: r.total).pp_rank})
            break  # recompute on costs the modelled time nothing more: off when off fits
    for entry in sorted(found, key=lambda e: (e["step_time_s"], -e["micro_batch_size"])):
        key = (entry["micro_batch_size"], entry["recompute"])
        with setting(cfg, train__recompute=entry["recompute"]):  # what is listed, validate accepts
            if key in checked or valid_micro_batches(cfg, gpus, [entry["micro_batch_size"]])[0]:
                return entry
    return None


def render_search(result: dict, top: int | None = None) -> str:
    rows = result["layouts"][:top] if top else result["layouts"]
    bw, tp = result["bandwidths_gbps"], result["tp"] > 1  # a column for the tensor-parallel term where tp > 1
    lines = [
        f"layouts of {result['gpus']} x {result['gpu'].upper()} for {result['model']}"
        + (f" at tp {result['tp']}" if tp else "") + f", {result['global_batch_size']} "
        f"sequences x {result['seq_len']} tokens per step: {result['considered']} considered, {result['invalid']} "
        f"refused by validation, {result['do_not_fit']} do not fit, {len(result['layouts'])} fit"
        + (f" (showing {len(rows)})" if len(rows) < len(result["layouts"]) else ""),
        f"step time = compute at MFU {100 * result['compute_mfu']:.0f}% + simulated bubble + exposed communication "
        f"(NVLink {bw['nvlink']:g} GB/s, IB {bw['ib']:g} GB/s); each layout with its fastest fitting micro-batch, "
        "recompute only where needed; fastest first",
        f"{'dp':>5}{'pp':>4}{'ep':>5}  {'schedule':<10}{'micro':>5}  {'recomp':<7}{'step s':>8}{'MFU':>7}"
        f"{'compute':>9}" + (f"{'tp':>8}" if tp else "")
        + f"{'bubble':>8}{'a2a':>8}{'p2p':>8}{'zero':>8}{'partner':>8}{'GiB/rank':>10}",
    ]
    for e in rows:
        t = e["step_time_terms_s"]
        tp_term = f"{t['tensor_parallel']:>8.3f}" if tp else ""
        lines.append(
            f"{e['dp']:>5}{e['pp']:>4}{e['ep']:>5}  {e['pp_schedule'] or '-':<10}{e['micro_batch_size']:>5}  "
            f"{'on' if e['recompute'] else 'off':<7}{e['step_time_s']:>8.3f}{100 * e['mfu']:>6.1f}%"
            f"{t['compute']:>9.3f}{tp_term}{t['pipeline_bubble']:>8.3f}{t['all_to_all']:>8.3f}{t['pipeline_p2p']:>8.3f}"
            f"{t['zero_reduce_scatter'] + t['zero_all_gather']:>8.3f}{t['partner_all_reduce']:>8.3f}"
            f"{e['memory_bytes_per_rank'] / GIB:>10.2f}")
    if not result["layouts"]:
        lines.append("no layout fits" + (f"; e.g. refused: {result['invalid_example']}"
                                         if result["invalid_example"] else ""))
    else:
        base = [o for o in result["base_overrides"] if o.split("=", 1)[0].lstrip("+~") not in SEARCHED]
        lines.append("the terms of the fastest: " + shlex.join(["python", "-m", "haillm.tools.plan", *base,
                                                         *result["layouts"][0]["overrides"], "--gpus",
                                                         str(result["gpus"]), "--gpu", result["gpu"]]))
    return "\n".join(lines)


def longest(cfg: DictConfig, gpus: int, gpu: str, limit: int = 1 << 24) -> dict:
    """The longest ``train.seq_len`` whose fullest rank fits ``gpu``'s usable memory in ``cfg``'s layout, as a
    multiple of what the layout splits a sequence into (2 cp chunks, tp shards under sequence parallelism), at
    most ``limit``; with the memory at that length and one step more. Binary search: memory grows with the
    length; the layout's model and ZeRO buckets are built once (``variant``)."""
    p = cfg.parallel
    unit = (2 * p.cp if p.cp > 1 else 1) * (p.tp if p.tp > 1 and p.sequence_parallel else 1)
    capacity, usable = usable_bytes(gpu)
    if usable is None:
        raise ConfigError(f"--longest needs a GPU's memory: --gpu={gpu} has no capacity to fit")
    args, lay = to_model_args(cfg.model), layout_of(cfg, gpu)
    ranks = all_ranks(args, lay)

    @functools.cache  # each length's ranks built once: the search and the report share them
    def total(n_units: int) -> float:
        return _total(variant(args, lay, ranks, seq_len=n_units * unit)[1])

    found = {"unit": unit, "usable": usable, "capacity": capacity}
    if total(1) > usable:
        return {"seq_len": 0, **found, "total": total(1)}
    lo, hi = 1, limit // unit  # total(lo) fits; total(hi + 1) does not, or hi is the limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(mid) <= usable else (lo, mid - 1)
    return {"seq_len": lo * unit, **found, "total": total(lo), "next_total": total(lo + 1)}
