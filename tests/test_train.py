"""End-to-end single-process training through `launch/train.py`'s main(): resume, bad input, run dir."""

from __future__ import annotations

import importlib.util
import json
import resource
import shutil
from pathlib import Path

import pytest
import torch

from haillm.models.deepseek_v3.model import DeepSeekV3
from haillm.tools.evaluate import evaluate_checkpoint
from haillm.tools.export import load_checkpoint_model
from haillm.tools.export import main as export_main
from haillm.tools.generate import main as generate_main
from haillm.train.metrics import peak_memory_bytes, reset_peak_memory

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("launch_train", ROOT / "launch" / "train.py")
launch_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch_train)

FAST = ["train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2", "data.max_bytes=300000",
        "logging.progress=false", "train.deterministic=true", "optim.warmup_steps=3"]


def train(capsys, out: Path, *overrides: str) -> tuple[int, str]:
    rc = launch_train.main([*FAST, f"output_dir={out}", *overrides])
    return rc, capsys.readouterr().err


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("haillm: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A finished 2-step run that bad-input tests copy and must leave untouched."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert launch_train.main([*FAST, f"output_dir={out}", "train.steps=2"]) == 0
    return out


def test_resume_is_exact(capsys, tmp_path):
    """8 steps in one run == 4 steps, then 4 more with checkpoint.resume=auto (fp32, deterministic), the EMA of
    the parameters (train.ema_decay) included, bitwise; `export --ema` writes that EMA.

    The one run also shows the step lines: with logging.log_interval=4 and stdout redirected (as under SLURM),
    exactly one plain line per 4 steps on stdout and in train.log, leading with the LM loss, and no tqdm bar
    (its \\r-joined redraws)."""
    schedule = ["optim.schedule=constant", "checkpoint.interval=4", "train.ema_decay=0.9"]
    assert launch_train.main([*FAST, f"output_dir={tmp_path / 'one'}", "train.steps=8", *schedule,
                              "logging.progress=true", "logging.log_interval=4"]) == 0
    captured = capsys.readouterr()
    lines = [ln for ln in captured.out.splitlines() if ln.startswith("step ")]
    assert [ln.split(" | ")[0] for ln in lines] == ["step 4/8", "step 8/8"]
    assert all(ln.split(" | ")[1].startswith("lm_loss ") for ln in lines)
    assert "\r" not in captured.out and "\r" not in captured.err
    logged = [ln for ln in (tmp_path / "one" / "train.log").read_text().splitlines() if "haillm.steps: " in ln]
    assert [ln.split("haillm.steps: ")[1] for ln in logged] == lines
    assert not any(ln.startswith("step ") for ln in captured.err.splitlines())
    assert captured.out.splitlines()[-1].startswith("lm_loss: step 1 ")
    assert train(capsys, tmp_path / "two", "train.steps=4", *schedule)[0] == 0
    assert train(capsys, tmp_path / "two", "train.steps=8", "checkpoint.resume=auto", *schedule)[0] == 0
    full, resumed = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed[4:]] == [r["loss"] for r in full[4:]]
    assert resumed[-1]["consumed_samples"] == full[-1]["consumed_samples"] == 32
    for step in (4, 8):
        ema_one, ema_two = (load_checkpoint_model(tmp_path / run / "checkpoints" / f"step_{step}", ema=True)
                            for run in ("one", "two"))
        assert all(torch.equal(v, ema_two.state_dict()[k]) for k, v in ema_one.state_dict().items())
    live = load_checkpoint_model(tmp_path / "one" / "checkpoints" / "step_8")
    assert not torch.equal(ema_one.head.weight, live.head.weight)  # an average of the trajectory, not the end
    assert export_main([str(tmp_path / "one" / "checkpoints" / "step_8"), str(tmp_path / "hf"), "--ema"]) == 0
    assert "(EMA of the parameters)" in capsys.readouterr().out
    # evaluate and generate read the EMA too (--ema); a Hugging Face directory has none to read
    step_8, text = tmp_path / "one" / "checkpoints" / "step_8", tmp_path / "eval.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    losses = [evaluate_checkpoint(step_8, str(text), batches=1, ema=flag)["lm_loss"] for flag in (False, True)]
    assert losses[0] != losses[1] and all(0 < x < 10 for x in losses)
    assert generate_main([str(step_8), "--prompt", "def", "--max-new-tokens", "3", "--greedy", "--ema"]) == 0
    assert generate_main([str(tmp_path / "hf"), "--prompt", "def", "--ema"]) == 2
    assert "--ema reads a training checkpoint's EMA" in capsys.readouterr().err


def test_run_dir_contents_and_metrics(capsys, tmp_path):
    out = tmp_path / "run"
    rc, _ = train(capsys, out, "train.steps=3", "checkpoint.interval=2", "logging=tensorboard")
    assert rc == 0
    assert (out / "config.yaml").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_3"]
    rows = records(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens", "tokens_per_s",
                "mfu", "step_time_s", "max_vio", "skipped"):
        assert key in rows[0], key
    assert rows[0]["tokens"] == 4 * 32 and rows[0]["skipped"] is False
    assert rows[0]["mfu"] > 0
    # CPU: the process's peak resident set so far, which only grows and includes the model and optimizer
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    assert 0.05 < rows[0]["peak_memory_gib"] <= rows[-1]["peak_memory_gib"] <= process_peak
    # logging=tensorboard: the same figures in event files that tensorboard's own loader reads
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("lm_loss", "loss", "lr", "grad_norm", "max_vio"):
        assert [e.step for e in events.Scalars(key)] == [r["step"] for r in rows]
        assert [e.value for e in events.Scalars(key)] == pytest.approx([r[key] for r in rows], rel=1e-6)  # float32


@pytest.mark.gpu
def test_peak_memory_is_the_steps_cuda_peak():
    """On CUDA the figure is the step's own peak of allocated bytes, reset when the next step starts."""
    device = torch.device("cuda")
    reset_peak_memory(device)
    live = torch.cuda.memory_allocated(device)  # whatever earlier tests left allocated
    big = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    del big
    assert peak_memory_bytes(device) >= live + (256 << 20)
    reset_peak_memory(device)
    assert peak_memory_bytes(device) == torch.cuda.memory_allocated(device) == live


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.foo=1"], "foo"),
        (["nonsense=3"], "nonsense"),
        (["train.global_batch_size=-4"], "train.global_batch_size=-4"),
        (["train.micro_batch_size=-2"], "train.micro_batch_size=-2"),
        (["train.global_batch_size=6", "train.micro_batch_size=4"], "divisible"),
        (["data.source=/no/such/place"], "/no/such/place"),
        (["parallel.pp_schedule=zigzag"], "zigzag"),
        (["logging.wandb=sometimes"], "sometimes"),
        (["checkpoint.resume=/no/such/step_7"], "checkpoint.resume=/no/such/step_7: no such checkpoint directory"),
        (["optim.beta2=1.0"], "optim.beta2=1.0 must be in [0, 1)"),
        (["optim.eps=0"], "optim.eps=0.0 must be > 0"),
        (["train.lr=nan"], "train.lr=nan must be > 0"),
        (["model.rms_norm_eps=-1e-6"], "model.rms_norm_eps=-1e-06 must be > 0"),
    ],
)
def test_bad_input_is_one_line_and_touches_nothing(capsys, base_run, tmp_path, overrides, expected):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    before = snapshot(out)
    rc, err = train(capsys, out, "train.steps=4", "checkpoint.resume=auto", *overrides)
    assert rc == 2 and "Traceback" not in err
    assert expected in error_line(err)
    assert snapshot(out) == before


def test_a_named_checkpoint_is_resumed_or_refused(capsys, base_run, tmp_path):
    """`checkpoint.resume=<checkpoints/step_N>` continues from that checkpoint, into another run directory too;
    a directory that is not a checkpoint is refused in one line, the run directory untouched. The checkpoint has
    no EMA of the parameters: with train.ema_decay it starts from the loaded weights (said in the log), and
    `export --ema` of a checkpoint without one is refused in one line."""
    step_2 = base_run / "checkpoints" / "step_2"
    out = tmp_path / "named"
    rc, err = train(capsys, out, "train.steps=4", f"checkpoint.resume={step_2}", "train.ema_decay=0.5")
    assert rc == 0 and "the EMA starts from the loaded parameters" in err
    assert load_checkpoint_model(out / "checkpoints" / "step_4", ema=True) is not None
    assert export_main([str(step_2), str(tmp_path / "hf"), "--ema"]) == 2
    assert capsys.readouterr().err.strip() == (f"haillm.tools.export: error: {step_2} holds no EMA of the parameters "
                                               "(its run had train.ema_decay=0); export it without --ema")
    auto = tmp_path / "auto"
    shutil.copytree(base_run, auto)
    assert train(capsys, auto, "train.steps=4", "checkpoint.resume=auto")[0] == 0
    assert [r["step"] for r in records(out)] == [3, 4]
    assert [r["loss"] for r in records(out)] == [r["loss"] for r in records(auto)][2:]
    before = snapshot(out)
    rc, err = train(capsys, out, "train.steps=6", f"checkpoint.resume={base_run}")
    assert rc == 2 and f"checkpoint.resume={base_run} is not a checkpoint" in error_line(err)
    assert snapshot(out) == before


def test_a_changed_schedule_on_resume_is_refused_or_followed(capsys, tmp_path):
    """A run trained to its end (step 6 of 6, the learning rate at its floor) resumed with train.steps=12: the
    schedule would jump back up (the cosine recomputed over 12 steps), so the default refuses in one line and
    leaves the run alone; `continue` goes on from the floor where it was, `restart` runs the warmup again."""
    lr, floor = 1e-3, 1e-4
    first = tmp_path / "first"
    schedule = [f"train.lr={lr}", "optim.min_lr_ratio=0.1", "optim.warmup_steps=3"]
    assert train(capsys, first, "train.steps=6", *schedule)[0] == 0
    assert records(first)[-1]["lr"] == pytest.approx(floor)
    before = snapshot(first)
    rc, err = train(capsys, first, "train.steps=12", "checkpoint.resume=auto", *schedule)
    line = error_line(err)
    assert rc == 2 and "train.steps 6 -> 12" in line and "optim.on_schedule_change=continue" in line
    assert snapshot(first) == before
    lrs = {}
    for mode in ("continue", "restart"):
        run = tmp_path / mode
        shutil.copytree(first, run)
        rc, _ = train(capsys, run, "train.steps=12", "checkpoint.resume=auto", *schedule,
                      f"optim.on_schedule_change={mode}")
        assert rc == 0
        lrs[mode] = [r["lr"] for r in records(run)][6:]
    assert lrs["continue"] == pytest.approx([floor] * 6)  # continuous: no jump back up to the cosine's middle
    assert lrs["restart"][:3] == pytest.approx([lr / 3, 2 * lr / 3, lr])  # the warmup, over the 6 steps left
    assert lrs["restart"][-1] == pytest.approx(floor)


def test_finetune_takes_the_weights_and_nothing_else(capsys, base_run, tmp_path):
    """`checkpoint.resume=<step_N> checkpoint.finetune=true`: the checkpoint's weights (its step-1 loss is the
    trained model's, not a fresh one's), then step 1 of a new run: data from the start, the new schedule's
    warmup, Adam from zero moments; without a path it is refused in one line."""
    import torch.distributed.checkpoint as dcp

    step_2 = base_run / "checkpoints" / "step_2"
    tuned, fresh = tmp_path / "tuned", tmp_path / "fresh"
    extra = ["train.steps=3", "train.lr=1e-3", "optim.warmup_steps=2"]
    assert train(capsys, tuned, *extra, f"checkpoint.resume={step_2}", "checkpoint.finetune=true")[0] == 0
    assert train(capsys, fresh, *extra)[0] == 0
    got, new = records(tuned), records(fresh)
    assert [r["step"] for r in got] == [1, 2, 3] and got[-1]["consumed_samples"] == new[-1]["consumed_samples"]
    assert [r["lr"] for r in got] == [r["lr"] for r in new]  # the new schedule from its first step
    # step 1's loss, computed before any update, is the checkpoint's model on the run's first batch
    from haillm.config import compose_config
    from haillm.data.loader import build_training_data, make_batcher

    cfg = compose_config([*FAST, *extra, f"output_dir={fresh}"])
    data = build_training_data(cfg.data, cfg.train.seq_len, cfg.train.global_batch_size, cfg.seed, eval_samples=0)
    batches = make_batcher(data, 0, 1, cfg.train.micro_batch_size, torch.device("cpu"), False, end=None).next_step()
    with torch.no_grad():
        expected = sum(load_checkpoint_model(step_2).compute_loss(b)["lm_loss"].item() for b in batches) / len(batches)
    assert got[0]["lm_loss"] == pytest.approx(expected, rel=1e-6) and abs(new[0]["lm_loss"] - expected) > 1e-3
    state = {"optim": {"step": torch.tensor(0)}}
    dcp.load(state, checkpoint_id=str(tuned / "checkpoints" / "step_3"), no_dist=True)
    assert int(state["optim"]["step"]) == 3  # Adam restarted: 3 steps, not 2 + 3
    rc, err = train(capsys, tmp_path / "no_path", "checkpoint.finetune=true")
    assert rc == 2 and "checkpoint.finetune=true needs checkpoint.resume=<path" in error_line(err)


def test_a_model_too_large_for_the_machine_is_refused_at_once(capsys, monkeypatch, tmp_path):
    """Refused with the planner's estimate and the memory available before anything is read or built (it used
    to allocate until the kernel killed it, about 100 s later)."""
    def never(*args, **kwargs):
        raise AssertionError("the run went on to read data and build the model")

    monkeypatch.setattr(launch_train, "build_training_data", never)
    rc, err = train(capsys, tmp_path / "run", "model=v3_671b")
    line = error_line(err)
    assert rc == 2 and "Traceback" not in err
    assert "model=v3_671b does not fit" in line and "GiB is available (CPU RAM" in line
    assert "train.check_memory=false" in line
    assert not (tmp_path / "run").exists()


def test_plot_draws_runs_overlaid(capsys, base_run, tmp_path):
    """`python -m haillm.tools.plot RUN RUN -o curves.png` on a real run and a longer one with evaluations and a
    skipped step writes a PNG; a directory without metrics is one line, exit code 2."""
    from haillm.tools import plot

    other = tmp_path / "longer"
    other.mkdir()
    rows = [{"step": s, "loss": 9 - s / 10, "lm_loss": 8 - s / 10, "lr": 1e-3, "grad_norm": 1.0 + s,
             "tokens_per_s": 1000, "max_vio": 0.5, "skipped": s == 7,
             **({"eval_loss": 8 - s / 12} if s % 5 == 0 else {})} for s in range(1, 31)]
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 31, "lo')
    out = tmp_path / "curves.png"
    assert plot.main([str(base_run), str(other), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_empty_dataset_and_bad_tokenizer(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    rc, err = train(capsys, tmp_path / "r1", f"data.source={empty}")
    assert rc == 2 and str(empty) in error_line(err)
    assert not (tmp_path / "r1").exists()
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{ this is not json")
    rc, err = train(capsys, tmp_path / "r2", f"data.tokenizer={bad}")
    assert rc == 2 and str(bad) in error_line(err)


def test_existing_run_needs_resume(capsys, base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    before = snapshot(out)
    rc, err = train(capsys, out, "train.steps=2")
    assert rc == 2 and "checkpoint.resume=auto" in error_line(err)
    assert snapshot(out) == before


def test_truncated_checkpoint_falls_back(capsys, tmp_path):
    out = tmp_path / "run"
    assert train(capsys, out, "train.steps=4", "checkpoint.interval=2", "optim.schedule=constant")[0] == 0
    shard = next((out / "checkpoints" / "step_4").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    rc, err = train(capsys, out, "train.steps=5", "checkpoint.interval=2", "checkpoint.resume=auto",
                    "optim.schedule=constant")
    assert rc == 0
    assert "step_4" in err and "falling back" in err
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4, 5]


def test_checkpoint_from_other_model_shape(capsys, base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    rc, err = train(capsys, out, "train.steps=2", "checkpoint.resume=auto", "model.dim=96")
    assert rc == 2 and "different model config" in error_line(err)


def test_nonfinite_steps_are_skipped_then_abort(capsys, tmp_path):
    """lr=1e30 blows the weights up after step 1: steps 2 and 3 are non-finite, skipped (both recorded), then
    abort."""
    out = tmp_path / "run"
    rc, err = train(capsys, out, "train.steps=5", "train.lr=1e30", "optim.warmup_steps=0",
                    "optim.schedule=constant", "train.max_skipped_steps=1", "train.ema_decay=0.5")
    assert rc == 3 and "training aborted" in err
    assert [r["skipped"] for r in records(out)] == [False, True, True]
    # skipped steps add no point to the EMA of the parameters: the start and step 1's weights, half and half
    ema, live = (load_checkpoint_model(out / "checkpoints" / "step_3", ema=flag) for flag in (True, False))
    start = dict(DeepSeekV3(live.args, init_seed=1234).named_parameters())
    for name, p in ema.named_parameters():
        assert torch.equal(p, 0.5 * start[name] + 0.5 * dict(live.named_parameters())[name]), name


def test_final_checkpoint_can_be_turned_off(capsys, tmp_path):
    """checkpoint.final=false (bench/fp8_fidelity.py's --trainer runs): the interval's checkpoints only."""
    out = tmp_path / "run"
    assert train(capsys, out, "train.steps=3", "checkpoint.interval=2", "checkpoint.final=false")[0] == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]
    assert [r["step"] for r in records(out)] == [1, 2, 3]
