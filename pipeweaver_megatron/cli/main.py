"""The `pipeweaver` command: thin subcommands over the library's layers."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from ..config import ConfigError, list_models, load_model, model_to_dict
from ..profiler.args import ProfileError, add_parser as add_profile_parser
from ..ir import LayoutError, ScheduleFormatError, ScheduleValidationError, render_grid
from ..schedules import Baseline, ScheduleError, build_baseline
from ..semu import CalibrationError, StuckSchedule, simulate_workload, write_plot, write_trace
from ..workload import WorkloadError, TokenRules, record_trace, sample_workload, summarize
from ..planner import PlannerError, SYSTEMS, make_system
from ..data import DataError
from .format import format_model, format_simulation
from .plan import add_cost_arguments, add_parser as add_plan_parser, cost_model
from .calibrate import add_parser as add_calibrate_parser
from .checkpoint import add_parser as add_checkpoint_parser
from .data import add_parser as add_data_parser
from .demo import add_parser as add_demo_parser
from .verify import add_parser as add_verify_parser

USER_ERRORS = (ConfigError, ScheduleError, WorkloadError, LayoutError, ScheduleFormatError,
               ScheduleValidationError, FileNotFoundError, CalibrationError, StuckSchedule,
               ProfileError, PlannerError, DataError)


def cmd_config_show(args: argparse.Namespace) -> None:
    model = load_model(args.model)
    print(json.dumps(model_to_dict(model), indent=2) if args.json else format_model(model))


def cmd_config_list(args: argparse.Namespace) -> None:
    for name in list_models():
        model = load_model(name)
        print(f"{name:<12} {model.description}")


def cmd_workload_sample(args: argparse.Namespace) -> None:
    model = load_model(args.model)
    dataset = args.dataset or model.dataset
    batches = sample_workload(model, dataset, args.iterations, args.seed)
    summary = summarize(batches, TokenRules.from_model(model))
    if args.record:
        record_trace(batches, args.record)
    if args.json:
        print(json.dumps({"model": model.name, "dataset": dataset, "seed": args.seed,
                          **summary.to_dict()}, indent=2))
    else:
        print(f"{model.name} on {dataset} (seed {args.seed})")
        print(summary.format())
        if args.record:
            print(f"trace written to {args.record}")


def cmd_schedule(args: argparse.Namespace) -> None:
    model = load_model(args.model)
    table = build_baseline(model, args.baseline, args.microbatches, args.pp, args.vp,
                           args.group_size)
    if args.json:
        print(json.dumps(table.to_json()))
        return
    print(f"{table.name} for {model.name}: {table.layout.num_ranks} ranks, "
          f"{table.layout.num_stages} stages, {table.num_microbatches} microbatches, "
          f"hash {table.content_hash[:16]}")
    print(table.layout.describe())
    print()
    print(render_grid(table))


def cmd_simulate(args: argparse.Namespace) -> None:
    costs = cost_model(args)
    model, hardware = costs.model, costs.hardware
    batches = sample_workload(model, args.workload or model.dataset, args.iterations, args.seed)
    plan = make_system(args.schedule, costs, batches[0], args.budget_ms, args.seed)
    run = simulate_workload(costs, batches, plan)
    if args.trace:
        write_trace(run.results[0], run.tables[0].layout, args.trace, f"{model.name} {args.schedule}")
    if args.plot:
        write_plot(run.results[0], run.tables[0].layout, args.plot,
                   f"{model.name}, {args.schedule}, iteration 0 on {hardware.name}")
    if args.json:
        print(json.dumps({"model": model.name, "schedule": args.schedule,
                          "hardware": hardware.name, "calibration": costs.calibration.source,
                          **run.to_dict()}, indent=2))
    else:
        print(format_simulation(model, args.schedule, hardware.name, run))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeweaver", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="model specs").add_subparsers(dest="action",
                                                                         required=True)
    show = config.add_parser("show", help="print a setup")
    show.add_argument("model", help="name from model_configs/ or a YAML path")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_config_show)
    config.add_parser("list", help="list the shipped setups").set_defaults(func=cmd_config_list)

    workload = sub.add_parser("workload", help="workload metadata").add_subparsers(
        dest="action", required=True)
    sample = workload.add_parser("sample", help="sample global batches and print statistics")
    sample.add_argument("--model", required=True)
    sample.add_argument("--dataset", help="generator name or a JSONL trace (default: the "
                                          "model's dataset)")
    sample.add_argument("--iterations", type=int, default=10)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--record", metavar="FILE.jsonl", help="also write the samples as a trace")
    sample.add_argument("--json", action="store_true")
    sample.set_defaults(func=cmd_workload_sample)

    schedule = sub.add_parser("schedule", help="a baseline schedule in the IR")
    schedule.add_argument("--model", required=True)
    schedule.add_argument("--baseline", required=True, choices=[b.value for b in Baseline])
    schedule.add_argument("--microbatches", type=int, help="default: the model's per-pipeline count")
    schedule.add_argument("--pp", type=int)
    schedule.add_argument("--vp", type=int)
    schedule.add_argument("--group-size", type=int, help="microbatch_group_size_per_vp_stage")
    schedule.add_argument("--json", action="store_true")
    schedule.set_defaults(func=cmd_schedule)

    sim = sub.add_parser("simulate", help="predict iteration time, bubbles, MFU and memory")
    sim.add_argument("--model", required=True)
    sim.add_argument("--workload", help="dataset generator, JSONL trace, or a prepared "
                                           "dataset folder (`pipeweaver data prepare`; its "
                                           "real batches) (default: the model's)")
    sim.add_argument("--schedule", required=True, choices=SYSTEMS,
                     help="pipeweaver plans every iteration; megatron-vpp, nnscaler and optimus "
                          "are the paper's comparison baselines")
    sim.add_argument("--budget-ms", type=float, default=1000.0,
                     help="pipeweaver's search budget per iteration")
    sim.add_argument("--iterations", type=int, default=10)
    sim.add_argument("--seed", type=int, default=0)
    add_cost_arguments(sim)
    sim.add_argument("--trace", metavar="OUT.json", help="Perfetto trace of iteration 0")
    sim.add_argument("--plot", metavar="OUT.png", help="timeline plot of iteration 0")
    sim.add_argument("--json", action="store_true")
    sim.set_defaults(func=cmd_simulate)

    add_profile_parser(sub)
    add_plan_parser(sub)
    add_verify_parser(sub)
    add_calibrate_parser(sub)
    add_checkpoint_parser(sub)
    add_data_parser(sub)

    add_demo_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        code = func(args)
    except USER_ERRORS as exc:
        print(f"pipeweaver: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
