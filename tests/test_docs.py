"""User documentation: the configuration reference is generated from the structured config and complete,
and the README's documentation index matches docs/."""

from __future__ import annotations

import re
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


def _bash_blocks(heading: str) -> list[list[str]]:
    """The commands of every ```bash block under a README heading, continuation lines joined."""
    import shlex

    section = (ROOT / "README.md").read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if shlex.split(line, comments=True):
                commands.append(shlex.split(line, comments=True))
    return commands


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
