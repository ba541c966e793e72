"""FP8 vs BF16 loss fidelity, the DeepSeek-V3 report's criterion (§3.3, App. B.1: relative loss error
consistently below 0.25%).

    PYTHONPATH=. python bench/fp8_fidelity.py                      # one seed: 300 steps x 2048 tokens per run
    PYTHONPATH=. python bench/fp8_fidelity.py --seeds 0 1 2 3 --jobs 2 --fp32 --json out.json
    PYTHONPATH=. python bench/fp8_fidelity.py --trainer            # on a Hopper GPU: the 1.4B model, ~3 runs

``--trainer`` (for a GPU) runs ``launch/train.py`` itself three times on the GPU training issue's model
(``model=v2_lite_16b model.n_layers=3 model.vocab_size=32768``, MTP off, 2 x 4096 tokens per step, the
standard library's text): BF16 + FP8 and BF16 from seed 0, and BF16 from seed 1 as the noise control; it
prints the relative difference of the smoothed loss (mean of the last 50 steps, and EMA(0.9)) of FP8
against BF16 next to the control's, FP8's as soon as its two runs are done. The runs write no checkpoint
(``checkpoint.final=false``) and each run's directory is deleted before the next starts: the disk holds one
run's logs, not 3 x ~19 GB of 1.38B checkpoints. ``--trainer-args`` adds overrides (another shape,
``train.steps``); ``--trainer-cpu`` is its dry run on this machine with the tiny model.

Trains one small DeepSeek-V3 MoE model (the ``tiny`` preset with ``FP8_TINY_OVERRIDES``: dims multiples of
128 but wkv_a's 160, MLA, dense + MoE layers, MTP) from each seed on the same batches (the project's data
pipeline: the Python standard library, byte tokenizer): once with FP8 linears (``apply_fp8``) and once with
the same linears BF16-emulated (operands rounded to bf16, fp32 arithmetic: the CPU stand-in for BF16 GEMMs,
see MACHINE.md); ``--fp32`` adds a run in fp32, the control. Everything else (embedding, head, gate, norms,
attention core) is fp32 in all runs, so they differ only in the precision of those GEMMs. The loop is the
trainer's recipe written out: AdamW (betas 0.9/0.95, decay 0.1 on matrices), warmup + cosine LR, clipping
at 1.0, the aux-loss-free gate-bias update.

Two measurements:

1. The report's: per seed, the signed relative difference of the smoothed final loss (mean of the last 50
   steps; also the EMA(0.9) the report's curves use) against the BF16 run, then mean ± standard error over
   seeds. Read it against the fp32 control: runs this short and small are chaotic. Any rounding change
   moves MoE routing and Adam's normalised steps, the curves part during the fast early descent, and the
   offset persists, so fp32 vs BF16 differs by as much as two seeds do (percents, either sign).
2. Same weights, not chaotic: every ``--probe-every`` steps along each BF16 run, the main-model loss and
   the objective's gradient on a fixed batch are computed with the linears in FP8, BF16 and fp32 on the
   very same weights; printed as FP8's and BF16's relative differences to fp32. This isolates the error
   of the arithmetic, which is what the training comparison would show without the chaos.
"""

import argparse
import json
import math
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch

from haillm.config import OptimConfig, TrainConfig
from haillm.data import DataConfig, StepBatcher, StepSampler, build_dataset
from haillm.fp8.policy import FP8_TINY_OVERRIDES, apply_precision
from haillm.models.deepseek_v3 import count_params, mtp_params
from haillm.models.deepseek_v3.args import get_preset
from haillm.models.deepseek_v3.model import DeepSeekV3
from haillm.train.optim import lr_at

SMOOTH_LAST = 50
ROOT = Path(__file__).resolve().parent.parent
PROBE_SEED = 10_000


def probe(model: DeepSeekV3, batch: torch.Tensor, run_precision: str, pow2: bool) -> dict[str, float]:
    """One model, three numerics: main-model loss and the objective's gradient on ``batch`` with the policy's
    linears in FP8, BF16-emulated and fp32, all on the same weights; returns FP8's and BF16's relative loss
    difference and relative gradient error ``|g - g_fp32| / |g_fp32|`` against fp32. Unlike the training
    comparison this is not chaotic: it is the error of the arithmetic alone."""
    results = {}
    for precision in ("default", "bf16_emulated", "fp8"):
        apply_precision(model, precision, pow2_scales=pow2)
        model.zero_grad(set_to_none=True)
        out = model.compute_loss(batch)
        out["loss"].backward()
        # an expert that receives no token under one numerics has no gradient there: count it as zeros
        grads = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in model.parameters()])
        results[precision] = (out["lm_loss"].item(), grads)
    apply_precision(model, "default" if run_precision == "fp32" else run_precision, pow2_scales=pow2)
    model.zero_grad(set_to_none=True)
    loss32, grad32 = results["default"]
    summary = {}
    for precision, name in (("fp8", "fp8"), ("bf16_emulated", "bf16")):
        loss, grad = results[precision]
        summary[f"{name}_loss_rel"] = (loss - loss32) / loss32
        summary[f"{name}_grad_rel_err"] = ((grad - grad32).norm() / grad32.norm()).item()
    return summary


def train(precision: str, args, dataset, schedule, probe_batch: torch.Tensor | None = None
          ) -> tuple[list[float], list[dict[str, float]]]:
    """Per-step main-model (next-token) loss of one run, and with ``probe_batch`` the ``probe`` results
    every ``args.probe_every`` steps (before the step's update)."""
    torch.manual_seed(args.seed)
    model = DeepSeekV3(get_preset("tiny").replace(**FP8_TINY_OVERRIDES), init_seed=args.seed)
    report = apply_precision(model, "default" if precision == "fp32" else precision, pow2_scales=args.pow2)
    print(f"[{precision}] {report.summary()}", flush=True)
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    batcher = StepBatcher(dataset, StepSampler(dataset.num_samples, args.batch, args.seed), 0, 1, args.batch)
    losses, probes, start = [], [], time.perf_counter()
    for step in range(1, args.steps + 1):
        if probe_batch is not None and (step % args.probe_every == 0 or step == 1):
            probes.append({"step": step, **probe(model, probe_batch, precision, args.pow2)})
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule)
        model.reset_moe_loads()
        out = model.compute_loss(batcher.next_step()[0])
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_gate_bias(model.moe_loads(), model.args.bias_update_speed)
        losses.append(out["lm_loss"].item())
        if step % args.log_every == 0 or step == args.steps:
            rate = step / (time.perf_counter() - start)
            print(f"[{precision}] step {step:4d}  lm loss {losses[-1]:.4f}  ({rate:.2f} steps/s)", flush=True)
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"{precision} run produced a non-finite loss")
    return losses, probes


def ema(values: list[float], coef: float = 0.9) -> list[float]:
    out, acc = [], values[0]
    for v in values:
        acc = coef * acc + (1 - coef) * v
        out.append(acc)
    return out


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def run_one(precision: str, seed: int, args) -> tuple[list[float], list[dict[str, float]]]:
    """One training run in a worker process (``--jobs``): its own thread budget, dataset and model."""
    torch.set_num_threads(args.threads)
    dataset = build_dataset(DataConfig(max_bytes=args.max_bytes), args.seq_len, min_samples=args.batch)
    schedule = SimpleNamespace(
        train=TrainConfig(steps=args.steps, lr=args.lr), optim=OptimConfig(warmup_steps=args.warmup)
    )
    probe_batch = None
    if precision == "bf16_emulated" and args.probe_every:  # a fixed batch, not drawn by the run's sampler
        sampler = StepSampler(dataset.num_samples, args.batch, PROBE_SEED + seed)
        probe_batch = StepBatcher(dataset, sampler, 0, 1, args.batch).next_step()[0]
    return train(precision, SimpleNamespace(**{**vars(args), "seed": seed}), dataset, schedule, probe_batch)


def compare(losses: list[float], base: list[float], warmup: int) -> dict[str, float]:
    """Signed relative differences of one run against its BF16 twin (same seed)."""
    last = min(SMOOTH_LAST, len(base))
    e, eb = ema(losses), ema(base)
    return {
        "final": sum(losses[-last:]) / last,
        "rel_mean_last": (sum(losses[-last:]) - sum(base[-last:])) / sum(base[-last:]),
        "rel_ema_final": (e[-1] - eb[-1]) / eb[-1],
        "max_rel_ema_gap": max((rel(a, b) for a, b in zip(e[warmup:], eb[warmup:], strict=True)), default=0.0),
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, (sum((v - m) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5


GPU_MODEL = ["model=v2_lite_16b", "model.n_layers=3", "model.vocab_size=32768", "model.mtp_depth=0",
             "train.seq_len=4096", "train.micro_batch_size=2", "train.global_batch_size=2", "train.lr=4.2e-4"]
CPU_MODEL = ["model=tiny", "train.steps=60", "train.seq_len=64", "optim.warmup_steps=5"]


def trainer_losses(overrides: list[str], run_dir: Path) -> list[float]:
    """One ``launch/train.py`` run in its own process; its per-step losses from ``metrics.jsonl``. No checkpoint
    is written (``checkpoint.final=false``, an interval past the run's end: a 1.38B run's would be ~19 GB of a
    64 GiB disk), and the run directory is deleted once read, whatever happened, so the disk use is bounded by
    one run's logs."""
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), *overrides, f"output_dir={run_dir}",
           "logging.progress=false", "checkpoint.interval=1000000", "checkpoint.final=false"]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        saved = list((run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").is_dir() else []
        if saved:  # a preemption still saves one; say so, it is deleted below
            print(f"note: the run wrote checkpoints {sorted(p.name for p in saved)} (deleted now)", flush=True)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r and "step" in r]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def trainer_main(args) -> None:
    """``--trainer``: FP8 vs BF16 from one seed and BF16 from another, each a full ``launch/train.py`` run."""
    base = (CPU_MODEL if args.trainer_cpu else GPU_MODEL + [f"train.steps={args.steps}"]) + args.trainer_args
    runs = {"bf16+fp8 seed 0": ["seed=0", "fp8.enabled=true"], "bf16 seed 0": ["seed=0"], "bf16 seed 1": ["seed=1"]}
    dtype = [] if args.trainer_cpu else ["train.dtype=bf16"]  # CPU: its default (fp32) runs, a dry run
    print(f"trainer runs: {' '.join(base + dtype)}")
    losses = {}

    def report(name: str) -> None:
        ref = losses["bf16 seed 0"]
        warmup = min(20, len(ref) // 4)
        c = compare(losses[name], ref, warmup)
        print(f"{name} vs bf16 seed 0: smoothed final loss (mean of last {SMOOTH_LAST}) "
              f"{100 * c['rel_mean_last']:+.3f}%, EMA(0.9) {100 * c['rel_ema_final']:+.3f}%, "
              f"largest EMA gap after warm-up {100 * c['max_rel_ema_gap']:.3f}%", flush=True)
        if name == "bf16+fp8 seed 0":
            fp8 = abs(c["rel_mean_last"])
            print(f"FP8 gap {100 * fp8:.3f}% (DeepSeek-V3's bound 0.25%): {'within' if fp8 < 0.0025 else 'ABOVE'}",
                  flush=True)
        if args.json:  # rewritten after each run: a timeout keeps what finished
            with open(args.json, "w") as f:
                json.dump({"overrides": base + dtype, "losses": losses}, f)

    # each comparison is printed as soon as its runs are done (FP8's after the second run), and each run's
    # directory is gone before the next starts (trainer_losses): a timeout or a full disk loses the least
    with tempfile.TemporaryDirectory(prefix="fp8_fidelity_") as tmp:
        for i, (name, extra) in enumerate(runs.items()):
            start = time.time()
            losses[name] = trainer_losses(base + dtype + extra, Path(tmp) / str(i))
            print(f"{name}: {len(losses[name])} steps in {time.time() - start:.0f} s, "
                  f"loss {losses[name][0]:.4f} -> {losses[name][-1]:.4f}", flush=True)
            if name == "bf16 seed 0":
                report("bf16+fp8 seed 0")
            elif name == "bf16 seed 1":
                report(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one FP8/BF16 pair per seed")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--max-bytes", type=int, default=2_000_000)
    parser.add_argument("--pow2", action="store_true", help="FP8 with power-of-two scales (fp8.pow2_scales)")
    parser.add_argument("--fp32", action="store_true", help="add an fp32 control run per seed (the noise floor)")
    parser.add_argument("--probe-every", type=int, default=25,
                        help="same-weights probe along the BF16 runs every N steps (0: off)")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--json", help="write per-step losses and the summary here")
    parser.add_argument("--trainer", action="store_true", help="GPU: three launch/train.py runs (module doc)")
    parser.add_argument("--trainer-cpu", action="store_true", help="--trainer's dry run on CPU, tiny model")
    parser.add_argument("--trainer-args", nargs="*", default=[], help="more overrides for --trainer")
    args = parser.parse_args()
    if args.trainer or args.trainer_cpu:
        trainer_main(args)
        return

    model_args = get_preset("tiny").replace(**FP8_TINY_OVERRIDES)
    (total, active), (mtp_total, _) = count_params(model_args), mtp_params(model_args)
    counts = {"total": total + mtp_total, "main_model": total, "main_activated": active, "mtp": mtp_total}
    tokens = args.steps * args.batch * args.seq_len
    print(f"model: tiny + {FP8_TINY_OVERRIDES}")
    print(
        f"params: {(total + mtp_total) / 1e6:.2f}M total ({total / 1e6:.2f}M main model, {active / 1e6:.2f}M "
        f"activated per token; MTP {mtp_total / 1e6:.2f}M)"
    )
    print(
        f"tokens per run: {tokens} ({args.steps} steps x {args.batch} x {args.seq_len}); seeds {args.seeds}; "
        f"{args.jobs} parallel runs x {args.threads} CPU threads"
    )

    precisions = ["fp8", "bf16_emulated"] + (["fp32"] if args.fp32 else [])
    jobs = [(p, seed) for seed in args.seeds for p in precisions]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(run_one, *zip(*jobs, strict=True), [args] * len(jobs)))
    else:
        results = [run_one(p, seed, args) for p, seed in jobs]
    runs = {job: losses for job, (losses, _) in zip(jobs, results, strict=True)}
    probes = [p for job, (_, found) in zip(jobs, results, strict=True) for p in found]

    summary: dict = {"steps": args.steps, "tokens": tokens, "params": counts, "seeds": args.seeds}
    for name in precisions[::2]:  # fp8 and fp32 against bf16
        per_seed = {s: compare(runs[name, s], runs["bf16_emulated", s], args.warmup) for s in args.seeds}
        for s, c in per_seed.items():
            print(
                f"seed {s}: {name} {c['final']:.4f} vs bf16 {per_seed[s]['final'] / (1 + c['rel_mean_last']):.4f} "
                f"(mean of last {SMOOTH_LAST} steps): {100 * c['rel_mean_last']:+.3f}%; EMA(0.9) final "
                f"{100 * c['rel_ema_final']:+.3f}%; largest EMA gap after warmup {100 * c['max_rel_ema_gap']:.3f}%"
            )
        diffs = [c["rel_mean_last"] for c in per_seed.values()]
        m, sd = mean_std(diffs)
        finals = [c["final"] for c in per_seed.values()]
        bases = [c["final"] / (1 + c["rel_mean_last"]) for c in per_seed.values()]
        pooled = (sum(finals) - sum(bases)) / sum(bases)
        summary[name] = {"per_seed": per_seed, "mean_rel": m, "std_rel": sd, "pooled_rel": pooled}
        stderr = f" ± {100 * sd / len(diffs) ** 0.5:.3f}% (std error over {len(diffs)} seeds)" if len(diffs) > 1 else ""
        print(
            f"{name} vs bf16: relative difference of the smoothed final loss {100 * m:+.3f}%{stderr}; "
            f"mean |difference| {100 * sum(map(abs, diffs)) / len(diffs):.3f}% (DeepSeek-V3: < 0.25%)"
        )
    if probes:
        summary["same_weights"] = {}
        print(
            f"same weights (every {args.probe_every} steps along the BF16 runs, {len(probes)} probes on a fixed "
            f"batch): mean (largest) |relative difference| to fp32"
        )
        for name in ("fp8", "bf16"):
            loss_rel = [abs(p[f"{name}_loss_rel"]) for p in probes]
            grad_err = [p[f"{name}_grad_rel_err"] for p in probes]
            summary["same_weights"][name] = {"loss_rel": loss_rel, "grad_rel_err": grad_err}
            print(
                f"  {name:4s}: main-model loss {100 * sum(loss_rel) / len(loss_rel):.4f}% "
                f"({100 * max(loss_rel):.4f}%), gradient {100 * sum(grad_err) / len(grad_err):.2f}% "
                f"({100 * max(grad_err):.2f}%)"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "losses": {f"{p}/{s}": v for (p, s), v in runs.items()},
                       "probes": probes}, f)


if __name__ == "__main__":
    main()
