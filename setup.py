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
        # Real multimodal data (pipeweaver_megatron/data): Energon datasets, the local BPE
        # (tokenizers; transformers for Megatron's --tokenizer-type HuggingFaceTokenizer),
        # the demo's photographs (scikit-image ships them) and image decoding (Pillow).
        # megatron-energon 7.x, not the 6.0.1 that Megatron-LM core_v0.16.1's extras name:
        # 6.0.1 needs extra pins (multi-storage-client<1, bitstring<5, its av-decode extra)
        # and can spin forever on an exception in TaskEncoder.batch; 7.4.1 installs next to
        # torch 2.13 (CPU) and megatron-core 0.16.1 without pulling a CUDA torch.
        "data": ["megatron-energon==7.4.1", "tokenizers", "transformers", "scikit-image",
                 "Pillow"],
    },
    entry_points={"console_scripts": ["pipeweaver=pipeweaver_megatron.cli.main:main"]},
)
