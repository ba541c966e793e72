"""Per-step metrics: MFU, the metrics.jsonl sink, Weights & Biases, TensorBoard and the console progress bar.

MFU = flops_per_token x tokens/s / (peak FLOP/s x devices). FLOPs per token come from the model's
own formula (`haillm.models.deepseek_v3.flops.flops_per_token`: 6 x activated matmul parameters,
including MLA, the activated experts, the head and MTP, plus the attention term), so the MFU the trainer
prints and the one a planner estimates are the same number.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Dense BF16 peak per GPU (vendor figures), used when train.peak_flops is 0.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "H20": 148e12, "A100": 312e12, "A800": 312e12}
# fp32 matmul throughput of one core of the 2-core development machine (shared/MACHINE.md: ~56 GFLOP/s
# with 1 thread, ~100-109 with 2); a CPU "MFU" is relative to this measured figure, not a vendor peak.
CPU_FLOPS_PER_THREAD = 50e9


def peak_flops(device: torch.device, override: float = 0.0) -> tuple[float, str]:
    """Peak FLOP/s of one device and where the figure comes from."""
    return named_peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else None, override)


def named_peak_flops(gpu_name: str | None, override: float = 0.0) -> tuple[float, str]:
    """``peak_flops`` of a GPU by name (``None``: this process's CPU, ``torch.get_num_threads()`` threads), so
    that the layout planner prices a device it does not have exactly as the trainer will."""
    if override > 0:
        return override, "train.peak_flops"
    if gpu_name is not None:
        for key, value in GPU_PEAK_FLOPS.items():
            if key in gpu_name:
                return value, f"{gpu_name} dense BF16"
        return 0.0, f"unknown GPU {gpu_name}: set train.peak_flops for MFU"
    threads = torch.get_num_threads()
    return CPU_FLOPS_PER_THREAD * threads, f"CPU fp32 {threads} thread(s) x 50 GFLOP/s (measured)"


def reset_peak_memory(device: torch.device) -> None:
    """Start a step's peak-memory window (CUDA keeps a resettable peak; a CPU process only its lifetime peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """This rank's peak memory: on CUDA the bytes allocated at the peak since ``reset_peak_memory`` (what
    limits the layout), on CPU the process's peak resident set size since it started."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kilobytes


class JsonlSink:
    """Appends one JSON object per line and flushes it, so a crash loses at most the current step."""

    def __init__(self, path: Path, after_step: int = 0):
        self.path = Path(path)
        _truncate_after(self.path, after_step)
        self.file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop records of steps after the checkpoint: they are about to be trained again."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        tmp.replace(path)


class WandbSink:
    """Weights & Biases in `offline` or `online` mode, writing under the run directory."""

    def __init__(self, mode: str, project: str, name: str, run_dir: Path, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(mode=mode, project=project, name=name or run_dir.name, dir=str(run_dir),
                              config=config, resume="allow")

    def write(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class TensorBoardSink:
    """TensorBoard event files under ``run_dir/tensorboard`` (``logging.tensorboard``): every numeric metric of a
    step as a scalar at that step. On resume the events of steps after the checkpoint are purged (TensorBoard
    drops them from the earlier files), as ``JsonlSink`` drops its records, so a curve has one value per step."""

    def __init__(self, run_dir: Path, after_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        purge = after_step + 1 if after_step else None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def write(self, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, global_step=record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


STEP_LOG = "haillm.steps"  # the plain step lines: stdout and train.log (launch/train.py keeps them off stderr)


def step_line(record: dict, total: int) -> str:
    """One plain line for a step: the LM loss first (what eval_loss measures too), then the full objective."""
    parts = [f"step {record['step']}/{total}", f"lm_loss {record['lm_loss']:.4f}"]
    if "eval_loss" in record:
        parts.append(f"eval lm_loss {record['eval_loss']:.4f}")
    parts += [f"loss {record['loss']:.4f} (+mtp {record['mtp_loss']:.4f}, +balance {record['balance_loss']:.2g})",
              f"lr {record['lr']:.3g}", f"grad_norm {record['grad_norm']:.3g}",
              f"{record['tokens_per_s']:.0f} tokens/s", f"mfu {100 * record['mfu']:.1f}%",
              f"mem {record['peak_memory_gib']:.1f} GiB"]
    if record.get("skipped"):
        parts.append("skipped")
    return " | ".join(parts)


class Progress:
    """Rank 0's view of the run: a tqdm bar (``bar``, when stdout is a terminal) showing the LM loss, tokens/s and
    the ETA, and every ``interval`` steps a plain line (``step_line``) in train.log, and on stdout when it is not
    a terminal (a redirected bar would be ``\\r``-joined junk there); a no-op elsewhere (``enabled`` False)."""

    def __init__(self, enabled: bool, total: int, initial: int, interval: int = 0, bar: bool = True):
        self.bar, self.eval_loss, self.total, self.interval = None, None, total, interval if enabled else 0
        self.to_stdout = not sys.stdout.isatty()
        if enabled and bar and not self.to_stdout:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, record: dict) -> None:
        if self.interval and (record["step"] % self.interval == 0 or record["step"] == self.total):
            line = step_line(record, self.total)
            logging.getLogger(STEP_LOG).info(line)
            if self.to_stdout:
                print(line, flush=True)
        if self.bar is not None:
            self.eval_loss = record.get("eval_loss", self.eval_loss)  # the latest evaluation stays shown
            extra = {} if self.eval_loss is None else {"eval_lm_loss": f"{self.eval_loss:.4f}"}
            self.bar.set_postfix(lm_loss=f"{record['lm_loss']:.4f}", **extra, tok_s=f"{record['tokens_per_s']:.0f}",
                                 mem=f"{record['peak_memory_gib']:.1f}G", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
