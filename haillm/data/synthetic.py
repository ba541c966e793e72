"""Deterministic synthetic text corpora of any size, fast to make (~100 MB/s): for tests and benchmarks of
the data pipeline, where the text's content does not matter but its size, document lengths and a few
multi-byte characters do.

    python -m haillm.data.synthetic OUT.jsonl --mb 200 [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

EXTRA_WORDS = ["café", "naïve", "Straße", "世界", "データ", "🚀", "—"]


def documents(total_bytes: int, seed: int = 0, max_doc_words: int = 3000) -> Iterator[str]:
    """Documents of 20..max_doc_words random words until about `total_bytes` UTF-8 bytes, same for a seed."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, int(n))) for n in rng.integers(1, 10, 5000)] + EXTRA_WORDS
    vocab = np.array(words, dtype=object)
    written = 0
    while written < total_bytes:
        text = " ".join(vocab[rng.integers(0, len(vocab), int(rng.integers(20, max_doc_words)))])
        written += len(text.encode("utf-8"))
        yield text


def write_corpus(path: str | Path, total_bytes: int, seed: int = 0, max_doc_words: int = 3000) -> int:
    """Write `path` (.jsonl: {"text": ...} rows; otherwise a directory of one .txt file per document) with
    about `total_bytes` bytes of text; returns the number of documents."""
    path = Path(path)
    docs = documents(total_bytes, seed, max_doc_words)
    if path.suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as out:
            return sum(out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n") > 0 for text in docs)
    path.mkdir(parents=True, exist_ok=True)
    return sum((path / f"doc_{i:07d}.txt").write_text(text, encoding="utf-8") > 0 for i, text in enumerate(docs))


def train_bpe(path: str | Path, texts: Iterable[str], vocab_size: int = 4096) -> Path:
    """Train a byte-level BPE tokenizer.json with an "<|endoftext|>" EOD (4k on 5 MB: ~2 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m haillm.data.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="OUT.jsonl (json rows) or a directory (one .txt file per document)")
    p.add_argument("--mb", type=float, required=True, help="MB of text")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    docs = write_corpus(args.out, int(args.mb * 1e6), args.seed)
    print(f"{docs} documents, {args.mb} MB -> {args.out}")


if __name__ == "__main__":
    main()
