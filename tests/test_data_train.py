"""Training from preprocessed shards: the losses of reading the corpus directly, a peak memory that does not
grow with the corpus, and data-parallel ranks that read disjoint rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist import run_distributed
from test_train import FAST, ROOT, launch_train

from haillm.data import DataConfig, StepSampler, build_tokenizer, rank_micro_batches
from haillm.data.shards import ShardDataset
from haillm.data.synthetic import write_corpus
from haillm.tools.preprocess import preprocess

STEPS = ["train.steps=6", "optim.schedule=constant"]
MB = 2**20


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """40 MB and 2 MB generated jsonl corpora and their byte-tokenized shards."""
    root = tmp_path_factory.mktemp("corpora")
    paths = {}
    for name, size in (("40mb", 40_000_000), ("2mb", 2_000_000)):
        paths[name] = root / f"{name}.jsonl"
        write_corpus(paths[name], size, seed=len(name))
        paths[f"{name}_shards"] = root / f"{name}_shards"
        preprocess(DataConfig(source=str(paths[name]), max_bytes=0), paths[f"{name}_shards"], workers=2,
                   progress=False)
    return paths


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_shards_train_like_the_corpus(corpora, tmp_path):
    """Acceptance 1: 40 MB preprocessed, 6 steps from the shards == 6 steps reading the corpus (fp32)."""
    direct, shards = tmp_path / "direct", tmp_path / "shards"
    assert launch_train.main([*FAST, *STEPS, f"output_dir={direct}", f"data.source={corpora['40mb']}",
                              "data.max_bytes=0"]) == 0
    assert launch_train.main([*FAST, *STEPS, f"output_dir={shards}",
                              f"data.source={corpora['40mb_shards']}"]) == 0
    assert len(losses(shards)) == 6
    assert losses(shards) == losses(direct)


def peak_rss(source: Path, out: Path) -> int:
    """Peak resident memory (bytes) of a whole training process, from the kernel's accounting of the child."""
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), *FAST, *STEPS, f"data.source={source}",
           f"output_dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, (out.parent / f"{out.name}.log").read_text()[-3000:]
    return usage.ru_maxrss * 1024  # kilobytes on Linux


def test_peak_memory_does_not_grow_with_the_corpus(corpora, tmp_path):
    """Acceptance 2: peak RSS with 40 MB of shards within 64 MB of that with 2 MB (in memory, +300 MB)."""
    small = peak_rss(corpora["2mb_shards"], tmp_path / "small")
    large = peak_rss(corpora["40mb_shards"], tmp_path / "large")
    print(f"peak RSS: 2 MB corpus {small / MB:.0f} MB, 40 MB corpus {large / MB:.0f} MB")
    assert large - small < 64 * MB, (small / MB, large / MB)


def _read_rows(argv: list[str]) -> list[int]:
    """Train on a dp rank, recording every row this rank reads from the shards."""
    read: list[int] = []
    gather = ShardDataset.gather

    def recording(self, indices):
        read.extend(int(i) for i in indices)
        return gather(self, indices)

    ShardDataset.gather = recording  # this forked rank's copy of the class only
    assert launch_train.main(argv) == 0
    return read


def test_dp_ranks_read_disjoint_rows(corpora, tmp_path):
    """Acceptance 2: at dp=2 each rank reads only its own share of each step's rows (prefetch included)."""
    steps, gbs, mbs = 4, 8, 2
    argv = [*FAST, f"train.steps={steps}", f"train.global_batch_size={gbs}", f"train.micro_batch_size={mbs}",
            f"data.source={corpora['2mb_shards']}", "parallel.dp=2", f"output_dir={tmp_path / 'run'}"]
    got = run_distributed(_read_rows, world_size=2, args=(argv,), timeout=240)
    assert set(got[0]).isdisjoint(got[1])
    num_samples = ShardDataset(corpora["2mb_shards"], 32, build_tokenizer("byte")).num_samples
    sampler = StepSampler(num_samples, gbs, seed=1234)

    def share(rank: int, n_steps: int) -> set[int]:
        return {i for s in range(n_steps)
                for m in rank_micro_batches(sampler.indices_for_step(s * gbs), rank, 2, mbs) for i in m}

    for rank in (0, 1):  # every row of its steps, nothing else (but the next step's, when prefetched)
        assert share(rank, steps) <= set(got[rank]) <= share(rank, steps + 1)
