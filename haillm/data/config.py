"""The data section of the run config, the one exception the data pipeline raises, and the names its messages
give the settings."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

# How the user spelled each DataConfig field, for error messages: the trainer's config keys (`data.<field>`)
# unless a tool that takes them as command-line flags says otherwise (`setting_names`).
_SETTING_NAMES: ContextVar[dict[str, str] | None] = ContextVar("haillm_data_setting_names", default=None)


def setting(name: str) -> str:
    """The name under which the user gave DataConfig's `name`: `data.<name>` under the trainer, the tool's flag
    (`--text-field`) inside `setting_names`. Messages of the data pipeline name settings only through it."""
    return (_SETTING_NAMES.get() or {}).get(name, f"data.{name}")


@contextlib.contextmanager
def setting_names(names: dict[str, str]) -> Iterator[None]:
    """Within the block, messages name DataConfig fields as `names` says ({"text_field": "--text-field"})."""
    token = _SETTING_NAMES.set(dict(names))
    try:
        yield
    finally:
        _SETTING_NAMES.reset(token)


class DataError(ValueError):
    """Bad data input (missing path, unparsable tokenizer, empty or too-small dataset).

    The message is always a single line that names the offending path or source, so the launcher can
    print it as-is and exit non-zero.
    """


@dataclass
class DataConfig:
    # "stdlib" | a file or directory (.txt .text .md .rst -> text, one document per file; .jsonl .json ->
    # json rows with `text_field`; .parquet; text and json also compressed; a directory holding any other
    # file is refused, see sources.py) | "hf:<name>" or "hf:<name>:<config>" (hub, when online)
    # | a directory written by `python -m haillm.tools.preprocess` (token shards, memory-mapped)
    source: str = "stdlib"
    text_field: str = "text"
    split: str = "train"
    tokenizer: str = "byte"  # "byte" | path to a Hugging Face tokenizer.json (or a directory holding one)
    max_bytes: int = 8_000_000  # cap on raw UTF-8 text bytes read; 0 = no cap
    shuffle: bool = True
    cache_dir: str = ""  # where `datasets` may cache; "" = a private temporary directory, removed after use
    # Weighted blend of preprocessed directories, "WEIGHT:DIR" each (data.blend=[0.7:/d/web,0.3:/d/code]);
    # when given it is the training data instead of `source`. Weights are relative.
    blend: list[str] = field(default_factory=list)
    eval_source: str = ""  # held-out data for train.eval_interval: anything `source` accepts
    eval_holdout: float = 0.0  # or: this fraction of `source`'s sequences (the last ones), never trained on
    prefetch: bool = True  # prepare the next step's batches in a background thread (pinned, copied on CUDA)
