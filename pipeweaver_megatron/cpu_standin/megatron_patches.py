"""Patches to Megatron-LM's own modules, applied to the imported module objects.

Each function below fixes one place where Megatron-LM (core_v0.16.1) assumes a GPU or a
Transformer Engine install even with ``--transformer-impl local``. They rebind attributes of
modules after importing them and never edit Megatron's files, so the user's checkout stays
as it is. :func:`install` applies them all.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def skip_fused_kernels() -> None:
    """initialize._compile_dependencies builds Megatron's legacy fused CUDA kernels with
    torch.utils.cpp_extension and nvcc (it reads CUDA_HOME's nvcc version first); there is
    no nvcc and nothing would run them. The dataset helpers it builds too are kept (see
    helpers_build)."""
    import megatron.legacy.fused_kernels as fused_kernels

    fused_kernels.load = _noop


def build_helpers_for_this_python() -> None:
    """compile_helpers builds with the interpreter that runs Megatron (helpers_build)."""
    import megatron.core.datasets.utils as utils

    from .helpers_build import compile_helpers

    utils.compile_helpers = compile_helpers


def skip_jit_warmup() -> None:
    """set_jit_fusion_options ends in _warmup_jit_function, which runs Megatron's
    torch.jit.script'ed bias-gelu / bias-dropout-add on "cuda" tensors in fp16/bf16 to
    trigger the nvfuser; on the host that only costs start-up time and warns."""
    import megatron.training.initialize as initialize

    initialize._warmup_jit_function = _noop


def vision_norm_without_te() -> None:
    """Without Transformer Engine, clip_vit_model falls back to NORM_IMPL = torch.nn.LayerNorm
    and then builds it as NORM_IMPL(config=..., hidden_size=..., ...), a TypeError for
    torch's LayerNorm (LLaVA's vision model cannot be built). megatron-core's own
    WrappedTorchNorm takes exactly that signature. NORM_IMPL is also CLIPViTModel.__init__'s
    default for ln_pre_impl / ln_post_impl, bound when the class was defined, so the
    defaults are rebound too."""
    import megatron.core.models.vision.clip_vit_model as clip
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if clip.NORM_IMPL is not torch.nn.LayerNorm:
        return  # Transformer Engine is present: TENorm takes config= already
    clip.NORM_IMPL = WrappedTorchNorm
    init = clip.CLIPViTModel.__init__
    if init.__defaults__:
        init.__defaults__ = tuple(WrappedTorchNorm if d is torch.nn.LayerNorm else d
                                  for d in init.__defaults__)
    if init.__kwdefaults__:
        init.__kwdefaults__ = {k: WrappedTorchNorm if d is torch.nn.LayerNorm else d
                               for k, d in init.__kwdefaults__.items()}


# Options that choose a CUDA-extension kernel over the plain PyTorch code computing the same
# thing. On a GPU the kernel exists; on the host it does not, and Megatron either refuses the
# run or fails in the first forward. With the option off it takes the PyTorch path.
HOST_KERNEL_ARGS = {
    # Apex's fused_weight_gradient_mlp_cuda accumulates wgrad into main_grad in one kernel;
    # ColumnParallelLinear raises when it is missing.
    "gradient_accumulation_fusion": False,
    # Apex's persistent FastLayerNorm; WrappedTorchNorm (the local spec's norm without
    # Apex) asserts the flag is off.
    "no_persist_layer_norm": True,
    # Megatron's scaled_masked_softmax_cuda (legacy fused_kernels, never built here);
    # FusedScaleMaskSoftmax imports it whenever the shapes suit the kernel in fp16/bf16.
    "masked_softmax_fusion": False,
}


def kernel_options_for_host() -> None:
    """After Megatron validates its arguments, set HOST_KERNEL_ARGS (kernel choices with the
    same numerics) and say once, on rank 0, which ones changed. Megatron builds every config
    (the language and the vision model's) from these args afterwards."""
    import megatron.training.arguments as arguments
    import megatron.training.initialize as initialize

    validate = arguments.validate_args
    if getattr(validate, "__cpu_standin__", False):
        return

    def validate_args(args: Any, *rest: Any, **kwargs: Any) -> Any:
        result = validate(args, *rest, **kwargs)
        changed = [name for name, value in HOST_KERNEL_ARGS.items()
                   if getattr(args, name, value) != value]
        for name in changed:
            setattr(args, name, HOST_KERNEL_ARGS[name])
        if changed and getattr(args, "rank", 0) == 0:
            settings = ", ".join(f"{name}={HOST_KERNEL_ARGS[name]}" for name in changed)
            print(f"cpu_standin: no CUDA kernels on the host: {settings}", flush=True)
        return result

    validate_args.__cpu_standin__ = True  # type: ignore[attr-defined]
    arguments.validate_args = validate_args
    initialize.validate_args = validate_args


def norm_with_sequence_parallel() -> None:
    """With --sequence-parallel, Megatron's norm must mark its weight and bias
    ``sequence_parallel`` so finalize_model_grads all-reduces their gradients over the
    tensor-parallel group; Apex's FusedLayerNorm and TE's norm do. Without either, the local
    spec builds WrappedTorchNorm, which asserts sequence parallelism is off, so a GPU-tested
    --sequence-parallel configuration could not be dry-run. The stand-in's norm is torch's
    LayerNorm/RMSNorm marked exactly as FusedLayerNorm marks its parameters."""
    import copy

    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    new = WrappedTorchNorm.__new__
    if getattr(new, "__cpu_standin__", False):
        return

    def __new__(cls: type, config: Any, *args: Any, **kwargs: Any) -> Any:
        if not getattr(config, "sequence_parallel", False):
            return new(cls, config, *args, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = new(cls, plain, *args, **kwargs)
        for param in norm.parameters(recurse=False):
            param.sequence_parallel = True
        return norm

    __new__.__cpu_standin__ = True  # type: ignore[attr-defined]
    WrappedTorchNorm.__new__ = __new__  # type: ignore[method-assign]


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_shared_generator_warning() -> None:
    """CudaRNGStatesTracker.fork warns when the *CPU* RNG state changed inside a fork, since
    on a GPU only the CUDA generator should move there. The stand-in's CUDA generator is the
    host generator (rng.py), so every fork that draws random numbers would log it."""
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(
        _DropMessage("CPU RNG state changed within GPU RNG context"))


PATCHES: tuple[Callable[[], None], ...] = (
    skip_fused_kernels,
    build_helpers_for_this_python,
    skip_jit_warmup,
    vision_norm_without_te,
    kernel_options_for_host,
    norm_with_sequence_parallel,
    quiet_shared_generator_warning,
)


def megatron_importable() -> bool:
    """Whether a megatron.core can be imported (from the script's folder or installed)."""
    import importlib.util

    try:
        return importlib.util.find_spec("megatron.core") is not None
    except ModuleNotFoundError:
        return False


def install() -> bool:
    """Apply every patch in PATCHES (each imports the Megatron modules it changes) whose
    modules exist (megatron-core alone has no megatron.training); False, patching nothing,
    when no Megatron is importable at all (a script without Megatron)."""
    if not megatron_importable():
        return False
    for patch in PATCHES:
        try:
            patch()
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("megatron."):
                raise
    return True
