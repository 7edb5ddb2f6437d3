"""Rotary position embeddings that also run off CUDA.

megatron-core 0.16.1's RotaryEmbedding.get_emb moves its frequencies to
torch.cuda.current_device() on first use, which fails on a CPU-only machine. This
subclass computes the same embedding ([max_seq_len, 1, 1, dim], both halves or
interleaved as configured) where its frequencies live.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding


class PortableRotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding without the move to CUDA (build it with use_cpu_initialization)."""

    def get_emb(self, max_seq_len: int, offset: int = 0) -> Tensor:
        """Embedding of positions offset .. offset + max_seq_len - 1."""
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(
                freqs.shape[0], -1)
        return emb[:, None, None, :]


def rotary_embedding(head_dim: int, max_seq_len: int, base: int = 10000) -> Tensor:
    """The LM's RoPE table for sequences up to max_seq_len, on the host."""
    module = PortableRotaryEmbedding(head_dim, 1.0, rotary_base=base, use_cpu_initialization=True)
    return module(max_seq_len, packed_seq=True)
