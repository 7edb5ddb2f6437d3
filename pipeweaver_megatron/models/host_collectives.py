"""megatron-core's sequence-parallel collectives on a host without CUDA.

megatron-core's all-gather and reduce-scatter along the sequence (tensor_parallel's
mappings and its linear layers' overlapped gathers) allocate their output buffers with
``device=torch.cuda.current_device()`` (directly, or through utils' global memory
buffer), which a CPU-only torch refuses; the collectives themselves are gloo's
all_gather_into_tensor and reduce_scatter_tensor. use_host_buffers() makes exactly those
three megatron-core modules see a torch whose ``cuda.current_device()`` is the host, so
the buffers are host tensors and nothing else changes. It does nothing where CUDA is
present. It is the only part of sequence parallelism that differs from a GPU run, and it
decides where a buffer lives, not what is computed.
"""

from __future__ import annotations

import types

import torch

_MODULES = ("megatron.core.tensor_parallel.mappings", "megatron.core.tensor_parallel.layers",
            "megatron.core.utils")


class _HostCuda(types.ModuleType):
    """torch.cuda, but current_device() is the host."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device(torch.cpu.current_device())


class _HostTorch(types.ModuleType):
    """torch with _HostCuda as its cuda."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _HostCuda()

    def __getattr__(self, name: str):
        return getattr(torch, name)


def use_host_buffers() -> bool:
    """Point megatron-core's sequence-parallel buffers at the host where there is no CUDA
    (idempotent); returns whether it did."""
    if torch.cuda.is_available():
        return False
    import importlib

    for name in _MODULES:
        module = importlib.import_module(name)
        if not isinstance(module.torch, _HostTorch):
            module.torch = _HostTorch()
    return True
