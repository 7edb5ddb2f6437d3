"""The torch function mode that puts every "cuda" tensor on the host.

Megatron-LM names its device in three ways: ``device=torch.cuda.current_device()`` (an int),
``device="cuda"`` / ``torch.device("cuda", i)``, and method calls such as ``t.cuda()`` or
``t.to("cuda")``. A CPU-only torch build rejects all of them. torch.device itself cannot be
replaced (it is a C type that isinstance checks rely on), so the rewrite happens where a
device reaches a torch function: every call made while :class:`CpuDeviceMode` is active
passes through ``__torch_function__``, which swaps cuda devices (and bare ints, which torch
reads as cuda ordinals) for ``cpu``. Methods that only make sense with a GPU (Tensor.cuda,
pinning, stream bookkeeping) return at once, and Tensor.type() answers with the cuda type
names Megatron compares against.

A torch function mode is per thread: __main__ enters it around the script, so the threads
the script starts itself run without it (the Megatron-LM paths tried with the stand-in,
asynchronous checkpoint saving included, need no more).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

CPU = torch.device("cpu")


def _is_cuda(device: Any) -> bool:
    """Whether ``device`` names a CUDA device (an ordinal int counts, as it does for torch)."""
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":", 1)[0] == "cuda"
    return False


def host(device: Any) -> Any:
    """``device`` with a cuda device replaced by the host; anything else unchanged."""
    return CPU if _is_cuda(device) else device


def _returns_self(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


def _returns_none(*args: Any, **kwargs: Any) -> None:
    return None


def _type(tensor: torch.Tensor, dtype: Any = None, *args: Any, **kwargs: Any) -> Any:
    """Tensor.type() names a GPU tensor "torch.cuda.FloatTensor" and Megatron's optimizers
    and gradient clipping compare against those names; the stand-in's tensors are the GPU's
    tensors, so they report the cuda name. Tensor.type("torch.cuda.X") converts to the
    host's "torch.X"."""
    if dtype is None:
        name = torch.Tensor.type(tensor)
        if tensor.device.type == "cpu" and name.startswith("torch.") and "." not in name[6:]:
            return "torch.cuda." + name[len("torch."):]
        return name
    if isinstance(dtype, str):
        dtype = dtype.replace("torch.cuda.", "torch.")
    elif isinstance(dtype, type) and dtype.__module__ == "torch.cuda":
        dtype = getattr(torch, dtype.__name__)
    return torch.Tensor.type(tensor, dtype, *args, **kwargs)


# Methods whose GPU meaning has no host counterpart. Tensor.cuda would raise "Torch not
# compiled with CUDA"; pin_memory needs a CUDA host allocator; record_stream needs a CUDA
# stream. Returning the tensor itself is what they do for a tensor already in place.
_REPLACED: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.Tensor.cuda: _returns_self,
    torch.Tensor.pin_memory: _returns_self,
    torch.Tensor.record_stream: _returns_none,
    torch.Tensor.type: _type,
}

# Methods that take the target device as their first positional argument (after self).
_DEVICE_FIRST = {torch.Tensor.to}


class CpuDeviceMode(TorchFunctionMode):
    """Rewrites cuda devices to cpu in every torch call made while the mode is active."""

    def __torch_function__(self, func: Callable[..., Any], types: Any,  # type: ignore[override]
                           args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
                           ) -> Any:
        kwargs = kwargs or {}
        replaced = _REPLACED.get(func)
        if replaced is not None:
            return replaced(*args, **kwargs)
        if func is torch.device and len(args) == 1 and isinstance(args[0], int) \
                and not isinstance(args[0], bool):
            return CPU  # torch.device(torch.cuda.current_device()): a CUDA ordinal
        if "device" in kwargs:
            kwargs = {**kwargs, "device": host(kwargs["device"])}
        if func in _DEVICE_FIRST and len(args) > 1 and not isinstance(args[1], torch.dtype):
            args = (args[0], host(args[1]), *args[2:])
        return func(*args, **kwargs)
