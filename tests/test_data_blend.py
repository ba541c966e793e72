"""Weighted blends of preprocessed datasets: proportions, determinism, exact resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import FAST, launch_train

from haillm.config import ConfigError, compose_config, validate
from haillm.data import DataConfig, DataError
from haillm.data.blend import PERIOD, BlendSampler, interleave, parse_blend
from haillm.data.loader import build_training_data
from haillm.data.synthetic import train_bpe, write_corpus
from haillm.tools.preprocess import preprocess


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> list[Path]:
    """Two small preprocessed datasets of different sizes."""
    root = tmp_path_factory.mktemp("blend")
    out = []
    for name, size in (("web", 400_000), ("code", 150_000)):
        write_corpus(root / f"{name}.jsonl", size, seed=len(name), max_doc_words=500)
        preprocess(DataConfig(source=str(root / f"{name}.jsonl"), max_bytes=0), root / name, workers=0,
                   shard_mb=0.05, progress=False)
        out.append(root / name)
    return out


def test_interleave_holds_the_weights():
    for weights in ([0.7, 0.3], [1, 1, 1], [5, 0.01, 2.5]):
        pattern = interleave(weights)
        share = np.asarray(weights) / sum(weights)
        for start in (0, 1234):  # any window of PERIOD positions (the pattern repeats)
            window = np.roll(pattern, -start)
            counts = np.bincount(window, minlength=len(weights))
            assert np.all(np.abs(counts - share * PERIOD) <= 1)
        prefix = np.bincount(pattern[:100], minlength=len(weights))  # and every prefix, within one sample
        assert np.all(np.abs(prefix - share * 100) < 1 + 1e-9)


def test_70_30_blend_shares_and_resume(parts):
    """Acceptance 4: over 10,000 samples each dataset's share is within 1% of its weight; resuming at a
    checkpoint's consumed_samples sees exactly the uninterrupted run's samples."""
    cfg = DataConfig(blend=[f"0.7:{parts[0]}", f"0.3:{parts[1]}"])
    data = build_training_data(cfg, seq_len=64, global_batch_size=8, seed=5)
    sizes = [d.num_samples for d in data.dataset.datasets]
    assert isinstance(data.sampler, BlendSampler)
    assert sizes[0] < 10_000 * 0.7 and sizes[1] < 10_000 * 0.3  # both datasets wrap into a second epoch
    straight = [data.sampler.next_indices() for _ in range(1250)]  # 10,000 samples
    ids = np.concatenate(straight)
    from_web = np.mean(ids < sizes[0])
    print(f"\n70/30 blend, 10,000 samples: shares {from_web:.4f} / {1 - from_web:.4f}")  # for the report (-s)
    assert abs(from_web - 0.7) < 0.01 and abs((1 - from_web) - 0.3) < 0.01
    code = ids[ids >= sizes[0]] - sizes[0]
    for epoch in range(len(code) // sizes[1]):  # each pass over a dataset is a permutation of its rows
        assert sorted(code[epoch * sizes[1] : (epoch + 1) * sizes[1]]) == list(range(sizes[1]))
    first = build_training_data(cfg, 64, 8, seed=5)
    got = [first.sampler.next_indices() for _ in range(400)]
    resumed = build_training_data(cfg, 64, 8, seed=5)
    resumed.sampler.load_state_dict(json.loads(json.dumps(first.sampler.state_dict())))  # as trainer_state.json
    got += [resumed.sampler.next_indices() for _ in range(850)]
    assert got == straight
    rows = data.dataset.gather([0, sizes[0], sizes[0] + 3])  # global ids map to each dataset's own rows
    assert torch.equal(rows[1:], data.dataset.datasets[1].gather([0, 3]))
    assert torch.equal(rows[:1], data.dataset.datasets[0].gather([0]))
    with pytest.raises(DataError, match="blend"):  # other weights do not resume this order
        build_training_data(DataConfig(blend=[f"0.6:{parts[0]}", f"0.4:{parts[1]}"]), 16, 8, 5).sampler \
            .load_state_dict(first.sampler.state_dict())


def test_blend_training_resumes_exactly(parts, capsys, tmp_path):
    """6 steps on a blend in one run == 3 steps, then 3 more from the checkpoint."""
    blend = f"data.blend=[0.7:{parts[0]},0.3:{parts[1]}]"
    common = [*FAST, blend, "optim.schedule=constant", "checkpoint.interval=3"]
    assert launch_train.main([*common, "train.steps=6", f"output_dir={tmp_path / 'one'}"]) == 0
    assert launch_train.main([*common, "train.steps=3", f"output_dir={tmp_path / 'two'}"]) == 0
    assert launch_train.main([*common, "train.steps=6", "checkpoint.resume=auto",
                              f"output_dir={tmp_path / 'two'}"]) == 0

    def records(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    one, two = records("one"), records("two")
    assert [r["loss"] for r in two] == [r["loss"] for r in one] and len(one) == 6
    assert two[-1]["consumed_samples"] == 24


def test_bad_blends(parts, tmp_path):
    for entry, expected in (("0.7", "WEIGHT:DIR"), ("-1:/x", "positive"), ("abc:/x", "WEIGHT:DIR")):
        with pytest.raises(ValueError, match=expected):
            parse_blend([entry])
        with pytest.raises(ConfigError) as err:
            validate(compose_config([f"data.blend=[{entry}]"]))
        assert entry in str(err.value) and "\n" not in str(err.value)
    assert parse_blend(["2:/a:b", "1e-3:/c"]) == [(2.0, "/a:b"), (0.001, "/c")]
    with pytest.raises(ConfigError, match="eval_holdout"):
        validate(compose_config([f"data.blend=[1:{parts[0]}]", "data.eval_holdout=0.1"]))
    raw = tmp_path / "raw.jsonl"
    write_corpus(raw, 10_000)
    with pytest.raises(DataError, match="not a preprocessed directory"):
        build_training_data(DataConfig(blend=[f"1:{parts[0]}", f"1:{raw}"]), 16, 8, 0)
    bpe = train_bpe(tmp_path / "tokenizer.json", ["some text to learn from"] * 10, 300)
    with pytest.raises(DataError, match="data.tokenizer"):  # all parts must share data.tokenizer
        build_training_data(DataConfig(blend=[f"1:{parts[0]}"], tokenizer=str(bpe)), 16, 8, 0)
    with pytest.raises(DataError, match="too small"):
        build_training_data(DataConfig(blend=[f"1:{parts[0]}", f"1e-6:{parts[1]}"]), 16, 8, 0)
