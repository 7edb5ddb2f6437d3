"""Optional GPU accelerators, detected without importing them.

transformer-engine and apex speed up megatron-core on CUDA machines; nothing in
pipeweaver_megatron needs them. Detection uses import metadata only, so asking costs
no CUDA initialisation and works on the planning side.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

INSTALL_HINTS = {
    "transformer_engine": "pip install --no-build-isolation 'transformer_engine[pytorch]'",
    "apex": "pip install -v --no-build-isolation --config-settings '--build-option=--cpp_ext' "
    "--config-settings '--build-option=--cuda_ext' git+<apex repository>",
}


@dataclass(frozen=True, slots=True)
class Accelerators:
    """Which optional accelerator packages are importable here."""

    transformer_engine: bool
    """transformer_engine is installed (TE layer specs are used on CUDA)."""
    apex: bool
    """apex is installed (fused kernels on CUDA)."""


def detect() -> Accelerators:
    """Report the optional accelerators present, without importing them."""
    return Accelerators(
        transformer_engine=importlib.util.find_spec("transformer_engine") is not None,
        apex=importlib.util.find_spec("apex") is not None,
    )
