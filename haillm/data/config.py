"""The data section of the run config, and the one exception the data pipeline raises."""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(ValueError):
    """Bad data input (missing path, unparsable tokenizer, empty or too-small dataset).

    The message is always a single line that names the offending path or source, so the launcher can
    print it as-is and exit non-zero.
    """


@dataclass
class DataConfig:
    # "stdlib" | a file or directory (.txt .md .py .rst -> text, one document per file; .jsonl .json ->
    # json rows with `text_field`; .parquet) | "hf:<name>" or "hf:<name>:<config>" (hub, when online)
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
