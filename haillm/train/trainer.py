"""The training loop: gradient accumulation, clipping, the non-finite guard, balancing, metrics, checkpoints, and
the EMA of the parameters (`train.ema_decay`)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from haillm.fp8.policy import invalidate_weight_caches
from haillm.models.deepseek_v3.balance import max_violation
from haillm.parallel.expert import AllToAllDispatcher
from haillm.parallel.mesh import ParallelDims
from haillm.parallel.pipeline.runtime import PipelineRuntime
from haillm.parallel.pipeline.stage import sum_partner_grads
from haillm.parallel.zero import ZeroAdamW
from haillm.train import checkpoint
from haillm.train.compile import compiled_regions
from haillm.train.ema import ParameterEMA
from haillm.train.evaluate import Evaluator
from haillm.train.health import LossHealth
from haillm.train.metrics import (
    JsonlSink,
    Progress,
    TensorBoardSink,
    WandbSink,
    peak_flops,
    peak_memory_bytes,
    reset_peak_memory,
)
from haillm.train.optim import lr_at, resume_origin, schedule_of
from haillm.train.preemption import Preemption
from haillm.train.watchdog import Watchdog

log = logging.getLogger(__name__)
LOSS_KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss")


class TrainingAborted(RuntimeError):
    """Too many consecutive steps were skipped (non-finite loss or gradient norm, loss spikes)."""


@dataclass
class Pipeline:
    """What a pipeline-parallel step needs besides the stage model: the schedule's runtime, and the rank
    (DualPipe mirror, or 1F1B's last rank for the MTP embedding) whose copies of parameters it shares."""

    runtime: PipelineRuntime
    partner: dist.ProcessGroup | None
    partner_params: list[tuple[str, torch.nn.Parameter]]
    mirrored: bool  # DualPipe: the partner holds the same stages (all of them), fed the other half of the data


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    consumed_samples: int = 0  # global data position: sequences consumed by all ranks together
    skipped_steps: int = 0
    consecutive_skipped: int = 0
    lr_origin: dict | None = None  # where the LR schedule starts after a resume that changed it (optim.lr_at)


class Trainer:
    """Runs optimizer steps of `train.global_batch_size` sequences, split into micro-batches per rank."""

    def __init__(self, cfg: DictConfig, dims: ParallelDims, model: torch.nn.Module, optimizer: ZeroAdamW,
                 batcher, run_dir: Path, device: torch.device, flops_per_token: float,
                 dispatcher: AllToAllDispatcher | None = None, pipeline: Pipeline | None = None,
                 evaluator: Evaluator | None = None):
        self.cfg, self.dims, self.model, self.optimizer, self.batcher = cfg, dims, model, optimizer, batcher
        self.dispatcher, self.pipeline, self.evaluator = dispatcher, pipeline, evaluator
        self.run_dir, self.device, self.flops_per_token = Path(run_dir), device, flops_per_token
        self.is_logging_rank = dims.is_rank0
        # parameter all-gathers overlap the next forward; a compiled region waits at its entry
        optimizer.register_forward_wait(model, regions=compiled_regions(model))
        self.state = TrainState()
        self.health = LossHealth(cfg.train.loss_spike_factor, cfg.train.loss_spike_window)
        self.checkpointer = checkpoint.Checkpointer(run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save,
                                                    OmegaConf.to_yaml(cfg, resolve=True),
                                                    timedelta(seconds=cfg.train.collective_timeout_s))
        self.ema: ParameterEMA | None = None  # host-memory EMA of this rank's parameters (haillm.train.ema)
        if cfg.train.ema_decay > 0:
            self.ema = ParameterEMA(model, cfg.train.ema_decay)
            if self.is_logging_rank:
                log.info("train.ema_decay=%g: EMA of the parameters in host memory, %.1f MiB on this rank (with its "
                         "staging copy)", cfg.train.ema_decay, self.ema.bytes / 2**20)
        self.stopped_by: str | None = None  # the signal that preempted the run
        self.abort: str | None = None  # why the run must stop after this step (too many skipped steps)
        self.peak, peak_source = peak_flops(device, cfg.train.peak_flops)
        if self.is_logging_rank:
            log.info("MFU peak: %.3g FLOP/s per device (%s); %.4g FLOPs per token", self.peak, peak_source,
                     flops_per_token)

    def resume(self) -> None:
        """Continue from the newest complete checkpoint (`checkpoint.resume=auto`) or the one named."""
        where = self.cfg.checkpoint.resume
        if where == "none":
            return
        if self.cfg.checkpoint.finetune:  # the weights (fp32 masters) and nothing else: step 0, new data, fresh Adam
            checkpoint.resume_from(Path(where), self.model, self.optimizer, rng=False)
            self.optimizer.reset_moments()
            invalidate_weight_caches(self.model)
            self._restart_ema("checkpoint.finetune: the EMA of the parameters starts from the loaded weights")
            log.info("checkpoint.finetune: the weights of %s, the optimizer, data and schedule from the start", where)
            return
        if where == "auto":
            saved = checkpoint.resume(self.run_dir, self.model, self.optimizer, self.ema)
        else:
            saved = checkpoint.resume_from(Path(where), self.model, self.optimizer, ema=self.ema)
        if saved is None:
            log.info("checkpoint.resume=auto: no checkpoint in %s, starting from step 0", self.run_dir)
            return
        invalidate_weight_caches(self.model)
        if self.ema is not None and not self.ema.restored:
            self._restart_ema(f"train.ema_decay={self.cfg.train.ema_decay:g}: the checkpoint holds no EMA of the "
                              "parameters (saved with train.ema_decay=0); the EMA starts from the loaded parameters")
        self.state = TrainState(**{k: saved.get(k, v) for k, v in asdict(TrainState()).items()})
        self.state.lr_origin = resume_origin(saved, self.cfg)
        self.health.load_state_dict(saved.get("health", {}))
        self.batcher.load_state_dict(saved["data"])
        log.info("resumed from step %d (%d samples consumed)", self.state.step, self.state.consumed_samples)

    def _restart_ema(self, why: str) -> None:
        """Start the EMA (if any) from the parameters as loaded, saying `why` in the log."""
        if self.ema is not None:
            self.optimizer.wait_params()
            self.ema.reset()
            log.info(why)

    def fit(self) -> list[dict]:
        """Train to `train.steps`; returns this run's step records (rank 0 also writes them out).

        Stops early, after a checkpoint, when a signal reaches any rank (`stopped_by`); a stalled, dead or
        failing rank ends the run with a `PeerFailure` naming it (haillm.train.watchdog)."""
        cfg = self.cfg
        sinks = self._open_sinks() if self.is_logging_rank else []
        progress = Progress(self.is_logging_rank, cfg.train.steps, self.state.step, cfg.logging.log_interval,
                            bar=cfg.logging.progress)
        records = []
        pipeline = self.pipeline
        # Left out of the collective counts: the pipeline's point-to-point groups (its transfers are compared on
        # their own), and the background checkpoint writer's, in which ranks legitimately differ mid-write.
        p2p_groups = pipeline.runtime.links.all() if pipeline else []
        watchdog = Watchdog(cfg.train.collective_timeout_s, cfg.train.watchdog_factor,
                            [*p2p_groups, self.checkpointer.group],
                            pipeline.runtime.p2p_posted if pipeline else None)
        try:
            with Preemption(self.device) as preemption, watchdog:
                while self.state.step < cfg.train.steps:
                    with watchdog.step_of(self.state.step + 1):
                        record = self.train_step()
                    if self.evaluator is not None and self.evaluator.due(self.state.step):
                        record |= self.evaluator.run()
                        watchdog.progress()  # the timeout bounds each piece of work between steps, not their sum
                    records.append(record)
                    for sink in sinks:
                        sink.write(record)
                    progress.update(record)
                    if self.abort is not None:  # after the step's bookkeeping: one consistent state to save
                        raise TrainingAborted(self.abort)
                    self.stopped_by = preemption.agreed()
                    last = self.state.step == cfg.train.steps
                    if (last and cfg.checkpoint.final) or self.stopped_by or \
                            self.state.step % cfg.checkpoint.interval == 0:
                        self.save_checkpoint()
                        watchdog.progress()
                    if self.stopped_by:
                        break
                path = self.checkpointer.wait()
                if self.stopped_by and self.is_logging_rank:
                    print(f"haillm: stopped by {self.stopped_by} after step {self.state.step}; checkpoint {path} "
                          "(continue with checkpoint.resume=auto)", flush=True)
        except TrainingAborted as exc:  # keep what the skipped steps did not spoil, e.g. to retry at a lower lr
            path = self.save_checkpoint(wait=True)  # the aborting step is never saved yet
            raise TrainingAborted(f"{exc}; the state after step {self.state.step} is in {path}") from None
        finally:
            self.batcher.close()  # no prefetch thread outlives the run
            if self.ema is not None:
                self.ema.close()
            progress.close()
            for sink in sinks:
                sink.close()
        return records

    def save_checkpoint(self, wait: bool = False) -> Path:
        """Checkpoint the state after the last step (asynchronously with checkpoint.async_save)."""
        self.optimizer.wait_params()
        trainer_state = {**asdict(self.state), "data": self.batcher.state_dict(), "health": self.health.state_dict(),
                         "schedule": schedule_of(self.cfg)}
        path = self.checkpointer.save(self.state.step, self.model, self.optimizer, trainer_state, self.ema)
        return self.checkpointer.wait() if wait else path

    def _open_sinks(self) -> list:
        sinks: list = [JsonlSink(self.run_dir / "metrics.jsonl", after_step=self.state.step)]
        if self.cfg.logging.wandb != "disabled":
            sinks.append(WandbSink(self.cfg.logging.wandb, self.cfg.logging.wandb_project,
                                   self.cfg.logging.run_name, self.run_dir,
                                   OmegaConf.to_container(self.cfg, resolve=True)))
        if self.cfg.logging.tensorboard:
            sinks.append(TensorBoardSink(self.run_dir, after_step=self.state.step))
        return sinks

    def train_step(self) -> dict:
        cfg, model, opt = self.cfg, self.model, self.optimizer
        step = self.state.step + 1
        start = time.perf_counter()
        reset_peak_memory(self.device)
        lr = lr_at(step, cfg, self.state.lr_origin)
        for group in opt.param_groups:
            group["lr"] = lr
        micro_batches = self.batcher.next_step()
        data_time = time.perf_counter() - start
        model.reset_moe_loads()
        if self.dispatcher is not None:
            self.dispatcher.reset_stats()
        sums = self.forward_backward([b.to(self.device, non_blocking=True) for b in micro_batches])
        # The norm first: it completes the gradient reduce-scatters, which must precede any other collective.
        grad_norm = opt.clip_grad_norm_(cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
        # Global figures, identical on every rank, so every rank takes the same skip/bias decisions.
        totals = dict(zip(LOSS_KEYS, (self._dp_sum(sums) / (len(micro_batches) * self.dims.dp_cp)).tolist(),
                          strict=True))
        loads = model.moe_loads()  # each cp and tp rank routes its own tokens: summed over cp and tp too
        loads = self._all_reduce(loads, self.dims.group("dp_cp_tp")) if self.dims.dp_cp_tp > 1 else loads
        if self.pipeline is not None and self.pipeline.mirrored:  # the mirror saw the other micro-batches
            loads = self._all_reduce(loads, self.pipeline.partner)
        why_skip = self.health.verdict(totals["loss"], grad_norm)
        skipped = why_skip is not None
        if skipped:
            self._skip(step, why_skip, totals["loss"], grad_norm)
        else:
            if self.ema is not None:  # the last EMA update has copied the parameters the step overwrites
                self.ema.before_optimizer_step()
            opt.step()
            invalidate_weight_caches(model)  # FP8 weights are quantized once per optimizer step
            self.health.applied(totals["loss"])
            self.state.consecutive_skipped = 0
            model.update_gate_bias(loads, model.args.bias_update_speed)
            if self.ema is not None:  # a skipped step adds no point to the average
                self.ema.update(opt.order_after_gathers)
        opt.zero_grad()
        self.state.step = step
        self.state.consumed_samples += cfg.train.global_batch_size
        elapsed = time.perf_counter() - start
        tokens = cfg.train.global_batch_size * cfg.train.seq_len
        tokens_per_s = tokens / elapsed
        # the whole step's FLOPs over every rank's peak (each rank is one device)
        mfu = self.flops_per_token * tokens_per_s / (self.peak * self.dims.world_size) if self.peak else 0.0
        max_vio, peak_memory = self._pipeline_max(max_violation(loads), peak_memory_bytes(self.device))
        record = {"step": step, **totals, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                  "tokens_per_s": tokens_per_s, "mfu": mfu, "step_time_s": elapsed, "data_time_s": data_time,
                  "max_vio": max_vio, "peak_memory_gib": peak_memory / 2**30, "skipped": skipped,
                  "skipped_steps": self.state.skipped_steps,
                  "consumed_samples": self.state.consumed_samples, "optimizer_state_bytes": opt.state_bytes()}
        if self.dispatcher is not None:  # where tokens went: ranks and nodes per token, over the whole dp group
            stats = self.dispatcher.stats(self.dims.dp_group)
            record |= {f"ep_{key}": stats[key] for key in ("ranks_per_token", "nodes_per_token",
                                                            "max_ranks_per_token", "max_nodes_per_token")}
        return record

    def forward_backward(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Forward and backward of one step's micro-batches into `.grad` (each loss scaled by 1/n, as in
        gradient accumulation); returns the sums over micro-batches of the LOSS_KEYS components."""
        opt, n = self.optimizer, len(micro_batches)
        if self.pipeline is not None:
            with opt.no_sync():  # mirror copies' gradients are summed before the data-parallel reduction
                out = self.pipeline.runtime.step(micro_batches)
            sum_partner_grads(self.pipeline.partner_params, self.pipeline.partner)
            return out.per_microbatch.sum(dim=1)
        sums = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(micro_batches):
            with opt.no_sync() if i < n - 1 else contextlib.nullcontext():
                out = self.model.compute_loss(batch)
                (out["loss"] / n).backward()
            sums += torch.stack([out[key].detach() for key in LOSS_KEYS]).double()  # read back once per step
        return sums.cpu()

    def _pipeline_max(self, *values: float) -> list[float]:
        """The largest of each value over the pipeline ranks, which hold different layers (max_vio over every
        MoE layer of the model; the peak memory of the fullest stage), in one collective."""
        maxima = torch.tensor(values, dtype=torch.float64)
        if self.dims.pp > 1:
            maxima = self._all_reduce(maxima, self.dims.pp_group, dist.ReduceOp.MAX)
        return maxima.tolist()

    def _dp_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the data- and context-parallel ranks, whose losses are means over their own tokens (the
        tensor itself at dp=cp=1)."""
        return self._all_reduce(tensor, self.dims.group("dp_cp")) if self.dims.dp_cp > 1 else tensor

    def _all_reduce(self, tensor: torch.Tensor, group: dist.ProcessGroup,
                    op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """All-reduce a small CPU tensor on the training device (NCCL takes GPU tensors only); CPU result."""
        on_device = tensor.to(self.device)
        dist.all_reduce(on_device, op=op, group=group)
        return on_device.cpu()

    def _skip(self, step: int, why: str, loss: float, grad_norm: float) -> None:
        """Count and log a skipped step; past `train.max_skipped_steps` in a row, set `abort` (fit raises once the
        step is recorded, so the checkpoint holds its data position)."""
        self.state.skipped_steps += 1
        self.state.consecutive_skipped += 1
        log.warning("step %d skipped, %s: loss=%s grad_norm=%s (%d in a row, %d in all)", step, why, loss, grad_norm,
                    self.state.consecutive_skipped, self.state.skipped_steps)
        if self.state.consecutive_skipped > self.cfg.train.max_skipped_steps:
            self.abort = (f"{self.state.consecutive_skipped} consecutive steps were skipped, the last for a {why} "
                          f"(train.max_skipped_steps={self.cfg.train.max_skipped_steps}); aborting")
