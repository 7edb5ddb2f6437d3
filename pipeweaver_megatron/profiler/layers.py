"""Layer-level calibration: time real megatron-core layers and fit LayerFactors.

Op-level microbenchmarks price each op alone; a real layer also pays framework dispatch
(Python, autograd, small unmodelled ops such as bias/transposes) and loses efficiency to
unfused ops. Per module kind and phase, measured = scale * SEMU's op sum + overhead is
fitted on a *training* set of layer shapes (hidden 96/192/384 and token counts that the
grounding benchmark does not use), so that benchmark checks predictions on held-out
shapes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import ModelSpec, ModuleKind, ModuleSpec, get_hardware, load_model
from ..ir import Part
from ..semu.calibration import Calibration, LayerFactors, fit_phase
from ..semu.ops import OpClass, Phase
from ..semu.costs import CostModel
from ..semu.shapes import ModuleShape
from .timing import synchronize


@dataclass(frozen=True, slots=True)
class LayerCase:
    """One layer shape: which tiny-vlm module, its width, and its sequences."""

    module: str
    hidden: int
    heads: int
    lengths: tuple[int, ...]


TRAINING_FULL = tuple(
    [LayerCase("vision", h, n, (64,) * k) for h, n in ((96, 4), (192, 4), (384, 8))
     for k in (1, 3, 12)]
    + [LayerCase("lm", h, n, lengths) for h, n in ((96, 4), (192, 4), (384, 8))
       for lengths in ((80,), (200, 300), (700, 700, 600))])
TRAINING_QUICK = tuple(
    [LayerCase("vision", 192, 4, (64,) * k) for k in (1, 3, 12)]
    + [LayerCase("lm", 192, 4, lengths) for lengths in ((80,), (200, 300), (700, 700, 600))])


def resized_model(model: ModelSpec, module: str, hidden: int, heads: int | None = None) -> ModelSpec:
    """model with one module at another width (FFN scaled alike, projector adjusted)."""
    spec = model.module(module)
    scale = hidden / spec.hidden_size
    heads = heads or spec.num_attention_heads
    groups = min(spec.query_groups, heads)
    while heads % groups:
        groups -= 1
    wide = dataclasses.replace(spec, hidden_size=hidden, ffn_hidden_size=int(spec.ffn_hidden_size * scale),
                               num_attention_heads=heads, num_query_groups=groups)
    modules = []
    for m in model.modules:
        if m.name == module:
            m = wide
        elif m.name in model.downstream(module) and wide.image is not None:
            m = dataclasses.replace(m, input_size=hidden * wide.image.merge_size ** 2)
        elif m.name in model.upstream(module) and not m.is_transformer:
            m = dataclasses.replace(m, hidden_size=hidden)
        modules.append(m)
    return dataclasses.replace(model, modules=tuple(modules))


def time_layer(spec: ModuleSpec, lengths: tuple[int, ...], repeats: int,
               dev: torch.device | None = None) -> tuple[float, float]:
    """Forward and backward seconds of one megatron-core layer on packed sequences: the
    fastest of the repeats, the least disturbed by other work on a shared machine."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from ..models import build_layer, rotary_embedding

    dev = dev or torch.device(torch.cpu.current_device())
    layer = build_layer(spec, layer_number=2).to(dev)
    with dev:
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        rotary = rotary_embedding(spec.head_dim, max(lengths)) if spec.causal else None
        grad = torch.randn(sum(lengths), 1, spec.hidden_size)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    forward, backward = [], []
    for i in range(repeats + 2):
        with dev:
            x = torch.randn(sum(lengths), 1, spec.hidden_size, requires_grad=True)
        synchronize(dev)
        start = time.perf_counter()
        out, _ = layer(x, attention_mask=None, rotary_pos_emb=rotary, packed_seq_params=packed)
        synchronize(dev)
        middle = time.perf_counter()
        out.backward(grad)
        synchronize(dev)
        end = time.perf_counter()
        if i >= 2:
            forward.append(middle - start)
            backward.append(end - middle)
    return min(forward), min(backward)


CLASSES = (OpClass.GEMM, OpClass.ATTENTION, OpClass.ELEMENTWISE)


def warm_up(model: ModelSpec, dev: torch.device | None = None) -> None:
    """Run a few layers untimed first: thread pools, allocator and lazy initialisation
    would otherwise land on the first timed case."""
    for module in ("vision", "lm"):
        time_layer(model.module(module), (128, 128), 5, dev)


def op_sums(model: ModelSpec, module: str, lengths: tuple[int, ...],
            calibration: Calibration) -> dict[str, list[float]]:
    """SEMU's op latencies of one middle layer with op-level factors only, per phase
    (forward, backward) and class (gemm, attention, elementwise, other)."""
    bare = dataclasses.replace(calibration, layer_factors={})
    costs = CostModel(model, get_hardware(calibration.hardware), bare, reuse=False)
    out = {"forward": [0.0] * 4, "backward": [0.0] * 4}
    for graph in costs.graphs((Part(module, 1, 2),), {module: ModuleShape(lengths)}):
        for op in graph.ops:
            phase = "forward" if op.phase == Phase.FORWARD else "backward"
            column = CLASSES.index(op.cls) if op.cls in CLASSES else 3
            out[phase][column] += op.count * costs.op_latency(op)
    return out


def fit_layers(calibration: Calibration, dev: torch.device, quick: bool,
               log: Callable[[str], object] = print) -> Calibration:
    """Measure the training layers and return the calibration with layer factors."""
    from ..models import init_single_process, teardown

    base = load_model("tiny-vlm")
    kinds = {"vision": ModuleKind.VISION_ENCODER.value, "lm": ModuleKind.LANGUAGE_MODEL.value}
    rows: dict[str, list[dict]] = {kind: [] for kind in kinds.values()}
    init_single_process(seed=0)
    try:
        warm_up(base, dev)
        for case in TRAINING_QUICK if quick else TRAINING_FULL:
            model = resized_model(base, case.module, case.hidden, case.heads)
            fwd, bwd = time_layer(model.module(case.module), case.lengths, 3 if quick else 9, dev)
            sums = op_sums(model, case.module, case.lengths, calibration)
            pred_f, pred_b = sum(sums["forward"]), sum(sums["backward"])
            rows[kinds[case.module]].append({
                "hidden": case.hidden, "lengths": list(case.lengths), "forward_s": fwd,
                "backward_s": bwd, "ops_forward_s": sums["forward"],
                "ops_backward_s": sums["backward"]})
            log(f"  layer {case.module:<6} h={case.hidden:<4} {sum(case.lengths):>5} tokens: "
                f"fwd {fwd * 1e3:7.2f} ms (ops {pred_f * 1e3:6.2f})  bwd {bwd * 1e3:7.2f} ms "
                f"(ops {pred_b * 1e3:6.2f})")
    finally:
        teardown()
    layers = {}
    for kind, found in rows.items():
        layers[kind] = LayerFactors(
            forward=fit_phase([r["ops_forward_s"] for r in found], [r["forward_s"] for r in found]),
            backward=fit_phase([r["ops_backward_s"] for r in found],
                               [r["backward_s"] for r in found]))
    record = {**calibration.measurements, "layers": rows}
    return dataclasses.replace(calibration, layer_factors=layers, measurements=record)
