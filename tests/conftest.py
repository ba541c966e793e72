"""Test-wide settings: tests marked ``gpu`` need CUDA and are skipped without it (the GPU benchmarks'
single device call runs them with ``pytest -m gpu``)."""

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
