"""`pipeweaver plan`: plan one global batch with the PipeWeaver search and show it."""

from __future__ import annotations

import argparse
import json

from ..config import ConfigError, get_hardware, load_model
from ..ir import render_grid
from ..planner import PipeWeaverPlanner, SearchSettings, partition
from ..semu import CostModel, load_calibration, write_plot, write_trace
from ..workload import WorkloadError, sample_workload


def cost_model(args: argparse.Namespace) -> CostModel:
    """The model, hardware profile and calibration named by --model/--hardware/--calibration."""
    model = load_model(args.model)
    calibration = load_calibration(args.calibration) if args.calibration else None
    hardware = get_hardware(args.hardware or (calibration.hardware if calibration
                                              else model.hardware))
    if calibration and calibration.hardware.lower() != hardware.name.lower():
        raise ConfigError(args.calibration, "hardware", f"fitted for {calibration.hardware}, "
                                                        f"not {hardware.name}")
    return CostModel(model, hardware, calibration)


def add_cost_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hardware", help="hardware profile (default: the model's)")
    parser.add_argument("--calibration", metavar="FILE", help="from `pipeweaver profile`")


def cmd_plan(args: argparse.Namespace) -> None:
    costs = cost_model(args)
    model = costs.model
    if args.iteration < 0:
        raise WorkloadError(f"--iteration must be >= 0, got {args.iteration}")
    batches = sample_workload(model, args.workload or model.dataset, args.iteration + 1, args.seed)
    settings = SearchSettings(max_evaluations=args.evaluations)
    planner = PipeWeaverPlanner(costs, partition(costs, reference=batches[0]), settings)
    result = planner.plan(batches[args.iteration], args.budget_ms, args.seed)
    title = f"{model.name} pipeweaver, iteration {args.iteration} on {costs.hardware.name}"
    if args.trace:
        write_trace(result.simulation, result.layout, args.trace, title)
    if args.plot:
        write_plot(result.simulation, result.layout, args.plot, title)
    if args.json:
        print(json.dumps({"model": model.name, "hardware": costs.hardware.name,
                          "iteration": args.iteration, "seed": args.seed, **result.to_dict()}))
        return
    search = result.search
    print(f"{title}: {result.table.num_microbatches} microbatches, "
          f"{sum(len(r) for r in result.table.ranks)} actions, hash {result.table.content_hash[:16]}")
    print(result.layout.describe())
    print(f"predicted iteration {result.predicted_iteration_time_s:.3f} s, lower bound "
          f"{result.lower_bound_s:.3f} s ({result.predicted_iteration_time_s / result.lower_bound_s - 1:+.1%}), "
          f"bubble {result.simulation.bubble_ratio:.1%}, MFU {result.simulation.mfu:.1%}")
    print("peak memory (GiB) " + " ".join(f"{m:.1f}" for m in result.peak_memory_gib)
          + f" of {result.capacity_bytes / 2**30:.1f}")
    print(f"search: {search.evaluations} candidates in {search.elapsed_ms:.0f} ms, gate "
          f"{search.gate}, best " + " -> ".join(f"{s:.3f}" for _, _, s in search.history))
    if args.grid:
        print(render_grid(result.table))


def add_parser(sub) -> None:
    plan = sub.add_parser("plan", help="search a PipeWeaver schedule for one batch")
    plan.add_argument("--model", required=True)
    plan.add_argument("--workload", help="dataset generator, JSONL trace, or a prepared "
                                           "dataset folder (`pipeweaver data prepare`; its "
                                           "real batches) (default: the model's)")
    plan.add_argument("--budget-ms", type=float, default=1000.0, help="search time budget")
    plan.add_argument("--evaluations", type=int,
                      help="stop after this many candidates (reproducible on any machine)")
    plan.add_argument("--seed", type=int, default=0, help="workload and search seed")
    plan.add_argument("--iteration", type=int, default=0, help="which batch of the workload")
    add_cost_arguments(plan)
    plan.add_argument("--trace", metavar="OUT.json", help="Perfetto trace of the predicted timeline")
    plan.add_argument("--plot", metavar="OUT.png", help="timeline plot")
    plan.add_argument("--grid", action="store_true", help="print the step x rank grid")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_plan)
