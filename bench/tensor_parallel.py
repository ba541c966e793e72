"""Cost of tensor (and sequence) parallelism on CPU: the ``small`` DeepSeek-V3 at tp=2 against tp=1.

    python bench/tensor_parallel.py [--batch 4] [--seq 256] [--threads N] [--rounds 3] [--steps 3] [--warmup 1]

One training step is forward + backward of ``model.compute_loss(batch)`` (main head, MTP module, balance
loss; fp32) on a ``[batch, seq + 1]`` batch of random tokens, then the sum over tp of the gradients that are
partial sums (``sum_partial_grads``: the routed experts, the router and, under sequence parallelism, every
replicated weight; the trainer's ZeRO-1 does this reduction over the tp group), no optimizer step (it is
local to each rank). Configurations, with ``--threads N`` cores in all (default: this machine's):

- ``tp=1, N thr``: one process with N threads, the same total as tp=2 (the baseline of the step ratios);
- ``tp=1, N/2 thr``: one process with one rank's threads (the baseline of the compute-per-rank ratio);
- ``tp=2 replicated`` and ``tp=2 seq-par``: two forked gloo processes with N/2 threads each, the model split
  by ``parallelize_tensor`` (``sequence_parallel`` off and on).

Each configuration runs in ``--rounds`` fresh process groups, taken in turn so that machine noise hits all
alike, each with ``--warmup`` steps and then ``--steps`` timed ones; medians over the timed steps of the
ranks' mean. Per step: ``step`` (all of it), ``comm`` (time inside the TP collectives during forward and
backward: ``all_gather_single``, ``reduce_scatter_single`` and the all-reduce of ``haillm.parallel.tensor``,
and the vocabulary-parallel cross-entropy's two all-reduces; waiting for the other rank included), ``compute``
(forward + backward less comm), ``grad sum``; then bytes sent per rank per step under a ring algorithm
(all-gather and reduce-scatter: (n-1)/n of the whole tensor, all-reduce: twice that).

One run on the 2-core test machine (N=2, load 0.42 before, 1 min 20 s; ``python bench/tensor_parallel.py``):

    config             step   best   comm compute   gsum comm%  step/2t  best/2t  step/1t  comp/1t   CPU/1t    loss
    tp=1, 2 thr       0.954  0.763  0.000   0.954  0.001  0.0%    1.00x    1.00x    0.68x    0.68x    1.32x 11.7158
    tp=1, 1 thr       1.409  1.291  0.000   1.408  0.001  0.0%    1.48x    1.69x    1.00x    1.00x    1.00x 11.7158
    tp=2 replicated   1.506  1.202  0.284   1.031  0.209 18.9%    1.58x    1.57x    1.07x    0.73x    0.72x 11.7158
    tp=2 seq-par      1.609  1.331  0.357   1.023  0.227 22.2%    1.69x    1.74x    1.14x    0.73x    0.70x 11.7158

    config                     all_gather       reduce_scatter           all_reduce   TP MiB grad sum MiB
    tp=2 replicated        12    8.99 MiB        0    0.00 MiB       48   45.19 MiB    54.18       108.29
    tp=2 seq-par           36   21.93 MiB       32   18.94 MiB       16    7.31 MiB    48.18       111.26

Reading. The four losses agree: the split computes the same model. tp=2 costs 1.6-1.7x the step of tp=1 on the
same two cores: two OpenMP threads split the work more cheaply than two gloo ranks do, which add 0.28-0.36 s of
collectives (19-22% of the step) and 0.21-0.23 s of grad sum (mostly the routed experts' partial gradients, 108
MiB: at dp=1 a cost of tp alone; with dp the trainer folds it into ZeRO-1's reduction over dp x tp). Compute per
rank is 0.70-0.73x of one thread's, not 0.5x: half the FLOPs, but per-op costs do not halve (tp=1 on half the
tokens costs 0.61-0.66x CPU here). The collectives are latency-bound on gloo, 4-5 ms a call (60 or 84 calls for
~50 MiB, against ~0.2 s for the grad sum's single 110 MiB all-reduce), so sequence parallelism, fewer bytes in
more calls, is no faster here. Bytes and calls are what the layout implies, with X = 1024 tokens x 384 x 4 B = 1.5
MiB: under sequence parallelism each of the 6 layers gathers MLA's two latents (192 + 144 wide) and the FFN input
and reduce-scatters MLA's and the FFN's outputs, and the adjoints in backward (3.875 X each way), plus the
embedding's output, the head's input and the MTP module's two gathered inputs (27.25 X gathered, 25.25 X
scattered); the MTP module (replicated, 1020 rows) all-reduces ~4.9 X and gathers its routed rows twice; a ring
sends half of each: 21.93 and 18.94 MiB. Replicated mode all-reduces the same 25.25 X (37.9 MiB) plus the MTP
module's 7.3 MiB, and gathers the routed rows of the 5 MoE layers and the MTP module forward and backward (12
calls, 18 MiB: 8.99 sent). Noise: tp=1 with 2 threads is the fragile row on this shared machine (a busy core
stalls every OpenMP barrier: 3.6 to 20 s a step seen at load 1 to 5); read ``best`` and the one-thread ratios
then.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from dist import run_distributed  # noqa: E402  (the forked gloo launcher shared with the tests)

import haillm.parallel.tensor as tensor_mod  # noqa: E402
from haillm.models.deepseek_v3 import DeepSeekV3, get_preset  # noqa: E402
from haillm.ops.linear import VocabShard  # noqa: E402
from haillm.parallel.tensor import TensorParallel  # noqa: E402
from haillm.parallel.tensor_plan import parallelize_tensor, sum_partial_grads  # noqa: E402

KINDS = ("all_gather", "reduce_scatter", "all_reduce")
MIB = 2**20


@dataclass(frozen=True)
class Config:
    """One measured layout: ``tp`` processes of ``threads`` threads each."""

    label: str
    tp: int
    threads: int
    sequence_parallel: bool = False


class CommMeter:
    """Seconds, calls and bytes sent per rank (ring algorithm) of the TP collectives, by kind, since ``reset``."""

    def __init__(self, size: int) -> None:
        self.share = (size - 1) / size
        self.reset()

    def reset(self) -> None:
        self.seconds = self.cpu = 0.0
        self.calls = dict.fromkeys(KINDS, 0)
        self.bytes = dict.fromkeys(KINDS, 0.0)

    def _wrap(self, fn: Callable, kind: str, nbytes: Callable[..., int]) -> Callable:
        def timed(*args: object, **kwargs: object) -> object:
            start, cpu = time.perf_counter(), time.process_time()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            self.cpu += time.process_time() - cpu
            self.calls[kind] += 1
            self.bytes[kind] += nbytes(*args) * self.share * (2 if kind == "all_reduce" else 1)
            return out
        return timed

    def install(self) -> None:
        """Wrap, in this process, every collective the TP code calls (looked up at call time)."""
        tensor_mod.all_gather_single = self._wrap(tensor_mod.all_gather_single, "all_gather",
                                                  lambda out, inp: out.nbytes)
        tensor_mod.reduce_scatter_single = self._wrap(tensor_mod.reduce_scatter_single, "reduce_scatter",
                                                      lambda out, inp: inp.nbytes)
        tensor_mod._all_reduce = self._wrap(tensor_mod._all_reduce, "all_reduce", lambda x, group: x.nbytes)
        VocabShard.peak_ = self._wrap(VocabShard.peak_, "all_reduce", lambda shard, peak: peak.nbytes)
        VocabShard.sums = self._wrap(VocabShard.sums, "all_reduce",
                                     lambda shard, total, picked: total.nbytes + picked.nbytes)


def _worker(config: Config, opts: argparse.Namespace) -> list[dict[str, float]]:
    """The timed steps of one rank: a dict of seconds, bytes and calls per step."""
    torch.set_num_threads(config.threads)
    tp = TensorParallel(dist.group.WORLD, config.tp, dist.get_rank(), config.sequence_parallel) \
        if config.tp > 1 else TensorParallel()
    model = DeepSeekV3(get_preset("small"), init_seed=0)
    placements = parallelize_tensor(model, tp)
    grad_mib = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if placements[n].partial_grad)
    grad_mib *= 2 * (tp.size - 1) / tp.size / MIB
    meter = CommMeter(tp.size)
    meter.install()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.args.vocab_size, (opts.batch, opts.seq + 1), generator=gen) for _ in range(2)]
    records = []
    for step in range(opts.warmup + opts.steps):
        model.zero_grad(set_to_none=True)
        dist.barrier()
        meter.reset()
        start, cpu = time.perf_counter(), time.process_time()
        loss = model.compute_loss(batches[step % 2])["loss"]
        loss.backward()
        mid, cpu = time.perf_counter(), time.process_time() - cpu
        sum_partial_grads(model, placements, tp)
        end = time.perf_counter()
        if step >= opts.warmup:
            records.append({"step": end - start, "comm": meter.seconds, "compute": mid - start - meter.seconds,
                            "cpu compute": cpu - meter.cpu, "grad sum": end - mid, "grad MiB": grad_mib,
                            "loss": loss.item(),
                            **{f"{k} MiB": meter.bytes[k] / MIB for k in KINDS},
                            **{f"{k} calls": float(meter.calls[k]) for k in KINDS}})
    return records


def _configs(threads: int) -> list[Config]:
    half = threads // 2
    return [Config(f"tp=1, {threads} thr", 1, threads), Config(f"tp=1, {half} thr", 1, half),
            Config("tp=2 replicated", 2, half), Config("tp=2 seq-par", 2, half, sequence_parallel=True)]


def _medians(steps: list[list[dict[str, float]]]) -> dict[str, float]:
    """Median over the steps of each quantity's mean over the ranks (``steps``: per step, per rank), and the
    fastest step as ``best``."""
    means = [{k: statistics.fmean(r[k] for r in ranks) for k in ranks[0]} for ranks in steps]
    return {**{k: statistics.median(m[k] for m in means) for k in means[0]}, "best": min(m["step"] for m in means)}


def _print(results: dict[Config, dict[str, float]], configs: list[Config]) -> None:
    whole, one = (results[c] for c in configs[:2])
    whole_threads, one_threads = (c.threads for c in configs[:2])
    vs_whole, vs_one = f"/{whole_threads}t", f"/{one_threads}t"
    print(f"\nseconds per step (median; best: the fastest step; gsum: the grad sum); ratios against tp=1 on "
          f"{whole_threads} threads ({vs_whole}: all)\nand on {one_threads} ({vs_one}: one rank's); CPU: process CPU "
          "time outside the TP collectives")
    print(f"{'config':16s} {'step':>6s} {'best':>6s} {'comm':>6s} {'compute':>7s} {'gsum':>6s} {'comm%':>5s} "
          + " ".join(f"{name:>8s}" for name in ("step" + vs_whole, "best" + vs_whole, "step" + vs_one,
                                                 "comp" + vs_one, "CPU" + vs_one))
          + f" {'loss':>7s}")
    for config in configs:
        r = results[config]
        ratios = (r["step"] / whole["step"], r["best"] / whole["best"], r["step"] / one["step"],
                  r["compute"] / one["compute"], r["cpu compute"] / one["cpu compute"])
        print(f"{config.label:16s} {r['step']:6.3f} {r['best']:6.3f} {r['comm']:6.3f} {r['compute']:7.3f} "
              f"{r['grad sum']:6.3f} {100 * r['comm'] / r['step']:4.1f}% "
              + " ".join(f"{x:7.2f}x" for x in ratios) + f" {r['loss']:7.4f}")
    print("\nper rank per step: calls and MiB sent (ring) of each TP collective, and of the grad sum (an all-reduce)")
    print(f"{'config':16s} " + " ".join(f"{k:>20s}" for k in KINDS) + f" {'TP MiB':>8s} {'grad sum MiB':>12s}")
    for config in configs[2:]:
        r = results[config]
        cells = " ".join(f"{int(r[f'{k} calls']):>8d} {r[f'{k} MiB']:7.2f} MiB" for k in KINDS)
        total = sum(r[f"{k} MiB"] for k in KINDS)
        print(f"{config.label:16s} {cells} {total:8.2f} {r['grad MiB']:12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (divisible by 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="threads in all: tp=2 gives each rank half (even, >= 2)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh process groups per configuration, in turn")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per round")
    opts = parser.parse_args()
    if opts.threads < 2 or opts.threads % 2 or opts.seq % 2:
        parser.error("--threads must be even and >= 2, --seq even")
    configs = _configs(opts.threads)
    load = os.getloadavg()[0]
    print(f"small preset (vocab 8192), {opts.batch} x {opts.seq} tokens, fp32, forward + backward of compute_loss "
          f"+ partial-grad sum; {opts.rounds} rounds x {opts.steps} steps (+{opts.warmup} warmup) per config; "
          f"gloo; load average {load:.2f} on {os.cpu_count()} CPUs")
    steps: dict[Config, list[list[dict[str, float]]]] = {c: [] for c in configs}
    for _ in range(opts.rounds):
        for config in configs:
            per_rank = run_distributed(_worker, config.tp, args=(config, opts), timeout=1200, pg_timeout=600,
                                       nccl_rules=False)
            steps[config] += [list(ranks) for ranks in zip(*per_rank, strict=True)]
    _print({c: _medians(s) for c, s in steps.items()}, configs)


if __name__ == "__main__":
    main()
