"""Typed run configuration: structured dataclasses registered with Hydra, composition and validation.

The YAML groups in ``conf/`` fill these dataclasses; anything not declared here is rejected by Hydra
(struct mode), so a typo in an override fails before any work starts. ``validate`` checks the
cross-field rules that types alone cannot express.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from haillm.data import DataConfig
from haillm.data.blend import parse_blend
from haillm.fp8.linear import WGRAD_MODES
from haillm.models.deepseek_v3.args import PRESETS, ModelArgs
from haillm.parallel.mesh import ParallelConfigError, ParallelDims
from haillm.parallel.pipeline.schedules import SCHEDULES
from haillm.parallel.pipeline.stage import stage_specs
from haillm.parallel.tensor_plan import check_divisible

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PP_SCHEDULES = ("1f1b", "dualpipe", "dualpipev")
WANDB_MODES = ("disabled", "offline", "online")
LR_SCHEDULES = ("cosine", "constant_then_decay", "constant")
DTYPES = ("auto", "fp32", "bf16")  # auto: bf16 on a GPU, fp32 on CPU
DEFAULT_MICRO_BATCH = 8  # the largest train.micro_batch_size chosen when it is unset (default_micro_batch)


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line naming the key and valid values."""


@dataclass(frozen=True)
class Domain:
    """The values a numeric key may take: ``low``..``high`` (``None``: unbounded; ``*_open``: excluded), finite,
    integral with ``integer``, or exactly ``off`` (a value that switches the feature off)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    off: float | None = None

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.off is not None and value == self.off:
            return True
        if not math.isfinite(value) or (self.integer and value != int(value)):
            return False
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return low_ok and high_ok

    def __str__(self) -> str:
        if self.integer and self.low == 1 and self.high is None and not self.low_open:
            text = "a positive integer"
        elif self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = "a finite number"
        if self.integer and not text.startswith("a "):
            text = f"an integer {text}"
        return f"{self.off:g} (off) or {text}" if self.off is not None else text


POSITIVE_INT, NATURAL = Domain(1, integer=True), Domain(0, integer=True)
POSITIVE, NON_NEGATIVE, FRACTION = Domain(0, low_open=True), Domain(0), Domain(0, 1)
OFF_OR_ABOVE_ONE = Domain(1, low_open=True, off=0)
# Every numeric key and the values it may take (``validate`` checks them all; tests/test_config.py checks that
# every numeric key is here). Relations between keys are checked in ``validate`` itself.
DOMAINS: dict[str, Domain] = {
    **{f"train.{k}": POSITIVE_INT for k in ("steps", "global_batch_size", "micro_batch_size", "seq_len",
                                            "loss_spike_window", "eval_batches")},
    "train.lr": POSITIVE, "train.max_skipped_steps": NATURAL, "train.peak_flops": NON_NEGATIVE,
    "train.collective_timeout_s": POSITIVE, "train.watchdog_factor": OFF_OR_ABOVE_ONE,
    "train.loss_spike_factor": OFF_OR_ABOVE_ONE, "train.eval_interval": NATURAL,
    "train.ema_decay": Domain(0, 1, high_open=True),
    "optim.beta1": Domain(0, 1, high_open=True), "optim.beta2": Domain(0, 1, high_open=True),
    "optim.eps": POSITIVE, "optim.weight_decay": NON_NEGATIVE, "optim.grad_clip": NON_NEGATIVE,
    "optim.warmup_steps": NATURAL, "optim.min_lr_ratio": FRACTION, "optim.decay_start": FRACTION,
    "optim.bucket_mb": POSITIVE,
    **{f"parallel.{k}": POSITIVE_INT for k in ("dp", "pp", "tp", "ep", "cp", "ranks_per_node")},
    "data.max_bytes": NATURAL, "data.eval_holdout": Domain(0, 1, high_open=True),
    "checkpoint.interval": POSITIVE_INT, "checkpoint.keep": NATURAL, "logging.log_interval": NATURAL,
    "seed": Domain(0, 2**63, high_open=True, integer=True),
    **{f"model.{k}": POSITIVE_INT for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_expert_groups",
                                            "n_limited_groups", "kv_lora_rank", "qk_nope_head_dim",
                                            "qk_rope_head_dim", "v_head_dim", "max_seq_len", "original_seq_len",
                                            "beta_fast", "beta_slow")},
    **{f"model.{k}": NATURAL for k in ("inter_dim", "moe_inter_dim", "n_dense_layers", "n_routed_experts",
                                       "n_shared_experts", "n_activated_experts", "q_lora_rank", "mtp_depth")},
    **{f"model.{k}": POSITIVE for k in ("route_scale", "rope_theta", "rms_norm_eps", "init_std")},
    "model.rope_factor": Domain(1),
    **{f"model.{k}": NON_NEGATIVE for k in ("mscale", "mscale_all_dim", "mtp_lambda", "balance_alpha",
                                            "bias_update_speed")},
}


def check_domains(cfg: DictConfig) -> None:
    """Every key of ``DOMAINS`` holds a value of its domain (one-line ConfigError naming the first that does not)."""
    for key, domain in DOMAINS.items():
        value = OmegaConf.select(cfg, key)
        _require(value in domain, f"{key}={value!r} must be {domain}")


ModelConfig = dataclasses.make_dataclass(
    "ModelConfig",
    [("name", str, "tiny"), ("init_from", str, "")],
    bases=(ModelArgs,),
    namespace={"__doc__": "ModelArgs plus the preset name and an optional `hf:<path>` initial checkpoint."},
)


@dataclass
class ParallelConfig:
    dp: int = 1
    pp: int = 1
    tp: int = 1
    ep: int = 1
    cp: int = 1  # context parallelism: each sequence split over cp ranks (haillm.parallel.context)
    pp_schedule: str = "1f1b"
    ranks_per_node: int = 8
    sequence_parallel: bool = True  # with tp > 1: activations between tensor-parallel regions split by sequence


@dataclass
class TrainConfig:
    steps: int = 300
    global_batch_size: int = 8  # sequences per optimizer step, whatever the layout
    micro_batch_size: int = 0  # sequences per forward/backward and rank; 0: the largest <= 8 that fits (1 with pp)
    seq_len: int = 128
    lr: float = 3e-3
    dtype: str = "auto"  # parameters/compute: fp32, or bf16 with fp32 masters in the optimizer; auto = bf16 on GPU
    deterministic: bool = False
    max_skipped_steps: int = 10  # consecutive skipped steps (non-finite, loss spike) tolerated; one more aborts
    peak_flops: float = 0.0  # per device, for MFU; 0 = detect (see haillm.train.metrics)
    recompute: bool = False  # recompute RMSNorm outputs, MLA up-projections and wo's input in backward
    recompute_swiglu: bool | None = None  # FFNs keep only SwiGLU inputs, gate weights before w2; None: as recompute
    ema_decay: float = 0.0  # EMA of the parameters in host memory, updated after each step (checkpointed); 0 = off
    compile: bool = False  # torch.compile the transformer blocks regionally (haillm/train/compile.py)
    collective_timeout_s: float = 600.0  # a collective (or a rank) stuck this long fails the job, naming the rank
    watchdog_factor: float = 10.0  # log all threads' stacks when a step takes this many times the median; 0: off
    loss_spike_factor: float = 0.0  # skip a step whose loss exceeds this many times the recent median; 0: off
    loss_spike_window: int = 20  # steps in that median
    eval_interval: int = 0  # steps between held-out evaluations (data.eval_source / data.eval_holdout); 0 = none
    eval_batches: int = 4  # global batches (train.global_batch_size sequences each) per evaluation
    check_memory: bool = True  # refuse at start a run the layout planner says cannot fit this machine's memory


@dataclass
class OptimConfig:
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    schedule: str = "cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    decay_start: float = 0.8  # constant_then_decay: fraction of steps before the decay begins
    moment_dtype: str = "fp32"  # Adam moments: fp32 or bf16 (DeepSeek-V3 used bf16)
    grad_reduce_dtype: str = "fp32"  # data-parallel gradient reduction: fp32, or bf16 (half the bytes)
    bucket_mb: float = 32.0  # ZeRO-1 gradient bucket size (fp32 MB): reductions start bucket by bucket in backward
    # resuming with another LR schedule (train.lr/steps, optim.schedule/warmup_steps/min_lr_ratio/decay_start):
    on_schedule_change: str = "refuse"  # refuse; continue (from the checkpoint's LR down to the floor); restart


@dataclass
class FP8Config:
    enabled: bool = False
    pow2_scales: bool = False
    wgrad: str = "bf16"  # weight-gradient GEMM: bf16 (faster than FP8 on cuBLAS, H200) or fp8 (DeepSeek-V3)
    cache_transposed: bool = False  # keep W.T's FP8 copy for Dgrad between steps (memory) or transpose per backward


@dataclass
class LoggingConfig:
    wandb: str = "disabled"
    wandb_project: str = "haillm"
    run_name: str = ""
    tensorboard: bool = False  # event files under output_dir/tensorboard
    progress: bool = True  # rank 0's tqdm bar (when stdout is a terminal) and step lines
    log_interval: int = 10  # a plain step line every N steps in train.log, and on stdout when it is not a terminal


@dataclass
class CheckpointConfig:
    interval: int = 100  # steps between checkpoints; one is written at the end unless checkpoint.final=false
    final: bool = True  # write one after the last step (false: only every interval steps and on a preemption)
    resume: str = "none"  # "none", "auto" (newest complete checkpoint in output_dir) or a step_<N> path
    keep: int = 3  # newest checkpoints kept; 0 keeps all
    async_save: bool = False  # write from a CPU copy in a background thread while training goes on
    finetune: bool = False  # with checkpoint.resume=<path>: its weights only (step 0, new data, schedule, Adam)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)  # type: ignore[valid-type]
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = 1234
    output_dir: str = "runs/${now:%Y%m%d-%H%M%S}"


@functools.cache
def register_configs() -> None:
    """Put the schema and the model presets in Hydra's ConfigStore (conf/model/*.yaml extend them); once per
    process: the store outlives every composition, and filling it is a fifth of one."""
    cs = ConfigStore.instance()
    cs.store(name="haillm_schema", node=Config)
    for name, args in PRESETS.items():
        cs.store(group="model", name=f"base_{name}", node=ModelConfig(**dataclasses.asdict(args), name=name))


def compose_config(overrides: list[str], config_name: str = "config") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line overrides; errors become one-line ConfigErrors."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
        OmegaConf.to_container(cfg, resolve=True)  # a dangling ${...} fails now, not somewhere inside the run
    except Exception as exc:  # Hydra raises several types, all with multi-line text
        raise ConfigError(_one_line_hydra_error(exc)) from None
    unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(Config)})
    _require(not unknown, f"unknown config key '{unknown[0] if unknown else ''}'; valid top-level keys: "
             + ", ".join(f.name for f in dataclasses.fields(Config)))
    # Here, like micro_batch_size below, so that launch/train.py, the layout planner and every tool composing a
    # run see (and config.yaml records) the model that will be built.
    from haillm.config_derived import apply_init_from, overridden_keys, resolve_vocab_size

    overridden = overridden_keys(overrides)
    apply_init_from(cfg.model, overridden)
    resolve_vocab_size(cfg, overridden)
    if cfg.train.micro_batch_size == 0:  # here, so that the trainer and the layout planner resolve it alike
        cfg.train.micro_batch_size = default_micro_batch(cfg.train.global_batch_size, cfg.parallel.dp, cfg.parallel.pp)
    return cfg


def default_micro_batch(global_batch: int, dp: int, pp: int) -> int:
    """`train.micro_batch_size` when unset: 1 with a pipeline (the most micro-batches), else the largest size up
    to DEFAULT_MICRO_BATCH that divides each data-parallel rank's share of the global batch, so that any dp
    dividing the batch runs as written (DEFAULT_MICRO_BATCH when dp does not divide it: validation says why)."""
    if pp > 1:
        return 1
    if dp < 1 or global_batch < 1 or global_batch % dp:
        return DEFAULT_MICRO_BATCH
    share = global_batch // dp
    return max(m for m in range(1, min(DEFAULT_MICRO_BATCH, share) + 1) if share % m == 0)


def _one_line_hydra_error(exc: BaseException) -> str:
    text = " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())
    cause = " ".join(str(exc.__cause__ or "").split())
    override = re.match(r"Could not override '([^']+)'", text)
    if override and "not in" in f"{text} {cause}":
        key = override.group(1)
        parent, _, _ = key.rpartition(".")
        return f"unknown config key '{key}'; valid keys{' under ' + parent if parent else ''}: " + ", ".join(
            _valid_keys(parent)
        )
    return f"{text} {cause}".strip()


def _valid_keys(parent: str) -> list[str]:
    node: object = Config
    for part in filter(None, parent.split(".")):
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return []
        node = fields[part].default_factory() if callable(fields[part].default_factory) else None
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def to_model_args(model_cfg: DictConfig | object) -> ModelArgs:
    """The plain ModelArgs of a composed model config (drops `name` and `init_from`)."""
    values = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else (
        dataclasses.asdict(model_cfg)
    )
    names = {f.name for f in dataclasses.fields(ModelArgs)}
    return ModelArgs(**{k: v for k, v in values.items() if k in names})


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _one_of(key: str, value: object, valid: tuple) -> None:
    _require(value in valid, f"{key}={value!r} is not valid; expected one of {', '.join(map(str, valid))}")


def _validate_data_and_eval(cfg: DictConfig) -> None:
    t, d = cfg.train, cfg.data
    _require(not (d.blend and d.eval_holdout), "data.eval_holdout does not apply to data.blend; set data.eval_source")
    _require(not (d.eval_source and d.eval_holdout), "set data.eval_source or data.eval_holdout, not both")
    try:
        parse_blend(d.blend)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if t.eval_interval:
        _require(bool(d.eval_source) or d.eval_holdout > 0,
                 f"train.eval_interval={t.eval_interval} needs held-out data: set data.eval_source or "
                 "data.eval_holdout (a fraction of data.source)")
        _require(cfg.parallel.pp == 1, f"train.eval_interval={t.eval_interval} is not supported with "
                 f"parallel.pp={cfg.parallel.pp} yet (evaluation runs the whole model on each rank)")


def _validate_resume(resume: str) -> None:
    """``checkpoint.resume``: none, auto, or an existing checkpoint directory (never a silent fresh start)."""
    if resume in ("none", "auto"):
        return
    path = Path(resume)
    _require(path.is_dir(), f"checkpoint.resume={resume}: no such checkpoint directory; expected none, auto or the "
             "path of a checkpoints/step_<N> directory")
    _require((path / "manifest.json").is_file(),
             f"checkpoint.resume={resume} is not a checkpoint (no manifest.json); expected none, auto or the path "
             "of a checkpoints/step_<N> directory")


def recompute_swiglu(cfg: DictConfig) -> bool:
    """``train.recompute_swiglu``, which follows ``train.recompute`` unless set."""
    value = cfg.train.recompute_swiglu
    return bool(cfg.train.recompute if value is None else value)


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Reject inconsistent configurations before any work starts (one-line ConfigError each)."""
    t, p, o = cfg.train, cfg.parallel, cfg.optim
    check_domains(cfg)
    _one_of("train.dtype", t.dtype, DTYPES)
    try:
        ParallelDims.from_config(p, world_size)
    except ParallelConfigError as exc:
        raise ConfigError(str(exc)) from None
    _one_of("parallel.pp_schedule", p.pp_schedule, PP_SCHEDULES)
    per_step = t.micro_batch_size * p.dp
    _require(
        t.global_batch_size % per_step == 0,
        f"train.global_batch_size={t.global_batch_size} must be divisible by "
        f"train.micro_batch_size*parallel.dp = {t.micro_batch_size}*{p.dp} = {per_step}",
    )
    _one_of("optim.schedule", o.schedule, LR_SCHEDULES)
    _one_of("optim.on_schedule_change", o.on_schedule_change, ("refuse", "continue", "restart"))
    _one_of("optim.moment_dtype", o.moment_dtype, ("fp32", "bf16"))
    _one_of("optim.grad_reduce_dtype", o.grad_reduce_dtype, ("fp32", "bf16"))
    _one_of("fp8.wgrad", cfg.fp8.wgrad, WGRAD_MODES)
    _one_of("logging.wandb", cfg.logging.wandb, WANDB_MODES)
    _require(not cfg.logging.tensorboard or importlib.util.find_spec("tensorboard") is not None,
             "logging.tensorboard=true needs the tensorboard package, which is not installed: pip install tensorboard")
    _validate_resume(cfg.checkpoint.resume)
    _require(not cfg.checkpoint.finetune or cfg.checkpoint.resume not in ("none", "auto"),
             f"checkpoint.finetune=true needs checkpoint.resume=<path of a checkpoints/step_<N> directory>, "
             f"got checkpoint.resume={cfg.checkpoint.resume}")
    _validate_data_and_eval(cfg)
    init_from = cfg.model.init_from
    _require(not init_from or init_from.startswith("hf:"), f"model.init_from={init_from!r} must be '' or hf:<path>")
    args = to_model_args(cfg.model)
    try:
        args.validate()
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
    if p.tp > 1:
        try:
            check_divisible(args, p.tp)
        except ParallelConfigError as exc:
            raise ConfigError(str(exc)) from None
        _require(not p.sequence_parallel or t.seq_len % p.tp == 0,
                 f"train.seq_len={t.seq_len} must be divisible by parallel.tp={p.tp} under sequence parallelism "
                 "(parallel.sequence_parallel=true splits every sequence over the tp ranks)")
        _require(not t.compile, f"train.compile=true is not supported with parallel.tp={p.tp} yet (one or the other)")
        _require(not cfg.model.init_from, f"model.init_from={cfg.model.init_from} loads whole tensors, not tp blocks: "
                 f"start at parallel.tp=1 and resume its checkpoint at parallel.tp={p.tp}")
    if p.cp > 1:
        _validate_context_parallel(cfg, args)
    if p.pp > 1:
        try:  # the schedule's own preconditions, and enough layers for every stage
            SCHEDULES[p.pp_schedule](p.pp, t.global_batch_size // per_step)
            stage_specs(args, p.pp_schedule, p.pp, 0)
        except ValueError as exc:
            raise ConfigError(f"parallel.pp={p.pp} with parallel.pp_schedule={p.pp_schedule}: {exc}") from None
    _require(
        t.seq_len <= args.max_seq_len,
        f"train.seq_len={t.seq_len} exceeds model.max_seq_len={args.max_seq_len}",
    )


def _validate_context_parallel(cfg: DictConfig, args: ModelArgs) -> None:
    t, p = cfg.train, cfg.parallel
    _require(t.seq_len % (2 * p.cp) == 0,
             f"train.seq_len={t.seq_len} must be divisible by 2*parallel.cp = {2 * p.cp} (each of the cp ranks holds "
             "two of 2*cp equal chunks of every sequence)")
    chunk = t.seq_len // (2 * p.cp)
    _require(chunk > args.mtp_depth,
             f"parallel.cp={p.cp} cuts train.seq_len={t.seq_len} into chunks of length {chunk}, which must exceed "
             f"model.mtp_depth={args.mtp_depth}: at most parallel.cp={t.seq_len // (2 * (args.mtp_depth + 1))}")
    _require(p.tp == 1 or not p.sequence_parallel or (t.seq_len // p.cp) % p.tp == 0,
             f"train.seq_len={t.seq_len} over parallel.cp={p.cp} leaves {t.seq_len // p.cp} tokens per rank, which "
             f"parallel.tp={p.tp} must divide under sequence parallelism (parallel.sequence_parallel=true)")


def resolve_dtype(cfg: DictConfig, device_type: str) -> None:
    """Fix `train.dtype=auto` for this device, so that config.yaml records what the run used."""
    if cfg.train.dtype == "auto":
        cfg.train.dtype = "bf16" if device_type == "cuda" else "fp32"
