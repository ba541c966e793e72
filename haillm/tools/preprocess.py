"""Offline tokenization into memory-mapped token shards (train with `data.source=OUT_DIR`).

    python -m haillm.tools.preprocess SOURCE OUT_DIR [--tokenizer byte|PATH/tokenizer.json] [--workers N]

SOURCE is anything `data.source` accepts (a file, a directory, `stdlib`, `hf:<name>[:<config>]`), read as a
stream in the order training reads it. The main process cuts the documents into chunks of `--shard-mb`
MB of text; worker processes tokenize them (batched `tokenizers` calls) and each writes one shard (see
`haillm.data.shards` for the format). The main process records every finished shard in `progress.jsonl`, in
order, and writes `manifest.json` last. An interrupted run resumes when started again with the same
arguments and an unchanged source (finished shards are kept; their text is read again but not tokenized),
or restarts from scratch with `--overwrite`. A run that failed (bad input: a missing text field, an unreadable
file) or finished no shard is no such work to protect: started again with other arguments or over a fixed
source, it replaces that unfinished output without `--overwrite` (same arguments still resume it). A finished
output needs `--overwrite`, and a directory holding anything else is never written. A run holds a lock on
OUT_DIR, so two never write it at once. Errors name this tool's flags (`--text-field`), not the trainer's keys.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from haillm.data.config import DataConfig, DataError, setting_names
from haillm.data.shards import (
    FORMAT,
    MANIFEST,
    SETTINGS,
    VERSION,
    npy_length,
    read_manifest,
    shard_files,
    token_dtype,
    write_shard,
)
from haillm.data.sources import describe_source, iter_documents, local_files, stdlib_root
from haillm.data.tokenizer import ByteTokenizer, Tokenizer, build_tokenizer

PROGRESS = "progress.jsonl"
LOCK = ".lock"  # flock'ed by the run writing the directory
SUB_BATCH_CHARS = 1 << 20  # text per tokenizer call in a worker: bounds the tokenizer's own buffers
# The command line's names of the DataConfig fields (error messages of the data pipeline use them), and of the
# run settings a resume compares.
FLAGS = {"source": "SOURCE", "text_field": "--text-field", "split": "--split", "tokenizer": "--tokenizer",
         "max_bytes": "--max-bytes"}
SETTING_FLAGS = {**FLAGS, "chunk_chars": "--shard-mb", "dtype": "--tokenizer", "source_files": "SOURCE"}


def chunks(docs: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    """Consecutive documents grouped into lists of at least `max_chars` characters (the last may be less)."""
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# --- worker side ----------------------------------------------------------------------------------------

_worker: dict = {}


def _init_worker(spec: str, out_dir: str, dtype: str, pooled: bool = True) -> None:
    if pooled:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (it ends the pool)
    _worker.update(tokenizer=build_tokenizer(spec), out_dir=Path(out_dir), dtype=dtype)


def _tokenize(index: int, docs: list[str]) -> dict:
    """Tokenize one chunk and write it as shard `index`; returns its manifest entry."""
    tok, dtype = _worker["tokenizer"], _worker["dtype"]
    parts = [tok.encode_documents(batch, dtype) for batch in chunks(docs, SUB_BATCH_CHARS)]
    # UTF-8 bytes of text, for throughput: byte tokens are exactly those (all but the EODs)
    num_tokens = sum(len(p) for p in parts)
    num_bytes = num_tokens - len(docs) if isinstance(tok, ByteTokenizer) else sum(len(d.encode()) for d in docs)
    return write_shard(_worker["out_dir"], index, parts, tok.eod_id, num_bytes)


class _Now:
    """A result computed in the main process (`--workers 0`), answering like the Pool's AsyncResult."""

    def __init__(self, value: dict):
        self.value = value

    def get(self) -> dict:
        return self.value

    def ready(self) -> bool:
        return True

    successful = ready


# --- run state ----------------------------------------------------------------------------------------


def _ours(name: str) -> bool:
    return (name in (MANIFEST, SETTINGS, PROGRESS, LOCK) or name.endswith(".tmp")
            or (name.endswith(".npy") and name.startswith(("tokens_", "docs_"))))


def _finished_shards(out: Path, dtype: str) -> list[dict]:
    """Shards of an interrupted run that are complete on disk, in order (the valid prefix of progress)."""
    done = []
    path = out / PROGRESS
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            break  # a line cut by the interruption
        tokens, docs = shard_files(len(done))
        ok = (entry.get("index") == len(done) and npy_length(out / tokens) == (entry["num_tokens"], dtype)
              and npy_length(out / docs) is not None)
        if not ok:
            break
        done.append(entry)
    return done


@contextlib.contextmanager
def claim_out_dir(out: Path) -> Iterator[None]:
    """Create `out` (new, or holding only our files) and hold its lock for the run, so that no other run
    writes the same shards and tmp files. The lock file is removed, still locked, when the run ends."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in out.iterdir() if not _ours(p.name))
    if foreign:
        raise DataError(f"output directory {out} holds other files ({', '.join(foreign[:3])}); choose an "
                        "empty or new directory")
    path = out / LOCK
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino  # not a file a run ending removed
        except (BlockingIOError, FileNotFoundError):
            held = False
        if not held:
            raise DataError(f"another preprocess is writing {out}")
        try:
            yield
        finally:
            path.unlink()


def prepare_out_dir(out: Path, settings: dict, overwrite: bool) -> list[dict]:
    """Make the claimed `out` ready; returns the shards an interrupted run with the same settings wrote.

    An unfinished run with other settings (or over a changed source) is replaced when it failed or finished no
    shard (nothing worth keeping), and refused otherwise: an interrupted run's shards are hours of work that a
    mistyped flag must not discard (`--overwrite` does)."""
    if (out / MANIFEST).is_file() and not overwrite:
        raise DataError(f"{out} already holds a finished preprocessed dataset; pass --overwrite to redo it")
    done: list[dict] = []
    if (out / SETTINGS).is_file() and not overwrite:
        try:
            saved = json.loads((out / SETTINGS).read_text())
        except ValueError:
            saved = {}
        saved = saved if isinstance(saved, dict) else {}
        changed = [k for k in settings if saved.get(k) != settings[k]]
        finished = _finished_shards(out, saved.get("dtype", settings["dtype"]))
        if changed and (saved.get("failed") or not finished):
            why = f"it failed: {saved['failed']}" if saved.get("failed") else "it finished no shard"
            print(f"replacing the unfinished run in {out} ({why}; {SETTING_FLAGS.get(changed[0], changed[0])} "
                  "differs now)", file=sys.stderr)
        elif changed == ["source_files"]:
            raise DataError(f"source {settings['source']} changed (files added, removed, resized or modified) "
                            f"since the interrupted run in {out} started; pass --overwrite to start again")
        elif changed:
            k = changed[0]
            flag = f" ({SETTING_FLAGS[k]})" if k in SETTING_FLAGS else ""
            raise DataError(f"{out} holds an interrupted run with {k}={saved.get(k)!r}{flag}, not "
                            f"{settings[k]!r}; run with the same arguments to resume it, or pass --overwrite to "
                            "start again")
        else:
            done = finished
    keep = {name for entry in done for name in shard_files(entry["index"])}
    for p in out.iterdir():
        if _ours(p.name) and p.name not in keep and p.name not in (PROGRESS, LOCK):
            p.unlink()
    (out / PROGRESS).write_text("".join(json.dumps(e) + "\n" for e in done))
    tmp = out / (SETTINGS + ".tmp")
    tmp.write_text(json.dumps(settings, indent=1))
    os.replace(tmp, out / SETTINGS)
    return done


# --- the run ------------------------------------------------------------------------------------------


def _source_key(source: str) -> str:
    return source if source == "stdlib" or source.startswith("hf:") else str(Path(source).expanduser().resolve())


def _source_root(cfg: DataConfig) -> Path | None:
    """The local file or directory `cfg.source` reads; None for a hub dataset."""
    if cfg.source.startswith("hf:"):
        return None
    return stdlib_root() if cfg.source == "stdlib" else Path(cfg.source).expanduser()


def _source_files(cfg: DataConfig) -> str | None:
    """sha256 of the (path relative to the source, size, mtime_ns) of each local file read: a resume of a
    changed source is refused, at the cost of a stat per file. None for a hub dataset: `data.source` names
    no revision, so its name (in the settings) is all that identifies it."""
    root = _source_root(cfg)
    if root is None:
        return None
    base = root if root.is_dir() else root.parent
    files = sorted(f for group in local_files(cfg).values() for f in group)
    stats = [(str(f.relative_to(base)), (st := f.stat()).st_size, st.st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def preprocess(cfg: DataConfig, out_dir: str | Path, workers: int = 1, shard_mb: float = 16,
               overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenize `cfg.source` into shards under `out_dir`; returns the manifest. Resumes an unfinished run."""
    start = time.perf_counter()
    out = Path(out_dir).expanduser()
    tokenizer = build_tokenizer(cfg.tokenizer)  # a bad tokenizer or path fails before anything is written
    if read_manifest(cfg.source) is not None:
        raise DataError(f"{cfg.source} is already a preprocessed directory: train with data.source={cfg.source}")
    root = _source_root(cfg)
    if root is not None and root.is_dir() and out.resolve().is_relative_to(root.resolve()):
        raise DataError(f"output {out} is inside the source directory {root}, whose files would be read as "
                        "data; choose an output outside it")
    dtype = token_dtype(tokenizer.vocab_size)
    chunk_chars = max(1, int(shard_mb * 2**20))
    settings = {"format": FORMAT, "version": VERSION, "source": _source_key(cfg.source),
                "text_field": cfg.text_field, "split": cfg.split, "max_bytes": cfg.max_bytes,
                "tokenizer": tokenizer.fingerprint, "dtype": dtype.str, "chunk_chars": chunk_chars,
                "source_files": _source_files(cfg)}  # last: a changed setting is named before the files it reads
    with claim_out_dir(out):
        done = prepare_out_dir(out, settings, overwrite)
        try:
            manifest = _write(cfg, out, settings, tokenizer, done, workers, progress)
        except Exception as exc:  # not an interruption (KeyboardInterrupt, SystemExit): a retry may replace it
            _record_failure(out, settings, exc)
            raise
    seconds = time.perf_counter() - start
    new_bytes = manifest["num_bytes"] - sum(e["num_bytes"] for e in done)
    new_tokens = manifest["num_tokens"] - sum(e["num_tokens"] for e in done)
    manifest["throughput"] = {"seconds": seconds, "bytes": new_bytes, "tokens": new_tokens,
                              "mb_per_s": new_bytes / 1e6 / seconds, "tokens_per_s": new_tokens / seconds}
    return manifest


def _record_failure(out: Path, settings: dict, exc: BaseException) -> None:
    """Mark the unfinished run in `out` as failed (its reason in the settings file), so that a retry with other
    arguments, or over a fixed source, replaces it instead of asking for --overwrite."""
    if (out / MANIFEST).is_file() or not (out / SETTINGS).is_file():
        return
    reason = " ".join(str(exc).split())[:300] or type(exc).__name__
    tmp = out / (SETTINGS + ".tmp")
    try:
        tmp.write_text(json.dumps({**settings, "failed": reason}, indent=1))
        os.replace(tmp, out / SETTINGS)
    except OSError:  # e.g. the disk is full: the run stays an interrupted one
        pass


def _write(cfg: DataConfig, out: Path, settings: dict, tokenizer: Tokenizer, done: list[dict], workers: int,
           progress: bool) -> dict:
    """Tokenize the shards after `done` in `workers` processes, then write the manifest; returns it."""
    from tqdm import tqdm

    dtype = np.dtype(settings["dtype"])
    chunk_chars = settings["chunk_chars"]
    if done:
        print(f"resuming: {len(done)} shards already written; reading past their text", file=sys.stderr)
    # Fork before any reading starts threads (pyarrow); the workers need no module the main one lacks.
    pool = mp.get_context("fork").Pool(workers, _init_worker, (cfg.tokenizer, str(out), dtype.str)) if workers else None
    if pool is None:
        _init_worker(cfg.tokenizer, str(out), dtype.str, pooled=False)
    shards = list(done)
    bar = tqdm(desc="tokenizing", unit="B", unit_scale=True, disable=None if progress else True,
               initial=sum(e["num_bytes"] for e in done))
    record = open(out / PROGRESS, "a")

    def finish(entry: dict) -> None:
        shards.append(entry)
        record.write(json.dumps(entry) + "\n")
        record.flush()
        bar.update(entry["num_bytes"])
        bar.set_postfix(shards=len(shards), refresh=False)

    pending: deque = deque()
    try:
        documents = itertools.chain.from_iterable(iter_documents(cfg, streaming=True))
        for index, docs in enumerate(chunks(documents, chunk_chars)):
            if index < len(done):
                continue
            pending.append(pool.apply_async(_tokenize, (index, docs)) if pool else _Now(_tokenize(index, docs)))
            while len(pending) > workers:  # bounded: reading runs at most one chunk per worker ahead
                finish(pending.popleft().get())
        while pending:
            finish(pending.popleft().get())
    except BaseException:
        while pending and pending[0].ready() and pending[0].successful():  # keep what is done for a resume
            finish(pending.popleft().get())
        raise
    finally:
        if pool is not None:
            pool.terminate()  # every task has finished, or the run stops here
            pool.join()
        bar.close()
        record.close()
    manifest = {
        "format": FORMAT, "version": VERSION, "source": describe_source(cfg),
        "source_config": {k: settings[k] for k in ("source", "text_field", "split", "max_bytes")},
        "tokenizer": {"spec": cfg.tokenizer, "fingerprint": tokenizer.fingerprint,
                      "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id},
        "dtype": dtype.name, "chunk_chars": chunk_chars,
        "num_tokens": sum(e["num_tokens"] for e in shards),
        "num_documents": sum(e["num_documents"] for e in shards),
        "num_bytes": sum(e["num_bytes"] for e in shards),
        "shards": [{k: e[k] for k in ("tokens", "docs", "num_tokens", "num_documents", "num_bytes")} for e in shards],
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    (out / SETTINGS).unlink()
    (out / PROGRESS).unlink()
    return manifest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m haillm.tools.preprocess", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="file, directory, 'stdlib' or hf:<name>[:<config>] (as data.source)")
    p.add_argument("out_dir", help="directory for the shards and manifest.json (new or empty)")
    p.add_argument("--tokenizer", default="byte", help="'byte' (default) or a tokenizer.json path")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                   help="tokenizer processes (default: one per core but the reader's; 0 = in the main process)")
    p.add_argument("--text-field", default="text", help="json/parquet field holding the text (default: text)")
    p.add_argument("--split", default="train", help="dataset split (default: train)")
    p.add_argument("--max-bytes", type=int, default=0, help="stop after this many bytes of text (0 = all)")
    p.add_argument("--shard-mb", type=float, default=16, help="MB of text per shard (default: 16)")
    p.add_argument("--overwrite", action="store_true", help="discard a finished or unfinished run in OUT_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.workers < 0:
        p.error(f"--workers={args.workers} must be >= 0")
    if args.shard_mb <= 0:
        p.error(f"--shard-mb={args.shard_mb} must be positive")
    if args.max_bytes < 0:
        p.error(f"--max-bytes={args.max_bytes} must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = DataConfig(source=args.source, text_field=args.text_field, split=args.split,
                     tokenizer=args.tokenizer, max_bytes=args.max_bytes)
    try:
        with setting_names(FLAGS):  # the data pipeline's messages name --text-field, not data.text_field
            m = preprocess(cfg, args.out_dir, args.workers, args.shard_mb, args.overwrite, not args.no_progress)
    except (DataError, OSError) as e:
        print(f"haillm.tools.preprocess: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"haillm.tools.preprocess: interrupted; run the same command again to resume in {args.out_dir}",
              file=sys.stderr)
        return 130
    t = m["throughput"]
    print(f"{m['num_documents']} documents, {m['num_bytes'] / 1e6:.1f} MB of text -> {m['num_tokens']} tokens "
          f"({m['dtype']}) in {len(m['shards'])} shards | {t['mb_per_s']:.1f} MB/s, "
          f"{t['tokens_per_s'] / 1e6:.2f}M tokens/s over {t['seconds']:.1f} s | {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
