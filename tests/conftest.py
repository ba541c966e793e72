"""Test-wide settings: tests marked ``gpu`` need CUDA and are skipped without it (the GPU benchmarks'
single device call runs them with ``pytest -m gpu``); the end-to-end modules below are marked ``slow``, which
``make test-quick`` leaves out (``make test`` runs everything)."""

import pytest
import torch

# Whole training runs, launchers and long checks: minutes together on 2 cores.
SLOW_MODULES = {"test_compile", "test_data_blend", "test_data_train", "test_eval", "test_experts_checkpoint",
                "test_export", "test_fuzz", "test_hf_parity", "test_plan_memory", "test_reliability",
                "test_reliability_health", "test_reshard", "test_train", "test_train_bf16", "test_train_cp",
                "test_train_dp", "test_train_ep", "test_train_fp8", "test_train_pp", "test_train_tp",
                "test_triton_sm90"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__.rpartition(".")[2] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
