"""The language model's layers of an LMM chunk, and the transformer-stack helpers every
module's part shares (vision encoder, LM, DiT).

A part holds layers [first, last) of one module. Its parameters are named by module and
layer only (``layers.<global index>``, plus ``embedding`` on the first part and
``final_norm`` / ``output_layer`` on the last), and each layer is initialised from a
generator seeded with (seed, module, layer), so any split of a module into parts holds
exactly the weights of the whole module.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.spec_utils import ModuleSpec as MegatronModuleSpec
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import ModelSpec, ModuleSpec
from .data import MicrobatchData
from .layer_specs import layer_spec
from .rotary import PortableRotaryEmbedding
from .sequence_parallel import (SequenceParallelNorm, layer_rng, local_rows, packed, pad_rows,
                                scatter)
from .transformer_config import transformer_config

Flow = dict[str, Tensor]
"""Named tensors passed from part to part (and between stages)."""
PartResult = tuple[Flow, "Tensor | None", int]
"""(tensors for the next part or stage, summed loss or None, tokens in the loss)."""


@contextlib.contextmanager
def seeded(seed: int, module: str, what: str) -> Iterator[None]:
    """Run the body on torch's host generator seeded by (seed, module, what), then
    restore it: weights created inside depend on nothing else."""
    key = zlib.crc32(f"pipeweaver-init:{seed}:{module}:{what}".encode())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(key)
        yield


def packed_params(cu_seqlens: Tensor, lengths: tuple[int, ...]) -> PackedSeqParams:
    """PackedSeqParams ('thd') for samples with these cumulative boundaries, carrying the
    host lengths too, so core attention never reads cu_seqlens back from the device
    (models/attention.py packed_segments)."""
    longest = max(lengths, default=0)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    return with_host_lengths(params, lengths)


def with_host_lengths(params: PackedSeqParams, lengths: tuple[int, ...]) -> PackedSeqParams:
    """Attach the unpadded sample lengths, known on the host, to params."""
    from .attention import HOST_SEGMENTS

    start, segments = 0, []
    for n in lengths:
        segments.append((start, n, start, n))
        start += n
    setattr(params, HOST_SEGMENTS, (segments, start, start))
    return params


def axial_rope(positions: Tensor, head_dim: int, base: float = 10000.0) -> Tensor:
    """Rotary embedding [T, 1, 1, head_dim] of T tokens at integer positions [T, A].

    The head_dim / 2 rotary frequencies are split over the A axes (1-D RoPE for A = 1,
    Qwen2-VL-style 2-D for image patches, 3-D for video tokens); the layout (both halves
    equal, not interleaved) is megatron-core's default.
    """
    half = head_dim // 2
    axes = positions.size(1)
    angles = []
    for axis in range(axes):
        count = half // axes + (1 if axis < half % axes else 0)
        exponent = torch.arange(count, dtype=torch.float32).to(positions.device) / max(count, 1)
        angles.append(positions[:, axis, None].float() * base ** -exponent)
    freqs = torch.cat(angles, dim=1)
    return torch.cat((freqs, freqs), dim=1)[:, None, None, :]


def build_layers(spec: MegatronModuleSpec | Sequence[MegatronModuleSpec],
                 config: TransformerConfig, module: str, first: int, last: int,
                 seed: int) -> nn.ModuleDict:
    """Layers first..last-1 of a module, keyed by their global index (layer_number =
    index + 1, as megatron numbers them), each initialised from its own seed. spec: one
    layer spec for all, or a block's spec of every layer of the module."""
    layers = {}
    for index in range(first, last):
        layer = spec[index] if isinstance(spec, (list, tuple)) else spec
        with seeded(seed, module, f"layer{index}"):
            layers[str(index)] = build_module(layer, config=config, layer_number=index + 1)
    return nn.ModuleDict(layers)


def run_layers(layers: nn.ModuleDict, hidden: Tensor, **kwargs) -> Tensor:
    """Run the layers in order on [s, 1, h] hidden states, each under the memory
    strategy of the enclosing memory.layer_memory block (none: plainly)."""
    from .memory import run_layer

    for layer in layers.values():
        hidden, _ = run_layer(layer, hidden, attention_mask=None, **kwargs)
    return hidden


def module_config(spec: ModuleSpec, tp: int, params_dtype: torch.dtype, dropout: float,
                  sequence_parallel: bool = False) -> TransformerConfig:
    """The module's TransformerConfig with all its layers (layer numbers are global)."""
    return transformer_config(spec, tp=tp, params_dtype=params_dtype, dropout=dropout,
                              sequence_parallel=sequence_parallel)


def first_param(module: nn.Module) -> Tensor:
    """Any parameter of the module: where and in which dtype it computes."""
    return next(module.parameters())


class LanguageModelPart(nn.Module):
    """Layers [first, last) of the LM.

    First part: ``embedding`` (megatron-core LanguageModelEmbedding) looks up the token
    ids and scatters the received image embeddings into the image positions. Every part:
    causal decoder layers with RoPE, positions restarting in every packed sample. Last
    part: ``final_norm``, then with a head ``output_layer`` and the masked cross-entropy
    summed over tokens; without a head (text-to-video) it emits the normed hidden states
    as "cond". With sequence_parallel the hidden states and the cond are this rank's
    rows ([Note: sequence parallelism in the chunks]).
    """

    def __init__(self, model: ModelSpec, name: str, first: int, last: int, *, tp: int,
                 params_dtype: torch.dtype, dropout: float, seed: int,
                 use_te: bool = False, sequence_parallel: bool = False) -> None:
        super().__init__()
        spec = model.module(name)
        if not spec.untie_embeddings:
            raise ValueError(f"module {name!r}: tied input and output embeddings are not "
                             "supported (they live on different pipeline stages)")
        self.first, self.last = first, last
        self.has_head = model.has_head(name)
        self.is_last = last == spec.num_layers
        self.config = config = module_config(spec, tp, params_dtype, dropout, sequence_parallel)
        if first == 0:  # whole on every rank: the images go in before the scatter
            with seeded(seed, name, "embedding"):
                self.embedding = LanguageModelEmbedding(
                    config, spec.vocab_size, model.parallel.microbatch_tokens,
                    position_embedding_type="rope", scatter_to_sequence_parallel=False)
        self.rotary = PortableRotaryEmbedding(spec.head_dim, 1.0, use_cpu_initialization=True)
        self.layers = build_layers(layer_spec(use_te, causal=True), config, name, first, last,
                                   seed)
        if self.is_last:
            self.final_norm = SequenceParallelNorm(config, spec.hidden_size,
                                                   eps=config.layernorm_epsilon)
            if self.has_head:
                with seeded(seed, name, "output_layer"):
                    self.output_layer = tensor_parallel.ColumnParallelLinear(
                        spec.hidden_size, spec.vocab_size, config=config,
                        init_method=config.init_method, bias=False, skip_bias_add=False,
                        gather_output=False)

    def forward(self, flow: Flow, data: MicrobatchData) -> PartResult:
        text = data.text
        config, length = self.config, text.tokens.numel()
        if self.first == 0:
            hidden = self.embedding(input_ids=text.tokens[None], position_ids=None)
            hidden = self._scatter_images(hidden, flow.get("image_embeds"), text.image_positions)
            hidden = scatter(hidden, config)
        else:
            hidden = flow["hidden"]
        if hidden.size(0) != local_rows(length, config):
            raise ValueError(f"LM hidden states hold {hidden.size(0)} rows, the microbatch's "
                             f"{length} tokens {local_rows(length, config)}")
        longest = max(text.sample_lengths, default=0)
        rope = self.rotary.get_emb(longest).to(hidden.device)[text.position_ids]
        cu_seqlens, lengths = packed(text.cu_seqlens, text.sample_lengths, config)
        with layer_rng(config):
            hidden = run_layers(self.layers, hidden, rotary_pos_emb=pad_rows(rope, sum(lengths)),
                                packed_seq_params=packed_params(cu_seqlens, lengths))
        if not self.is_last:
            return {"hidden": hidden}, None, 0
        hidden = self.final_norm(hidden)
        if not self.has_head:
            return {"cond": hidden}, None, 0
        logits, _ = self.output_layer(hidden)  # under SP it gathers the rows first
        losses = tensor_parallel.vocab_parallel_cross_entropy(logits[:length].float(),
                                                               text.labels[:, None])
        return {}, (losses[:, 0] * text.loss_mask).sum(), text.loss_tokens

    @staticmethod
    def _scatter_images(hidden: Tensor, embeds: Tensor | None, positions: Tensor) -> Tensor:
        """hidden [S, 1, H] with rows `positions` replaced by the image embeddings."""
        count = positions.numel()
        given = 0 if embeds is None else embeds.size(0)
        if given != count:
            raise ValueError(f"the LM sequence has {count} image tokens, {given} image "
                             "embeddings were given")
        if count == 0:
            return hidden
        return hidden.index_put((positions,), embeds[:, None, :].to(hidden.dtype))
