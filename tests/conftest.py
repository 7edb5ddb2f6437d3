"""Shared fixtures: shipped model specs and a helper to write broken YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeweaver_megatron.config import config_dir, load_model


@pytest.fixture
def write_spec(tmp_path: Path):
    """Write a (possibly broken) copy of a shipped spec and return its path.

    edit(data) mutates the parsed YAML before it is written back.
    """

    def write(name: str, edit=None, text: str | None = None) -> Path:
        path = tmp_path / f"{name}-edited.yaml"
        if text is None:
            data = yaml.safe_load((config_dir() / f"{name}.yaml").read_text())
            if edit is not None:
                edit(data)
            text = yaml.safe_dump(data)
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="session")
def vlm_s():
    return load_model("VLM-S")


@pytest.fixture(scope="session")
def tiny_vlm():
    return load_model("tiny-vlm")


@pytest.fixture(scope="module")
def megatron_single_process():
    """A one-process gloo world with megatron-core's parallel_state (TP = PP = 1) for the
    tests of a module; torch and megatron are imported only by modules that use it."""
    import warnings

    from pipeweaver_megatron.models import init_single_process, teardown

    warnings.filterwarnings("ignore", category=UserWarning)
    init_single_process(seed=1234)
    yield
    teardown()


FAST = {"test_compile", "test_nccl_order", "test_config", "test_ir", "test_memopt",
        "test_planner", "test_schedules", "test_search", "test_semu", "test_workload",
        "test_comparison_baselines", "test_runtime_fit", "test_sp_plans",
        "test_action_graph", "test_compile_passes", "test_budget", "test_cut_search"}
"""The planning side's tests (no torch, no processes): `make test-fast`, `pytest -m fast`."""


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "fast: the planning side alone (IR, SEMU, planner, "
                                       "workload), seconds; make test-fast")
    config.addinivalue_line("markers", "integration: torch, megatron-core, real processes "
                                       "(gloo, torchrun, Megatron-LM pretrain), minutes")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        item.add_marker(pytest.mark.fast if module in FAST else pytest.mark.integration)
