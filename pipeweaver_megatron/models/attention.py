"""Core attention on torch's scaled_dot_product_attention, a drop-in for megatron-core's
DotProductAttention in the local (non-Transformer-Engine) layer spec.

megatron-core 0.16.1's DotProductAttention refuses packed sequences and materialises the
full [b, heads, s, s] score matrix. This module takes the same constructor and forward
arguments that SelfAttention / CrossAttention pass to ``core_attention`` and adds:

- causal, bottom-right causal and bidirectional (no mask / padding mask) attention;
- packed sequences (``PackedSeqParams`` with ``cu_seqlens``, 'thd' or 'sbhd' with b=1):
  attention never crosses a sample boundary, and runs of equally long samples are
  batched into one SDPA call, so the cost is sum(s_i^2), not (sum s_i)^2. The sample
  boundaries come from the host (packed_segments): no device read per layer. One SDPA
  call under a block-diagonal mask was measured 2-9x slower on CPU (the masked math
  kernel computes (sum s_i)^2 scores), and nested jagged tensors refuse is_causal; on
  GPUs the Transformer Engine spec runs packed sequences as THD with cu_seqlens;
- grouped-query attention (num_query_groups < num_attention_heads).

Masks follow megatron's convention: a boolean ``attention_mask`` is True where attention
is NOT allowed, broadcastable to [b, heads, sq, sk].
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal, AttnMaskType.causal_bottom_right)


def causal_mask(sq: int, sk: int, like: Tensor) -> Tensor:
    """Boolean [sq, sk] mask, True where a query may attend (bottom-right aligned)."""
    rows = torch.arange(sq).to(like.device)[:, None]
    cols = torch.arange(sk).to(like.device)[None, :]
    return cols <= rows + (sk - sq)


def sdpa(query: Tensor, key: Tensor, value: Tensor, *, causal: bool, scale: float,
         blocked: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """Attention on [b, heads, s, d] tensors; key/value may have fewer (grouped) heads.

    blocked: megatron-style boolean mask, True where attention is not allowed.
    """
    allowed = None if blocked is None else ~blocked
    if causal and (allowed is not None or query.size(-2) != key.size(-2)):
        tri = causal_mask(query.size(-2), key.size(-2), query)
        allowed = tri if allowed is None else allowed & tri
        causal = False
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed, dropout_p=dropout_p, is_causal=causal,
        scale=scale, enable_gqa=key.size(1) != query.size(1))


HOST_SEGMENTS = "_pipeweaver_segments"
"""Attribute of a PackedSeqParams holding packed_segments' result: set by whoever built
it from host lengths (models/language.py packed_params), else by the first layer."""


def packed_segments(params: PackedSeqParams) -> tuple[list[tuple[int, int, int, int]], int, int]:
    """(q_start, q_len, kv_start, kv_len) per sample, and total q / kv rows.

    Padded cu_seqlens (if given) place each sample; the unpadded ones give its length.
    Read from the device once per PackedSeqParams (a host sync on CUDA), then cached on
    it for every later layer; none at all where the builder attached host lengths.
    """
    cached = getattr(params, HOST_SEGMENTS, None)
    if cached is not None:
        return cached
    found = _device_segments(params)
    setattr(params, HOST_SEGMENTS, found)
    return found


def _device_segments(params: PackedSeqParams) -> tuple[list[tuple[int, int, int, int]], int, int]:
    if params.cu_seqlens_q is None:
        raise ValueError("packed_seq_params needs cu_seqlens_q")
    cu_q = params.cu_seqlens_q.tolist()
    cu_kv = cu_q if params.cu_seqlens_kv is None else params.cu_seqlens_kv.tolist()
    pos_q = cu_q if params.cu_seqlens_q_padded is None else params.cu_seqlens_q_padded.tolist()
    pos_kv = cu_kv if params.cu_seqlens_kv_padded is None else params.cu_seqlens_kv_padded.tolist()
    if len(cu_q) != len(cu_kv):
        raise ValueError(f"cu_seqlens_q has {len(cu_q) - 1} samples, cu_seqlens_kv {len(cu_kv) - 1}")
    segments = [(pos_q[i], cu_q[i + 1] - cu_q[i], pos_kv[i], cu_kv[i + 1] - cu_kv[i])
                for i in range(len(cu_q) - 1)]
    return segments, pos_q[-1], pos_kv[-1]


def equal_runs(segments: list[tuple[int, int, int, int]]) -> list[list[tuple[int, int, int, int]]]:
    """Consecutive, contiguous samples of equal lengths, grouped to share one SDPA call."""
    runs: list[list[tuple[int, int, int, int]]] = []
    for seg in segments:
        if runs:
            last = runs[-1][-1]
            if (seg[1], seg[3]) == (last[1], last[3]) and seg[0] == last[0] + last[1] \
                    and seg[2] == last[2] + last[3]:
                runs[-1].append(seg)
                continue
        runs.append([seg])
    return runs


class SDPAttention(MegatronModule):
    """megatron-core core attention on scaled_dot_product_attention (CPU and GPU)."""

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPAttention supports softmax_type 'vanilla' only, "
                             f"got {config.softmax_type!r}")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                     layer_number):
            raise ValueError("SDPAttention does not support sliding-window attention")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        world = pg_collection.tp.size()
        projection = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection, world)
        self.hidden_size_per_attention_head = divide(projection, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, world)
        self.num_query_groups_per_partition = divide(config.num_query_groups, world)
        # apply_query_key_layer_scaling divides the scale by the layer number and the fp32
        # softmax multiplies it back, so the product is the plain scale.
        self.softmax_scale = (1.0 / math.sqrt(self.hidden_size_per_attention_head)
                              if softmax_scale is None else softmax_scale)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                attention_mask: Optional[Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> Tensor:
        """[sq, b, np, hn] (or packed [t, np, hn]) inputs -> [sq, b, np*hn] (or [t, np*hn]).

        With packed_seq_params the attention_mask is ignored (as Transformer Engine does):
        cu_seqlens define the samples.
        """
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention_bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        causal = mask_type in CAUSAL_TYPES
        dropout_p = self.dropout_p if self.training else 0.0
        with self._rng(dropout_p):
            if packed_seq_params is not None and packed_seq_params.cu_seqlens_q is not None:
                return self._packed(query, key, value, packed_seq_params, causal, dropout_p)
            # [s, b, n, d] -> [b, n, s, d]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            out = sdpa(q, k, v, causal=causal, scale=self.softmax_scale,
                       blocked=attention_mask, dropout_p=dropout_p)
        sq, b = query.size(0), query.size(1)
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _packed(self, query: Tensor, key: Tensor, value: Tensor, params: PackedSeqParams,
                causal: bool, dropout_p: float) -> Tensor:
        """Packed samples: [t, n, d] ('thd') or [t, 1, n, d] ('sbhd' with one row)."""
        four_d = query.dim() == 4
        if four_d:
            if query.size(1) != 1:
                raise ValueError(f"packed sequences need batch size 1, got {query.size(1)}")
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        segments, rows_q, rows_kv = packed_segments(params)
        if rows_q > query.size(0) or rows_kv > key.size(0):
            raise ValueError(f"cu_seqlens cover {rows_q}/{rows_kv} tokens, the inputs hold "
                             f"{query.size(0)}/{key.size(0)}")
        heads, dim = query.size(1), query.size(2)
        out = query.new_zeros(query.size(0), heads, dim)
        for run in equal_runs(segments):
            q0, lq, k0, lk = run[0]
            n = len(run)
            q = query[q0:q0 + n * lq].view(n, lq, heads, dim).transpose(1, 2)
            k = key[k0:k0 + n * lk].view(n, lk, key.size(1), dim).transpose(1, 2)
            v = value[k0:k0 + n * lk].view(n, lk, value.size(1), dim).transpose(1, 2)
            o = sdpa(q, k, v, causal=causal, scale=self.softmax_scale, dropout_p=dropout_p)
            out[q0:q0 + n * lq] = o.transpose(1, 2).reshape(n * lq, heads, dim)
        out = out.reshape(out.size(0), self.hidden_size_per_partition)
        return out.unsqueeze(1) if four_d else out

    def _rng(self, dropout_p: float):
        """megatron's tensor-parallel RNG region for attention dropout (as DotProductAttention)."""
        if dropout_p > 0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()
