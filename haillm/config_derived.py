"""Model fields a run derives rather than states: ``model.init_from=hf:DIR``'s dimensions from DIR/config.json and
``model.vocab_size=0`` from the tokenizer, applied by ``haillm.config.compose_config`` so that every tool composing
a run sees the model that will be built."""

from __future__ import annotations

import dataclasses
from collections.abc import Set as AbstractSet
from pathlib import Path

from omegaconf import DictConfig

from haillm.config import ConfigError, _require
from haillm.data import DataError
from haillm.models.deepseek_v3.args import ModelArgs


def overridden_keys(overrides: list[str]) -> set[str]:
    """The dotted keys the command line sets (`model.dim=96` -> model.dim); a group choice (`model=small`) is none."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.key_or_group for o in OverridesParser.create().parse_overrides(overrides)}


def apply_init_from(model: DictConfig, overridden: AbstractSet[str] = frozenset()) -> None:
    """`model.init_from=hf:DIR`: every model field that DIR/config.json holds comes from it (the MTP depth is the
    MTP layers DIR stores), not from the preset; the training-objective fields (`TRAINING_FIELDS`) stay the run's.
    A field set on the command line (in `overridden`) keeps its value, which for a field the weights fix
    (`CHECKPOINT_FIELDS`) must agree with config.json; context length, YaRN and MTP depth may differ."""
    spec = model.init_from
    if not spec.startswith("hf:"):
        return  # '' or not hf:<path>: validate() says which values are valid
    from haillm.models.deepseek_v3.hf import hf_model_args
    from haillm.models.deepseek_v3.hf_config import CHECKPOINT_FIELDS, TRAINING_FIELDS

    path = Path(spec[3:]).expanduser()
    expected = "expected hf:<directory of a Hugging Face DeepseekV3 checkpoint: config.json and *.safetensors>"
    _require(bool(spec[3:]) and path.is_dir(), f"model.init_from={spec}: {path} is not a directory; {expected}")
    _require((path / "config.json").is_file(), f"model.init_from={spec}: {path} holds no config.json; {expected}")
    try:
        stored = hf_model_args(path)
    except KeyError as exc:
        raise ConfigError(f"model.init_from={spec}: {path / 'config.json'} has no {exc}") from None
    except (ValueError, OSError, TypeError, AttributeError) as exc:
        raise ConfigError(f"model.init_from={spec}: {' '.join(str(exc).split())[:300]}") from None
    for name in (f.name for f in dataclasses.fields(ModelArgs) if f.name not in TRAINING_FIELDS):
        value = getattr(stored, name)
        if f"model.{name}" not in overridden:
            model[name] = value
        elif name in CHECKPOINT_FIELDS and model[name] != value:
            raise ConfigError(f"model.{name}={model[name]} disagrees with model.init_from={spec}, whose config.json "
                              f"gives {value}: the checkpoint's weights fix it (drop the override)")


def tokenizer_vocab_size(spec: str) -> int:
    """The ids of `data.tokenizer` (258 for `byte`, a tokenizer.json's highest id + 1, with the EOD it may add)."""
    from haillm.data.tokenizer import ByteTokenizer, build_tokenizer

    if spec == "byte":
        return ByteTokenizer.vocab_size
    try:
        return build_tokenizer(spec).vocab_size
    except DataError as exc:
        raise ConfigError(str(exc)) from None


def vocab_too_small(vocab: int, ids: int, tokenizer: str, origin: str = "") -> str:
    """The one-line refusal of a model vocabulary smaller than the tokenizer's."""
    return (f"model.vocab_size={vocab}{origin} is smaller than data.tokenizer={tokenizer}, which has {ids} ids; set "
            f"model.vocab_size={ids} or more (0: the tokenizer's)")


def resolve_vocab_size(cfg: DictConfig, overridden: AbstractSet[str] = frozenset()) -> None:
    """`model.vocab_size=0` (the `tiny` and `small` presets) becomes the tokenizer's number of ids; any vocabulary
    smaller than the tokenizer's is refused here, before anything runs. Padding is not added: set a larger
    `model.vocab_size` (kept as given) for, e.g., a multiple of 128."""
    model, spec = cfg.model, cfg.data.tokenizer
    if not isinstance(model.vocab_size, int) or model.vocab_size < 0:
        return  # validate() refuses it
    ids = tokenizer_vocab_size(spec)
    if model.vocab_size == 0:
        model.vocab_size = ids
    elif model.vocab_size < ids:
        if "model.vocab_size" in overridden:
            origin = ""
        elif model.init_from.startswith("hf:"):
            origin = f" (from model.init_from={model.init_from})"
        else:
            origin = f" (the {model.name} preset's)"
        raise ConfigError(vocab_too_small(model.vocab_size, ids, spec, origin))
