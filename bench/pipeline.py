"""Step time of our pipeline runtime against torch.distributed.pipelining on the same stage modules.

Two gloo processes with one thread each run, on the same stage modules and micro-batches and in the same
run, our 1F1B and DualPipeV and torch's ``Schedule1F1B`` and ``ScheduleDualPipeV``, alternating them so
that machine noise hits all alike. Prints median step times, ours/torch ratios (goal: <= 1.0x), best-of
ratios and the CPU time of both processes (a steadier measure of the work done on a shared machine).
"ours+store" runs the same parameters through ``deferrable_linear``, so its I/W actions really split the
weight gradients (with plain ``nn.Linear`` our I is a full backward and W is empty).

Stages are Linear-GELU-Linear blocks on ``[batch, seq, dim]`` activations. Finding (torch 2.13): its
ScheduleDualPipeV fails on them with "Can't detach views in-place" (``stage_backward_input`` detaches the
stage output in place, and ``nn.Linear`` on a 3-D input returns a view); the bench records the failure and
compares DualPipeV on ``[tokens, dim]`` activations, where the output is not a view (then GELU works, as
does ReLU).

Second part, the overlap of the expert all-to-all in F&B pairs: two gloo processes (one thread each) form
an EP group of 2; each runs a one-rank DualPipeV pipeline (both stages of a comm-heavy variant of the
``small`` DeepSeek-V3: wide hidden, narrow experts, top-6) on its own micro-batches, so most steps are
[F&B] pairs. The same step runs with the pairs interleaved and with their halves back to back (F then B),
alternating. Within the pairs the bench measures the time blocked waiting for all-to-alls (count and token
exchanges of dispatch, combine and their gradients) and replays the very same exchanges with no compute
(their standalone latency); hidden fraction = 1 - wait / standalone.

    python bench/pipeline.py [--part all|torch|overlap] [--dim 256] [--hidden 1024] [--micro-batch 4]
        [--seq 64] [--microbatches 8] [--repeats 9] [--ep-microbatches 6] [--ep-seq 128]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

from haillm.models.deepseek_v3 import get_preset
from haillm.ops.wgrad import deferrable_linear
from haillm.parallel import expert
from haillm.parallel.expert import AllToAllDispatcher, ExpertPlacement, apply_expert_parallel
from haillm.parallel.pipeline.runtime import ChunkOutput, PipelineRuntime
from haillm.parallel.pipeline.schedules import Pair, topology
from haillm.parallel.pipeline.stage import build_stage_model

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}
# Stage variants tried in order until torch's schedule runs: (activation, flat [tokens, dim] activations).
VARIANTS = (("gelu", False), ("gelu", True), ("relu", True))


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Stages:
    """Our runtime's stage protocol over the same blocks torch's PipelineStage wraps. ``deferred``: run the
    blocks' linears through ``deferrable_linear`` (same parameters), so that I/W split the weight grads."""

    metric_keys = ("loss",)

    def __init__(self, blocks: dict[int, Block], order: list[int], n_stages: int, deferred: bool = False):
        self.blocks, self.order, self.n_stages, self.deferred = blocks, order, n_stages, deferred

    def _block(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        b = self.blocks[stage]
        if not self.deferred:
            return b(x)
        return deferrable_linear(b.act(deferrable_linear(x, b.fc1.weight, b.fc1.bias)), b.fc2.weight, b.fc2.bias)

    def activation_shape(self, batch):
        return tuple(batch[0].shape), batch[0].dtype

    def forward_chunk(self, chunk, x, batch):
        stage = self.order[chunk]
        h = self._block(stage, batch[0] if stage == 0 else x)
        if stage < self.n_stages - 1:
            return ChunkOutput(h, None, {})
        loss = F.mse_loss(h, batch[1])
        return ChunkOutput(None, loss, {"loss": loss.detach()})


def _runners(opts, variant: tuple[str, bool], schedule: str, rank: int, group) -> tuple:
    """(ours, ours with deferred weight grads, torch's) step functions on shared blocks for one schedule and
    stage variant (activation, flat): flat activations are ``[tokens, dim]``, not ``[batch, seq, dim]``."""
    act, flat = variant
    pp = dist.get_world_size()
    topo = topology(schedule, pp)
    order = [s.index for s in topo.chunks[rank]]
    blocks = {s: Block(opts.dim, opts.hidden, act, seed=s) for s in order}
    params = [p for b in blocks.values() for p in b.parameters()]
    gen = torch.Generator().manual_seed(0)
    n = opts.microbatches
    shape = (n * opts.micro_batch * opts.seq,) if flat else (n * opts.micro_batch, opts.seq)
    x = torch.randn(*shape, opts.dim, generator=gen)
    y = torch.randn(*shape, opts.dim, generator=gen)
    micro = list(zip(x.tensor_split(n), y.tensor_split(n), strict=True))
    ours_rt = PipelineRuntime(Stages(blocks, order, topo.n_stages), schedule, n, pp_group=group)
    deferred_rt = PipelineRuntime(Stages(blocks, order, topo.n_stages, deferred=True), schedule, n, pp_group=group)
    torch_stages = [PipelineStage(blocks[s], s, topo.n_stages, torch.device("cpu"), group=group) for s in order]
    if schedule == "1f1b":
        torch_sched = Schedule1F1B(torch_stages[0], n, loss_fn=F.mse_loss)
    else:
        torch_sched = ScheduleDualPipeV(torch_stages, n, loss_fn=F.mse_loss)

    def ours() -> float:
        return ours_rt.step(micro).mean["loss"]

    def deferred() -> float:
        return deferred_rt.step(micro).mean["loss"]

    def theirs() -> float:
        losses: list = []
        kwargs = {}
        if 0 in order:
            kwargs["target"] = None
        first, last = 0 in order, topo.n_stages - 1 in order
        inputs = (x,) if first else ()
        if last:
            torch_sched.step(*inputs, target=y, losses=losses)
        else:
            torch_sched.step(*inputs)
        loss = torch.tensor(sum(float(v.detach()) for v in losses) / n if losses else 0.0)
        dist.all_reduce(loss, group=group)
        return float(loss)

    def timed(fn):
        def run() -> tuple[float, float, float]:
            """(wall time of the step, CPU time of both processes together, loss)."""
            for p in params:
                p.grad = None
            dist.barrier(group=group)
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = fn()
            cpu = torch.tensor(time.process_time() - cpu_start, dtype=torch.float64)
            dist.barrier(group=group)
            wall = time.perf_counter() - start
            dist.all_reduce(cpu, group=group)
            return wall, float(cpu), loss
        return run

    return timed(ours), timed(deferred), timed(theirs)


def _init(rank: int, store_path: str, timeout_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _probe_worker(rank: int, opts, schedule: str, variant: tuple[str, bool], workdir: str) -> None:
    """One warm-up step of torch's schedule; writes "ok" or the first line of the error."""
    _init(rank, os.path.join(workdir, "store"), timeout_s=60)
    try:
        _runners(opts, variant, schedule, rank, dist.group.WORLD)[-1]()
        result = "ok"
    except Exception as e:
        result = " <- ".join(f"{type(x).__name__}: {str(x).strip().splitlines()[0]}"
                             for x in (e, e.__cause__) if x is not None)
    with open(os.path.join(workdir, f"rank{rank}"), "w") as f:
        f.write(result)


def _torch_runs(opts, schedule: str, variant: tuple[str, bool]) -> str | None:
    """None if torch's schedule runs on these stages, else its error. Done in a throw-away process pair:
    a rank whose stage fails leaves its peer blocked in a receive, so the peer is killed, not waited for."""
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory() as workdir:
        procs = [ctx.Process(target=_probe_worker, args=(r, opts, schedule, variant, workdir)) for r in range(2)]
        for p in procs:
            p.start()
        paths = [os.path.join(workdir, f"rank{r}") for r in range(2)]
        while not any(os.path.exists(p) and open(p).read() not in ("", "ok") for p in paths):
            if all(os.path.exists(p) for p in paths) or not any(p.is_alive() for p in procs):
                break
            time.sleep(0.05)
        time.sleep(0.2)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        results = [open(p).read() if os.path.exists(p) else "no result" for p in paths]
    errors = [r for r in results if r != "ok"]
    primary = [r for r in errors if "Connection closed" not in r and "Timed out" not in r]
    return (primary or errors or [None])[0]


def _worker(rank: int, opts, cases: list[tuple[str, str, str]], store_path: str) -> None:
    _init(rank, store_path, timeout_s=300)
    group = dist.group.WORLD
    runners = [(label, _runners(opts, variant, schedule, rank, group)) for label, schedule, variant in cases]
    for _, fns in runners:  # warm-up
        for fn in fns:
            fn()
    times: dict[str, list[list[float]]] = {label: [[], [], []] for label, _ in runners}
    cpu_times: dict[str, list[list[float]]] = {label: [[], [], []] for label, _ in runners}
    losses: dict[str, list[float]] = {label: [0.0, 0.0, 0.0] for label, _ in runners}
    for _ in range(opts.repeats):
        for label, fns in runners:
            for i, fn in enumerate(fns):
                wall, cpu, losses[label][i] = fn()
                times[label][i].append(wall)
                cpu_times[label][i].append(cpu)
    if rank == 0:
        tokens = opts.microbatches * opts.micro_batch * opts.seq
        print(f"2 gloo ranks x 1 thread, {opts.microbatches} micro-batches of {opts.micro_batch}x{opts.seq} "
              f"tokens, dim {opts.dim}, hidden {opts.hidden}, fp32; {opts.repeats} steps each")
        print("ours: our runtime on the same nn.Linear blocks; ours+store: the same parameters through "
              "deferrable_linear (I/W split the weight grads)")
        print(f"{'schedule (stages)':46s} {'ours':>7s} {'ours+store':>10s} {'torch':>7s} {'ours/torch':>10s} "
              f"{'ours+store/torch':>16s}  (median; best-of ratios)  loss ours / ours+store / torch")
        for label, step_times in times.items():
            ours, stored, theirs = (statistics.median(t) for t in step_times)
            best = [min(t) for t in step_times]
            loss_text = " / ".join(f"{v:.6f}" for v in losses[label])
            print(f"{label:46s} {ours:6.3f}s {stored:9.3f}s {theirs:6.3f}s {ours / theirs:9.2f}x "
                  f"{stored / theirs:15.2f}x  ({best[0] / best[2]:.2f}x; {best[1] / best[2]:.2f}x)  {loss_text}")
        print("CPU seconds per step, both processes (gloo threads included), median: "
              + "; ".join(f"{label.split(' ')[0]} ours {statistics.median(c[0]):.3f}, ours+store "
                          f"{statistics.median(c[1]):.3f}, torch {statistics.median(c[2]):.3f}"
                          for label, c in cpu_times.items()))
        print(f"tokens per step: {tokens}")
    dist.destroy_process_group()


# --- overlap of the expert all-to-all in F&B pairs (ep=2) ------------------------------------------------

# A variant of the ``small`` preset with more bytes to move per FLOP: wide hidden, narrow experts, top-6.
OVERLAP_MODEL = dict(n_layers=4, n_dense_layers=1, mtp_depth=0, dim=1024, inter_dim=512, moe_inter_dim=64,
                     n_heads=4, q_lora_rank=64, kv_lora_rank=64, vocab_size=1024, n_activated_experts=6)


class _PairMeter:
    """Wall time and all-to-all wait inside a runtime's F&B pairs; optionally records the exchanges."""

    def __init__(self, runtime: PipelineRuntime, dispatcher: AllToAllDispatcher):
        self.wall = self.wait = 0.0
        self.record: list | None = None
        run_pair = runtime._pair

        def pair(step, routes) -> None:
            recording, wait, start = self.record is not None, dispatcher.comm_wait_s, time.perf_counter()
            _Recorder.active = self.record if recording else None
            run_pair(step, routes)
            _Recorder.active = None
            self.wall += time.perf_counter() - start
            self.wait += dispatcher.comm_wait_s - wait

        runtime._pair = pair


class _Recorder:
    """Notes the (rows, splits) of every exchange the dispatcher starts while ``active`` is a list."""

    active: list | None = None
    start_transfer = staticmethod(expert._start_transfer)

    @staticmethod
    def transfer(send, in_splits, out_splits, group):
        if _Recorder.active is not None:
            _Recorder.active.append((tuple(send.shape[1:]), send.dtype, list(in_splits), list(out_splits)))
        return _Recorder.start_transfer(send, in_splits, out_splits, group)

    @staticmethod
    def counts(dispatcher: AllToAllDispatcher):
        announce = dispatcher.announce_dispatch

        def recorded(*args, **kwargs):
            if _Recorder.active is not None:
                p = dispatcher.placement
                _Recorder.active.append(((p.experts_per_rank,), torch.int64, [1] * p.ep_size, [1] * p.ep_size))
            return announce(*args, **kwargs)

        dispatcher.announce_dispatch = recorded


def _replay(exchanges: list, group) -> float:
    """Seconds to run ``exchanges`` one after another with nothing else to do (the same sizes)."""
    dist.barrier(group=group)
    start = time.perf_counter()
    for row, dtype, in_splits, out_splits in exchanges:
        send = torch.ones(sum(in_splits), *row, dtype=dtype)
        recv = torch.empty(sum(out_splits), *row, dtype=dtype)
        dist.all_to_all_single(recv, send, out_splits, in_splits, group=group)
    return time.perf_counter() - start


def _overlap_worker(rank: int, opts, store_path: str) -> None:
    _init(rank, store_path, timeout_s=300)
    group = dist.group.WORLD
    args = get_preset("small").replace(**OVERLAP_MODEL)
    model = build_stage_model(args, "dualpipev", 1, 0, init_seed=0)
    dispatcher = AllToAllDispatcher(group, ExpertPlacement(args.n_routed_experts, 2, rank, None, args.n_expert_groups))
    apply_expert_parallel(model, dispatcher)
    expert._start_transfer = _Recorder.transfer
    _Recorder.counts(dispatcher)
    n = opts.ep_microbatches
    gen = torch.Generator().manual_seed(rank)  # data parallel: each EP rank has its own tokens
    batches = list(torch.randint(0, args.vocab_size, (n * 2, opts.ep_seq + 1), generator=gen).split(2))
    modes = {"F then B": False, "interleaved": True}
    runtimes = {m: PipelineRuntime(model, "dualpipev", n, overlap=o) for m, o in modes.items()}
    meters = {m: _PairMeter(rt, dispatcher) for m, rt in runtimes.items()}
    rows: dict[str, list[tuple[float, float, float, float]]] = {m: [] for m in modes}
    exchanges: list = []
    standalone: list[float] = []
    for repeat in range(opts.repeats + 1):  # the first round warms up
        for mode, runtime in runtimes.items():
            meter = meters[mode]
            meter.wall = meter.wait = 0.0
            meter.record = exchanges if repeat == 0 and mode == "interleaved" else None
            model.zero_grad(set_to_none=True)
            dist.barrier(group=group)
            start = time.perf_counter()
            loss = runtime.step(batches).mean["loss"]
            times = torch.tensor([time.perf_counter() - start, meter.wall, meter.wait], dtype=torch.float64)
            dist.all_reduce(times, group=group)  # the mean of the two ranks
            if repeat:
                rows[mode].append((*(times / 2).tolist(), loss))
        if repeat:
            standalone.append(_replay(exchanges, group))
    if rank == 0:
        med = {m: [statistics.median(r[i] for r in v) for i in range(3)] for m, v in rows.items()}
        best = {m: [min(r[i] for r in v) for i in range(3)] for m, v in rows.items()}
        alone = statistics.median(standalone)
        n_pairs = sum(isinstance(s, Pair) for s in runtimes["interleaved"].steps)
        print(f"\nF&B pairs with ep=2: 2 gloo ranks x 1 thread, each a 1-rank DualPipeV of the 'small' variant "
              f"{OVERLAP_MODEL}, {n} micro-batches of 2x{opts.ep_seq} tokens ({n_pairs} pairs per step), fp32; "
              f"median of {opts.repeats} steps per mode, mean of the two ranks")
        print(f"{'median (best)':14s} {'step':>16s} {'in pairs':>16s} {'a2a wait in pairs':>18s} "
              f"{'1 - wait/alone':>16s}  loss")
        for mode in modes:
            (step, pairs, wait), (b_step, b_pairs, b_wait) = med[mode], best[mode]
            print(f"{mode:14s} {step:7.3f} ({b_step:.3f})s {pairs:7.3f} ({b_pairs:.3f})s {wait:.4f} ({b_wait:.4f})s "
                  f"{1 - wait / alone:6.1%} ({1 - b_wait / alone:.1%})  {rows[mode][-1][3]:.6f}")
        print(f"the pairs' {len(exchanges)} all-to-alls (counts, tokens, gradients) replayed alone: {alone:.4f}s per "
              f"step (median); a wait also holds the time the peer rank arrives late (skew, OS noise)")
        for name, stat in (("median", med), ("best", best)):
            serial, inter = stat["F then B"], stat["interleaved"]
            print(f"{name}: interleaving removes {1 - inter[2] / serial[2]:.1%} of the all-to-all wait left by F then "
                  f"B (which already hides some under the shared experts and weight grads); interleaved / F then B: "
                  f"step {inter[0] / serial[0]:.2f}x, pairs {inter[1] / serial[1]:.2f}x")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--part", choices=("all", "torch", "overlap"), default="all")
    parser.add_argument("--ep-microbatches", type=int, default=6)
    parser.add_argument("--ep-seq", type=int, default=128)
    opts = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    load = os.getloadavg()[0]
    print(f"load average before the run: {load:.2f} on {os.cpu_count()} CPUs"
          + (" -- a loaded machine skews the ratios (gloo threads then compete with compute for the cores)"
             if load > 0.5 * (os.cpu_count() or 1) else ""))
    if opts.part in ("all", "torch"):
        _compare_with_torch(opts)
    if opts.part in ("all", "overlap"):
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_overlap_worker, args=(opts, os.path.join(tmp, "store")), nprocs=2,
                               start_method="fork")


def _compare_with_torch(opts) -> None:
    cases = []
    for schedule, label in (("1f1b", "1F1B"), ("dualpipev", "DualPipeV")):
        for variant in VARIANTS:
            name = f"Linear-{variant[0].upper()}-Linear, {'[tokens, dim]' if variant[1] else '[batch, seq, dim]'}"
            error = _torch_runs(opts, schedule, variant)
            if error is None:
                cases.append((f"{label} ({name})", schedule, variant))
                break
            print(f"finding: torch {label} fails on {name} stages: {error}")
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(opts, cases, os.path.join(tmp, "store")), nprocs=2,
                           start_method="fork")


if __name__ == "__main__":
    main()
