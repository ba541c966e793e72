"""Config composition, validation messages and the LR schedule."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from haillm.config import DOMAINS, Config, ConfigError, Domain, compose_config, to_model_args, validate
from haillm.data.tokenizer import ByteTokenizer, build_tokenizer
from haillm.models.deepseek_v3.args import PRESETS
from haillm.train.optim import lr_at, resume_origin, schedule_of


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_presets_compose_to_the_python_presets(name):
    """Field for field, except that `tiny` and `small` take the tokenizer's vocabulary (258 ids for `byte`)."""
    cfg = compose_config([f"model={name}"])
    assert cfg.model.name == name
    vocab = ByteTokenizer.vocab_size if name in ("tiny", "small") else PRESETS[name].vocab_size
    assert to_model_args(cfg.model) == PRESETS[name].replace(vocab_size=vocab)


def test_defaults_validate_and_overrides_apply():
    cfg = compose_config(["train.steps=7", "model.dim=96", "parallel.pp_schedule=dualpipe"])
    validate(cfg)
    assert cfg.train.steps == 7 and to_model_args(cfg.model).dim == 96
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["train.foo=1"], 1, "unknown config key 'train.foo'; valid keys under train: steps"),
        (["train.steps=0"], 1, "train.steps=0 must be a positive integer"),
        (["train.global_batch_size=10", "train.micro_batch_size=4"], 1, "must be divisible by"),
        ([], 2, "world size is 2"),
        (["parallel.dp=4", "parallel.ep=3", "train.micro_batch_size=2"], 4, "parallel.ep=3 must divide parallel.dp=4"),
        (["optim.schedule=linear"], 1, "optim.schedule='linear' is not valid"),
        (["model.n_limited_groups=9"], 1, "model:"),
        (["train.seq_len=100000"], 1, "exceeds model.max_seq_len"),
        (["model.init_from=/x"], 1, "hf:<path>"),
        (["parallel.cp=2"], 1, "parallel.dp*pp*cp*tp = 2 (dp=1, pp=1, cp=2, tp=1) but world size is 1"),
        (["parallel.cp=2", "train.seq_len=30"], 2, "train.seq_len=30 must be divisible by 2*parallel.cp = 4"),
        (["parallel.cp=16", "train.seq_len=32"], 16, "parallel.cp=16 cuts train.seq_len=32 into chunks of length 1, "
                                                     "which must exceed model.mtp_depth=1: at most parallel.cp=8"),
        (["parallel.cp=4", "train.seq_len=16", "model.mtp_depth=2"], 4, "chunks of length 2, which must exceed "
                                                                        "model.mtp_depth=2: at most parallel.cp=2"),
        (["parallel.cp=2", "parallel.tp=4", "train.seq_len=12", "model.vocab_size=260"], 8,
         "train.seq_len=12 over parallel.cp=2 leaves 6 tokens per rank, which parallel.tp=4 must divide"),
    ],
)
def test_validation_errors_are_one_line(overrides, world, message):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides), world_size=world)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_lr_schedules():
    cfg = compose_config(["train.steps=100", "train.lr=1.0", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    assert lr_at(1, cfg) == pytest.approx(0.1)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    values = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    cfg.optim.schedule = "constant_then_decay"
    cfg.optim.decay_start = 0.5
    assert lr_at(50, cfg) == pytest.approx(1.0)
    assert lr_at(75, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_lr_after_a_schedule_change_continues_or_restarts():
    """Resumed at step 50 of a 100-step run with train.steps now 200: `continue` starts from the learning rate the
    run had (no jump), then decays to the floor at step 200; `restart` warms up again from step 50."""
    old = compose_config(["train.steps=100", "train.lr=1.0", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    new = compose_config(["train.steps=200", "train.lr=1.0", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1",
                          "optim.on_schedule_change=continue"])
    saved = {"step": 50, "schedule": schedule_of(old), "lr_origin": None}
    origin = resume_origin(saved, new)
    at_50 = lr_at(50, old)
    assert origin == {"mode": "continue", "step": 50, "lr": at_50}
    assert at_50 * 0.999 < lr_at(51, new, origin) <= at_50 and lr_at(200, new, origin) == pytest.approx(0.1)
    assert lr_at(51, new) > at_50 * 1.2  # what the recomputed schedule would have jumped to
    new.optim.on_schedule_change = "restart"
    origin = resume_origin(saved, new)
    assert lr_at(51, new, origin) == pytest.approx(0.1) and lr_at(60, new, origin) == pytest.approx(1.0)
    assert resume_origin({**saved, "schedule": schedule_of(new)}, new) is None  # unchanged: as saved
    new.optim.on_schedule_change = "refuse"
    with pytest.raises(ConfigError, match=r"train.steps 100 -> 200\) and would jump from 0.6.* up to 0.9"):
        resume_origin(saved, new)
    extended_in_warmup = {"step": 5, "schedule": schedule_of(old), "lr_origin": None}
    assert resume_origin(extended_in_warmup, new) is None  # the same rate at step 5: the new schedule follows
    shorter = compose_config(["train.steps=60", "train.lr=1.0", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    assert resume_origin(saved, shorter) is None  # cut short: it decays sooner, no jump up


def test_model_config_fields_cover_model_args():
    cfg = compose_config([])
    for f in dataclasses.fields(type(PRESETS["tiny"])):
        assert f.name in cfg.model


def _numeric_keys(node: type, prefix: str = "") -> list[str]:
    """Dotted names of every int/float field of the structured config (bools are neither)."""
    keys = []
    for f in dataclasses.fields(node):
        kind = f.type if isinstance(f.type, type) else {"int": int, "float": float}.get(str(f.type))
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(value):
            keys += _numeric_keys(type(value), f"{prefix}{f.name}.")
        elif kind in (int, float) or (type(value) in (int, float)):
            keys.append(f"{prefix}{f.name}")
    return keys


def test_every_numeric_key_has_a_domain():
    keys = _numeric_keys(Config)
    assert "optim.beta1" in keys and "model.rope_theta" in keys and "seed" in keys
    assert sorted(set(keys) - set(DOMAINS)) == []
    assert sorted(set(DOMAINS) - set(keys)) == []


def _outside(domain: Domain, integer: bool) -> list:
    """Values just outside ``domain``, of the key's type."""
    values = []
    if domain.low is not None:
        values.append(domain.low if domain.low_open else domain.low - (1 if integer else 1e-3))
    if domain.high is not None:
        values.append(domain.high if domain.high_open else domain.high + (1 if integer else 1e-3))
    if domain.off is not None and domain.low is not None:  # between "off" and the range
        values = [v for v in values if v != domain.off] + ([] if integer else [(domain.off + domain.low) / 2])
    if not integer:
        values += [float("nan"), float("inf")]
    return [int(v) if integer else float(v) for v in values]


@pytest.fixture(scope="module")
def default_cfg():
    return compose_config([])


@pytest.mark.parametrize("key", sorted(DOMAINS))
def test_values_outside_a_domain_are_refused_in_one_line(default_cfg, key):
    integer = isinstance(OmegaConf.select(default_cfg, key), int)
    domain = DOMAINS[key]
    cases = _outside(domain, integer)
    assert cases, key
    for value in cases:
        cfg = copy.deepcopy(default_cfg)
        OmegaConf.update(cfg, key, value)
        with pytest.raises(ConfigError) as info:
            validate(cfg)
        text = str(info.value)
        assert text.startswith(f"{key}=") and f"must be {domain}" in text and "\n" not in text, (value, text)


@pytest.mark.parametrize(("overrides", "micro_batch"), [
    ([], 8), (["parallel.dp=4"], 2), (["parallel.dp=2", "train.global_batch_size=12"], 6),
    (["parallel.dp=8"], 1), (["parallel.pp=2"], 1), (["parallel.dp=4", "train.micro_batch_size=1"], 1),
])
def test_unset_micro_batch_fits_the_layout(overrides, micro_batch):
    """The README's `torchrun --nproc_per_node=4 launch/train.py parallel.dp=4` used to stop on the default 8."""
    cfg = compose_config(overrides)
    assert cfg.train.micro_batch_size == micro_batch
    validate(cfg, cfg.parallel.dp * cfg.parallel.pp)


# --- the vocabulary follows the tokenizer; model.init_from=hf:DIR follows DIR/config.json ---------------------------


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory):
    from haillm.data.synthetic import documents, train_bpe

    return train_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json", documents(20_000, seed=1), 600)


def _refused(overrides: list[str], *parts: str) -> str:
    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides))
    text = str(info.value)
    assert "\n" not in text and all(p in text for p in parts), text
    return text


def test_vocab_size_is_the_tokenizers_unless_set(bpe_json):
    """tiny and small take the tokenizer's ids (and config.yaml records the number); published presets keep
    theirs; an explicit larger vocabulary is kept, a smaller one (explicit or a preset's) refused naming both."""
    ids = build_tokenizer(str(bpe_json)).vocab_size
    assert 300 < ids <= 601
    tok = f"data.tokenizer={bpe_json}"
    for preset in ("tiny", "small"):
        cfg = compose_config([f"model={preset}", tok])
        validate(cfg)
        assert cfg.model.vocab_size == ids and f"vocab_size: {ids}\n" in OmegaConf.to_yaml(cfg, resolve=True)
    assert compose_config([]).model.vocab_size == ByteTokenizer.vocab_size  # the byte default: no file read
    assert compose_config(["model=v3_671b", tok]).model.vocab_size == 129280
    assert compose_config(["model=v2_lite_16b", tok, "model.vocab_size=0"]).model.vocab_size == ids
    assert compose_config([tok, "model.vocab_size=1024"]).model.vocab_size == 1024
    _refused([tok, "model.vocab_size=300"], "model.vocab_size=300 is smaller", str(bpe_json), f"{ids} ids")
    _refused([f"data.tokenizer={bpe_json.parent / 'nope.json'}"], "data.tokenizer:", "nope.json", "does not exist")


def test_the_planner_resolves_the_vocabulary_without_a_tokenizer_file():
    from haillm.tools.plan import make_plan

    for preset in ("tiny", "small"):
        make_plan([f"model={preset}", "train.seq_len=64", "train.global_batch_size=8"], gpu="cpu")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Hugging Face checkpoint of a model unlike any preset (written by save_hf, as export does)."""
    from haillm.models.deepseek_v3.hf import save_hf
    from haillm.models.deepseek_v3.model import DeepSeekV3

    args = PRESETS["tiny"].replace(vocab_size=300, dim=32, n_layers=2, n_heads=2, max_seq_len=256,
                                   original_seq_len=256, rope_theta=5e4)
    path = tmp_path_factory.mktemp("hf") / "ckpt"
    model = DeepSeekV3(args, init_seed=3)
    save_hf(model, path)
    return path, args, model.state_dict()


def test_init_from_takes_the_checkpoints_config(hf_dir, bpe_json):
    """The model's fields come from DIR/config.json, the preset's are not used; command-line overrides of the
    context length or MTP depth win; one of a field the weights fix must agree; the launcher then loads the
    weights. Bad directories and disagreements are one-line ConfigErrors at composition, before any run."""
    import importlib.util

    from haillm.parallel.mesh import ParallelDims

    path, args, state = hf_dir
    init = f"model.init_from=hf:{path}"
    cfg = compose_config([init, "model=small"])
    validate(cfg)
    assert to_model_args(cfg.model) == args
    assert f"dim: {args.dim}\n" in OmegaConf.to_yaml(cfg, resolve=True)
    longer = compose_config([init, "model.max_seq_len=512", "model.mtp_depth=0", f"model.dim={args.dim}"])
    assert to_model_args(longer.model) == args.replace(max_seq_len=512, mtp_depth=0)
    _refused([init, "model.dim=64"], "model.dim=64 disagrees", f"hf:{path}", "gives 32")
    _refused([init, "model.vocab_size=512"], "model.vocab_size=512 disagrees", "gives 300")
    _refused([init, f"data.tokenizer={bpe_json}"], "model.vocab_size=300 (from model.init_from", "is smaller")
    _refused([f"model.init_from=hf:{path.parent / 'missing'}"], "missing is not a directory")
    _refused([f"model.init_from=hf:{path.parent}"], "holds no config.json")

    spec = importlib.util.spec_from_file_location("launch_train", Path(__file__).parent.parent / "launch" / "train.py")
    launch_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_train)
    model, _ = launch_train.build_model(cfg, ParallelDims.from_config(cfg.parallel, 1).build("cpu"),
                                        torch.device("cpu"))
    loaded = model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())


@pytest.mark.parametrize("recipe, seq_len, batch", [("v3_context_32k", 32768, 1920), ("v3_context_128k", 131072, 480)])
def test_context_extension_recipes_hold_the_reports_settings(recipe, seq_len, batch):
    """DeepSeek-V3 report §4.3: YaRN s=40, alpha=1, beta=32 on the 4K original context, 1000 steps at a constant
    7.3e-6; 1920 sequences of 32K, then 480 of 128K. The recipe composes on the V3 model and validates."""
    cfg = compose_config(["model=v3_671b", f"+recipe={recipe}", "parallel.cp=4"])
    validate(cfg, world_size=4)
    args = to_model_args(cfg.model)
    assert (cfg.train.seq_len, args.max_seq_len, cfg.train.global_batch_size) == (seq_len, seq_len, batch)
    assert (args.original_seq_len, args.rope_factor, args.beta_slow, args.beta_fast) == (4096, 40, 1, 32)
    assert args.uses_yarn and args.mscale == 1.0
    assert (cfg.train.steps, cfg.train.lr, cfg.optim.schedule, cfg.optim.warmup_steps) == (1000, 7.3e-6, "constant", 0)
