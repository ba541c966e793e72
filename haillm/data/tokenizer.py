"""Tokenizers: a file-free byte tokenizer (the default) and any Hugging Face `tokenizer.json`.

Both expose `vocab_size`, `eod_id`, `fingerprint`, `encode`, `decode` and `encode_documents`, the batched
path packing and preprocessing use: it tokenizes many documents at once and returns one flat array with
`eod_id` after each. `fingerprint` identifies the vocabulary and rules, so token shards written with one
tokenizer are never read with another.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

import numpy as np

from haillm.data.config import DataError, setting

# Checked in this order; the first one the tokenizer knows becomes the end-of-document id.
EOD_CANDIDATES = (
    "<|endoftext|>",
    "<｜end▁of▁sentence｜>",  # DeepSeek-V3
    "<|end_of_text|>",  # Llama 3
    "</s>",
    "<eos>",
    "<|eos|>",
)
# The parts of a tokenizer.json that decide the ids `encode_documents` produces: not the decoder, nor the
# post-processor (encoding adds no template tokens), nor padding and truncation (turned off).
ENCODING_KEYS = ("added_tokens", "normalizer", "pre_tokenizer", "model")


class Tokenizer(Protocol):
    vocab_size: int
    eod_id: int
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_documents(self, texts: list[str], dtype: type = np.int32) -> np.ndarray: ...


def join_with_eod(flat: np.ndarray, lengths: np.ndarray, eod_id: int, dtype: type = np.int32) -> np.ndarray:
    """Insert `eod_id` after each of the consecutive runs of `lengths` tokens in `flat`, as `dtype`.

    One slice copy per document: measured 4x faster than a boolean-mask scatter on 40 MB of text, and
    no slower on short documents.
    """
    out = np.empty(int(lengths.sum()) + len(lengths), dtype=dtype)
    src = dst = 0
    for n in lengths.tolist():
        out[dst : dst + n] = flat[src : src + n]
        out[dst + n] = eod_id
        src, dst = src + n, dst + n + 1
    return out


def _without_unset(node: object) -> object:
    """`node` without the keys whose value is None or False: `tokenizers` releases add fields with such
    defaults (BPE's `ignore_merges` in 0.19), which must not change a fingerprint."""
    if isinstance(node, dict):
        return {k: _without_unset(v) for k, v in node.items() if v is not None and v is not False}
    if isinstance(node, list):
        return [_without_unset(v) for v in node]
    return node


def encoding_fingerprint(spec: dict, eod_id: int) -> str:
    """sha256 of what decides the ids of a parsed tokenizer.json (`spec`) and of its EOD id, in a form the
    `tokenizers` version that serialised it does not change: the encoding keys only, unset fields dropped,
    BPE merges as pairs (written "a b" before tokenizers 0.20, ["a", "b"] since), keys sorted."""
    parts = {key: spec.get(key) for key in ENCODING_KEYS}
    model = dict(parts["model"] or {})
    if isinstance(model.get("merges"), list):
        model["merges"] = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    parts |= {"model": model, "eod_id": eod_id}
    canonical = json.dumps(_without_unset(parts), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus end-of-document (256) and pad (257). Needs no files."""

    vocab_size = 258
    eod_id = 256
    pad_id = 257
    fingerprint = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        arr = np.asarray(ids, dtype=np.int64)
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def encode_documents(self, texts: list[str], dtype: type = np.int32) -> np.ndarray:
        raw = [t.encode("utf-8") for t in texts]
        lengths = np.fromiter(map(len, raw), dtype=np.int64, count=len(raw))
        return join_with_eod(np.frombuffer(b"".join(raw), dtype=np.uint8), lengths, self.eod_id, dtype)


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer loaded from a tokenizer.json.

    End of document is the first of `EOD_CANDIDATES` the tokenizer knows. If it knows none,
    "<|endoftext|>" is added as a special token, which appends it at the end of the vocabulary.
    Encoding never adds the tokenizer's own BOS/EOS template tokens: documents get exactly one EOD each.
    The file's own padding and truncation settings are turned off: they would pad documents with ids and
    cut them short inside a batched call.
    """

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        path = Path(path).expanduser()
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{setting('tokenizer')}: tokenizer file {path} does not exist (expected 'byte' or a "
                            "Hugging Face tokenizer.json, or a directory holding one)")
        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"{setting('tokenizer')}: tokenizer file {path} does not parse as a Hugging Face "
                            f"tokenizer.json: {reason}") from e
        self.path = path
        self._tok.no_padding()
        self._tok.no_truncation()
        eod = next((i for name in EOD_CANDIDATES if (i := self._tok.token_to_id(name)) is not None), None)
        if eod is None:
            self._tok.add_special_tokens([EOD_CANDIDATES[0]])
            eod = self._tok.token_to_id(EOD_CANDIDATES[0])
        self.eod_id: int = eod
        # max id + 1 rather than the count, in case the vocabulary has holes
        self.vocab_size: int = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        # of the library's own serialisation, so a reformatted copy of the file still matches
        self.fingerprint: str = encoding_fingerprint(json.loads(self._tok.to_str()), eod)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def encode_documents(self, texts: list[str], dtype: type = np.int32) -> np.ndarray:
        encodings = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        ids = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.concatenate([np.asarray(doc, dtype=dtype) for doc in ids] or [np.empty(0, dtype)])
        return join_with_eod(flat, lengths, self.eod_id, dtype)


def build_tokenizer(spec: str) -> Tokenizer:
    """ "byte" -> ByteTokenizer; anything else is a path to a tokenizer.json (or a directory holding one)."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)
