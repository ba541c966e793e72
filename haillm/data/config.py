"""The data section of the run config, and the one exception the data pipeline raises."""

from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """Bad data input (missing path, unparsable tokenizer, empty or too-small dataset).

    The message is always a single line that names the offending path or source, so the launcher can
    print it as-is and exit non-zero.
    """


@dataclass
class DataConfig:
    # "stdlib" | a file or directory (.txt .md .py .rst -> text, one document per file; .jsonl .json ->
    # json rows with `text_field`; .parquet) | "hf:<name>" or "hf:<name>:<config>" (hub, when online)
    source: str = "stdlib"
    text_field: str = "text"
    split: str = "train"
    tokenizer: str = "byte"  # "byte" | path to a Hugging Face tokenizer.json (or a directory holding one)
    max_bytes: int = 8_000_000  # cap on raw UTF-8 text bytes read; 0 = no cap
    shuffle: bool = True
    cache_dir: str = ""  # where `datasets` may cache; "" = a private temporary directory, removed after use
