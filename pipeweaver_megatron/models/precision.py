"""Mixed precision on the host path: bf16 compute, fp32 gradients (as megatron-core's
DDP with grad_reduce_in_fp32 keeps them in ``main_grad``).

    params = keep_fp32_grads(chunk)       # after building the chunk in bf16
    ... forward / backward of every (sub-)microbatch ...
    grad = main_grad(param)               # fp32 sum over all of them
    zero_main_grads(params)

Each backward's bf16 gradient is added into the parameter's fp32 ``main_grad`` as soon
as autograd has accumulated it (a post-accumulate-grad hook), and ``.grad`` is cleared,
so a pipeline that splits a batch into more (sub-)microbatches than one process does
rounds no more often. fp32 parameters are left alone (their ``.grad`` stays as is).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def keep_fp32_grads(module: nn.Module) -> list[nn.Parameter]:
    """Accumulate the gradients of module's low-precision parameters in fp32 main_grad;
    returns those parameters."""
    chosen = [p for p in module.parameters() if p.dtype != torch.float32 and p.requires_grad]
    for param in chosen:
        param.main_grad = None
        param.register_post_accumulate_grad_hook(_accumulate)
    return chosen


def _accumulate(param: nn.Parameter) -> None:
    grad = param.grad.float()
    param.main_grad = grad if param.main_grad is None else param.main_grad.add_(grad)
    param.grad = None


def main_grad(param: nn.Parameter) -> torch.Tensor | None:
    """The parameter's gradient in fp32: main_grad where kept, else .grad."""
    found = getattr(param, "main_grad", None)
    return found if found is not None else param.grad


def zero_main_grads(params: Iterable[nn.Parameter]) -> None:
    for param in params:
        if hasattr(param, "main_grad"):
            param.main_grad = None
