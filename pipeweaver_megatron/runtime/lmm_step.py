"""Megatron-style forward_step_func and loss_func for LMMChunks.

    output, loss_func = lmm_forward_step(data_iterator, chunk)

The chunk's received tensors come from chunk.set_input_tensor (the runtime sets them);
the iterator yields the (sub-)microbatch's MicrobatchData. loss_func returns Megatron's
3-tuple (loss sum, token count, {"lm loss": [loss sum, tokens]}), so with
calculate_per_token_loss a pipeline and a single process sum identically.
"""

from __future__ import annotations

import torch

from ..models.lmm import ChunkResult


def lmm_forward_step(data_iterator, model):
    """One chunk forward on the next (sub-)microbatch."""
    data = next(data_iterator)
    result = model(_received(model), data)
    return result, lmm_loss


def _received(model) -> dict:
    """The chunk's received tensors (the runtime set them), under any wrappers such as
    megatron-core's DDP."""
    while not hasattr(model, "input_tensors") and hasattr(model, "module"):
        model = model.module
    return getattr(model, "input_tensors", None) or {}


def lmm_loss(output: ChunkResult, non_loss_data: bool = False):
    """Megatron's (loss, num_tokens, report) of a chunk that ends with a head."""
    tokens = torch.tensor(output.num_tokens, dtype=torch.int, device=output.loss.device)
    if non_loss_data:
        return output.loss.detach()
    report = torch.stack([output.loss.detach().float(), tokens.float()])
    return output.loss, tokens, {"loss": report}
