"""`python -m haillm.tools.export CHECKPOINT OUT_DIR`: a checkpoint of any layout becomes a Hugging Face
DeepseekV3 checkpoint that transformers loads with our logits (1e-4, fp32)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from dist import run_distributed
from omegaconf import OmegaConf
from test_train import launch_train
from test_train_dp import COMMON

from haillm.config import compose_config, validate
from haillm.models.deepseek_v3.model import DeepSeekV3
from haillm.tools.export import main as export_main
from haillm.tools.generate import generate, load_model

transformers = pytest.importorskip("transformers")
TOL = 1e-4
STEPS = "train.steps=3"


def _main(argv: list[str]) -> int:
    return launch_train.main(argv)


def trained_model(run_dir: Path) -> DeepSeekV3:
    """The model of the run's last checkpoint as the trainer itself resumes it, in one process."""
    cfg = compose_config([*COMMON, f"output_dir={run_dir}", STEPS, "checkpoint.resume=auto"])
    validate(cfg, 1)
    return launch_train.run(cfg, 0, 1, torch.device("cpu")).model.eval()


LAYOUTS = {"dp2-ep2": ["parallel.dp=2", "parallel.ep=2"],
           "pp2-dualpipe": ["parallel.pp=2", "parallel.pp_schedule=dualpipe"]}


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_export_loads_in_transformers_with_our_logits(tmp_path, layout, capsys):
    run = tmp_path / "run"
    argv = [*COMMON, f"output_dir={run}", STEPS, *layout]
    assert run_distributed(_main, world_size=2, args=(argv,), timeout=240) == [0, 0]
    out = tmp_path / "hf"
    assert export_main([str(run / "checkpoints" / "step_3"), str(out)]) == 0

    reference = tmp_path / "reference"
    shutil.copytree(run, reference)
    ours = trained_model(reference)
    tokens = torch.randint(ours.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        expected, got = ours(tokens), hf.eval()(tokens).logits
        untrained = DeepSeekV3(ours.args, init_seed=1234).eval()(tokens)
    assert (got - expected).abs().max().item() < TOL
    assert (untrained - expected).abs().max().item() > 100 * TOL  # the trained weights are what was compared

    # greedy decoding from the checkpoint (MLA's latent cache) gives transformers' tokens from the export
    model, _ = load_model(run / "checkpoints" / "step_3")
    prompt = tokens[0, :8].tolist()
    ours_tokens = generate(model, prompt, 16, greedy=True)
    hf.generation_config.eos_token_id = None  # the comparison runs all 16 steps
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert ours_tokens == theirs[0, len(prompt):].tolist()


def test_a_loaded_checkpoint_is_the_trainers_model_bitwise(tmp_path):
    """`load_checkpoint_model` rebuilds what no checkpoint holds (the rope tables; they used to be whatever
    `to_empty` left, and the logits were off by 0.16-0.44 or NaN): its logits are the trainer's own, bitwise."""
    from haillm.tools.export import load_checkpoint_model

    cfg = compose_config([*COMMON, f"output_dir={tmp_path / 'run'}", STEPS])
    validate(cfg, 1)
    trained = launch_train.run(cfg, 0, 1, torch.device("cpu")).model.eval()
    loaded = load_checkpoint_model(tmp_path / "run" / "checkpoints" / "step_3").eval()
    tokens = torch.randint(trained.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), trained(tokens))
        assert torch.equal(loaded.compute_loss(torch.cat([tokens, tokens[:, :1]], 1))["loss"],
                           trained.compute_loss(torch.cat([tokens, tokens[:, :1]], 1))["loss"])


def test_export_takes_the_tokenizer_along(tmp_path):
    """A run with its own tokenizer.json: the export holds a copy, config.json's bos/eos are its end-of-document
    id (transformers' generate then stops there, as our generate does), and it is readable by the group even
    under umask 077."""
    import json
    import os
    import stat

    from haillm.data.synthetic import documents, train_bpe
    from haillm.data.tokenizer import build_tokenizer

    tok = train_bpe(tmp_path / "tokenizer.json", documents(200_000, seed=1), 600)
    run = tmp_path / "run"
    argv = [*COMMON, f"output_dir={run}", "train.steps=2", f"data.tokenizer={tok}"]  # model.vocab_size: its ids
    assert launch_train.main(argv) == 0
    old = os.umask(0o077)
    try:
        assert export_main([str(run / "checkpoints" / "step_2"), str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    hf_dir = tmp_path / "hf"
    assert (hf_dir / "tokenizer.json").read_bytes() == tok.read_bytes()
    eod, ids = build_tokenizer(str(tok)).eod_id, build_tokenizer(str(tok)).vocab_size
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == eod
    assert config["vocab_size"] == ids == OmegaConf.load(run / "config.yaml").model.vocab_size  # recorded resolved
    assert all(p.stat().st_mode & stat.S_IRGRP for p in [hf_dir, *hf_dir.iterdir()])


def test_export_refuses_bad_input_in_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert export_main([str(missing), str(tmp_path / "out")]) == 2
    incomplete = tmp_path / "step_1"
    incomplete.mkdir()
    assert export_main([str(incomplete), str(tmp_path / "out")]) == 2
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    assert export_main([str(incomplete), str(occupied)]) == 2
    assert (occupied / "keep.txt").read_text() == "mine"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("haillm.tools.export: error: ") for line in err), err
    assert "nowhere" in err[0] and "manifest" in err[1] and "not an empty directory" in err[2]


def test_unreadable_config_is_one_line(tmp_path, capsys):
    """A checkpoint written before config.yaml was stored in it takes the run directory's: broken YAML there is
    one error line too."""
    step = tmp_path / "run" / "checkpoints" / "step_1"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text('{"step": 1, "files": {}}')
    (tmp_path / "run" / "config.yaml").write_text("model: [unclosed\n")
    assert export_main([str(step), str(tmp_path / "out")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    config = tmp_path / "run" / "config.yaml"
    assert line.startswith(f"haillm.tools.export: error: {config}: unusable model config (while parsing"), line
