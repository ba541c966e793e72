"""The layout planner's step-time model: compute at a stated MFU, the pipeline bubble, and the communication that
overlap does not hide, at stated link bandwidths (``python -m haillm.tools.plan``).

    step = compute + tensor parallel + pipeline bubble + exposed all-to-all + exposed pipeline P2P
           + exposed ZeRO reduce-scatter + exposed ZeRO all-gather + partner all-reduce

Compute: the step's FLOPs (``flops.py``, what the trainer's MFU counts) / (GPUs x peak x MFU), equal on every rank.

Traffic (``traffic``): bytes per rank and step of each kind, from the layout and the ZeRO-1 buckets; the tensor-
parallel collectives by layer kind and direction (``tp_traffic``), from the region edges of
``haillm.parallel.tensor`` as the model code calls them.

Links. Ranks sit on the mesh as ``ParallelDims`` places them (``rank = (pp_rank*dp + dp_rank)*tp + tp_rank``, the
ep group being ``ep`` consecutive dp ranks, the expert-data-parallel group stride ``ep``) and nodes are
consecutive blocks of ``parallel.ranks_per_node`` ranks. A collective whose group lies in one node runs at the
NVLink bandwidth, any other at the InfiniBand one (a ring across nodes is bound by each GPU's NIC). The
all-to-all sends each peer its share: the bytes for peers on other nodes go over IB, the rest over NVLink, both
at once (its time is the slower of the two). Bandwidths are per GPU and direction, in GB/s (1e9 B/s).

Overlap, as the code runs it:

- all-to-all: an F&B pair of DualPipe / DualPipeV (``pipeline/overlap.py``) runs each half's exchanges while the
  other half computes: hidden while the pair's exchanges take no longer than its compute (DeepSeek-V3 report
  §3.2.1), the excess exposed. A step outside a pair (warm-up and cool-down; every step of 1F1B or of no
  pipeline) waits for its own exchanges: exposed.
- pipeline bubble and P2P: the schedule simulator (``pipeline/simulate.py``) with per-step costs F = u + a,
  B = 2u + a, I = u + a, W = u and F&B = max(3u, 2a) (u: the forward compute of one chunk on one micro-batch,
  a: that chunk's all-to-all one way; ``a`` dropped where hidden). The bubble is the makespan less a rank's busy
  time; P2P is what the makespan grows by when every transfer between ranks takes its message's time.
- ZeRO-1 reduce-scatter: without a pipeline the buckets are reduced during the last micro-batch's backward
  (``zero.py``'s gradient hooks): exposed is what outlasts that backward, at least the last bucket. With a
  pipeline the trainer runs the whole pipeline under ``no_sync()``, sums the partner gradients, then reduces
  every bucket (``Trainer.forward_backward``, ``clip_grad_norm_``): all exposed.
- partner all-reduce (``sum_partner_grads``, DualPipe's mirror pairs, 1F1B's embedding with MTP): blocking, exposed.
- tensor parallel: every region edge is a synchronous collective in the compute's stream, over NVLink (a tp group
  lies in one node): exposed, and in the pipeline simulation part of each step's compute (``u``).
- ZeRO-1 all-gather: launched bucket by bucket after the optimizer step, waited for by each module in the next
  forward (``register_forward_wait``): exposed is the first bucket beyond the rank's idle start, or what outlasts
  the end of the rank's first forward.

Not modelled: the optimizer step's own time, data loading, launch overheads, stragglers, uneven routing
(uniform routing, as the traffic), contention between concurrent transfers, and the SMs communication takes
(folded into the MFU). Recomputation's extra FLOPs are not charged, nor the down-projections every tp rank
repeats on whole sequences in replicated mode.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

from haillm.models.deepseek_v3.args import ModelArgs
from haillm.parallel.mesh import ParallelDims
from haillm.parallel.pipeline.schedules import Pair, Schedule, Topology, build, halves, p2p_messages
from haillm.parallel.pipeline.simulate import Costs, Simulation, simulate
from haillm.parallel.pipeline.stage import StageSpec
from haillm.tools.activations import FP32, ActivationSetup, fp8_bytes
from haillm.tools.memory import Layout, RankMemory

GB = 1e9
# DeepEP's published normal-kernel bandwidths (deepseek-ai/DeepEP README, "Normal kernels with NVLink and RDMA
# forwarding": H800, ~160 GB/s NVLink, CX7 400 Gb/s InfiniBand ~50 GB/s; 4096 tokens, hidden 7168, top-8, FP8
# dispatch, BF16 combine; shared/REFERENCE.md §6.1): intranode EP8 153 GB/s dispatch (158 combine) over NVLink;
# internode 43 GB/s over RDMA at EP16 (EP32 58, EP64 51): we take the lowest. An H100's NVLink is faster than an
# H800's: pass --nvlink-gbps for it.
DEFAULT_NVLINK_GBPS = 153.0
DEFAULT_IB_GBPS = 43.0
TERMS = ("compute", "tensor_parallel", "context_parallel", "pipeline_bubble", "all_to_all", "pipeline_p2p",
         "zero_reduce_scatter", "zero_all_gather", "partner_all_reduce")
PIPELINED = ("dualpipe", "dualpipev")  # schedules whose F&B pairs hide the all-to-all


@dataclass(frozen=True)
class Bandwidths:
    """Per GPU and direction, GB/s."""

    nvlink_gbps: float = DEFAULT_NVLINK_GBPS
    ib_gbps: float = DEFAULT_IB_GBPS

    def rate(self, ib: bool) -> float:
        """Bytes per second over InfiniBand (``ib``) or NVLink."""
        return (self.ib_gbps if ib else self.nvlink_gbps) * GB


@functools.lru_cache(maxsize=256)
def schedule_of(name: str, pp: int, n_microbatches: int) -> tuple[Schedule, Topology]:
    """``schedules.build``, cached (the search asks for the same schedule many times; callers never mutate it)."""
    return build(name, pp, n_microbatches)


@functools.lru_cache(maxsize=256)
def pipeline_counts(name: str, pp: int, n_microbatches: int) -> list[tuple[tuple[int, ...], int]]:
    """Per pipeline rank: (forwards of each local chunk, point-to-point sends) in one step."""
    schedule, topo = schedule_of(name, pp, n_microbatches)
    sends = p2p_messages(schedule, topo)[0]
    out = []
    for rank, steps in enumerate(schedule):
        chunks = [a.chunk for s in steps for a in halves(s) if a.kind == "F"]
        out.append((tuple(chunks.count(c) for c in range(len(topo.chunks[rank]))), len(sends[rank])))
    return out


@functools.lru_cache(maxsize=1024)
def simulation(name: str, pp: int, n_microbatches: int, costs: Costs) -> Simulation:
    return simulate(*schedule_of(name, pp, n_microbatches), costs)


TP_LAYER_KINDS = ("attention", "dense_ffn", "moe", "embedding", "head", "mtp")
# The forward and backward collective of each region edge (``haillm.parallel.tensor``), under sequence parallelism
# and in replicated mode; per rank a ring all-gather or reduce-scatter sends (tp-1)/tp of the whole tensor and an
# all-reduce (a reduce-scatter, then an all-gather) twice that.
_EDGES = {
    "enter": (("all_gather", "reduce_scatter"), (None, "all_reduce")),
    "exit": (("reduce_scatter", "all_gather"), ("all_reduce", None)),
    "enter_fp8": (("all_gather", None), (None, None)),
    "gather_sequence": (("all_gather", None), (None, None)),
    "shard_rows": ((None, None), (None, "all_gather")),
    "unshard_rows": ((None, None), ("all_gather", None)),
    "sum_partials": (("all_reduce", None), ("all_reduce", None)),
}
_RING_SHARE = {"all_gather": 1, "reduce_scatter": 1, "all_reduce": 2}


def _region_edges(a: ModelArgs, s: ActivationSetup, seq_len: int) -> dict[str, list[tuple[str, float]]]:
    """Each layer kind's region edges, as (edge, bytes per token of the whole sequence): MLA's latents in (or its
    input, with its FP8 copy, without q-LoRA) and ``wo``'s partial sums out; an FFN's input (and FP8 copy) in
    and its output out; the MoE router's rows (replicated mode) and the balance loss's per-sequence sums; the
    embedding's partial rows out; the head's input in and its per-row max, sum and target logit."""
    act, dim = s.act_bytes, a.dim
    fp8_in = [("enter_fp8", fp8_bytes(dim))] if s.fp8 else []
    ffn = [("enter", dim * act), *fp8_in, ("exit", dim * act)]
    attn = [("enter", a.q_lora_rank * act)] if a.q_lora_rank else [("enter", dim * act), *fp8_in]
    attn += [("enter", (a.kv_lora_rank + a.qk_rope_head_dim) * act), ("exit", dim * act)]
    moe = [("shard_rows", dim * act), ("unshard_rows", dim * act)] + (ffn if a.n_shared_experts else [])
    if a.balance_alpha > 0:
        moe.append(("sum_partials", 2 * a.n_routed_experts * FP32 / seq_len))
    return {"attention": attn, "dense_ffn": ffn, "moe": moe, "embedding": [("exit", dim * act)],
            "head": [("enter", dim * act), ("sum_partials", 3 * FP32)]}


def tp_traffic(a: ModelArgs, lay: Layout, spec: StageSpec) -> dict[str, list[float]]:
    """[forward, backward] bytes one tensor-parallel rank sends per micro-batch of the chunk ``spec``, by layer
    kind. The MTP modules (replicated mode) take the main model's embedding and last hidden state gathered."""
    out = {kind: [0.0, 0.0] for kind in TP_LAYER_KINDS}
    s, mb, seq = lay.setup, lay.micro_batch, lay.seq_len

    def add(kind: str, edges: list[tuple[str, float]], tokens: int, setup: ActivationSetup) -> None:
        for edge, width in edges:
            for i, collective in enumerate(_EDGES[edge][0 if setup.gathers else 1]):
                if collective:
                    out[kind][i] += _RING_SHARE[collective] * (s.tp - 1) / s.tp * tokens * width

    if s.tp == 1:
        return out
    edges = _region_edges(a, s, seq)
    for i in spec.layers:
        add("attention", edges["attention"], mb * seq, s)
        kind = "dense_ffn" if i < a.n_dense_layers else "moe"
        add(kind, edges[kind], mb * seq, s)
    if spec.first or (spec.last and a.mtp_depth and lay.pp > 1):  # a pipeline's last stage embeds for MTP again
        add("embedding", edges["embedding"], mb * seq, s)
    if spec.last:
        add("head", edges["head"], mb * seq, s)
        if a.mtp_depth:
            add("mtp", [("gather_sequence", 2 * a.dim * s.act_bytes)], mb * seq, s)
        mtp = s.replicated()
        for k in range(1, a.mtp_depth + 1):
            depth = _region_edges(a, mtp, seq - k)
            add("mtp", depth["attention"] + depth["moe"] + depth["head"], mb * (seq - k), mtp)
    return out


def rank_tp_traffic(a: ModelArgs, lay: Layout, rank: RankMemory) -> dict[str, list[float]]:
    """``tp_traffic`` of every local chunk times its forwards in one step."""
    forwards = (lay.n_microbatches,)
    if lay.pp > 1:
        forwards = pipeline_counts(lay.schedule, lay.pp, lay.n_microbatches)[rank.pp_rank][0]
    out = {kind: [0.0, 0.0] for kind in TP_LAYER_KINDS}
    for spec, n in zip(rank.specs, forwards, strict=True):
        for kind, (fwd, bwd) in tp_traffic(a, lay, spec).items():
            out[kind][0] += n * fwd
            out[kind][1] += n * bwd
    return out


def traffic(args: ModelArgs, lay: Layout, ranks: list[RankMemory], fp8_dispatch: bool) -> list[dict[str, float]]:
    """Bytes one rank of each pipeline rank sends per step, by kind. All-to-all: every routed copy of a token
    that lands on another EP rank (uniform routing: (ep-1)/ep of them), dispatched (FP8 with 1x128 scales
    under ``fp8.enabled``) and combined forward, and both again as gradients in backward; with
    ``train.recompute_swiglu`` the copy's fp32 gate weight rides along both ways; each tp rank routes 1/tp of
    the tokens. P2P: activations and gradients between pipeline ranks (a sequence shard under sequence
    parallelism). ZeRO-1: ring reduce-scatter of the gradient buckets (in ``optim.grad_reduce_dtype``) and
    all-gather of the parameters. Partner: the fp32 all-reduce of ``sum_partner_grads`` between two ranks (a
    ring of two sends the buffer once): every gradient of a DualPipe mirror pair, the embedding's between the
    first and the last rank of 1F1B with MTP. Tensor parallel: ``rank_tp_traffic``, forward and backward.
    Context parallel: ``context_parallel_bytes``; each cp rank routes its own 1/cp of the tokens."""
    act, dim, k = lay.setup.act_bytes, args.dim, args.n_activated_experts
    copy_out = dim + 4 * -(-dim // 128) if fp8_dispatch else dim * act
    gate_weight = 2 * 4 if lay.setup.swiglu_inputs_only else 0  # fp32, sent with its copy and its gradient back
    per_copy = (copy_out + 3 * dim * act + gate_weight) * (lay.ep - 1) / lay.ep / lay.tp / lay.cp
    out = []
    for rank in ranks:
        if lay.pp > 1:
            forwards, sends = pipeline_counts(lay.schedule, lay.pp, lay.n_microbatches)[rank.pp_rank]
            p2p = sends * lay.micro_batch * lay.seq_len // lay.seq_factor * dim * act
        else:
            forwards, p2p = (lay.n_microbatches,), 0
        a2a = cp = 0.0
        for spec, n in zip(rank.specs, forwards, strict=True):
            tokens = sum(lay.seq_len for i in spec.layers if i >= args.n_dense_layers)
            if spec.last:
                tokens += sum(lay.seq_len - d for d in range(1, args.mtp_depth + 1))
            a2a += n * lay.micro_batch * tokens * k * per_copy
            attention_layers = len(spec.layers) + (args.mtp_depth if spec.last else 0)
            cp += n * attention_layers * context_parallel_bytes(args, lay)
        zero = {"zero_reduce_scatter": 0.0, "zero_all_gather": 0.0}
        for b in rank.plans:
            share = (b.world - 1) / b.world
            zero["zero_reduce_scatter"] += b.reduce_bytes(lay.reduce_dtype) * share
            zero["zero_all_gather"] += b.param_bytes() * share
        tp = sum(f + b for f, b in rank_tp_traffic(args, lay, rank).values())
        out.append({"tensor_parallel": tp, "context_parallel": cp, "all_to_all": a2a, "pipeline_p2p": float(p2p),
                    **zero, "partner_all_reduce": float(rank.partner_grads)})
    return out


def context_parallel_bytes(args: ModelArgs, lay: Layout) -> float:
    """Bytes a cp rank sends for one attention layer and micro-batch (``haillm.parallel.context``): the
    all-gather of the latents and rotated shared keys, ``(cp - 1)`` times its local ones, the reduce-scatter
    of their gradients in backward (as many), and with recompute the all-gather again in backward."""
    if lay.cp == 1:
        return 0.0
    local = lay.micro_batch * lay.seq_len // lay.cp * (args.kv_lora_rank + args.qk_rope_head_dim)
    return (2 + lay.setup.recompute) * (lay.cp - 1) * local * lay.setup.act_bytes


def context_parallel_flops(args: ModelArgs, lay: Layout, micro_batches: int) -> float:
    """FLOPs a cp rank adds to its 1/cp of the model's: it up-projects every key chunk of the sequence (``wkv_b``)
    in forward, again in backward (recomputed), and takes their gradients, where one process does each token's
    once; per step of ``micro_batches`` on each rank, over every attention layer (MTP blocks too)."""
    if lay.cp == 1:
        return 0.0
    gemm = 2 * args.kv_lora_rank * args.n_heads * (args.qk_nope_head_dim + args.v_head_dim) / lay.tp
    seq, local = lay.seq_len, lay.seq_len // lay.cp
    per_layer = gemm * (4 * seq - 3 * local)  # forward + recompute + 2 backward GEMMs over all, 3 over its own
    return micro_batches * lay.micro_batch * (args.n_layers + args.mtp_depth) / lay.pp * per_layer


def _dims(lay: Layout) -> ParallelDims:
    return ParallelDims(lay.dp, lay.pp, lay.tp, lay.ep, lay.world, lay.ranks_per_node, rank=0, cp=lay.cp)


def _crosses(dims: ParallelDims, ranks: Sequence[int]) -> bool:
    return len({dims.node_of(g) for g in ranks}) > 1


def _remote_share(dims: ParallelDims, ranks: Sequence[int]) -> float:
    """Of the (sender, receiver) pairs of a group, the share on different nodes."""
    n = len(ranks)
    if n < 2:
        return 0.0
    per_node: dict[int, int] = {}
    for g in ranks:
        per_node[dims.node_of(g)] = per_node.get(dims.node_of(g), 0) + 1
    return 1 - sum(c * (c - 1) for c in per_node.values()) / (n * (n - 1))


@dataclass(frozen=True)
class RankLinks:
    """Which link each of a pipeline rank's transfers takes (True: InfiniBand), over all its data-parallel ranks."""

    a2a_ib_share: float  # of the all-to-all bytes (peers on other nodes), the worst ep group
    dp_ib: bool  # the dense parameters' data-parallel group
    edp_ib: bool  # the experts' data-parallel group
    next_ib: bool  # pipeline P2P to the next pipeline rank
    partner_ib: bool  # sum_partner_grads' pair


def rank_links(lay: Layout, pp_rank: int) -> RankLinks:
    dims, r, ep, edp = _dims(lay), pp_rank, lay.ep, lay.dp // lay.ep
    at = dims.global_rank
    share = max(_remote_share(dims, [at(r, j * ep + e, 0) for e in range(ep)]) for j in range(edp))
    edp_ib = any(_crosses(dims, [at(r, k * ep + e, 0) for k in range(edp)]) for e in range(ep))
    nxt = r + 1 if r + 1 < lay.pp else None
    mirror = lay.pp - 1 - r if lay.schedule == "dualpipe" else (lay.pp - 1 if r == 0 else 0)
    return RankLinks(
        a2a_ib_share=share,
        dp_ib=_crosses(dims, [at(r, d, 0) for d in range(lay.dp)]),
        edp_ib=edp_ib,
        next_ib=nxt is not None and any(dims.node_of(at(r, d, 0)) != dims.node_of(at(nxt, d, 0))
                                        for d in range(lay.dp)),
        partner_ib=any(dims.node_of(at(r, d, 0)) != dims.node_of(at(mirror, d, 0)) for d in range(lay.dp)),
    )


def _link(ib: bool) -> str:
    return "IB" if ib else "NVLink"


def step_time(lay: Layout, ranks: list[RankMemory], comm: list[dict[str, float]], compute_s: float, dim: int,
              bw: Bandwidths) -> dict:
    """The step time's terms (exposed seconds; they sum to ``step_time_s``), each transfer's whole time
    (``comm_time_s``, busiest pipeline rank), the links taken and the simulated bubble fraction.

    ``ranks``, ``comm``: per pipeline rank, its memory (ZeRO buckets, partner buffer) and bytes sent
    (``plan.traffic``); ``compute_s``: one rank's compute per step; ``dim``: the model width (P2P messages)."""
    links = [rank_links(lay, r.pp_rank) for r in ranks]
    a2a = []  # per pipeline rank: the all-to-all's time, IB and NVLink bytes at once
    for c, lk in zip(comm, links, strict=True):
        a2a.append(max(c["all_to_all"] * lk.a2a_ib_share / bw.rate(True),
                       c["all_to_all"] * (1 - lk.a2a_ib_share) / bw.rate(False)))
    message = lay.micro_batch * lay.seq_len // lay.seq_factor * dim * lay.setup.act_bytes
    p2p = message / bw.rate(any(lk.next_ib for lk in links)) if lay.pp > 1 else 0.0
    sent = [c["pipeline_p2p"] for c in comm]
    hides = lay.pp > 1 and lay.schedule in PIPELINED
    terms = dict.fromkeys(TERMS, 0.0)
    terms["compute"] = compute_s
    tp = max(c["tensor_parallel"] for c in comm) / bw.rate(False)  # within a node; in line with the compute
    terms["tensor_parallel"] = tp
    cp_ib = lay.cp * lay.tp > lay.ranks_per_node  # the cp ranks of one tp rank: adjacent, one node where they fit
    cp = max(c["context_parallel"] for c in comm) / bw.rate(cp_ib)  # synchronous, before each attention
    terms["context_parallel"] = cp
    bubble_fraction = None
    if lay.pp > 1:
        schedule, _ = schedule_of(lay.schedule, lay.pp, lay.n_microbatches)
        units = {"F": 1, "B": 2, "I": 1, "W": 1}
        busy = sum(3 if isinstance(s, Pair) else units[s.kind] for s in schedule[0])
        u = (compute_s + tp) / busy  # every rank runs as many units
        forwards = [sum(a.kind == "F" for s in steps for a in halves(s)) for steps in schedule]
        a = max(t / (2 * n) for t, n in zip(a2a, forwards, strict=True))
        costs = Costs(f=u + a, b=2 * u + a, w=u, i=u + a, fb=max(3 * u, 2 * a) if hides else 3 * u + 2 * a)
        sim = simulation(lay.schedule, lay.pp, lay.n_microbatches, costs)
        with_p2p = simulation(lay.schedule, lay.pp, lay.n_microbatches, replace(costs, p2p=p2p))
        # (clamped: float rounding may leave -1e-16 where a term is zero)
        terms["all_to_all"] = max(0.0, min(sim.busy) - compute_s - tp)
        terms["pipeline_bubble"] = max(0.0, sim.makespan - min(sim.busy))
        terms["pipeline_p2p"] = max(0.0, with_p2p.makespan - sim.makespan)
        bubble_fraction = terms["pipeline_bubble"] / sim.makespan if sim.makespan else 0.0
    else:
        terms["all_to_all"] = a2a[0]
        forward = (compute_s + tp) / 3 / lay.n_microbatches  # of one micro-batch; its backward takes twice as long
    worst_end, worst_ag = (0.0, 0.0), 0.0  # (partner all-reduce, reduce-scatter) of the rank that ends last
    rs_all, ag_all, partner_all = [], [], []
    for i, (rank, lk) in enumerate(zip(ranks, links, strict=True)):
        rs, ag, last_rs = 0.0, [], {}
        for b in rank.plans:
            if b.world == 1:
                continue
            expert = rank.replicas[b.group].startswith("edp")  # edp_cp or edp_cp_tp; dense: dp_cp or dp_cp_tp
            rate, share = bw.rate(lk.edp_ib if expert else lk.dp_ib), (b.world - 1) / b.world
            t = b.reduce_bytes(lay.reduce_dtype) * share / rate
            rs += t
            last_rs[b.group] = t  # the group's last bucket (its gradients are ready last)
            ag.append(b.param_bytes() * share / rate)
        # the optimizer step gathers the buckets in reverse (first layers first)
        first_ag, ag_total = (ag[-1] if ag else 0.0), sum(ag)
        if lay.pp > 1:
            rs_exposed = rs  # the pipeline runs under no_sync(): every bucket after the last backward
            start = sim.spans[i][0].start
            ag_exposed = max(0.0, first_ag - start, ag_total - sim.spans[i][0].end)
        else:
            rs_exposed = max(max(last_rs.values(), default=0.0), rs - 2 * forward)
            ag_exposed = max(first_ag, ag_total - forward)
        partner = rank.partner_grads / bw.rate(lk.partner_ib)
        rs_all.append(rs)
        ag_all.append(ag_total)
        partner_all.append(partner)
        if partner + rs_exposed > sum(worst_end):
            worst_end = (partner, rs_exposed)
        worst_ag = max(worst_ag, ag_exposed)
    terms["partner_all_reduce"], terms["zero_reduce_scatter"] = worst_end[0], worst_end[1]
    terms["zero_all_gather"] = worst_ag
    dense_ib = [lk.dp_ib for lk in links]
    expert_ib = [lk.edp_ib for lk in links]
    a2a_share = max(lk.a2a_ib_share for lk in links)
    return {
        "step_time_s": sum(terms.values()),
        "terms": terms,
        "comm_time_s": {"tensor_parallel": tp, "context_parallel": cp, "all_to_all": max(a2a),
                        "pipeline_p2p": max(sent) / bw.rate(any(lk.next_ib for lk in links)) if lay.pp > 1 else 0.0,
                        "zero_reduce_scatter": max(rs_all), "zero_all_gather": max(ag_all),
                        "partner_all_reduce": max(partner_all)},
        "links": {
            "tensor_parallel": "NVLink" if lay.tp > 1 else "none",  # a tp group lies in one node (ParallelDims)
            "context_parallel": _link(cp_ib) if lay.cp > 1 else "none",
            "all_to_all": "none" if lay.ep == 1 else (f"IB {100 * a2a_share:.0f}% of bytes, NVLink the rest"
                                                     if a2a_share else "NVLink"),
            "pipeline_p2p": "none" if lay.pp == 1 else _link(any(lk.next_ib for lk in links)),
            "zero_dense": _link(any(dense_ib)) if lay.dp * lay.cp * lay.tp > 1 else "none",  # over dp x cp (x tp)
            "zero_experts": _link(any(expert_ib)) if lay.dp // lay.ep * lay.cp * lay.tp > 1 else "none",
            "partner_all_reduce": _link(any(lk.partner_ib for lk in links)) if max(partner_all) else "none",
        },
        "overlap": ("DualPipe F&B pairs hide the all-to-all up to the pair's compute" if hides
                    else "no F&B pairs: the all-to-all is exposed"),
        "bubble_fraction": bubble_fraction,
    }
