"""Where documents come from: the Python standard library (the default), local files, or the hub.

Everything is read through Hugging Face `datasets`. `iter_documents(cfg)` yields batches of non-empty
document strings in a deterministic order, capped at `cfg.max_bytes` UTF-8 bytes in total. Local sources
are loaded offline into a private temporary cache (unless `cfg.cache_dir` is set), so nothing lands in
the repository and concurrent runs never share cache files.

`iter_documents(cfg, streaming=True)` yields the same documents in the same order without building a
cache (what preprocessing uses, for corpora larger than memory or disk): json, parquet and hub sources
through `datasets` streaming, text files one at a time exactly as the `text` builder's document mode
reads them (`open(path, encoding="utf-8", errors="replace").read()`), which its streaming mode does at
~5 ms per file.
"""

from __future__ import annotations

import contextlib
import os
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from haillm.data.config import DataConfig, DataError, setting

# The corpus files a local source may hold, by suffix (case-insensitive). A directory is read whole: any other
# file in it (a script, a .csv, a README without a suffix, a compressed parquet) is refused with the list of
# them, never read as text nor skipped unseen; hidden files and directories are left out. Source code is not a
# corpus type here (a helper script next to the data was once trained on); only `stdlib` reads .py files.
BUILDER_BY_SUFFIX = {
    ".txt": "text", ".text": "text", ".md": "text", ".rst": "text",
    ".jsonl": "json", ".json": "json",
    ".parquet": "parquet",
}  # fmt: skip
# Text and json files may be compressed (`datasets` decompresses them by their last suffix; .zst needs the
# zstandard package, a dependency of haillm): corpus.jsonl.gz reads as corpus.jsonl.
COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma", ".zst": "zstandard"}
SUPPORTED = " ".join(BUILDER_BY_SUFFIX) + " (text and json also as .gz .bz2 .xz .zst)"
LISTED = 5  # refused files named in the message; the rest are counted
# The stdlib's test suites hold deliberately odd files (bad encodings, generated data); installed
# packages are not the stdlib.
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
BATCH_DOCS = 256


def reason(e: BaseException) -> str:
    """First line of the root cause of an exception, for one-line error messages."""
    while e.__cause__ is not None:  # datasets wraps the informative error in a generic one
        e = e.__cause__
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def describe_source(cfg: DataConfig) -> str:
    if cfg.source == "stdlib":
        return f"the Python standard library at {stdlib_root()}"
    if cfg.source.startswith("hf:"):
        return f"hub dataset {cfg.source[3:]} (split {cfg.split})"
    return f"data source {Path(cfg.source).expanduser()}"


def builder_of(path: Path) -> str | None:
    """The `datasets` builder that reads `path` ("text", "json", "parquet"), compressed or not; None: unsupported."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        inner = BUILDER_BY_SUFFIX.get(suffixes[-2]) if len(suffixes) > 1 else None
        return inner if inner in ("text", "json") else None
    return BUILDER_BY_SUFFIX.get(suffixes[-1]) if suffixes else None


def _open_text(path: Path):
    """A text file for reading, decompressed by its suffix, decoded as the `text` builder decodes it."""
    compression = COMPRESSED.get(path.suffix.lower())
    if compression == "zstandard":
        import zstandard

        return zstandard.open(path, "rt", encoding="utf-8", errors="replace")
    if compression is not None:
        module = __import__(compression)
        return module.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _walk(root: Path, keep, skip_dirs: set[str] = frozenset()) -> list[Path]:
    """Files under `root` that `keep(path)` accepts, hidden entries skipped, in sorted (deterministic) order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".") and keep(Path(dirpath, f))]
    return sorted(found)


def _first_bytes(files: list[Path], max_bytes: int) -> list[Path]:
    """The leading files whose sizes reach `max_bytes` (all when 0): a cap avoids loading the rest."""
    if not max_bytes:
        return files
    kept, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        kept.append(f)
        total += f.stat().st_size
    return kept


def local_files(cfg: DataConfig) -> dict[str, list[Path]]:
    """The non-empty files to read, grouped by `datasets` builder ("text", "json", "parquet")."""
    if cfg.source == "stdlib":
        root = stdlib_root()
        files = _walk(root, lambda path: path.suffix == ".py", STDLIB_SKIP_DIRS)
        if not files:
            raise DataError(
                f"no .py files under the Python standard library at {root}; set {setting('source')} to a path"
            )
        builder = lambda path: "text"  # noqa: E731
    else:
        root, builder = Path(cfg.source).expanduser(), builder_of
        if not root.exists():
            raise DataError(
                f"data source {root} does not exist (expected 'stdlib', 'hf:<name>[:<config>]', "
                f"or a file or directory of {SUPPORTED} files)"
            )
        if root.is_dir():
            files = _walk(root, lambda path: True)
            others = [str(f.relative_to(root)) for f in files if builder_of(f) is None]
            if others:
                more = f" and {len(others) - LISTED} more" if len(others) > LISTED else ""
                raise DataError(
                    f"data directory {root} holds {len(others)} file(s) that are not corpus files: "
                    f"{', '.join(others[:LISTED])}{more}; accepted: {SUPPORTED}. Move them out, or name a "
                    "directory (or a file) holding corpus files only"
                )
            if not files:
                raise DataError(f"data directory {root} holds no corpus files ({SUPPORTED})")
        elif builder_of(root) is not None:
            files = [root]
        else:
            raise DataError(f"data file {root} has an unsupported type (expected one of {SUPPORTED})")
    files = [f for f in files if f.stat().st_size > 0]
    if not files:
        raise DataError(f"{describe_source(cfg)} is empty: all its files have zero bytes")
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(builder(f), []).append(f)
    if "text" in groups:
        groups["text"] = _first_bytes(groups["text"], cfg.max_bytes)
    return groups


@contextlib.contextmanager
def _datasets_session(cache_dir: str, offline: bool):
    """Import `datasets` quietly (no progress bars, no logs), offline unless reading the hub; pick a cache.

    Offline mode is switched by the flags `datasets` and `huggingface_hub` consult at call time (what
    HF_DATASETS_OFFLINE=1 sets at import), and restored afterwards.

    "" gives local sources a fresh temporary directory (deleted afterwards: the packed tokens are copied
    out) and hub sources datasets' own cache (HF_DATASETS_CACHE, by default ~/.cache/huggingface).
    """
    import datasets
    import huggingface_hub.constants as hub_constants

    saved_offline = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    bars_were_on = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # failures surface as one DataError line
    if offline:
        datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        if cache_dir:
            yield datasets, str(Path(cache_dir).expanduser())
        elif offline:
            with tempfile.TemporaryDirectory(prefix="haillm-datasets-") as tmp:
                yield datasets, tmp
        else:
            yield datasets, None
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved_offline
        datasets.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


def _column_batches(ds, field: str, what: str) -> Iterator[list]:
    """Batches of one column of a Dataset or IterableDataset."""
    columns = ds.column_names
    if columns is not None and field not in columns:
        raise DataError(f"{what} has no field '{field}' (fields: {', '.join(columns)}); name the one holding "
                        f"the text with {setting('text_field')}")
    for batch in ds.select_columns([field]).iter(batch_size=BATCH_DOCS):
        yield batch[field]


def _cap(batches: Iterable[list], max_bytes: int, what: str) -> Iterator[list[str]]:
    """Drop empty documents, stop after `max_bytes` UTF-8 bytes (cutting the last one), reject no text."""
    total = 0
    for texts in batches:
        docs = []
        for text in texts:
            if not text:
                continue
            if not isinstance(text, str):
                raise DataError(f"{what}: the text field holds {type(text).__name__} values, not strings")
            if max_bytes:
                raw = text.encode("utf-8")
                if total + len(raw) > max_bytes:
                    raw = raw[: max_bytes - total]
                    text = raw.decode("utf-8", errors="ignore")
                total += len(raw)
            else:
                total += len(text)
            if text:
                docs.append(text)
            if max_bytes and total >= max_bytes:
                break
        if docs:
            yield docs
        if max_bytes and total >= max_bytes:
            return
    if total == 0:
        raise DataError(f"{what} is empty: it has no text")


def _text_file_batches(files: list[Path]) -> Iterator[list[str]]:
    """One document per file, read as the `text` builder's document mode reads it, BATCH_DOCS at a time."""
    for i in range(0, len(files), BATCH_DOCS):
        batch = []
        for f in files[i : i + BATCH_DOCS]:
            with _open_text(f) as fh:
                batch.append(fh.read())
        yield batch


def _local_batches(
    datasets, groups: dict[str, list[Path]], cfg: DataConfig, cache_dir: str, streaming: bool = False
) -> Iterator[list]:
    for builder, files in groups.items():
        # the text builder ignores encoding_errors for compressed files: read those as the streaming path does
        if builder == "text" and (streaming or any(f.suffix.lower() in COMPRESSED for f in files)):
            yield from _text_file_batches(files)
            continue
        options = {"sample_by": "document", "encoding_errors": "replace"} if builder == "text" else {}
        ds = datasets.load_dataset(
            builder,
            data_files={cfg.split: [str(f) for f in files]},
            split=cfg.split,
            cache_dir=cache_dir,
            streaming=streaming,
            **options,
        )
        field = "text" if builder == "text" else cfg.text_field
        yield from _column_batches(ds, field, f"{describe_source(cfg)} ({builder} files)")


def _hub_batches(datasets, cfg: DataConfig, cache_dir: str | None, streaming: bool = False) -> Iterator[list]:
    name, _, config = cfg.source[3:].partition(":")
    if not name:
        raise DataError(
            f"data source {cfg.source!r} names no dataset (expected 'hf:<name>' or 'hf:<name>:<config>')"
        )
    # With a byte cap, stream: only the bytes needed are fetched instead of the whole dataset.
    ds = datasets.load_dataset(
        name, config or None, split=cfg.split, streaming=streaming or cfg.max_bytes > 0, cache_dir=cache_dir
    )
    yield from _column_batches(ds, cfg.text_field, describe_source(cfg))


def iter_documents(cfg: DataConfig, streaming: bool = False) -> Iterator[list[str]]:
    """Batches of document texts from `cfg.source`, deterministic order, at most `cfg.max_bytes` bytes;
    `streaming` reads them without a `datasets` cache (same documents, same order)."""
    hub = cfg.source.startswith("hf:")
    what = describe_source(cfg)
    groups = {} if hub else local_files(cfg)  # path errors surface before `datasets` is even imported
    with _datasets_session(cfg.cache_dir, offline=not hub) as (datasets, cache_dir):
        try:
            batches = (
                _hub_batches(datasets, cfg, cache_dir, streaming)
                if hub
                else _local_batches(datasets, groups, cfg, cache_dir, streaming)
            )
            yield from _cap(batches, cfg.max_bytes, what)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"could not read {what}: {reason(e)}") from e
