"""The CPU stand-in: run an unmodified Megatron-LM training script on the host.

    torchrun --nproc-per-node N -m pipeweaver_megatron.cpu_standin pretrain_vlm.py ARGS...
    python -m pipeweaver_megatron.cpu_standin pretrain_gpt.py ARGS...      (one process)

installs a stand-in for the GPU and then runs the script as ``python SCRIPT ARGS`` would
(see __main__). It is a dry run of the real thing: Megatron-LM's own pretrain() with its
argument checks, parallel groups, schedules, optimizer, checkpoints and data pipeline, on
gloo and host tensors. What it replaces, in order:

- the environment Megatron expects of a GPU job (:func:`set_environment`);
- torch.compile, which would compile for Triton (:func:`disable_torch_compile`);
- torch.cuda's surface (cuda.install): devices, streams, events, memory, NVTX;
- the CUDA RNG, served by the host's default generator (rng.install);
- NCCL process groups, served by gloo (distributed.install);
- cuda devices in tensor calls, rewritten to cpu (devices.CpuDeviceMode, active while the
  script runs);
- places in Megatron-LM itself that need nvcc, Transformer Engine or a GPU
  (megatron_patches.install), and the distributed optimizer's checkpoints on torch's Adam,
  which stands in for FusedAdam (optimizer_state.install).

Nothing else in pipeweaver_megatron imports this package; torch and megatron are imported
only when :func:`install` runs.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

__all__ = ["disable_torch_compile", "install", "set_environment"]


def set_environment() -> None:
    """The environment of a Megatron-LM GPU job.

    Megatron's example launch scripts export CUDA_DEVICE_MAX_CONNECTIONS=1 (tensor and
    sequence parallelism rely on it to order communication before compute kernels, and the
    argument checks look at it); on the host it changes nothing but what those checks see.
    A value the user set is kept (Megatron FSDP asserts it is not 1).
    """
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def disable_torch_compile() -> None:
    """Run torch.compile'd functions eagerly.

    Megatron's jit_fuser (megatron.core.jit) is torch.compile, applied as a decorator to the
    fused bias-dropout-add, bias-gelu/swiglu etc. when their modules are imported. Inductor
    believes the stand-in's torch.cuda (is_available() is True), picks Triton and fails
    looking for libcuda. Dynamo reads its ``disable`` switch when a compiled function is
    first called, so the decorated functions run as the plain PyTorch code they wrap;
    TORCH_COMPILE_DISABLE passes the switch on to child processes.
    """
    os.environ["TORCH_COMPILE_DISABLE"] = "1"
    import torch._dynamo

    torch._dynamo.config.disable = True


def install() -> Any:
    """Install every process-wide patch and return the torch function mode to enter while
    the script runs (a mode is per thread, so the caller scopes it)."""
    set_environment()
    from . import cuda, distributed, megatron_patches, optimizer_state, rng
    from .devices import CpuDeviceMode

    disable_torch_compile()
    # Megatron's DataLoaders pin memory for the copy to the GPU; torch finds no accelerator
    # and says so once per loader. There is no copy to make (Tensor.pin_memory is a no-op).
    warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true but no "
                            "accelerator is found")
    cuda.install()
    rng.install()
    distributed.install()
    if megatron_patches.install():
        optimizer_state.install()  # megatron.core.optimizer exists wherever megatron.core does
    return CpuDeviceMode()
