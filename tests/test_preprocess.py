"""Offline preprocessing into token shards: the shards hold exactly the stream in-memory packing builds,
whatever the worker count; interrupted runs resume; bad input is one line; the trainer-side dataset reads
any seq_len by index arithmetic."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from haillm.data import DataConfig, DataError, build_dataset, iter_documents
from haillm.data.shards import MANIFEST, SETTINGS, ShardDataset, token_dtype
from haillm.data.synthetic import documents, train_bpe, write_corpus
from haillm.data.tokenizer import build_tokenizer
from haillm.tools import preprocess as prep

ROOT = Path(__file__).resolve().parent.parent
SHARD_MB = 0.02  # ~20 KB of text per shard: many shards, rows straddling their boundaries


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A directory mixing text files, a jsonl and a parquet file (~300 KB), with an empty document."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root / "a_text", 100_000, seed=1, max_doc_words=400)
    write_corpus(root / "b.jsonl", 100_000, seed=2, max_doc_words=400)
    rows = [{"text": t} for t in documents(100_000, seed=3, max_doc_words=400)] + [{"text": ""}]
    pq.write_table(pa.Table.from_pylist(rows), root / "c.parquet")
    (root / "a_text" / "crlf.txt").write_bytes(b"line one\r\nline two\xff\r\n")  # newlines, a bad byte
    return root


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    return train_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json", documents(300_000, seed=9), 1000)


def run(source, out, tokenizer="byte", workers=0, **kw) -> dict:
    cfg = DataConfig(source=str(source), tokenizer=str(tokenizer), max_bytes=kw.pop("max_bytes", 0),
                     text_field=kw.pop("text_field", "text"))
    return prep.preprocess(cfg, out, workers=workers, shard_mb=kw.pop("shard_mb", SHARD_MB), progress=False, **kw)


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_shards_hold_the_packed_stream(corpus, bpe, tmp_path, tokenizer):
    """Every row at several seq_len equals in-memory packing of the same source; manifest counts add up."""
    spec = bpe if tokenizer == "bpe" else "byte"
    meta = run(corpus, tmp_path / "out", spec, workers=2)
    tok = build_tokenizer(str(spec))
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["eod_id"] == tok.eod_id
    assert len(meta["shards"]) > 5
    for seq_len in (7, 64, 1000):
        direct = build_dataset(DataConfig(source=str(corpus), tokenizer=str(spec), max_bytes=0), seq_len)
        shards = build_dataset(DataConfig(source=str(tmp_path / "out"), tokenizer=str(spec)), seq_len)
        assert isinstance(shards, ShardDataset)
        assert shards.num_samples == direct.num_samples and shards.num_tokens == direct.num_tokens
        everything = list(range(direct.num_samples))
        assert torch.equal(shards.gather(everything), direct.rows.long())
        some = [5, 0, direct.num_samples - 1, 5]
        assert torch.equal(shards.gather(some), direct.gather(some))
    stream = np.concatenate([np.load(tmp_path / "out" / s["tokens"]) for s in meta["shards"]])
    starts = np.cumsum([0] + [s["num_tokens"] for s in meta["shards"]])
    ends = np.concatenate([np.load(tmp_path / "out" / s["docs"]) + start
                           for s, start in zip(meta["shards"], starts[:-1], strict=True)])
    assert np.array_equal(ends, np.flatnonzero(stream == tok.eod_id) + 1)
    n_docs = sum(len(batch) for batch in iter_documents(DataConfig(source=str(corpus), max_bytes=0)))
    assert meta["num_tokens"] == len(stream) and len(ends) == meta["num_documents"] == n_docs
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.endswith(".npy")) == [MANIFEST]


def test_worker_count_and_max_bytes(corpus, tmp_path):
    """1 or 3 workers write byte-identical shards to in-process tokenization; a byte cap matches packing's."""
    run(corpus, tmp_path / "w0", workers=0)
    run(corpus, tmp_path / "w3", workers=3)
    assert snapshot(tmp_path / "w0") == snapshot(tmp_path / "w3")
    run(corpus, tmp_path / "capped", max_bytes=123_457, workers=1)
    direct = build_dataset(DataConfig(source=str(corpus), max_bytes=123_457), 31)
    shards = build_dataset(DataConfig(source=str(tmp_path / "capped")), 31)
    assert torch.equal(shards.gather(range(direct.num_samples)), direct.rows.long())


def test_interrupted_run_resumes(corpus, tmp_path, monkeypatch, capsys):
    """A run killed after 3 shards keeps them, resumes without tokenizing them again, ends identical."""
    run(corpus, tmp_path / "clean")
    real, calls = prep._tokenize, []

    def failing(index, docs):
        if index == 3:
            raise KeyboardInterrupt
        calls.append(index)
        return real(index, docs)

    monkeypatch.setattr(prep, "_tokenize", failing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(corpus, out)
    assert calls == [0, 1, 2] and not (out / MANIFEST).exists()
    (out / "tokens_000004.npy.tmp").write_bytes(b"half a shard")  # debris of a worker killed mid-write
    with pytest.raises(DataError) as err:  # training refuses an unfinished directory
        build_dataset(DataConfig(source=str(out)), 8)
    assert "unfinished" in str(err.value) and str(out) in str(err.value)
    with pytest.raises(DataError, match="chunk_chars="):  # other settings do not resume it
        run(corpus, out, "byte", shard_mb=SHARD_MB * 2)
    calls.clear()
    monkeypatch.setattr(prep, "_tokenize", lambda i, d: (calls.append(i), real(i, d))[1])
    capsys.readouterr()
    run(corpus, out)
    assert "resuming: 3 shards" in capsys.readouterr().err
    assert calls[0] == 3 and 0 not in calls
    assert snapshot(out) == snapshot(tmp_path / "clean")


def test_resume_refuses_a_changed_source(corpus, tmp_path, monkeypatch):
    """An unfinished run is not resumed over a source changed since (its finished shards hold the old
    text): one line says so; --overwrite starts again."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "b.jsonl").write_bytes((corpus / "b.jsonl").read_bytes())
    real = prep._tokenize

    def failing(index, docs):
        if index == 2:
            raise KeyboardInterrupt
        return real(index, docs)

    monkeypatch.setattr(prep, "_tokenize", failing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(source, out)
    monkeypatch.setattr(prep, "_tokenize", real)
    with open(source / "b.jsonl", "a") as f:
        f.write(json.dumps({"text": "a document added since"}) + "\n")
    with pytest.raises(DataError) as err:
        run(source, out)
    assert "changed" in str(err.value) and str(out) in str(err.value) and "\n" not in str(err.value)
    assert run(source, out, overwrite=True)["num_documents"] == run(source, tmp_path / "clean")["num_documents"]


def test_a_failed_run_is_retried_without_overwrite(tmp_path, capsys):
    """A run that fails on bad input (here a jsonl without the --text-field, after shards of the text files were
    finished) says so naming the tool's flag, not the trainer's key; the retry with the right flag replaces its
    unfinished output without --overwrite and writes what a clean run writes."""
    source = tmp_path / "src"
    write_corpus(source / "text", 60_000, seed=4, max_doc_words=300)
    write_corpus(source / "z.jsonl", 20_000, seed=5, max_doc_words=300)
    (source / "z.jsonl").write_text((source / "z.jsonl").read_text().replace('"text":', '"body":'))
    out = tmp_path / "out"
    common = [str(source), str(out), "--workers", "0", "--no-progress", "--shard-mb", str(SHARD_MB)]
    capsys.readouterr()
    assert prep.main(common) == 2
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert "no field 'text'" in line and "--text-field" in line and "data." not in line, line
    assert (out / "tokens_000001.npy").is_file() and not (out / MANIFEST).exists()  # shards it finished
    assert "no field 'text'" in json.loads((out / SETTINGS).read_text())["failed"]
    with pytest.raises(DataError, match="failed"):  # training says it failed, not that it may be resumed
        build_dataset(DataConfig(source=str(out)), 8)
    assert prep.main([*common, "--text-field", "body"]) == 0
    assert f"replacing the unfinished run in {out} (it failed" in capsys.readouterr().err
    run(source, tmp_path / "clean", text_field="body")
    assert snapshot(out) == snapshot(tmp_path / "clean")
    assert prep.main(common) == 2  # a finished output still needs --overwrite
    assert "--overwrite" in capsys.readouterr().err and snapshot(out) == snapshot(tmp_path / "clean")
    assert prep.main([*common[:2], "--tokenizer", str(tmp_path / "nope.json")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "--tokenizer: tokenizer file" in line and "nope.json" in line and "data." not in line, line


def test_one_run_writes_an_output_dir_at_a_time(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / prep.LOCK, "a") as held:  # as another run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DataError) as err:
            run(corpus / "b.jsonl", out)
        assert str(err.value) == f"another preprocess is writing {out}"
        assert sorted(p.name for p in out.iterdir()) == [prep.LOCK]
    run(corpus / "b.jsonl", out)
    assert (out / MANIFEST).is_file()


def test_output_dir_protection(corpus, tmp_path):
    out = tmp_path / "out"
    run(corpus, out)
    before = snapshot(out)
    with pytest.raises(DataError, match="already holds a finished"):
        run(corpus, out)
    assert snapshot(out) == before
    run(corpus, out, overwrite=True, shard_mb=1)
    assert len(json.loads((out / MANIFEST).read_text())["shards"]) == 1
    with pytest.raises(DataError, match="already a preprocessed directory"):
        run(out, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    with pytest.raises(DataError, match="inside the source directory"):  # it would read its own files
        run(corpus, corpus / "a_text" / "tok")
    assert not (corpus / "a_text" / "tok").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(DataError, match="holds other files"):
            run(corpus, foreign, overwrite=overwrite)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_shard_dataset_checks(corpus, bpe, tmp_path):
    out = tmp_path / "out"
    run(corpus, out)
    with pytest.raises(DataError) as err:  # ids of one tokenizer must not be read as another's
        build_dataset(DataConfig(source=str(out), tokenizer=str(bpe)), 8)
    assert "data.tokenizer" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="too small") as err:  # advice that applies to shards
        build_dataset(DataConfig(source=str(out)), 32, min_samples=10**7)
    assert "preprocess more text" in str(err.value) and "raise data.max_bytes" not in str(err.value)
    shard = out / "tokens_000002.npy"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match="tokens_000002.npy is missing, truncated"):
        build_dataset(DataConfig(source=str(out)), 8)


def test_large_vocabulary_uses_uint32(tmp_path):
    """A vocabulary past 2^16 ids is stored as uint32 and reads back unchanged."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(70_000)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)} | {"[UNK]": 70_000}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    rng = np.random.default_rng(0)
    (tmp_path / "c.jsonl").write_text("".join(
        json.dumps({"text": " ".join(rng.choice(words, 50))}) + "\n" for _ in range(40)))
    assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32
    meta = run(tmp_path / "c.jsonl", tmp_path / "out", tmp_path / "tokenizer.json", shard_mb=0.001)
    assert meta["dtype"] == "uint32"
    cfg = DataConfig(source=str(tmp_path / "c.jsonl"), tokenizer=str(tmp_path / "tokenizer.json"), max_bytes=0)
    direct = build_dataset(cfg, 15)
    assert int(direct.rows.max()) > 2**16
    shards = build_dataset(DataConfig(source=str(tmp_path / "out"), tokenizer=cfg.tokenizer), 15)
    assert torch.equal(shards.gather(range(direct.num_samples)), direct.rows.long())


def test_cli(corpus, tmp_path):
    """The command line: a throughput line and exit 0; bad input: one error line, exit 2, nothing written."""
    cmd = [sys.executable, "-m", "haillm.tools.preprocess"]
    env = {"PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([*cmd, str(corpus / "b.jsonl"), str(tmp_path / "out"), "--workers", "2"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "MB/s" in ok.stdout and "tokens/s" in ok.stdout
    assert (tmp_path / "out" / MANIFEST).is_file() and not (tmp_path / "out" / SETTINGS).exists()
    bad = subprocess.run([*cmd, str(tmp_path / "missing"), str(tmp_path / "out2")], capture_output=True,
                         text=True, env=env, timeout=120)
    errors = [ln for ln in bad.stderr.splitlines() if "error:" in ln]
    assert bad.returncode == 2 and len(errors) == 1 and "missing" in errors[0] and "does not exist" in errors[0]
    assert not (tmp_path / "out2").exists()


def test_compressed_corpora_give_the_same_shards(corpus, tmp_path):
    """A .jsonl.gz and text files compressed as .gz, .bz2, .xz and .zst preprocess to the shards of their
    uncompressed twins, byte for byte (and a compressed parquet is refused in one line)."""
    import bz2
    import gzip
    import lzma

    import zstandard

    compressors = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
                   ".zst": zstandard.ZstdCompressor().compress}
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    (plain / "text").mkdir(parents=True)
    (packed / "text").mkdir(parents=True)
    (plain / "b.jsonl").write_bytes((corpus / "b.jsonl").read_bytes())
    (packed / "b.jsonl.gz").write_bytes(gzip.compress((corpus / "b.jsonl").read_bytes()))
    for i, f in enumerate(sorted((corpus / "a_text").glob("*.txt"))[:8]):
        suffix = list(compressors)[i % 4]
        (plain / "text" / f.name).write_bytes(f.read_bytes())
        (packed / "text" / (f.name + suffix)).write_bytes(compressors[suffix](f.read_bytes()))
    run(plain, tmp_path / "out_plain")
    run(packed, tmp_path / "out_packed")
    shards = sorted(p.name for p in (tmp_path / "out_plain").glob("*.npy"))  # tokens and document ends
    assert len(shards) > 2 and shards == sorted(p.name for p in (tmp_path / "out_packed").glob("*.npy"))
    for name in shards:
        assert (tmp_path / "out_plain" / name).read_bytes() == (tmp_path / "out_packed" / name).read_bytes()
    # training reads them through `datasets` (not streamed): the same documents too
    assert list(iter_documents(DataConfig(source=str(packed)))) == list(iter_documents(DataConfig(source=str(plain))))
    gz_parquet = tmp_path / "c.parquet.gz"
    gz_parquet.write_bytes(gzip.compress((corpus / "c.parquet").read_bytes()))
    with pytest.raises(DataError, match="unsupported type"):
        list(iter_documents(DataConfig(source=str(gz_parquet))))
