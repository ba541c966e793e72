"""Preprocessing throughput (`haillm.tools.preprocess`) on a generated corpus, byte and BPE tokenizers.

    python bench/preprocess.py [--mb 200] [--workers 1 2] [--bpe-vocab 4096]

Generates a deterministic jsonl corpus of --mb MB of text and a byte-level BPE tokenizer.json trained on
its first 5 MB, then measures in this run, on the same corpus:
- read: streaming the documents alone (no tokenization): the ceiling for any tokenizer;
- in-memory packing: `build_dataset`, what every rank did before preprocessing (one process, byte);
- preprocess with each tokenizer and each --workers value (whole run: reading, tokenizing, writing shards).
Prints MB/s of UTF-8 text and M tokens/s, with ratios against in-memory packing and against reading. The
machine's load average is printed first: other work on the cores lowers every figure.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from haillm.data import DataConfig, build_dataset, iter_documents  # noqa: E402
from haillm.data.synthetic import documents, train_bpe, write_corpus  # noqa: E402
from haillm.tools.preprocess import preprocess  # noqa: E402


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=200, help="MB of text (default 200)")
    p.add_argument("--workers", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    p.add_argument("--bpe-vocab", type=int, default=4096)
    a = p.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="haillm-bench-") as tmp:
        root = Path(tmp)
        corpus = root / "corpus.jsonl"
        seconds, n_docs = timed(lambda: write_corpus(corpus, int(a.mb * 1e6)))
        seconds_bpe, bpe = timed(lambda: train_bpe(root / "tokenizer.json", documents(5_000_000), a.bpe_vocab))
        print(f"corpus: {n_docs} documents, {a.mb:.0f} MB of text in {corpus.stat().st_size / 1e6:.0f} MB of jsonl "
              f"(generated in {seconds:.1f} s); BPE vocab {a.bpe_vocab} trained on 5 MB in {seconds_bpe:.1f} s")
        cfg = DataConfig(source=str(corpus), max_bytes=0)
        total = sum(len(d.encode()) for batch in iter_documents(cfg, streaming=True) for d in batch)
        rows = []
        seconds, _ = timed(lambda: sum(len(b) for b in iter_documents(cfg, streaming=True)))
        rows.append(("read (streaming, no tokenizer)", "-", seconds, None))
        seconds, packed = timed(lambda: build_dataset(cfg, seq_len=2048))
        rows.append(("in-memory packing (before)", "byte", seconds, packed.num_tokens))
        del packed
        for name, spec in (("byte", "byte"), ("bpe", str(bpe))):
            for workers in a.workers:
                out = root / f"{name}_{workers}"
                meta = preprocess(DataConfig(source=str(corpus), tokenizer=spec, max_bytes=0), out, workers,
                                  progress=False)
                rows.append((f"preprocess, {workers} worker(s)", name, meta["throughput"]["seconds"],
                             meta["num_tokens"]))
        base_read, base_packing = rows[0][2], rows[1][2]
        print(f"{'':34} {'tokenizer':>9} {'MB/s':>8} {'Mtok/s':>8} {'x packing':>10} {'x read':>8}")
        for label, tok, seconds, tokens in rows:
            mtok = f"{tokens / seconds / 1e6:8.2f}" if tokens else f"{'-':>8}"
            print(f"{label:34} {tok:>9} {total / 1e6 / seconds:8.1f} {mtok} {base_packing / seconds:10.2f} "
                  f"{base_read / seconds:8.2f}")


if __name__ == "__main__":
    main()
