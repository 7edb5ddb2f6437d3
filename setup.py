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
    },
    entry_points={"console_scripts": ["pipeweaver=pipeweaver_megatron.cli.main:main"]},
)
