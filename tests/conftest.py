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
