"""Optional dependencies: a feature that needs one fails with one line saying what to install."""

from __future__ import annotations

import sys

import pytest

from haillm.config import ConfigError, compose_config, validate
from haillm.tools.schedule import main as schedule_main


def test_plot_without_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    png = tmp_path / "timeline.png"
    with pytest.raises(SystemExit) as exit_info:
        schedule_main(["--schedule", "dualpipe", "--pp", "4", "--microbatches", "8", "--plot", str(png)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not png.exists()
    assert captured.err.splitlines() == ["python -m haillm.tools.schedule: error: --plot needs matplotlib, "
                                         "which is not installed: pip install matplotlib"]


def test_tensorboard_logging_without_tensorboard_is_refused_before_the_run(monkeypatch):
    cfg = compose_config(["logging=tensorboard"])
    validate(cfg)  # installed here (a dependency of haillm)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not
    with pytest.raises(ConfigError, match=r"^logging.tensorboard=true needs the tensorboard package, which is not "
                                          r"installed: pip install tensorboard$"):
        validate(cfg)
