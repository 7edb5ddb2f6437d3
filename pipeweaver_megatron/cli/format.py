"""Human-readable text for the CLI (no logic beyond formatting)."""

from __future__ import annotations

from ..config import ModelSpec, ModuleKind, get_hardware


def _params(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _topology(model: ModelSpec) -> str:
    chain = list(zip(model.order, model.order[1:]))
    if sorted(chain) == sorted(model.topology):
        return " -> ".join(model.order)
    return ", ".join(f"{s} -> {d}" for s, d in model.topology)


def format_model(model: ModelSpec) -> str:
    """The setup as a few aligned tables."""
    par = model.parallel
    hw = get_hardware(model.hardware)
    lines = [
        f"{model.name}: {model.description}",
        f"  source     {model.source}",
        f"  topology   {_topology(model)}",
        f"  parallel   TP={par.tp} PP={par.pp} DP={par.dp} (VPP baseline vp={par.vp}), "
        f"{par.world_size} GPUs, sequence parallel {'on' if par.sequence_parallel else 'off'}",
        f"  batching   {par.microbatch_tokens} LM tokens and <= {par.max_images_per_microbatch} "
        f"images per microbatch, global batch {par.global_batch_size} microbatches "
        f"({par.num_microbatches} per pipeline)",
        f"  hardware   {hw.name}: {hw.peak_flops / 1e12:.0f} TFLOP/s, "
        f"{hw.memory_capacity / 1e9:.0f} GB at {hw.memory_bandwidth / 1e12:.2f} TB/s, "
        f"{hw.gpus_per_node} per node",
        f"  workload   {model.dataset}",
        "",
        f"  {'module':<10} {'kind':<15} {'layers':>6} {'hidden':>7} {'ffn':>7} {'heads':>5} "
        f"{'groups':>6} {'params':>9}",
    ]
    for name in model.order:
        m = model.module(name)
        heads = str(m.num_attention_heads) if m.is_transformer else "-"
        groups = str(m.query_groups) if m.is_transformer else "-"
        lines.append(f"  {m.name:<10} {m.kind.value:<15} {m.num_layers:>6} {m.hidden_size:>7} "
                     f"{m.ffn_hidden_size:>7} {heads:>5} {groups:>6} "
                     f"{_params(model.module_params(name)):>9}")
    lines.append(f"  {'total':<10} {'':<15} {'':>6} {'':>7} {'':>7} {'':>5} {'':>6} "
                 f"{_params(model.total_params):>9}")
    for m in model.modules_of(ModuleKind.VISION_ENCODER):
        r = m.image
        lines.append(f"\n  {m.name}: patch {r.patch_size}, merge {r.merge_size}x{r.merge_size}: a "
                     f"{r.image_size}px image is {r.encoder_tokens(r.image_size, r.image_size)} "
                     f"encoder tokens and {r.default_lm_tokens} LM tokens")
    for m in model.modules_of(ModuleKind.GENERATOR):
        v = m.video
        lines.append(f"\n  {m.name}: {v.fps} fps, clips <= {v.max_clip_seconds:g} s, <= "
                     f"{v.max_clips_per_microbatch} clips and {v.max_seconds_per_microbatch:g} s per "
                     f"microbatch, {v.height}x{v.width}: {v.tokens(v.max_clip_seconds)} DiT tokens "
                     f"per {v.max_clip_seconds:g} s clip")
    return "\n".join(lines)


def format_simulation(model: ModelSpec, schedule: str, hardware: str, run) -> str:
    """Per-iteration times and the summary of a simulated workload."""
    lines = [f"{model.name}, {schedule} on {hardware} ({len(run.results)} iterations)",
             f"  {'iteration':>9} {'time (s)':>10} {'bound (s)':>10} {'bubble':>8} {'MFU':>7}"]
    for i, r in enumerate(run.results):
        lines.append(f"  {i:>9} {r.iteration_time_s:>10.3f} {r.lower_bound_s:>10.3f} "
                     f"{r.bubble_ratio:>8.1%} {r.mfu:>7.1%}")
    lines += [f"  mean iteration time  {run.mean_iteration_time_s:.3f} s "
              f"(lower bound {run.mean('lower_bound_s'):.3f} s)",
              f"  bubble ratio {run.mean('bubble_ratio'):.1%}, MFU {run.mean('mfu'):.1%}",
              "  peak memory (GiB)    " + " ".join(f"{m:.1f}" for m in run.peak_memory_gib),
              f"  stage-cost reuse     {run.reuse.hits} hits, {run.reuse.misses} misses"]
    return "\n".join(lines)
