"""haillm training entry point: `python launch/train.py [key=value ...]` or under `torchrun`.

Configuration is composed by Hydra from conf/config.yaml and the overrides. Extra flags:
`--cfg` prints the composed config and exits; `--help` prints this text.

Exit codes: 0 done (also when SIGTERM/SIGINT stopped the run after a checkpoint), 2 bad configuration or
input, 3 training aborted (too many skipped steps; the state is checkpointed), 4 a rank died, stalled or a
collective failed (the error names the rank). Under `torchrun --max-restarts=N` a restarted job continues
from its newest complete checkpoint in the same run directory.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from haillm.config import ConfigError, compose_config, recompute_swiglu, resolve_dtype, to_model_args, validate
from haillm.config_derived import vocab_too_small
from haillm.data import DataError
from haillm.data.loader import build_training_data, make_batcher
from haillm.fp8.policy import apply_fp8
from haillm.models.deepseek_v3.flops import flops_per_token
from haillm.models.deepseek_v3.model import DeepSeekV3
from haillm.ops.precision import cast_parameters
from haillm.parallel.context import ContextParallel, apply_context_parallel
from haillm.parallel.expert import AllToAllDispatcher, ExpertPlacement, apply_expert_parallel
from haillm.parallel.mesh import ParallelConfigError, ParallelDims
from haillm.parallel.pipeline.p2p import LinkGroups
from haillm.parallel.pipeline.runtime import PipelineRuntime
from haillm.parallel.pipeline.stage import (
    StageModel,
    build_stage_model,
    partner_group,
    pipelines_of,
    second_copies,
)
from haillm.parallel.tensor import TensorParallel
from haillm.parallel.tensor_plan import parallelize_tensor
from haillm.train.checkpoint import CheckpointError, list_checkpoints, peek_trainer_state
from haillm.train.compile import apply_compile
from haillm.train.evaluate import build_evaluator
from haillm.train.fit_check import check_fits
from haillm.train.metrics import STEP_LOG
from haillm.train.optim import build_optimizer, resume_origin
from haillm.train.setup import broadcast_object, init_distributed, job_store, restarts, seed_everything
from haillm.train.trainer import Pipeline, Trainer, TrainingAborted
from haillm.train.watchdog import PEER_FAILURE_EXIT, PeerFailure, is_comm_failure

log = logging.getLogger("haillm")
USER_ERRORS = (ConfigError, DataError, CheckpointError, ParallelConfigError)


def setup_logging(rank: int, run_dir: Path | None = None) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(lambda record: record.name != STEP_LOG)  # step lines: train.log here, stdout by Progress
    handlers: list[logging.Handler] = [console]
    if run_dir is not None and rank == 0:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(level=level, handlers=handlers, force=True,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")


def prepare_run_dir(cfg: DictConfig, rank: int) -> Path:
    """Resolve `output_dir` once (rank 0's `${now:...}` wins; a torchrun restart keeps the first attempt's) and
    refuse to overwrite another run, unless this is a restart of the job that wrote it."""
    output_dir = broadcast_object(_job_run_dir(str(cfg.output_dir)) if rank == 0 else None)
    cfg.output_dir = output_dir
    run_dir = Path(output_dir)
    if restarts() and cfg.checkpoint.resume != "auto":
        log.warning("restart %d of this torchrun job: continuing from the newest checkpoint", restarts())
        cfg.checkpoint.resume, cfg.checkpoint.finetune = "auto", False
    holds_run = (run_dir / "metrics.jsonl").exists() or bool(list_checkpoints(run_dir))
    if holds_run and cfg.checkpoint.resume == "none":
        raise ConfigError(
            f"output_dir={output_dir} already holds a run; pass checkpoint.resume=auto to continue it "
            "or choose another output_dir"
        )
    return run_dir


def _job_run_dir(output_dir: str) -> str:
    """The run directory of the first attempt of this torchrun job (`${now:...}` resolves anew each attempt)."""
    store = job_store()
    if store is None:
        return output_dir
    if restarts() == 0:
        store.set("haillm/output_dir", output_dir)
        return output_dir
    return store.get("haillm/output_dir").decode()


def build_model(cfg: DictConfig, dims: ParallelDims, device: torch.device
                ) -> tuple[DeepSeekV3 | StageModel, AllToAllDispatcher | None]:
    """Build on the meta device (this rank's pipeline stages only), keep this rank's experts and tensor-parallel
    blocks, then materialise and initialise: weights are a function of the seed and each parameter's FQN only,
    so every layout starts from the same model."""
    args = to_model_args(cfg.model)
    with torch.device("meta"):
        if dims.pp > 1:
            model = build_stage_model(args, cfg.parallel.pp_schedule, dims.pp, dims.pp_rank, init_seed=None)
        else:
            model = DeepSeekV3(args, init_seed=None)
    model.set_recompute(cfg.train.recompute, swiglu=recompute_swiglu(cfg))
    dispatcher = None
    if dims.ep > 1:  # with FP8 the dispatch payload travels as 1x128-tile FP8; the combine stays high precision
        placement = ExpertPlacement.from_dims(dims, args.n_routed_experts, args.n_expert_groups)
        dispatcher = AllToAllDispatcher(dims.ep_group, placement, fp8=cfg.fp8.enabled)
        apply_expert_parallel(model, dispatcher)
    parallelize_tensor(model, TensorParallel(dims.tp_group, dims.tp, dims.tp_rank, cfg.parallel.sequence_parallel))
    apply_context_parallel(model, ContextParallel(dims.cp_group, dims.cp, dims.cp_rank))
    model.to_empty(device=device)
    model.init_weights(cfg.seed)
    if cfg.model.init_from:
        from haillm.models.deepseek_v3.hf import load_hf_state

        path = Path(cfg.model.init_from.removeprefix("hf:")).expanduser()  # compose_config read its config.json
        if not path.is_dir():
            raise ConfigError(f"model.init_from={cfg.model.init_from}: {path} is not a directory")
        try:
            load_hf_state(model, path)
        except (ValueError, OSError) as exc:  # weights missing or of other shapes than config.json says
            raise ConfigError(f"model.init_from={cfg.model.init_from}: {' '.join(str(exc).split())[:300]}") from None
    if cfg.train.dtype == "bf16":  # the compute copy; fp32 masters are made from it by the optimizer
        cast_parameters(model, torch.bfloat16)
    if cfg.train.compile:  # regions compile at their first call; precision (FP8) may still be set afterwards
        log.info("train.compile: %d regions of the transformer blocks", len(apply_compile(model)))
    return model, dispatcher


def build_pipeline(cfg: DictConfig, dims: ParallelDims, model: StageModel, device: torch.device) -> Pipeline:
    schedule = cfg.parallel.pp_schedule
    n_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dims.dp)
    timeout = timedelta(seconds=cfg.train.collective_timeout_s)
    partner = partner_group(schedule, pipelines_of(dims), mtp=model.args.mtp_depth > 0, timeout=timeout)
    # The point-to-point traffic has groups of its own (one per direction of each link, haillm.parallel.pipeline.p2p),
    # which the watchdog leaves out of its collective counts (haillm.train.watchdog).
    links = LinkGroups.create(pipelines_of(dims), timeout)
    runtime = PipelineRuntime(model, schedule, n_micro, pp_group=dims.pp_group, device=device, links=links)
    return Pipeline(runtime, partner, model.partner_params(schedule), mirrored=schedule == "dualpipe")


def run(cfg: DictConfig, rank: int, world: int, device: torch.device) -> Trainer:
    """Train as `cfg` says; returns the trainer (its model and optimizer) for programmatic use."""
    resolve_dtype(cfg, device.type)
    check_fits(cfg, world, rank, device)
    run_dir = prepare_run_dir(cfg, rank)
    seed_everything(cfg.seed, cfg.train.deterministic)
    t = cfg.train
    data = build_training_data(cfg.data, t.seq_len, t.global_batch_size, cfg.seed,
                               eval_samples=t.eval_batches * t.global_batch_size if t.eval_interval else 0)
    dataset = data.dataset
    if dataset.tokenizer.vocab_size > cfg.model.vocab_size:  # compose_config refuses it first; a cfg built otherwise
        raise ConfigError(vocab_too_small(cfg.model.vocab_size, dataset.tokenizer.vocab_size, cfg.data.tokenizer))
    dims = ParallelDims.from_config(cfg.parallel, world).build(
        device.type, timedelta(seconds=t.collective_timeout_s))
    model, dispatcher = build_model(cfg, dims, device)
    pipeline = build_pipeline(cfg, dims, model, device) if dims.pp > 1 else None
    optimizer = build_optimizer(model, cfg, dims, second_copies(model, cfg.parallel.pp_schedule, dims.pp, dims.pp_rank))
    batcher = make_batcher(data, dims.dp_rank, dims.dp, t.micro_batch_size, device, cfg.data.prefetch,
                           end=t.steps * t.global_batch_size)
    # A resume that would change the learning-rate schedule is refused (optim.on_schedule_change) before this too.
    saved = peek_trainer_state(run_dir, cfg.checkpoint.resume)
    if saved is not None and not cfg.checkpoint.finetune:
        resume_origin(saved, cfg)
    # Everything that can reject the run has run: only now touch the run directory.
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        tmp.replace(run_dir / "config.yaml")
    setup_logging(rank, run_dir)
    if cfg.fp8.enabled:  # FP8 is a compute format only: parameters, gradients and checkpoints keep their dtypes
        report = apply_fp8(model, True, cfg.fp8.pow2_scales, cfg.fp8.wgrad, cfg.fp8.cache_transposed)
        log.info("fp8: %s", report.summary())
    args = model.args
    log.info("run dir %s | model %s: %.2fM parameters | %d packed sequences of %d tokens", run_dir,
             cfg.model.name, sum(p.numel() for p in model.parameters()) / 1e6, dataset.num_samples,
             cfg.train.seq_len + 1)
    log.info("layout dp=%d pp=%d cp=%d tp=%d ep=%d (%d ranks) | optimizer state %.2f MB on this rank", dims.dp,
             dims.pp, dims.cp, dims.tp, dims.ep, world, optimizer.state_bytes() / 2**20)
    trainer = Trainer(cfg, dims, model, optimizer, batcher, run_dir, device,
                      flops_per_token(args, cfg.train.seq_len), dispatcher, pipeline,
                      evaluator=build_evaluator(cfg, data.eval_dataset, model, dims, device))
    trainer.resume()
    records = trainer.fit()
    if rank == 0 and records and not trainer.stopped_by:
        first, last = records[0], records[-1]
        print(f"lm_loss: step {first['step']} {first['lm_loss']:.4f} -> step {last['step']} {last['lm_loss']:.4f} "
              f"(loss with the MTP and balance terms {first['loss']:.4f} -> {last['loss']:.4f}) "
              f"| {last['tokens_per_s']:.0f} tokens/s | outputs in {run_dir}", flush=True)
    return trainer


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    rank, world, device = 0, 1, torch.device("cpu")
    peer_failed = False
    try:
        setup_logging(rank)
        cfg = compose_config([a for a in argv if a != "--cfg"])
        if "--cfg" in argv:
            print(OmegaConf.to_yaml(cfg))
            return 0
        validate(cfg, int(os.environ.get("WORLD_SIZE", 1)) if "RANK" in os.environ else 1)
        rank, world, device = init_distributed(cfg.train.collective_timeout_s)
        setup_logging(rank)
        run(cfg, rank, world, device)
        return 0
    except USER_ERRORS as exc:
        if int(os.environ.get("RANK", 0)) == 0:  # the same line on every rank: said once
            print(f"haillm: error: {exc}", file=sys.stderr)
        return 2
    except TrainingAborted as exc:
        print(f"haillm: training aborted: {exc}", file=sys.stderr)
        return 3
    except PeerFailure as exc:
        peer_failed = True  # tearing the group down could wait on the failed ranks
        print(f"haillm: error: {exc}", file=sys.stderr)
        return PEER_FAILURE_EXIT
    except Exception as exc:  # outside training (resume, checkpoint load, group set-up): no diagnosis, one line
        if not is_comm_failure(exc):
            raise
        peer_failed = True
        print(f"haillm: error: a collective failed on rank {rank} outside the training loop, another rank died or "
              f"stalled ({str(exc).splitlines()[0][:200]})", file=sys.stderr)
        return PEER_FAILURE_EXIT
    finally:
        if dist.is_initialized() and not peer_failed:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
