"""Training speed on one GPU: the trainer's full optimizer step in BF16, with regional torch.compile and with
FP8, our model's forward + backward (eager and compiled) against transformers' DeepseekV3, and the top
kernels of one profiled step, eager and compiled.

    PYTHONPATH=. python bench/gpu_train.py                      # the GPU issue's configuration, <= ~4 min
    PYTHONPATH=. python bench/gpu_train.py --layers 4 --seq 2048 --batch 4 --steps 6
    PYTHONPATH=. python bench/gpu_train.py --sections trainer   # any of: trainer, model, profile

Default configuration (the GPU training issue's): ``model=v2_lite_16b model.n_layers=3
model.vocab_size=32768``, MTP off, micro-batch 2 x 4096 tokens, one process. MFU is model FLOPs per token
(``haillm.models.deepseek_v3.flops``, the trainer's own count) x tokens/s over 989 TFLOP/s (H100/H200 dense
BF16 datasheet); ``--peak-tflops`` changes it.

1. trainer: ``Trainer.train_step`` (forward, backward, ZeRO-1 reduction, clipping, AdamW on the fp32 masters,
   parameter all-gather, bias update) on synthetic tokens, built exactly as ``launch/train.py`` builds a run;
   BF16 (``train.dtype=bf16``), BF16 with ``fp8.enabled=true`` and BF16 with ``train.compile=true``. Median
   step time after warm-up steps, tokens/s, MFU, peak memory (the last step's ``peak_memory_gib``: the
   step's ``torch.cuda.max_memory_allocated``) against the planner's (``planned``: ``haillm.tools.plan``'s
   total for the same overrides), and the first step's time apart: with compile on it holds
   the compilation (``compile s`` = first step - median step).
2. model: forward + backward of next-token cross-entropy, ours (``compute_loss``) eager and with the
   blocks compiled (``haillm.train.compile.apply_compile``), and transformers' ``DeepseekV3ForCausalLM``
   with the same weights (ours written with ``save_hf``, read by ``from_pretrained``), same batch, all with
   bf16 parameters; median ms, MFU, the ratio, peak memory (``max_memory_allocated``, parameters and
   gradients included: torchtitan's 10.4 GiB on an H200 is the figure to stay under), and the first call
   apart (compiled: graphs already compiled for the trainer's shapes are reused from dynamo's cache, so it
   is mostly not a fresh compile).
3. profile: one trainer step under ``torch.profiler``, eager and compiled: CPU time vs GPU time (a
   launch-bound step has more CPU than GPU time), the ``aten::mm`` count, and the top kernels by GPU time.

Sections and variants run in that order until ``--time-budget`` seconds have passed (the rest print
"skipped"), so that the run ends inside ``bench/gpu_run.sh``'s limit for its part with every finished line
printed. Each trainer is built, measured and released inside one function (``with_trainer``): none is alive
while the next is built, which would inflate the next variant's peak memory; a variant that raises prints
its traceback and the others still run.

Without CUDA it prints one line and exits 0 (``--cpu`` runs a tiny configuration on CPU: a dry run of
every section for this script itself).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("launch_train", ROOT / "launch" / "train.py")
launch_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch_train)

from haillm.config import compose_config, resolve_dtype, to_model_args, validate  # noqa: E402
from haillm.fp8.policy import apply_fp8  # noqa: E402
from haillm.models.deepseek_v3.flops import flops_per_token  # noqa: E402
from haillm.parallel.mesh import ParallelDims  # noqa: E402
from haillm.tools.plan import make_plan  # noqa: E402
from haillm.train.optim import build_optimizer  # noqa: E402
from haillm.train.trainer import Trainer  # noqa: E402


class SyntheticBatcher:
    """Random tokens in the trainer's batcher interface: the data pipeline is not what is measured here."""

    def __init__(self, n_micro: int, micro_batch: int, seq_len: int, vocab: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.batches = [torch.randint(0, vocab, (micro_batch, seq_len + 1), generator=gen) for _ in range(n_micro)]

    def next_step(self) -> list[torch.Tensor]:
        return self.batches

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


def overrides(a: argparse.Namespace, *extra: str) -> list[str]:
    return [f"model={a.model}", f"model.n_layers={a.layers}", f"model.vocab_size={a.vocab}", "model.mtp_depth=0",
            f"train.seq_len={a.seq}", f"train.micro_batch_size={a.batch}", f"train.global_batch_size={a.batch}",
            f"train.peak_flops={a.peak_tflops * 1e12}", "logging.progress=false", *extra]


def build_trainer(a: argparse.Namespace, device: torch.device, *extra: str) -> Trainer:
    """What ``launch/train.py``'s ``run`` builds for one process, with synthetic tokens and no run directory."""
    cfg = compose_config(overrides(a, *extra))
    validate(cfg, 1)
    resolve_dtype(cfg, device.type)
    dims = ParallelDims.from_config(cfg.parallel, 1).build(device.type)
    model, dispatcher = launch_train.build_model(cfg, dims, device)
    optimizer = build_optimizer(model, cfg, dims)
    if cfg.fp8.enabled:
        apply_fp8(model, True, cfg.fp8.pow2_scales, cfg.fp8.wgrad)
    batcher = SyntheticBatcher(1, a.batch, a.seq, a.vocab)
    run_dir = Path(tempfile.mkdtemp(prefix="gpu_train_"))
    return Trainer(cfg, dims, model, optimizer, batcher, run_dir, device,
                   flops_per_token(to_model_args(cfg.model), a.seq), dispatcher)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_and_median(fn: Callable[[], object], device: torch.device, a: argparse.Namespace,
                     before: Callable[[], object] | None = None) -> tuple[float, float]:
    """Seconds of ``fn``'s first call (compilation shows there) and the median after ``a.warmup`` more, over
    ``a.steps`` timed calls; ``before`` runs untimed ahead of each call."""
    times = []
    for _ in range(1 + a.warmup + a.steps):
        if before is not None:
            before()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1 + a.warmup :])


def free(device: torch.device) -> None:
    """Collect what the last variant left (compiled models are reference cycles) and return the cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def with_trainer(a: argparse.Namespace, device: torch.device, extra: list[str],
                 measure: Callable[[Trainer], dict]) -> dict:
    """Build a trainer, ``measure`` it and release it: the trainer lives only in ``_use_trainer``'s frame, so
    nothing of it is alive when the next variant is built (a variable in the caller's loop would keep it, and
    with it about 23 GiB on the GPU configuration, while the next one is built). Checked: after the frame is
    gone, the garbage collected and the cache emptied, a weak reference to the trainer must be dead; ``--cpu``
    asserts it, a GPU run prints a warning (the next variant's peak would be inflated)."""
    result, ref = _use_trainer(a, device, extra, measure)
    free(device)
    if ref() is not None:
        referrers = [type(r).__name__ for r in gc.get_referrers(ref())]
        print(f"WARNING: the trainer ({' '.join(extra)}) is still alive after its release (referred to by "
              f"{referrers[:8]}): the next variant's peak memory includes it", flush=True)
        assert not a.cpu, "--cpu dry run: a released trainer is still alive"
    elif a.cpu:
        print(f"  (--cpu check: the trainer of {' '.join(extra) or 'the variant'} is freed)", flush=True)
    return result


def _use_trainer(a: argparse.Namespace, device: torch.device, extra: list[str],
                 measure: Callable[[Trainer], dict]) -> tuple[dict, weakref.ref]:
    trainer = build_trainer(a, device, *extra)
    try:
        return measure(trainer), weakref.ref(trainer)
    finally:  # its optimizer's hooks reference the optimizer from tensors the garbage collector does not traverse
        trainer.optimizer.close()
        shutil.rmtree(trainer.run_dir, ignore_errors=True)


def planned_gib(a: argparse.Namespace, device: torch.device, extra: list[str]) -> float:
    """The planner's peak for the variant (``haillm.tools.plan``, parameters to activations, H100 rules: the
    same kernels' FP8 choice as the run), to set against the measured ``max_memory_allocated``."""
    gpu = "h100" if device.type == "cuda" else "cpu"
    return make_plan(overrides(a, *extra), gpus=1, gpu=gpu)["memory_bytes_per_rank"]["total"] / 2**30


def trainer_section(a: argparse.Namespace, device: torch.device) -> None:
    print(f"\n== trainer: full optimizer step, {a.batch} x {a.seq} tokens ==")
    print(f"{'variant':>13} {'step ms':>9} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9} {'planned':>8} {'loss':>8} "
          f"{'1st step s':>10}")
    base = None
    # the quick ones first: a compiled variant spends its first step compiling (a minute or more on a GPU)
    variants = (("bf16", ["train.dtype=bf16"]), ("bf16+fp8", ["train.dtype=bf16", "fp8.enabled=true"]),
                ("bf16+compile", ["train.dtype=bf16", "train.compile=true"]))
    for name, extra in variants:
        if out_of_time(a, name):
            continue

        def measure(trainer: Trainer) -> dict:
            records = []
            first, step = first_and_median(lambda: records.append(trainer.train_step()), device, a)
            return {"first": first, "step": step, "record": records[-1], "fpt": trainer.flops_per_token,
                    "peak": trainer.peak}

        try:
            r = with_trainer(a, device, extra, measure)
        except Exception:  # one broken variant (e.g. FP8 on a new GPU) must not cost the others' figures
            traceback.print_exc()
            print(f"{name:>13} FAILED (traceback above)", flush=True)
            free(device)
            assert not a.cpu, f"--cpu dry run: variant {name} failed"
            continue
        first, step, record = r["first"], r["step"], r["record"]
        tokens = a.batch * a.seq / step
        mfu = r["fpt"] * tokens / r["peak"]
        base = base or step
        compile_note = f", compile {first - step:.1f} s" if "compile" in name else ""
        planned = planned_gib(a, device, extra)
        print(f"{name:>13} {step * 1e3:9.1f} {tokens:10.0f} {mfu:7.1%} {record['peak_memory_gib']:9.2f} "
              f"{planned:8.2f} {record['loss']:8.4f} {first:10.1f}  ({base / step:.2f}x bf16{compile_note}; "
              f"planned/peak {planned / max(record['peak_memory_gib'], 1e-9):.2f})", flush=True)


def model_section(a: argparse.Namespace, device: torch.device) -> None:
    import transformers

    from haillm.models.deepseek_v3.hf import save_hf
    from haillm.models.deepseek_v3.model import DeepSeekV3
    from haillm.ops.precision import cast_parameters
    from haillm.train.compile import apply_compile

    args = to_model_args(compose_config(overrides(a)).model)
    print(f"\n== model forward+backward, bf16 parameters, {a.batch} x {a.seq} tokens ==")
    with torch.device(device):  # initialised where it runs: serial CPU sampling of 1.4B weights takes ~8 s
        ours = DeepSeekV3(args, init_seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(ours, tmp)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16)
    ours = cast_parameters(ours, torch.bfloat16).to(device).train()
    theirs = theirs.to(device).train()
    batch = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=torch.Generator().manual_seed(1)).to(device)

    def step_of(model: DeepSeekV3):
        def step() -> None:
            model.compute_loss(batch)["loss"].backward()
            model.reset_moe_loads()

        return step

    def theirs_step() -> None:
        logits = theirs(batch[:, :-1]).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten()).backward()

    fpt = flops_per_token(args, a.seq)
    results = {}
    for name in ("ours", "ours+compile", "transformers"):
        if out_of_time(a, name):
            continue
        if name == "ours+compile":  # the same weights, blocks compiled: the eager copy is not needed any more
            apply_compile(ours)
        model = theirs if name == "transformers" else ours
        fn = theirs_step if name == "transformers" else step_of(ours)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        first, t = first_and_median(fn, device, a, before=lambda m=model: m.zero_grad(set_to_none=True))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        results[name] = (t, first, peak)
    ref = results.get("transformers", (None,))[0]
    for name, (t, first, peak) in results.items():
        mfu = fpt * a.batch * a.seq / t / (a.peak_tflops * 1e12)
        ratio = f", {ref / t:.2f}x transformers" if ref else ""
        print(f"{name:>13} {t * 1e3:8.1f} ms  MFU {mfu:6.1%}  peak {peak:.2f} GiB  (1st call {first:.1f} s{ratio})",
              flush=True)


def profile_section(a: argparse.Namespace, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile

    for name, extra in (("bf16", []), ("bf16+compile", ["train.compile=true"])):
        if out_of_time(a, f"profile {name}"):
            continue
        print(f"\n== profile: one {name} trainer step ==")

        def measure(trainer: Trainer) -> dict:
            for _ in range(a.warmup):
                trainer.train_step()
            sync(device)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                trainer.train_step()
                sync(device)
            return {"events": prof.key_averages()}

        events = with_trainer(a, device, ["train.dtype=bf16", *extra], measure)["events"]
        sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        device_us = sum(e.self_device_time_total for e in events) if device.type == "cuda" else 0.0
        cpu_us = max((e.cpu_time_total for e in events if e.key == "ProfilerStep*"), default=0.0) or sum(
            e.self_cpu_time_total for e in events)
        mm_calls = sum(e.count for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
        print(f"CPU time {cpu_us / 1e3:.1f} ms, GPU time {device_us / 1e3:.1f} ms, {mm_calls} mm/addmm/bmm calls")
        print(events.table(sort_by=sort, row_limit=a.top), flush=True)


def out_of_time(a: argparse.Namespace, what: str) -> bool:
    """True (after saying so) once ``--time-budget`` seconds have passed since the start."""
    elapsed = time.monotonic() - a.start
    if elapsed <= a.time_budget:
        return False
    print(f"{what}: skipped, {elapsed:.0f} s of the {a.time_budget:.0f} s time budget used", flush=True)
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="v2_lite_16b")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--sections", nargs="+", default=["trainer", "model", "profile"],
                   choices=["trainer", "model", "profile"])
    p.add_argument("--time-budget", type=float, default=180.0,
                   help="seconds after which no further section or variant starts (bench/gpu_run.sh gives "
                   "each part a limit about 60 s above the budget it passes)")
    p.add_argument("--cpu", action="store_true", help="dry run on CPU with a tiny configuration")
    a = p.parse_args()
    a.start = time.monotonic()
    logging.basicConfig(level=logging.WARNING)
    if a.cpu:
        a.model, a.layers, a.vocab, a.batch, a.seq, a.steps, a.warmup = "tiny", 4, 512, 2, 64, 2, 1
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_train: no CUDA device; nothing to measure (pass --cpu for a dry run)")
        return 0
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}; "
          f"model={a.model} layers={a.layers} vocab={a.vocab} batch={a.batch} seq={a.seq}")
    for section in a.sections:
        if out_of_time(a, f"section {section}"):
            continue
        {"trainer": trainer_section, "model": model_section, "profile": profile_section}[section](a, device)
        free(device)  # the section's models (compiled ones are reference cycles) before the next section's
    return 0


if __name__ == "__main__":
    sys.exit(main())
