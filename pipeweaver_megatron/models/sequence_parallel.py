"""Megatron sequence parallelism in the LMM chunks (tensor parallelism > 1).

[Note: sequence parallelism in the chunks] With ``sequence_parallel`` each tensor-
parallel rank holds ceil(n / tp) rows of every [n, 1, h] hidden sequence between
layers, exactly the message shapes ir.messages prices: the layers' linear layers
all-gather the rows before attention and the MLP and reduce-scatter after them
(megatron-core's ColumnParallel / RowParallelLinear), the norms run on the rows and
their weights carry ``sequence_parallel`` so their gradients are summed over the
tensor-parallel group (all_reduce_sequence_parallel_grads, as finalize_model_grads
does). A sequence whose length does not divide by tp is padded at its end with zero
rows that form one extra packed sample: attention keeps them to themselves, no
output reads them, so they add exact zeros to every gradient. Where a module begins
(patch or token embedding, computed whole on every rank) its sequence is padded and
scattered; where whole rows are needed (the projector's merge of neighbouring
patches, the LM's and the DiT's heads) the rows are gathered and the padding dropped.
The projector's "image_embeds" stay whole, as the messages say.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig


def padded_length(n: int, tp: int) -> int:
    """Rows of a sequence of n tokens once padded for tp ranks: tp * ceil(n / tp)."""
    return -(-n // tp) * tp


class SequenceParallelNorm:
    """megatron-core's local norm (WrappedTorchNorm: LayerNorm or RMSNorm by the
    config) that also runs under sequence parallelism, marking its parameters
    ``sequence_parallel`` as apex's FusedLayerNorm and Transformer Engine's norms do
    (WrappedTorchNorm itself refuses the flag). Without the flag it is WrappedTorchNorm."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                **kwargs: Any) -> WrappedTorchNorm:
        if not config.sequence_parallel:
            return WrappedTorchNorm(config, hidden_size, eps=eps, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = WrappedTorchNorm(plain, hidden_size, eps=eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm


def scatter(hidden: Tensor, config: TransformerConfig) -> Tensor:
    """This rank's rows of a whole [n, 1, h] sequence, padded to padded_length (a no-op
    without sequence parallelism). Backward gathers the gradient."""
    if not config.sequence_parallel:
        return hidden
    hidden = pad_rows(hidden, whole_rows(hidden.size(0), config))
    return tensor_parallel.scatter_to_sequence_parallel_region(hidden)


def gather(rows: Tensor, tokens: int, config: TransformerConfig) -> Tensor:
    """The whole [tokens, ...] sequence from every rank's rows, padding dropped (a no-op
    without sequence parallelism). What follows must run alike on every rank (its
    gradient is whole on each), so backward keeps this rank's rows of it."""
    if not config.sequence_parallel:
        return rows
    whole = tensor_parallel.gather_from_sequence_parallel_region(
        rows, tensor_parallel_output_grad=False)
    return whole[:tokens]


def pad_rows(values: Tensor, rows: int) -> Tensor:
    """values [n, ...] with zero rows appended up to rows (per-token RoPE angles and
    positions of the padding: angle 0 leaves its rows as they are)."""
    missing = rows - values.size(0)
    return values if missing <= 0 else torch.cat([values, values.new_zeros(missing,
                                                                            *values.shape[1:])])


def packed(cu_seqlens: Tensor, lengths: tuple[int, ...], config: TransformerConfig
           ) -> tuple[Tensor, tuple[int, ...]]:
    """The packed samples' boundaries and lengths with the padding as one more sample
    (see the Note); unchanged without sequence parallelism or padding."""
    total = sum(lengths)
    missing = whole_rows(total, config) - total
    if not missing:
        return cu_seqlens, tuple(lengths)
    end = torch.full((1,), total + missing, dtype=cu_seqlens.dtype).to(cu_seqlens.device)
    return torch.cat([cu_seqlens, end]), tuple(lengths) + (missing,)


def whole_rows(tokens: int, config: TransformerConfig) -> int:
    """Rows the layers' attention sees for a sequence of tokens (padded under SP)."""
    if not config.sequence_parallel:
        return tokens
    return padded_length(tokens, config.tensor_model_parallel_size)


def local_rows(tokens: int, config: TransformerConfig) -> int:
    """Rows this rank holds between layers for a sequence of tokens."""
    if not config.sequence_parallel:
        return tokens
    return whole_rows(tokens, config) // config.tensor_model_parallel_size


def layer_rng(config: TransformerConfig) -> Any:
    """TransformerBlock's RNG under sequence parallelism: the model-parallel fork, so
    the ranks' rows draw different dropout masks. Nothing else draws in the layers, so
    without dropout the fork is skipped."""
    if config.sequence_parallel and (config.hidden_dropout or config.attention_dropout):
        return tensor_parallel.get_cuda_rng_tracker().fork()
    return contextlib.nullcontext()


def sequence_parallel_params(params: Iterable[torch.nn.Parameter]) -> list:
    """The parameters whose gradients are partial sums over tensor parallelism."""
    return [p for p in params if getattr(p, "sequence_parallel", False)]


def all_reduce_sequence_parallel_grads(params: Iterable[torch.nn.Parameter],
                                       grad_of=lambda p: p.grad) -> None:
    """Sum the gradients of sequence-parallel parameters (norm weights) over the
    tensor-parallel group, as megatron-core's finalize_model_grads does; grad_of picks
    the tensor holding a parameter's gradient (.grad, or an fp32 main_grad)."""
    group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return
    grads = [g for g in map(grad_of, sequence_parallel_params(params)) if g is not None]
    for dtype in {g.dtype for g in grads}:  # one collective per dtype, as megatron coalesces
        same = [g for g in grads if g.dtype == dtype]
        flat = _flatten_dense_tensors(same)
        dist.all_reduce(flat, group=group)
        for grad, summed in zip(same, _unflatten_dense_tensors(flat, same)):
            grad.copy_(summed)
