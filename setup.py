"""pipeweaver_megatron: dynamic interleaved pipeline schedules for multimodal Megatron training."""
from setuptools import find_packages, setup

PACKAGES = find_packages(include=["pipeweaver_megatron", "pipeweaver_megatron.*"]) + [
    "pipeweaver_megatron.model_configs",
]

setup(
    name="pipeweaver_megatron",
    version="0.1.0",
    description="PipeWeaver for Megatron-LM: per-batch modality-aware interleaved pipeline schedules",
    python_requires=">=3.10",
    packages=PACKAGES,
    # The YAML specs live at the repository root (model_configs/) and are shipped as a
    # subpackage so an installed wheel finds them exactly like a source checkout does.
    package_dir={"pipeweaver_megatron.model_configs": "model_configs"},
    package_data={"pipeweaver_megatron.model_configs": ["*.yaml", "components/*.yaml"]},
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy",
        "pyyaml",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "hypothesis"],
        "search": ["highspy"],
        # What Megatron-LM's own training loop (megatron/training, pretrain_*.py) imports
        # beyond megatron-core, measured at core_v0.16.1: triton is imported unconditionally
        # (initialize.py -> batch_invariant_kernels; its wheel imports without a GPU),
        # psutil by the torch_dist checkpoint writer (without it the writer subprocess
        # dies and the parent hangs), pybind11 to build the dataset helpers.
        "megatron-lm": ["six", "regex", "pydantic", "einops", "psutil", "pybind11", "triton"],
    },
    entry_points={"console_scripts": ["pipeweaver=pipeweaver_megatron.cli.main:main"]},
)
