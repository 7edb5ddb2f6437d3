"""--num-virtual-stages-per-pipeline-rank under --pipeweaver, chosen before Megatron
sets up its virtual pipeline.

Megatron builds V model chunks per pipeline rank from its flags (validate_args turns
--num-virtual-stages-per-pipeline-rank into virtual_pipeline_model_parallel_size)
before any provider runs; the run's layout gives every rank sum(K_i) stages (see
[Note: virtual stages] in providers.py). The layout follows from the spec, PP, TP, the
hardware and calibration, and the partitioner's reference batch (replica 0's first,
drawn from the seed), all known once the flags are parsed, so the wrapped parser cuts it
then, the same way the planner service will (service_settings + cut_layout), and sets V
itself: a V given on the command line that disagrees is an error naming both values.
The planner service cuts the layout again when it starts; the drop-in checks that the
two agree.

Pure Python: the planner side only (no torch, no megatron).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from typing import Callable

from ..config import ModelSpec, ModuleKind, load_model
from ..ir import Layout
from ..service import FAULTS as SERVICE_FAULTS
from ..service import ServiceSettings
from ..service.planner_service import cut_layout
from ..workload import GlobalBatch, Microbatch, SampleMeta, sample_workload
from .model_args import data_parallel_size, planning_spec


PARSED: dict = {}
"""What the parser derived for this process's run: "spec" (the ModelSpec the planner
prices) and "layout" (the Layout the virtual stages follow)."""


def layout_id(layout: Layout) -> str:
    """A stable text id of a layout (stages, ranks and parts)."""
    return hashlib.sha256(layout.describe().encode()).hexdigest()[:16]


class VirtualStagesError(ValueError):
    """--num-virtual-stages-per-pipeline-rank disagrees with the run's layout."""


def spec_overrides(args: argparse.Namespace, tp: int, pp: int, dp: int) -> dict[str, int]:
    """The model spec's parallel settings as the run's flags set them: the parallel
    sizes, and --global-batch-size / --seq-length as the microbatches per iteration and
    the packing budget, and --sequence-parallel (taken with TP > 1; the flag decides,
    not the model file)."""
    parallel = {"tp": tp, "pp": pp, "dp": dp,
                "sequence_parallel": bool(getattr(args, "sequence_parallel", False)) and tp > 1}
    if args.global_batch_size:
        parallel["global_batch_size"] = args.global_batch_size
    if args.seq_length:
        parallel["microbatch_tokens"] = args.seq_length
    return parallel


def parse_time_parallel(args: argparse.Namespace) -> dict[str, int]:
    """spec_overrides from the flags and the launcher's world size (before
    torch.distributed runs)."""
    return spec_overrides(args, args.tensor_model_parallel_size,
                          args.pipeline_model_parallel_size, data_parallel_size(args))


def layout_reference(model: ModelSpec, workload: str | None, seed: int):
    """The batch the chunk partitioner takes typical shapes from: replica 0's first, on
    every replica, so all data-parallel replicas cut the same layout (their gradients
    are reduced parameter by parameter). A language model alone (pretrain_gpt.py's
    GPT) without a workload: every microbatch one sequence of the microbatch's tokens,
    as its dataset makes them."""
    if workload is None and len(model.modules) == 1 \
            and model.modules[0].kind == ModuleKind.LANGUAGE_MODEL:
        parallel = model.parallel
        return GlobalBatch(iteration=0, microbatches=tuple(
            Microbatch(index=j, samples=(SampleMeta(sample_id=j,
                                                    text_tokens=parallel.microbatch_tokens),))
            for j in range(parallel.num_microbatches)))
    return sample_workload(model, workload or model.dataset, 1, seed * 1000)[0]


def message_dtype(args: argparse.Namespace) -> str:
    """The activations' dtype between stages: Float16Module's under --bf16 / --fp16."""
    if getattr(args, "bf16", False):
        return "bfloat16"
    return "float16" if getattr(args, "fp16", False) else "float32"


def service_settings(args: argparse.Namespace, model: ModelSpec, parallel: dict[str, int],
                     pp: int, tp: int, model_file: str | None = None) -> ServiceSettings:
    """The planner service's settings of a run with these flags. model_file: where the
    workers load the spec (default --pipeweaver-model-config)."""
    hardware = args.pipeweaver_hardware
    if hardware is None and args.pipeweaver_calibration:
        from ..semu import load_calibration

        hardware = load_calibration(args.pipeweaver_calibration).hardware
    return ServiceSettings(
        model=model_file or args.pipeweaver_model_config, parallel=dict(parallel),
        dtype=message_dtype(args), hardware=hardware
        or model.hardware, calibration=args.pipeweaver_calibration, pp=pp, tp=tp,
        sequence_parallel=parallel.get("sequence_parallel"),  # None: the script's own model
        schedule=args.pipeweaver_schedule, budget_ms=args.pipeweaver_search_budget_ms,
        lookahead=args.pipeweaver_lookahead,
        partition=getattr(args, "pipeweaver_partition", "balanced"),
        online_calibration=getattr(args, "pipeweaver_online_calibration", "off") == "on",
        workers=args.pipeweaver_planner_workers, timeout_ms=args.pipeweaver_plan_timeout_ms,
        fallback=args.pipeweaver_fallback,
        reference=layout_reference(model, getattr(args, "workload", None), args.seed),
        seed=args.seed, faults={i: kind for kind, i in args.pipeweaver_inject_fault
                                if kind in SERVICE_FAULTS})


def run_spec(args: argparse.Namespace) -> tuple[ModelSpec, dict[str, int]]:
    """The run's spec and the parallel overrides the planner workers apply to it:
    --pipeweaver-model-config with the flags' parallel settings, or the model of the
    script's own flags (model_args.planning_spec, which holds them already)."""
    if args.pipeweaver_model_config:
        parallel = parse_time_parallel(args)
        return load_model(args.pipeweaver_model_config, parallel), parallel
    return planning_spec(args), {}


def run_layout(args: argparse.Namespace, model: ModelSpec, parallel: dict[str, int]) -> Layout:
    """The layout of a --pipeweaver run, from its flags and spec."""
    pp, tp = args.pipeline_model_parallel_size, args.tensor_model_parallel_size
    settings = service_settings(args, model, parallel, pp, tp, model_file=model.name)
    return cut_layout(settings, model, pp).layout


def choose_virtual_stages(args: argparse.Namespace) -> int | None:
    """Set args.num_virtual_stages_per_pipeline_rank to the stages per rank of the run's
    layout (None for one, as Megatron has it) and return it; a different V given on the
    command line raises VirtualStagesError. PP 1 is left alone (Megatron builds one chunk
    whatever V says; the providers explain what to pass)."""
    model, parallel = run_spec(args)
    PARSED.clear()
    PARSED["spec"] = model
    if args.pipeline_model_parallel_size == 1:
        return args.num_virtual_stages_per_pipeline_rank
    layout = run_layout(args, model, parallel)
    PARSED["layout"] = layout
    # Megatron saves its args in every checkpoint and loads them with weights_only:
    # plain strings only there.
    args.pipeweaver_layout = layout_id(layout)
    counts = {len(layout.stages_of_rank(r)) for r in range(layout.num_ranks)}
    if len(counts) != 1:
        raise VirtualStagesError(f"the run's layout gives the pipeline ranks {sorted(counts)} "
                                 "stages; Megatron builds the same number on every rank")
    stages = counts.pop()
    chosen = None if stages == 1 else stages
    given = args.num_virtual_stages_per_pipeline_rank
    if given not in (None, stages) or (given is None and getattr(
            args, "num_layers_per_virtual_pipeline_stage", None) is not None):
        raise VirtualStagesError(
            f"--num-virtual-stages-per-pipeline-rank {given}: the run's layout gives every "
            f"pipeline rank {stages} stages; drop the flag (PipeWeaver sets it) or pass {stages}")
    args.num_virtual_stages_per_pipeline_rank = chosen
    if int(os.environ.get("RANK", "0")) == 0:
        owned = ["+".join(f"{p.module}[{p.first_layer}:{p.last_layer}]" for p in s.parts)
                 for s in layout.stages_of_rank(0)]
        print(f"pipeweaver: the layout gives each of the {layout.num_ranks} pipeline ranks "
              f"{stages} stages (rank 0: {', '.join(owned)}): "
              f"--num-virtual-stages-per-pipeline-rank {stages}", file=sys.stderr, flush=True)
    return chosen


def wrap_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser, whose parse_known_args (parse_args calls it) chooses V under
    --pipeweaver right after parsing, before Megatron's validate_args reads it."""
    parse: Callable = parser.parse_known_args

    def parse_known_args(*a, **kw):
        namespace, rest = parse(*a, **kw)
        if getattr(namespace, "pipeweaver", False) and hasattr(
                namespace, "num_virtual_stages_per_pipeline_rank"):
            choose_virtual_stages(namespace)
        return namespace, rest

    parser.parse_known_args = parse_known_args
    return parser
