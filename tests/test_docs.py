"""User documentation: the configuration reference is generated from the structured config and complete,
and the README's documentation index matches docs/."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from haillm.tools import config_reference

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_configuration_reference_is_current_and_complete(capsys):
    assert config_reference.undocumented() == [] and config_reference.stale_meanings() == []
    code = config_reference.main(["--check", str(DOCS / "configuration.md")])
    assert code == 0, capsys.readouterr().err
    text = (DOCS / "configuration.md").read_text()
    for key, _, _ in config_reference.config_keys():
        assert f"| `{key}` |" in text, key


def test_an_undocumented_key_fails(monkeypatch, capsys):
    keys = config_reference.config_keys()
    monkeypatch.setattr(config_reference, "config_keys", lambda: [*keys, ("train.new_knob", "int", "")])
    assert config_reference.undocumented() == ["train.new_knob"]
    assert config_reference.main(["--check", str(DOCS / "configuration.md")]) == 1
    assert "train.new_knob" in capsys.readouterr().err


def test_readme_indexes_every_guide_and_guides_link_what_exists():
    readme = (ROOT / "README.md").read_text()
    index = readme.split("\n## Documentation\n", 1)[1]
    linked = set(re.findall(r"\]\((docs/[^)]+\.md)\)", index))
    assert linked == {f"docs/{p.name}" for p in DOCS.glob("*.md")}
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def _bash_blocks(heading: str | None = None) -> list[list[str]]:
    """The commands of every ```bash block under a README heading (the whole README: None), continuation lines
    joined."""
    section = (ROOT / "README.md").read_text()
    if heading is not None:
        section = section.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if shlex.split(line, comments=True):
                commands.append(shlex.split(line, comments=True))
    return commands


def _runner(command: list[str]) -> str:
    """Which test runs a README command (an unknown kind of command fails the test below: give it one)."""
    program = next(a for a in command if "=" not in a or a.startswith("-"))  # after VAR=value assignments
    if program == "make":
        return "CI: .ci/run is `make test`; `make train`'s recipe in test_make_train_runs_launch_train"
    if program.endswith("torchrun"):
        return "test_readme_multi_process_commands_run_as_written"
    if program in ("docker", "mkdir", "sbatch", "launch/multinode.sh"):
        return "test_docker.py (stand-in srun, scontrol, torchrun, nvidia-smi; no Docker engine or cluster here)"
    if program == "bash" and command[command.index("bash") + 1].startswith("bench/gpu_"):
        return "GPU machine only (bench/gpu_run.sh; its scripts dry-run on CPU in test_bench_gpu_scripts)"
    if program == ".venv/bin/python":
        return "test_readme_single_process_commands_run_as_written"
    return ""


def test_every_readme_command_is_run_by_a_test():
    """Each command of the README's bash blocks is one that a test runs, and every command written in the
    README, in blocks or in the text, names the project's venv (a bare `python` or `torchrun` is another
    interpreter, without haillm)."""
    commands = _bash_blocks()
    assert len(commands) >= 20
    assert [" ".join(c) for c in commands if not _runner(c)] == []
    readme = (ROOT / "README.md").read_text()
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", readme, flags=re.S))
    bare = [c for c in spans + [" ".join(c) for c in commands]
            if re.match(r"(python3?|torchrun|pip) ", c) or re.search(r"[;&|] *(python3?|torchrun|pip) ", c)]
    assert bare == []


def test_make_train_runs_launch_train():
    """`make train ARGS=...` trains with launch/train.py in the venv, with the arguments as overrides."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}  # under make test
    recipe = subprocess.run(["make", "--dry-run", "--no-print-directory", "train", "ARGS=train.steps=50 model=small"],
                            cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    assert recipe[-1].split() == ["HF_DATASETS_OFFLINE=1", ".venv/bin/python", "launch/train.py", "train.steps=50",
                                  "model=small"]


def _scaled(command: list[str], stand_ins: dict[str, str]) -> list[str]:
    """A README command at test scale: the steps of a run divided by 150 (step_300 -> step_2, its checkpoint;
    one step where the command keeps the default), 32-token sequences of a 200 kB corpus, 2 preprocessing
    workers; absolute data paths moved into the test's directory. Everything else as written."""
    scale = {"train.seq_len": "32", "data.max_bytes": "200000", "logging.progress": "false"}
    out = []
    for arg in command:
        arg = re.sub(r"step_(\d+)", lambda m: f"step_{int(m.group(1)) // 150}", arg)
        for old, new in stand_ins.items():
            arg = arg.replace(old, new)
        key, eq, value = arg.partition("=")
        if eq and key in ("train.steps", "train.eval_interval"):
            arg = f"{key}={max(1, int(value) // 150)}"
        elif eq and key in scale:
            continue
        out.append(arg)
    if "--workers" in out:
        out[out.index("--workers") + 1] = "2"
    if "launch/train.py" in out:
        out += [f"{k}={v}" for k, v in scale.items()]
        if not any(a.startswith("train.steps=") for a in out):
            out.append("train.steps=1")
    return out


def _stand_in_corpus_and_tokenizer(root: Path) -> dict[str, str]:
    """/data/web.jsonl and /tok/tokenizer.json of the README's Data section: a small jsonl corpus and a
    byte-level BPE tokenizer trained on it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    words = "the model routes each token to eight experts of its group while the pipeline overlaps".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40 + i % 30)) for i in range(1500)]
    (root / "data").mkdir()
    (root / "data" / "web.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (root / "tok").mkdir()
    tokenizer.save(str(root / "tok" / "tokenizer.json"))
    return {"/data/": f"{root}/data/", "/tok/": f"{root}/tok/"}


@pytest.mark.slow
def test_readme_single_process_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """Every `.venv/bin/python` command of the README, in the README's order, from one working directory, as
    a new user would type them: train, plan, preprocess and train on the shards, resume, extend, evaluate,
    generate, export, plot, draw a schedule. Run in this process (the tools' and launcher's `main`), at test
    scale (``_scaled``); each must succeed (the planner's exit code 1 is its "does not fit" answer)."""
    import importlib

    from test_train import launch_train

    monkeypatch.chdir(tmp_path)
    stand_ins = _stand_in_corpus_and_tokenizer(tmp_path)
    commands = [c for c in _bash_blocks() if c[0] == ".venv/bin/python"]
    assert len(commands) >= 10
    ran = []
    for command in commands:
        argv = _scaled(command[1:], stand_ins)
        if argv[0] == "launch/train.py":
            rc = launch_train.main(argv[1:])
        else:
            assert argv[0] == "-m" and argv[1].startswith("haillm.tools."), command
            rc = importlib.import_module(argv[1]).main(argv[2:])
        err = capsys.readouterr().err
        assert rc == 0 or (argv[1] == "haillm.tools.plan" and rc == 1), f"{' '.join(command)}: exit {rc}\n{err}"
        ran.append(argv[1] if argv[0] == "-m" else argv[0])
    assert {"launch/train.py", "haillm.tools.preprocess", "haillm.tools.evaluate", "haillm.tools.generate",
            "haillm.tools.export", "haillm.tools.plot", "haillm.tools.schedule", "haillm.tools.plan"} <= set(ran)
    run = tmp_path / "runs" / "my-run"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (run / "hf" / "config.json").is_file() and (tmp_path / "curves.png").is_file()
    assert (tmp_path / "dualpipe.png").is_file()


@pytest.mark.slow
def test_readme_multi_process_commands_run_as_written(tmp_path):
    """Each torchrun command of the README's "Running" section, with its own overrides and only the scale
    brought down (one step of a smaller corpus, short sequences), trains on its number of ranks (forked,
    under NCCL's rules, instead of torchrun's start-up): the defaults fit every layout it shows."""
    from dist import run_distributed
    from test_train import launch_train

    runs = [c for c in _bash_blocks("Running") if c[0].endswith("torchrun")]
    assert len(runs) >= 3
    for i, command in enumerate(runs):
        world = int(next(a for a in command if a.startswith("--nproc_per_node=")).split("=")[1])
        overrides = command[command.index("launch/train.py") + 1:]
        scale = ["train.steps=1", "train.seq_len=32", "data.max_bytes=200000", "logging.progress=false",
                 f"output_dir={tmp_path / str(i)}"]
        assert run_distributed(launch_train.main, world, args=([*overrides, *scale],), timeout=240) == [0] * world
