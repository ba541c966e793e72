"""User documentation: the configuration reference is generated from the structured config and complete,
and the README's documentation index matches docs/."""

from __future__ import annotations

import re
from pathlib import Path

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
