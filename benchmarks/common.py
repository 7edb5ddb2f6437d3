"""Helpers shared by the benchmarks: a setup's model, costs and batches; one system run
through SEMU; markdown tables; reports (markdown + JSON) that name their command; plots.

Scripts in benchmarks/ import this module as `common` (they run as
`python benchmarks/NAME.py`, which puts this folder first on sys.path).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeweaver_megatron.config import ModelSpec, get_hardware, load_model
from pipeweaver_megatron.planner import PipeWeaverPlanner, SearchSettings, make_system, partition
from pipeweaver_megatron.semu import CostModel, WorkloadSimulation, simulate_workload
from pipeweaver_megatron.workload import GlobalBatch, sample_workload

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
"""Where `make bench` writes; `make bench-quick` writes under build/ instead."""
BASELINES = ("megatron-vpp", "nnscaler", "optimus")
SYSTEMS = ("pipeweaver", *BASELINES)
GIB = 2**30
SIMULATED = ("SEMU-predicted: every time, MFU and memory figure here is SEMU's simulation "
             "on the setup's GPU hardware profile, not a measurement.")


@dataclass(frozen=True, kw_only=True)
class Setup:
    """A model with its cost model and the global batches every system runs."""

    model: ModelSpec
    costs: CostModel
    batches: list[GlobalBatch]

    @property
    def capacity_gib(self) -> float:
        return self.costs.hardware.memory_capacity / GIB


def load_setup(name: str, iterations: int, seed: int, dataset: str | None = None) -> Setup:
    model = load_model(name)
    costs = CostModel(model, get_hardware(model.hardware))
    return Setup(model=model, costs=costs,
                 batches=sample_workload(model, dataset or model.dataset, iterations, seed))


@dataclass(frozen=True, kw_only=True)
class SystemRun:
    """One system planned and simulated on every batch of a setup."""

    name: str
    run: WorkloadSimulation
    system: Any
    """The semu.Planner make_system built (PipeWeaverSystem keeps its PlanResults)."""
    wall_s: float

    @property
    def mean_s(self) -> float:
        return self.run.mean_iteration_time_s

    @property
    def mfu(self) -> float:
        return self.run.mean("mfu")

    @property
    def peak_gib(self) -> float:
        return max(self.run.peak_memory_gib)

    def summary(self) -> dict:
        out = {"mean_iteration_time_s": self.mean_s, "iteration_time_s": self.run.iteration_time_s,
               "mfu": self.mfu, "peak_memory_gib": self.peak_gib, "wall_s": self.wall_s}
        plans = getattr(self.system, "plans", None)
        if plans:
            gaps = [p.predicted_iteration_time_s / p.lower_bound_s - 1 for p in plans]
            balance = [p.predicted_iteration_time_s / p.balance_bound_s - 1 for p in plans]
            out.update(lower_bound_gap_max=max(gaps), lower_bound_gap_mean=sum(gaps) / len(gaps),
                       balance_gap_mean=sum(balance) / len(balance),
                       within_5_percent=sum(g <= 0.05 for g in gaps),
                       plan_ms_mean=sum(p.search.elapsed_ms for p in plans) / len(plans),
                       evaluations_mean=sum(p.search.evaluations for p in plans) / len(plans))
        else:
            out["batches_recomputed"] = getattr(self.system, "recomputed", 0)
        return out


def run_system(setup: Setup, name: str, budget_ms: float, seed: int,
               settings: SearchSettings = SearchSettings(),
               batches: Sequence[GlobalBatch] | None = None) -> SystemRun:
    """Plan (PipeWeaver) or build (static systems) and simulate every batch."""
    began = time.perf_counter()
    batches = setup.batches if batches is None else batches
    system = make_system(name, setup.costs, batches[0], budget_ms, seed, settings)
    run = simulate_workload(setup.costs, batches, system, detail_first=False)
    out = SystemRun(name=name, run=run, system=system, wall_s=time.perf_counter() - began)
    print(f"  {setup.model.name:10} {name:13} {out.mean_s:8.3f} s  MFU {out.mfu:5.1%}  "
          f"peak {out.peak_gib:5.1f} GiB  ({out.wall_s:.0f} s)", flush=True)
    return out


def warm_planner(setup: Setup, settings: SearchSettings = SearchSettings(),
                 seed: int = 0) -> PipeWeaverPlanner:
    """PipeWeaver's planner for the setup, on this process pinned to one CPU core (planning
    times are per core), with its stage-cost cache warmed as training would."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    planner = PipeWeaverPlanner(setup.costs, partition(setup.costs, reference=setup.batches[0]),
                                settings)
    planner.plan(setup.batches[0], 1.0, seed)
    return planner


def gain(baseline_s: float, ours_s: float) -> float:
    """Throughput gain: baseline time / our time - 1."""
    return baseline_s / ours_s - 1


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def command(script: str, argv: Sequence[str]) -> str:
    """The shell command that reproduces a report."""
    return " ".join(["python", f"benchmarks/{script}.py", *map(shlex.quote, argv)])


def header(title: str, script: str, argv: Sequence[str], *notes: str) -> list[str]:
    """A report's title, the command that made it and its notes, as markdown lines."""
    lines = [f"# {title}", "", f"Command: `{command(script, argv)}` (part of `make bench`, "
             "which runs `python benchmarks/run_all.py`).", ""]
    for note in notes:
        lines += [note, ""]
    return lines


def write_report(out: Path, stem: str, lines: Sequence[str], data: Any) -> Path:
    """Write STEM.md and STEM.json under out; print the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.md"
    text = "\n".join(lines).rstrip() + "\n"
    path.write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    print(text, flush=True)
    return path


def figure(width: float = 8.0, height: float = 4.0, rows: int = 1, cols: int = 1, **kwargs):
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=(width, height), **kwargs)


def save_figure(fig, path: Path) -> None:
    """A modest PNG (80 dpi), then free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def grouped_bars(ax, groups: Sequence[str], series: dict[str, Sequence[float]],
                 ylabel: str) -> None:
    """Bars for each series side by side within each group."""
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")


def parse(parser, argv: Sequence[str] | None, out_default: Path = RESULTS):
    """Parse argv with the shared --out option; also return the argv a report shows."""
    parser.add_argument("--out", type=Path, default=out_default,
                        help="folder for the .md, .json and .png files")
    argv = list(sys.argv[1:] if argv is None else argv)
    return parser.parse_args(argv), shown_argv(argv)


def shown_argv(argv: Sequence[str]) -> list[str]:
    """argv without --out DIR (the folder does not change the figures)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            out.append(a)
    return out
