"""Data pipeline: tokenizers, sources, packing, and the step sampler. Fast, offline."""

import json
import tempfile

import numpy as np
import pytest
import torch

from haillm.data import (
    ByteTokenizer,
    DataConfig,
    DataError,
    HFTokenizer,
    PackedDataset,
    StepBatcher,
    StepSampler,
    build_dataset,
    build_tokenizer,
    rank_micro_batches,
)
from haillm.data.sampler import SampleOrder
from haillm.data.sources import local_files
from haillm.data.tokenizer import encoding_fingerprint

DOCS = ["Hello, world!\n", "naïve café — 世界 🚀\n", "def f(x):\n    return x + 1\n"]


def byte_stream(docs):
    """Reference: each document's UTF-8 bytes followed by EOD (256), concatenated."""
    return [t for d in docs for t in [*d.encode("utf-8"), 256]]


def assert_one_line_naming(err, *parts):
    msg = str(err.value)
    assert "\n" not in msg
    for part in parts:
        assert str(part) in msg


# --- tokenizers ---------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_non_ascii():
    tok = build_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eod_id, tok.pad_id) == (258, 256, 257)
    text = DOCS[1]
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and len(ids) > len(text)
    assert tok.decode(ids) == text
    assert tok.decode([*ids, tok.eod_id, tok.pad_id]) == text  # specials decode to nothing


def test_byte_encode_documents_places_eod():
    out = ByteTokenizer().encode_documents(DOCS)
    assert out.dtype == np.int32
    assert out.tolist() == byte_stream(DOCS)


def _train_bpe(path, special_tokens):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(DOCS * 50, trainer)
    tok.save(str(path))
    return path


def test_hf_tokenizer_from_trained_json(tmp_path):
    path = _train_bpe(tmp_path / "tokenizer.json", ["<pad>", "<|endoftext|>"])
    tok = build_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    assert tok.eod_id == 1  # special tokens come first, in the order given
    for text in DOCS:
        ids = tok.encode(text)
        assert tok.eod_id not in ids and max(ids) < tok.vocab_size
        assert tok.decode(ids) == text
    expected = [t for d in DOCS for t in [*tok.encode(d), tok.eod_id]]
    assert tok.encode_documents(DOCS).tolist() == expected
    assert build_tokenizer(str(tmp_path)).eod_id == tok.eod_id  # a directory holding tokenizer.json


def test_hf_tokenizer_without_eod_appends_one(tmp_path):
    path = _train_bpe(tmp_path / "tokenizer.json", [])
    base_size = len(json.loads(path.read_text())["model"]["vocab"])
    tok = HFTokenizer(path)
    assert tok.eod_id == base_size and tok.vocab_size == base_size + 1
    assert tok.encode_documents(["ab"]).tolist()[-1] == tok.eod_id


def test_tokenizer_files_own_padding_and_truncation_are_ignored(tmp_path):
    """A tokenizer.json saved with truncation and padding on encodes whole documents, no pad ids, and has
    the fingerprint of the same tokenizer saved without them (its shards are interchangeable)."""
    from tokenizers import Tokenizer

    plain = _train_bpe(tmp_path / "plain.json", ["<pad>", "<|endoftext|>"])
    tok = Tokenizer.from_file(str(plain))
    tok.enable_truncation(8)
    tok.enable_padding(pad_id=0, pad_token="<pad>", length=64)
    tok.save(str(tmp_path / "padded.json"))
    padded, reference = HFTokenizer(tmp_path / "padded.json"), HFTokenizer(plain)
    assert padded.encode_documents(DOCS).tolist() == reference.encode_documents(DOCS).tolist()
    assert padded.encode(DOCS[1]) == reference.encode(DOCS[1]) and len(reference.encode(DOCS[1])) > 8
    assert padded.fingerprint == reference.fingerprint


def test_tokenizer_fingerprint_ignores_the_serialisation_format(tmp_path):
    """The fingerprint of a tokenizer.json does not change with the `tokenizers` release that wrote it (an
    older one: merges as "a b", no ignore_merges, another version tag) but does with its rules or EOD."""
    spec = json.loads(_train_bpe(tmp_path / "tokenizer.json", ["<|endoftext|>"]).read_text())
    old = json.loads(json.dumps(spec))
    old["version"] = "0.9"
    old["model"]["merges"] = [" ".join(pair) for pair in spec["model"]["merges"]]
    old["model"].pop("ignore_merges")
    old["decoder"] = None
    assert isinstance(spec["model"]["merges"][0], list)
    assert encoding_fingerprint(old, 0) == encoding_fingerprint(spec, 0) == HFTokenizer(tmp_path).fingerprint
    other = json.loads(json.dumps(spec))
    other["pre_tokenizer"]["add_prefix_space"] = True
    assert encoding_fingerprint(other, 0) != encoding_fingerprint(spec, 0) != encoding_fingerprint(spec, 1)


def test_bad_tokenizer_files_raise_data_error(tmp_path):
    good = _train_bpe(tmp_path / "good.json", ["<|endoftext|>"])
    truncated = tmp_path / "truncated.json"
    truncated.write_text(good.read_text()[:500])
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"version": "1.0", "model": 42}')
    for path in (truncated, corrupt):
        with pytest.raises(DataError) as err:
            build_tokenizer(str(path))
        assert_one_line_naming(err, path, "does not parse")
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError) as err:
        build_tokenizer(str(missing))
    assert_one_line_naming(err, missing, "does not exist")


# --- sources and packing ------------------------------------------------------------------------------


def _write_text_dir(root):
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text(DOCS[0], encoding="utf-8")
    (root / "sub" / "c.md").write_text(DOCS[1], encoding="utf-8")
    (root / "a.rst").write_text(DOCS[2], encoding="utf-8")
    (root / ".hidden.txt").write_text("not read")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("hidden directories are not read")
    return [DOCS[2], DOCS[0], DOCS[1]]  # sorted path order: a.rst, b.txt, sub/c.md


def test_packing_rows_eod_and_determinism(tmp_path):
    docs = _write_text_dir(tmp_path / "corpus")
    cfg = DataConfig(source=str(tmp_path / "corpus"))
    ds = build_dataset(cfg, seq_len=7)
    stream = byte_stream(docs)
    rows = len(stream) // 8
    assert ds.num_tokens == len(stream)
    assert ds.rows.shape == (rows, 8) and ds.num_samples == rows and ds.seq_len == 7
    assert ds.rows.flatten().tolist() == stream[: rows * 8]
    assert ds[1].dtype == torch.long and ds[1].tolist() == stream[8:16]
    got = ds.gather([2, 0])
    assert got.dtype == torch.long and got.tolist() == [stream[16:24], stream[0:8]]
    again = build_dataset(cfg, seq_len=7)
    assert torch.equal(again.rows, ds.rows)


def test_jsonl_json_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"body": d, "id": i} for i, d in enumerate(DOCS)] + [
        {"body": "", "id": 9},
        {"body": None, "id": 10},
    ]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    plain_json = tmp_path / "docs.json"
    plain_json.write_text(json.dumps(rows), encoding="utf-8")
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, plain_json, parquet):
        ds = build_dataset(DataConfig(source=str(path), text_field="body"), seq_len=3)
        stream = byte_stream(DOCS)  # empty and null texts are skipped
        assert ds.rows.flatten().tolist() == stream[: ds.num_samples * 4], path


def test_max_bytes_caps_text_read(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 1000)
    (tmp_path / "b.txt").write_text("y" * 1000)
    ds = build_dataset(DataConfig(source=str(tmp_path), max_bytes=1500), seq_len=9)
    assert ds.num_tokens == 1500 + 2  # all of a.txt, half of b.txt, an EOD after each
    cut = tmp_path / "accents.txt"
    cut.write_text("é" * 100)
    ds = build_dataset(DataConfig(source=str(cut), max_bytes=41), seq_len=4)
    assert ds.num_tokens == 40 + 1  # a character is never split: 20 "é" kept


def test_private_cache_is_removed_and_cache_dir_is_used(tmp_path, monkeypatch):
    tmp, cwd, cache = tmp_path / "tmp", tmp_path / "cwd", tmp_path / "cache"
    tmp.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.chdir(cwd)
    _write_text_dir(tmp_path / "corpus")
    build_dataset(DataConfig(source=str(tmp_path / "corpus")), seq_len=7)
    assert list(tmp.iterdir()) == [] and list(cwd.iterdir()) == []
    build_dataset(DataConfig(source=str(tmp_path / "corpus"), cache_dir=str(cache)), seq_len=7)
    assert any(cache.iterdir()) and list(cwd.iterdir()) == []


def test_missing_unsupported_and_empty_sources(tmp_path):
    cases = []
    cases.append((DataConfig(source=str(tmp_path / "missing")), [tmp_path / "missing", "does not exist"]))
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n")
    cases.append((DataConfig(source=str(odd)), [odd, "unsupported"]))
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    cases.append((DataConfig(source=str(nothing)), [nothing, "no corpus files", ".jsonl"]))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases.append((DataConfig(source=str(empty)), [empty, "empty"]))
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n{"text": null}\n')
    cases.append((DataConfig(source=str(blank)), [blank, "empty"]))
    cases.append((DataConfig(source=str(blank), text_field="body"), [blank, "no field 'body'", "data.text_field"]))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"definitely not parquet")
    cases.append((DataConfig(source=str(broken)), [broken, "could not read"]))
    cases.append((DataConfig(source="hf:"), ["hf:", "names no dataset"]))
    for cfg, parts in cases:
        with pytest.raises(DataError) as err:
            build_dataset(cfg, seq_len=8)
        assert_one_line_naming(err, *parts)


def test_a_directory_holding_other_files_is_refused_naming_them(tmp_path):
    """A folder's files are read by their corpus suffix (.txt .text .md .rst .jsonl .json .parquet, text and json
    also compressed); any other file (a helper script, a csv, a compressed parquet, no suffix) is refused in one
    line naming it and what is accepted, never read as text. Hidden files and folders are left out; a .py file
    is no corpus (only `stdlib` reads .py files)."""
    root = tmp_path / "corpus"
    _write_text_dir(root)
    (root / "sub" / "d.jsonl.gz").write_bytes(b"")  # an accepted type (empty: skipped)
    assert [f.name for fs in local_files(DataConfig(source=str(root))).values() for f in fs] == ["a.rst", "b.txt",
                                                                                                  "c.md"]
    for name in ("download.py", "sub/rows.csv", "LICENSE", "sub/t.parquet.gz", "e.bin", "f.bin"):
        (root / name).write_text("not a corpus")
    with pytest.raises(DataError) as err:
        local_files(DataConfig(source=str(root)))
    assert_one_line_naming(err, root, "6 file(s)", "LICENSE, download.py, e.bin, f.bin, sub/rows.csv and 1 more",
                           "accepted: .txt .text .md .rst .jsonl .json .parquet", ".zst")
    assert ".hidden" not in str(err.value) and ".git" not in str(err.value)
    script = root / "download.py"
    with pytest.raises(DataError) as err:
        local_files(DataConfig(source=str(script)))
    assert_one_line_naming(err, script, "unsupported type")


def test_too_small_dataset_says_what_it_has_and_needs(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("z" * 99)  # 100 tokens with the EOD -> 3 rows of 33
    with pytest.raises(DataError) as err:
        build_dataset(DataConfig(source=str(path)), seq_len=32, min_samples=4)
    assert_one_line_naming(err, path, "100 tokens", "3 sequences", "needs 4")
    assert build_dataset(DataConfig(source=str(path)), seq_len=32, min_samples=3).num_samples == 3


def test_default_stdlib_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = build_dataset(DataConfig(max_bytes=100_000), seq_len=64, min_samples=8)
    assert isinstance(ds.tokenizer, ByteTokenizer) and "standard library" in ds.source
    n_docs = int((ds.rows == 256).sum())
    assert 100_000 < ds.num_tokens <= 100_000 + 100 and n_docs >= 1
    assert ds.num_samples == ds.num_tokens // 65
    text = ds.tokenizer.decode(ds.rows.flatten().tolist())
    assert "import " in text and "def " in text
    assert list(tmp_path.iterdir()) == []


# --- sampler ------------------------------------------------------------------------------------------


def test_sampler_epochs_are_seeded_permutations():
    sampler = StepSampler(num_samples=10, global_batch_size=4, seed=3)
    order = [i for step in range(5) for i in sampler.next_indices()]  # 20 positions = 2 epochs
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:]) == list(range(10))
    assert order[:10] != order[10:]
    assert order[8:12] == [*sampler.epoch_order(0)[8:].tolist(), *sampler.epoch_order(1)[:2].tolist()]
    assert sampler.indices_for_step(8) == order[8:12]  # a pure function of the position
    same = StepSampler(10, 4, seed=3)
    assert [i for _ in range(5) for i in same.next_indices()] == order
    other = StepSampler(10, 4, seed=4)
    assert [i for _ in range(5) for i in other.next_indices()] != order
    plain = StepSampler(10, 4, seed=3, shuffle=False)
    assert [i for _ in range(5) for i in plain.next_indices()] == list(range(10)) * 2


def test_sample_orders_are_compact_and_unchanged():
    """Epoch orders are int32 (4 bytes a sample) holding the permutations rng.permutation gives (those the
    exact-loss tests were written with); without shuffling no order is held at all."""
    order = SampleOrder(1000, seed=3, stream=(1,))
    for epoch in (0, 1, 0):
        got = order.epoch_order(epoch)
        assert got.dtype == np.int32 and np.array_equal(got, np.random.default_rng([3, 1, epoch]).permutation(1000))
    assert SampleOrder(2**31).dtype == np.int64
    plain = SampleOrder(1000, shuffle=False)
    assert plain.ids_at(np.arange(996, 1004)).tolist() == [996, 997, 998, 999, 0, 1, 2, 3]
    assert plain._orders == {}


def test_sampler_resume_equals_uninterrupted():
    straight = StepSampler(13, 4, seed=7)
    expected = [straight.next_indices() for _ in range(10)]
    first = StepSampler(13, 4, seed=7)
    got = [first.next_indices() for _ in range(4)]
    state = first.state_dict()
    assert state["consumed_samples"] == 16
    resumed = StepSampler(13, 4, seed=7)
    resumed.load_state_dict(state)
    got += [resumed.next_indices() for _ in range(6)]
    assert got == expected
    with pytest.raises(DataError, match="num_samples"):
        StepSampler(14, 4, seed=7).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        StepSampler(13, 4, seed=8).load_state_dict(state)


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_dp_ranks_together_see_the_dp1_batch(dp_size):
    gbs, mbs = 8, 2
    reference = StepSampler(21, gbs, seed=1)
    samplers = [StepSampler(21, gbs, seed=1) for _ in range(dp_size)]
    for _ in range(6):  # crosses two epoch boundaries
        want = reference.next_indices()
        union = []
        for rank, sampler in enumerate(samplers):
            micro = rank_micro_batches(sampler.next_indices(), rank, dp_size, mbs)
            assert len(micro) == gbs // (dp_size * mbs) and all(len(m) == mbs for m in micro)
            union += [i for m in micro for i in m]
        assert union == want


def test_step_batcher_resumes_at_another_dp_size():
    rows = torch.arange(30 * 5, dtype=torch.int32).reshape(30, 5)
    ds = PackedDataset(rows, ByteTokenizer(), "test", rows.numel())
    gbs = 8
    single = StepBatcher(ds, StepSampler(30, gbs, seed=2), micro_batch_size=4)
    expected = [torch.cat(single.next_step()) for _ in range(6)]
    assert expected[0].shape == (8, 5) and expected[0].dtype == torch.long

    def run(batchers, steps):
        return [torch.cat([mb for b in batchers for mb in b.next_step()]) for _ in range(steps)]

    two = [StepBatcher(ds, StepSampler(30, gbs, seed=2), r, 2, 2) for r in range(2)]
    got = run(two, 3)
    four = [StepBatcher(ds, StepSampler(30, gbs, seed=2), r, 4, 1) for r in range(4)]
    for b in four:
        b.load_state_dict(two[0].state_dict())
    got += run(four, 3)
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


def test_layout_and_size_validation():
    with pytest.raises(ValueError, match=r"micro_batch_size \(2\) x dp \(4\)"):
        rank_micro_batches(list(range(6)), 0, 4, 2)
    with pytest.raises(ValueError, match="dp_rank"):
        rank_micro_batches(list(range(8)), 2, 2, 2)
    ds_rows = torch.zeros(8, 3, dtype=torch.int32)
    ds = PackedDataset(ds_rows, ByteTokenizer(), "test", 24)
    with pytest.raises(ValueError, match="does not divide"):
        StepBatcher(ds, StepSampler(8, 6), 0, 4, 1)
    with pytest.raises(DataError, match="fewer than one global batch"):
        StepSampler(num_samples=3, global_batch_size=4)
