"""Property-based fuzzing (hypothesis) of what a user hands the launcher: override sets (valid and invalid
values, types, grammar, combinations), and truncated or corrupted data, tokenizer and checkpoint files.

Every case must either run (exit 0, or 3 for a run that aborts itself) or exit 2 with exactly one
`haillm: error:` line; never an exception escaping main, never a traceback, never a hang (pytest-timeout),
and never a change to a checkpoint that existed before (a checkpoint the run found unusable and wrote anew
is the one exception). The examples are derandomized, so CI sees the same cases every run; the number of
cases run is printed (pytest -s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_train import launch_train, snapshot
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from haillm.config import Config
from haillm.tools.export import main as export_main
from haillm.train.checkpoint import list_checkpoints

BASE = ["train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2", "data.max_bytes=100000",
        "logging.progress=false", "train.steps=1", "optim.warmup_steps=0", "checkpoint.interval=1"]
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CASES: dict[str, int] = {}


def leaf_keys(node: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(node):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        keys += leaf_keys(type(default), f"{prefix}{f.name}.") if dataclasses.is_dataclass(default) else [
            f"{prefix}{f.name}"]
    return keys


# Keys whose values name places to write or read get their own pools below (a fuzzed output_dir or
# data.source such as "/" would write into, or read, the whole machine).
SPECIAL = {"output_dir", "data.cache_dir", "data.source", "data.tokenizer", "model.init_from", "logging.wandb"}
KEYS = [k for k in leaf_keys() if k not in SPECIAL]
VALUES = st.one_of(
    st.integers(-2, 40).map(str),
    st.sampled_from(["nan", "inf", "-inf", "-1.5", "0.0", "1e-9", "0.5", "1.5", "3.0", "1e30", "1e400"]),
    st.sampled_from(["true", "false", "null", "[]", "[1,2]", "{}", "{a: 1}", "${oops}", "${train.lr}", "'q'",
                     "a=b", "", " ", "x y", "\\", "ü", "'${now:%Y}'", "1_000", "0x10"]),
    st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=6),
)


def special_values(tmp: Path) -> st.SearchStrategy[str]:
    bad_json = tmp / "bad_tokenizer.json"
    bad_json.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merg')
    return st.sampled_from([
        "data.source=stdlib", "data.source=/no/such/dir", "data.source=hf:no/such_dataset", f"data.source={tmp}",
        "data.tokenizer=byte", "data.tokenizer=/no/such/tokenizer.json", f"data.tokenizer={bad_json}",
        "model.init_from=", "model.init_from=hf:/no/such/dir", "model.init_from=nothf", f"model.init_from=hf:{tmp}",
        "logging.wandb=disabled", "logging.wandb=sometimes", "model=tiny", "model=small", "model=bogus",
        "optim=v3", "parallel=v3_2048gpu", "fp8=enabled", "data=local", "+new.key=1", "~train.lr", "train.lr",
        "++train.lr=0.01", "train=", "checkpoint.resume=none", "checkpoint.resume=step_1",
    ])


def launch(argv: list[str]) -> tuple[int, str]:
    """Exit code and stderr of the launcher, in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = launch_train.main(argv)
    return code, err.getvalue()


def assert_clean_outcome(code: int, err: str, what: object) -> None:
    assert "Traceback" not in err, (what, err[-3000:])
    assert code in (0, 2, 3), (what, code, err[-3000:])
    prefix = {0: None, 2: "haillm: error:", 3: "haillm: training aborted:"}[code]
    lines = [ln for ln in err.splitlines() if ln.startswith("haillm:")]
    assert lines == [] if prefix is None else (len(lines) == 1 and lines[0].startswith(prefix)), (what, err[-3000:])


def checkpoints(run: Path) -> dict[str, dict[str, bytes]]:
    return {path.name: snapshot(path) for _, path in list_checkpoints(run)}


def assert_untouched(before: dict[str, dict[str, bytes]], run: Path, rewritable: str | None = None) -> None:
    """Checkpoints present before are unchanged (or were pruned by checkpoint.keep after a newer commit);
    `rewritable` is the one the run may have replaced, found unusable."""
    after = checkpoints(run)
    for name, files in before.items():
        if name in after and name != rewritable:
            assert after[name] == files, name


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A 4-step run with checkpoints step_2 and step_4."""
    out = tmp_path_factory.mktemp("fuzz_base") / "run"
    assert launch([*BASE, f"output_dir={out}", "train.steps=4", "checkpoint.interval=2"])[0] == 0
    return out


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    counts = ", ".join(f"{name} {n}" for name, n in CASES.items())
    print(f"\nfuzz cases run: {counts}; total {sum(CASES.values())}")


def count(name: str) -> None:
    CASES[name] = CASES.get(name, 0) + 1


@pytest.mark.timeout(900)
def test_fuzz_overrides(base_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz_overrides")
    override = st.one_of(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), VALUES), special_values(tmp))

    @settings(FUZZ, max_examples=20)
    @given(overrides=st.lists(override, min_size=1, max_size=4), existing=st.booleans())
    def case(overrides: list[str], existing: bool) -> None:
        count("override sets")
        out = tmp / f"case{CASES['override sets']}"
        if existing:  # continue the base run: its checkpoints must survive whatever the overrides say
            shutil.copytree(base_run, out)
        before = checkpoints(out) if existing else {}
        code, err = launch([*BASE, f"output_dir={out}", "checkpoint.resume=auto", *overrides])
        assert_clean_outcome(code, err, overrides)
        assert_untouched(before, out)
        shutil.rmtree(out, ignore_errors=True)

    case()


CHECKPOINT_FILES = ["manifest.json", "trainer_state.json", "rng_rank0.pt", ".metadata", "__0_0.distcp", "config.yaml"]
DAMAGE = ["truncate", "flip", "garbage", "empty", "delete", "append"]


def damage(path: Path, how: str, where: float, byte: int) -> None:
    data = path.read_bytes()
    at = int(where * max(len(data) - 1, 0))
    if how == "truncate":
        path.write_bytes(data[:at])
    elif how == "flip":
        path.write_bytes(data[:at] + bytes([data[at] ^ (byte or 1)]) + data[at + 1:] if data else b"\x01")
    elif how == "garbage":
        path.write_bytes(bytes((byte + i * 7919) % 256 for i in range(len(data))))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "delete":
        path.unlink()
    else:
        path.write_bytes(data + bytes([byte]) * 17)


@pytest.mark.timeout(900)
def test_fuzz_checkpoint_files(base_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz_checkpoints")

    @settings(FUZZ, max_examples=6)
    @given(step=st.sampled_from([2, 4]), file=st.sampled_from(CHECKPOINT_FILES), how=st.sampled_from(DAMAGE),
           where=st.floats(0, 1), byte=st.integers(0, 255))
    def case(step: int, file: str, how: str, where: float, byte: int) -> None:
        count("damaged checkpoints")
        out = tmp / f"case{CASES['damaged checkpoints']}"
        shutil.copytree(base_run, out)
        damaged = out / "checkpoints" / f"step_{step}"
        damage(damaged / file, how, where, byte)
        before = checkpoints(out)
        code, err = launch([*BASE, f"output_dir={out}", "checkpoint.resume=auto", "train.steps=4",
                            "checkpoint.interval=2"])  # nothing to train unless step_4 is unusable
        assert_clean_outcome(code, err, (step, file, how))
        assert_untouched(before, out, rewritable=damaged.name)
        code = export_main([str(damaged), str(out / "hf")])  # reads the damaged checkpoint (or refuses)
        assert code in (0, 2)
        shutil.rmtree(out, ignore_errors=True)

    case()


def write_data(path: Path, kind: str) -> None:
    docs = [f"def f{i}(x):\n    return x * {i}  # émoji ✓\n" * 40 for i in range(30)]
    if kind == "txt":
        path.write_text("\n\n".join(docs))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    elif kind == "json":
        path.write_text(json.dumps([{"text": d} for d in docs]))
    else:
        pq.write_table(pa.table({"text": docs}), path)


@pytest.mark.timeout(900)
def test_fuzz_data_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz_data")

    @settings(FUZZ, max_examples=10)
    @given(kind=st.sampled_from(["txt", "jsonl", "json", "parquet"]), how=st.sampled_from(DAMAGE[:-2] + ["append"]),
           where=st.floats(0, 1), byte=st.integers(0, 255), as_tokenizer=st.booleans())
    def case(kind: str, how: str, where: float, byte: int, as_tokenizer: bool) -> None:
        count("damaged data files")
        case_dir = tmp / f"case{CASES['damaged data files']}"
        (case_dir / "data").mkdir(parents=True)
        if as_tokenizer:  # a damaged tokenizer.json next to good data
            write_data(case_dir / "data" / "a.txt", "txt")
            tokenizer = case_dir / "tokenizer.json"
            Tokenizer(WordLevel({"[unk]": 0, "def": 1, "return": 2}, unk_token="[unk]")).save(str(tokenizer))
            damage(tokenizer, how, where, byte)
            extra = [f"data.tokenizer={tokenizer}"]
        else:
            data = case_dir / "data" / f"a.{kind}"
            write_data(data, kind)
            damage(data, how, where, byte)
            extra = []
        code, err = launch([*BASE, f"output_dir={case_dir / 'run'}", f"data.source={case_dir / 'data'}", *extra])
        assert_clean_outcome(code, err, (kind, how, as_tokenizer))
        shutil.rmtree(case_dir, ignore_errors=True)

    case()
