"""Token shards: the directory `python -m haillm.tools.preprocess` writes, and the memory-mapped dataset
that trains from it with `data.source=<that directory>`.

A preprocessed directory holds, for shard i = 0, 1, ...:
- `tokens_<i>.npy`: token ids (uint16 when the vocabulary fits, else uint32), documents back to back, each
  followed by the tokenizer's EOD id: shard after shard, the very stream `packing.pack` cuts;
- `docs_<i>.npy`: int64 end offset in the shard (exclusive, EOD included) of each document;
- `manifest.json`, written last: format, tokenizer (spec, fingerprint, vocab size, EOD id), dtype, source,
  token/document/byte counts and the shards with theirs. A directory without it is unfinished.

Row r of a `seq_len` dataset is tokens [r * (seq_len + 1), (r + 1) * (seq_len + 1)) of the stream, found by
index arithmetic over the shards' cumulative token counts, so any `seq_len` trains from the same shards,
a rank reads only the rows it trains on, and memory does not grow with the corpus.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from haillm.data.config import DataError, setting
from haillm.data.tokenizer import Tokenizer

FORMAT = "haillm-token-shards"
VERSION = 1
MANIFEST = "manifest.json"
SETTINGS = "preprocess.json"  # present while a preprocessing run is unfinished
OPEN_SHARDS = 256  # memory maps kept open (each holds a file descriptor)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def shard_files(index: int) -> tuple[str, str]:
    return f"tokens_{index:06d}.npy", f"docs_{index:06d}.npy"


def _save_atomic(path: Path, parts: Sequence[np.ndarray]) -> None:
    """Write the concatenation of 1-D `parts` as one .npy file, atomically, without a second buffer of the
    whole shard in memory."""
    tmp = path.with_name(path.name + ".tmp")
    header = {"descr": np.lib.format.dtype_to_descr(parts[0].dtype), "fortran_order": False,
              "shape": (sum(len(p) for p in parts),)}
    with open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for part in parts:
            part.tofile(f)
    os.replace(tmp, path)


def write_shard(out_dir: Path, index: int, parts: Sequence[np.ndarray], eod_id: int, num_bytes: int) -> dict:
    """Write shard `index`, the tokens `parts` back to back (each file atomically); returns its manifest entry."""
    ends, offset = [], 0
    for part in parts:
        ends.append(np.flatnonzero(part == eod_id) + offset + 1)
        offset += len(part)
    ends = np.concatenate(ends).astype(np.int64)
    names = shard_files(index)
    _save_atomic(out_dir / names[0], parts)
    _save_atomic(out_dir / names[1], [ends])
    return {"index": index, "tokens": names[0], "docs": names[1], "num_tokens": offset,
            "num_documents": len(ends), "num_bytes": num_bytes}


def npy_length(path: Path) -> tuple[int, np.dtype] | None:
    """(length, dtype) of a 1-D .npy file whose size matches its header, else None (missing, truncated)."""
    try:
        with open(path, "rb") as f:
            fmt = np.lib.format
            version = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read_header(f)
            header = f.tell()
    except (OSError, ValueError):
        return None
    if len(shape) != 1 or path.stat().st_size != header + shape[0] * dtype.itemsize:
        return None
    return shape[0], dtype


def read_manifest(path: str | Path) -> dict | None:
    """The manifest of a preprocessed directory; None when `path` is not one (any other source)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    manifest = path / MANIFEST
    if not manifest.is_file():
        if (path / SETTINGS).is_file():
            try:
                failed = json.loads((path / SETTINGS).read_text()).get("failed")
            except (ValueError, AttributeError):
                failed = None
            if failed:
                raise DataError(f"{path} holds a preprocessing run that failed ({failed}); fix its input and run "
                                "`python -m haillm.tools.preprocess` into it again")
            raise DataError(
                f"{path} holds an unfinished preprocessing run (no {MANIFEST}); run "
                f"`python -m haillm.tools.preprocess` with the same arguments again to finish it"
            )
        return None
    try:
        meta = json.loads(manifest.read_text())
    except ValueError as e:
        raise DataError(f"{manifest} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None  # a data directory that happens to hold a manifest.json of its own
    if meta.get("version") != VERSION:
        raise DataError(f"{manifest} has format version {meta.get('version')}; this haillm reads {VERSION}")
    return meta


def check_tokenizer(meta: dict, tokenizer: Tokenizer, path: str | Path) -> None:
    """Refuse shards written by another tokenizer than `data.tokenizer` (ids would mean other strings)."""
    saved = meta["tokenizer"]
    if saved["fingerprint"] != tokenizer.fingerprint:
        raise DataError(
            f"{path} was tokenized with '{saved['spec']}' ({saved['fingerprint'][:19]}) but {setting('tokenizer')} "
            f"is another tokenizer ({tokenizer.fingerprint[:19]}); set {setting('tokenizer')} to the one used to "
            "preprocess"
        )


class ShardDataset:
    """Rows of `seq_len + 1` tokens of a preprocessed directory, memory-mapped. Same interface as
    `PackedDataset`: row i is one training sequence, `gather(ids)` a LongTensor of rows."""

    def __init__(self, path: str | Path, seq_len: int, tokenizer: Tokenizer):
        self.path = Path(path).expanduser()
        meta = read_manifest(self.path)
        if meta is None:
            raise DataError(f"{self.path} is not a preprocessed directory (no haillm {MANIFEST})")
        check_tokenizer(meta, tokenizer, self.path)
        self.tokenizer, self._seq_len = tokenizer, seq_len
        self.source = f"preprocessed {self.path} (from {meta['source']})"
        dtype = np.dtype(meta["dtype"])
        self.files = [self.path / s["tokens"] for s in meta["shards"]]
        for file, shard in zip(self.files, meta["shards"], strict=True):
            if npy_length(file) != (shard["num_tokens"], dtype):
                raise DataError(f"token shard {file} is missing, truncated or not the one {MANIFEST} lists")
        self.starts = np.concatenate([[0], np.cumsum([s["num_tokens"] for s in meta["shards"]])]).astype(np.int64)
        self.num_tokens = int(self.starts[-1])
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # the prefetch thread and evaluation may read at once

    @property
    def num_samples(self) -> int:
        return self.num_tokens // (self._seq_len + 1)

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.gather([index])[0]

    def _shard(self, i: int) -> np.ndarray:
        with self._lock:
            tokens = self._maps.pop(i, None)
            if tokens is None:
                tokens = np.load(self.files[i], mmap_mode="r")
                if len(self._maps) >= OPEN_SHARDS:
                    self._maps.popitem(last=False)
            self._maps[i] = tokens
            return tokens

    def read(self, start: int, out: np.ndarray) -> None:
        """Fill `out` with the stream's tokens from global offset `start` on (across shards if needed)."""
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < len(out):
            offset = start + done - int(self.starts[shard])
            piece = self._shard(shard)[offset : offset + len(out) - done]
            out[done : done + len(piece)] = piece
            done += len(piece)
            shard += 1

    def gather(self, indices: Sequence[int]) -> torch.Tensor:
        """LongTensor [len(indices), seq_len + 1] of the given rows, in the given order."""
        width = self._seq_len + 1
        out = np.empty((len(indices), width), dtype=np.int64)
        for k, row in enumerate(indices):
            if not 0 <= row < self.num_samples:
                raise IndexError(f"row {row} out of range for {self.num_samples} rows")
            self.read(int(row) * width, out[k])
        return torch.from_numpy(out)
