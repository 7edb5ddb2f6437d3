"""Op graphs of one stage processing one (sub-)microbatch, per TP rank.

Formulas follow Megatron-LM's layer structure (Narayanan et al., SC'21; Korthikanti et
al., "Reducing Activation Recomputation in Large Transformer Models", MLSys'23). Per
layer: norm, [SP all-gather], QKV GEMM (grouped-query: K and V have query_groups heads),
[rotary for the LM], core attention, output GEMM, TP all-reduce (reduce-scatter with SP),
residual; [cross-attention for a DiT]; norm, [all-gather], MLP GEMMs (3 matrices when
gated), activation, TP reduction, residual. Every forward GEMM has an input-gradient and
a weight-gradient GEMM of equal FLOPs; flash attention's backward costs 2.5x its forward
FLOPs; TP collectives are mirrored in the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelSpec, ModuleKind, ModuleSpec
from .ops import Op, OpClass, Phase
from .shapes import ModuleShape

F, BI, BW = Phase.FORWARD, Phase.BACKWARD_INPUT, Phase.BACKWARD_WEIGHT


@dataclass(frozen=True, kw_only=True, slots=True)
class Parallel:
    """Per-rank sharding of a stage."""

    tp: int
    sequence_parallel: bool
    dtype_bytes: int
    causal_fraction: float = 0.5
    """Cost of causal attention relative to full (kernel property, from calibration)."""
    local_spec: bool = False
    """Layers run megatron-core's local spec on torch ops (see [Note: saved activations])."""

    @property
    def seq_shard(self) -> int:
        """Divisor of replicated (norm, residual) activations: tp with SP, else 1."""
        return self.tp if self.sequence_parallel and self.tp > 1 else 1


@dataclass(frozen=True, kw_only=True, slots=True)
class PartGraph:
    """Ops and memory of one part (consecutive layers of one module) on one TP rank."""

    ops: tuple[Op, ...]
    saved_bytes: float
    """Activations kept from forward to backward without recompute."""
    checkpoint_bytes: float
    """Activations kept with full recompute of every layer (layer inputs only)."""
    output_tokens: int
    output_hidden: int
    model_flops: float
    """Forward GEMM and attention FLOPs of all TP ranks (for MFU)."""
    layer_ops: tuple[Op, ...] = ()
    """The ops of the transformer layers (each with count = layers)."""
    layers: int = 0
    """Transformer layers in the part (0 for a projector)."""

    @property
    def layer_forward(self) -> tuple[Op, ...]:
        """The forward ops of the transformer layers: what full recompute runs again."""
        return tuple(op for op in self.layer_ops if op.phase == F)


def gemm(name: str, m: float, n: float, k: float, par: Parallel, count: int = 1) -> list[Op]:
    """Forward GEMM (m x k) @ (k x n) and its two gradient GEMMs."""
    e = par.dtype_bytes
    flops, mem = 2.0 * m * n * k, e * (m * k + k * n + m * n)
    return [Op(name, OpClass.GEMM, F, flops, mem, count=count),
            Op(f"{name}.dgrad", OpClass.GEMM, BI, flops, mem, count=count),
            Op(f"{name}.wgrad", OpClass.GEMM, BW, flops, mem, count=count)]


def elementwise(name: str, numel: float, par: Parallel, passes: int = 2, count: int = 1) -> list[Op]:
    """A memory-bound op touching numel elements `passes` times; backward twice as much."""
    mem = par.dtype_bytes * numel * passes
    return [Op(name, OpClass.ELEMENTWISE, F, 0.0, mem, count=count),
            Op(f"{name}.grad", OpClass.ELEMENTWISE, BI, 0.0, 2 * mem, count=count)]


def attention(name: str, flops: float, numel: float, par: Parallel, count: int = 1) -> list[Op]:
    """Core attention (flash/SDPA): forward, and backward at 2.5x the FLOPs."""
    mem = par.dtype_bytes * numel
    return [Op(name, OpClass.ATTENTION, F, flops, mem, count=count),
            Op(f"{name}.grad", OpClass.ATTENTION, BI, 2.5 * flops, 2 * mem, count=count)]


def tp_collective(name: str, numel: float, par: Parallel, count: int = 1) -> list[Op]:
    """The TP reduction after a row-parallel GEMM, or the SP all-gather before a
    column-parallel one: all-reduce without SP, reduce-scatter / all-gather with SP
    (half the traffic); the backward pass runs the mirror collective."""
    if par.tp == 1:
        return []
    size = par.dtype_bytes * numel
    net = (1 if par.sequence_parallel else 2) * (par.tp - 1) / par.tp * size
    return [Op(name, OpClass.COLLECTIVE, F, 0.0, 2 * size, net, count=count),
            Op(f"{name}.grad", OpClass.COLLECTIVE, BI, 0.0, 2 * size, net, count=count)]


def layer_ops(spec: ModuleSpec, shape: ModuleShape, cond_hidden: int, par: Parallel,
              count: int) -> tuple[list[Op], float, float]:
    """Ops of `count` identical layers, with the activation bytes one layer saves."""
    t, e, rep = par.tp, par.dtype_bytes, par.seq_shard
    tokens = float(shape.tokens)
    h, f, kv = spec.hidden_size, spec.ffn_hidden_size, spec.query_groups * spec.head_dim
    heads, d = spec.num_attention_heads / t, spec.head_dim
    squares = sum(s * s for s in shape.seqs) * (par.causal_fraction if spec.causal else 1.0)
    ops: list[Op] = []
    ag = [] if not par.sequence_parallel else tp_collective("allgather", tokens * h, par, count)
    ops += elementwise("norm1", tokens * h / rep, par, count=count) + ag
    ops += gemm("qkv", tokens, (h + 2 * kv) / t, h, par, count)
    if spec.causal:
        ops += elementwise("rotary", tokens * (h + kv) / t, par, count=count)
    ops += attention("core_attention", 4.0 * d * heads * squares,
                     tokens * (2 * h + 2 * kv) / t, par, count)
    ops += gemm("proj", tokens, h, h / t, par, count)
    ops += tp_collective("attn_reduce", tokens * h, par, count)
    ops += elementwise("residual1", tokens * h / rep, par, passes=3, count=count)
    saved = tokens * h * 4 / rep + tokens * (2 * h + 2 * kv) / t
    if par.local_spec:
        saved = _local_self_saved(spec, tokens, rep, t)
    if spec.cross_attention and shape.cond:
        cond = float(sum(shape.cond))
        cross = sum(s * c for s, c in zip(shape.seqs, shape.cond))
        ops += elementwise("cross_norm", tokens * h / rep, par, count=count) + ag
        ops += gemm("cross_q", tokens, h / t, h, par, count)
        ops += gemm("cross_kv", cond, 2 * kv / t, cond_hidden, par, count)
        ops += attention("cross_attention", 4.0 * d * heads * cross,
                         (2 * tokens * h + 2 * cond * kv) / t, par, count)
        ops += gemm("cross_proj", tokens, h, h / t, par, count)
        ops += tp_collective("cross_reduce", tokens * h, par, count)
        ops += elementwise("residual_cross", tokens * h / rep, par, passes=3, count=count)
        if par.local_spec:
            # its norm's input, output and statistics; q, SDPA's output and log-sum-exp;
            # the condition and its K/V projection; the [tokens, cond] attention mask
            saved += tokens * (2 * h + 2) / rep + cond * cond_hidden / rep + tokens * cond \
                + (2 * tokens * h + 2 * cond * kv + tokens * spec.num_attention_heads) / t
        else:
            saved += tokens * h * 2 / rep + 2 * tokens * h / t + 2 * cond * kv / t
    up = 2 if spec.gated_mlp else 1
    ops += elementwise("norm2", tokens * h / rep, par, count=count) + ag
    ops += gemm("fc1", tokens, up * f / t, h, par, count)
    ops += elementwise("activation", tokens * f / t, par, passes=up + 1, count=count)
    ops += gemm("fc2", tokens, h, f / t, par, count)
    ops += tp_collective("mlp_reduce", tokens * h, par, count)
    ops += elementwise("residual2", tokens * h / rep, par, passes=3, count=count)
    saved += tokens * f * ((5 if spec.gated_mlp else 2) if par.local_spec else up + 1) / t
    return ops, e * saved, e * tokens * h / rep


def _local_self_saved(spec: ModuleSpec, tokens: float, rep: int, t: int) -> float:
    """[Note: saved activations] Elements one layer of megatron-core's local spec saves
    for its backward, before the MLP (counted by models/memory.SavedBytes on every
    tensor autograd keeps, a storage once; exact for tiny-vlm's and tiny-t2v's layers):
    five hidden-sized tensors around the norms and residuals, two more with RMSNorm
    (torch's composite rms_norm keeps its normalised input), the norms' statistics;
    RoPE's cos/sin of q and k (4 x head_dim); attention keeps the rotated q and k, the
    fused QKV projection's whole output (v is a view of it), SDPA's output and
    log-sum-exp. The MLP (added by the caller) keeps fc1's output and the activation's
    (GELU), or with SwiGLU fc1's doubled output and three intermediates. Transformer
    Engine fuses most of these (Korthikanti et al.'s counts, the formula above)."""
    h, kv, d = spec.hidden_size, spec.query_groups * spec.head_dim, spec.head_dim
    rms = spec.kind == ModuleKind.LANGUAGE_MODEL
    around = (7 if rms else 5) * h / rep + (2 if rms else 4) / rep
    attention = (3 * h + 3 * kv + spec.num_attention_heads) / t + 4 * d / t
    return tokens * (around + attention)


def input_ops(model: ModelSpec, spec: ModuleSpec, shape: ModuleShape, par: Parallel) -> tuple[list[Op], float]:
    """Ops in front of a module's first layer, with the bytes they save."""
    tokens, h = float(shape.tokens), spec.hidden_size
    if spec.kind == ModuleKind.LANGUAGE_MODEL:
        ops = elementwise("embedding", tokens * h, par)
        ops[-1:] = [Op("embedding.wgrad", OpClass.ELEMENTWISE, BW, 0.0,
                       2 * par.dtype_bytes * tokens * h)]
        return ops + tp_collective("embedding_reduce", tokens * h, par), 0.0
    if spec.kind == ModuleKind.VISION_ENCODER:
        rule = spec.image
        patch = rule.channels * rule.temporal_patch_size * rule.patch_size ** 2
        return gemm("patch_embed", tokens, h, patch, Parallel(
            tp=1, sequence_parallel=False, dtype_bytes=par.dtype_bytes)), par.dtype_bytes * tokens * patch
    if spec.kind == ModuleKind.GENERATOR:
        patch = spec.video.latent_channels * spec.video.patch_size ** 2
        return gemm("patch_embed", tokens, h, patch, par), par.dtype_bytes * tokens * patch
    return [], 0.0


def output_ops(model: ModelSpec, spec: ModuleSpec, shape: ModuleShape, par: Parallel) -> tuple[list[Op], float]:
    """Ops behind a module's last layer (final norm, LM head and loss, DiT output)."""
    tokens, h, t, e = float(shape.tokens), spec.hidden_size, par.tp, par.dtype_bytes
    ops = elementwise("final_norm", tokens * h / par.seq_shard, par)
    saved = e * tokens * h / par.seq_shard
    if spec.kind == ModuleKind.LANGUAGE_MODEL and model.has_head(spec.name):
        vocab = spec.vocab_size / t
        ops += tp_collective("head_allgather", tokens * h, par) if par.sequence_parallel else []
        ops += gemm("lm_head", tokens, vocab, h, par)
        # Cross entropy in fp32 over the vocabulary shard: read logits, softmax, loss.
        ops += [Op("cross_entropy", OpClass.ELEMENTWISE, F, 0.0, 4 * 3 * tokens * vocab),
                Op("cross_entropy.grad", OpClass.ELEMENTWISE, BI, 0.0, 4 * 2 * tokens * vocab)]
        saved += e * tokens * h + 4 * tokens * vocab
    elif spec.kind == ModuleKind.GENERATOR:
        patch = spec.video.latent_channels * spec.video.patch_size ** 2
        ops += gemm("dit_out", tokens, patch, h, par)
        ops += elementwise("diffusion_loss", tokens * patch, par, passes=3)
    return ops, saved


def projector_ops(model: ModelSpec, spec: ModuleSpec, shape: ModuleShape, par: Parallel) -> tuple[list[Op], float, int]:
    """Patch merger: norm over encoder tokens, then an MLP over merged tokens."""
    encoder = model.module(model.upstream(spec.name)[0])
    merge = encoder.image.merge_size ** 2 if encoder.image else 1
    tokens = float(shape.tokens) / merge
    t, width = par.tp, spec.input_size
    ops = elementwise("merger_norm", shape.tokens * encoder.hidden_size, par)
    ops += gemm("merger_fc1", tokens, spec.ffn_hidden_size / t, width, par)
    ops += elementwise("merger_gelu", tokens * spec.ffn_hidden_size / t, par)
    ops += gemm("merger_fc2", tokens, spec.hidden_size, spec.ffn_hidden_size / t, par)
    ops += tp_collective("merger_reduce", tokens * spec.hidden_size, par)
    saved = par.dtype_bytes * (shape.tokens * encoder.hidden_size + tokens * width
                               + 2 * tokens * spec.ffn_hidden_size / t)
    return ops, saved, int(tokens)


def part_graph(model: ModelSpec, module: str, first: int, last: int, shape: ModuleShape,
               par: Parallel) -> PartGraph:
    """The graph of layers [first, last) of a module for one shape."""
    spec = model.module(module)
    if shape.tokens == 0:
        return PartGraph(ops=(), saved_bytes=0.0, checkpoint_bytes=0.0,
                         output_tokens=0, output_hidden=spec.hidden_size, model_flops=0.0)
    if spec.kind == ModuleKind.PROJECTOR:
        ops, saved, out_tokens = projector_ops(model, spec, shape, par)
        return _finish(ops, (), saved, saved, out_tokens, spec.hidden_size, par, 0)
    layer, per_layer, checkpoint = layer_ops(spec, shape, model.condition_hidden(module), par,
                                             last - first)
    ops, saved = list(layer), per_layer * (last - first)
    checkpoint *= last - first
    if first == 0:
        extra, extra_saved = input_ops(model, spec, shape, par)
        ops, saved, checkpoint = extra + ops, saved + extra_saved, checkpoint + extra_saved
    if last == spec.num_layers:
        extra, extra_saved = output_ops(model, spec, shape, par)
        ops, saved, checkpoint = ops + extra, saved + extra_saved, checkpoint + extra_saved
    return _finish(ops, tuple(layer), saved, checkpoint, shape.tokens, spec.hidden_size, par,
                   last - first)


def _finish(ops, layer: tuple[Op, ...], saved, checkpoint, out_tokens, hidden, par: Parallel,
            layers: int) -> PartGraph:
    useful = sum(op.flops * op.count for op in ops
                 if op.phase == F and op.cls in (OpClass.GEMM, OpClass.ATTENTION))
    return PartGraph(ops=tuple(ops), saved_bytes=saved, checkpoint_bytes=checkpoint,
                     output_tokens=out_tokens, output_hidden=hidden, model_flops=useful * par.tp,
                     layer_ops=layer, layers=layers)
