"""Planning speed on one core: VLM-L batches planned within 1 s against a 30 s search.

The process is pinned to one CPU core (os.sched_setaffinity). For each batch the same
seed plans with --budget-ms (target: <= 1 s wall) and with --long-ms (the reference);
reported: wall time, candidates scored, predicted iteration time, and how far the short
plan's prediction is from the long one's (target: within 1%).

Usage: python benchmarks/planner_speed.py [--model vlm-l] [--iterations 3]
       [--budget-ms 1000] [--long-ms 30000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pipeweaver_megatron.config import get_hardware, load_model
from pipeweaver_megatron.planner import PipeWeaverPlanner, partition
from pipeweaver_megatron.semu import CostModel
from pipeweaver_megatron.workload import sample_workload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vlm-l")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--budget-ms", type=float, default=1000.0)
    parser.add_argument("--long-ms", type=float, default=30000.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/results/planner_speed.md")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    model = load_model(args.model)
    costs = CostModel(model, get_hardware(model.hardware))
    batches = sample_workload(model, model.dataset, args.iterations, args.seed)
    planner = PipeWeaverPlanner(costs, partition(costs, reference=batches[0]))
    planner.plan(batches[0], 1.0, args.seed)  # warm the stage-cost cache as training would
    rows = []
    for i, batch in enumerate(batches):
        row = {"iteration": i}
        for label, budget in (("short", args.budget_ms), ("long", args.long_ms)):
            began = time.perf_counter()
            result = planner.plan(batch, budget, args.seed)
            row[label] = {"wall_ms": (time.perf_counter() - began) * 1000,
                          "evaluations": result.search.evaluations,
                          "predicted_s": result.predicted_iteration_time_s,
                          "lower_bound_s": result.lower_bound_s}
        row["difference"] = row["short"]["predicted_s"] / row["long"]["predicted_s"] - 1
        rows.append(row)
        print(f"iteration {i}: {row['short']['wall_ms']:.0f} ms -> {row['short']['predicted_s']:.3f} s, "
              f"{row['long']['wall_ms'] / 1000:.0f} s -> {row['long']['predicted_s']:.3f} s "
              f"({row['difference']:+.2%})", flush=True)
    lines = [f"# Planning speed: {model.name} on one core", "",
             f"Command: `python benchmarks/planner_speed.py --model {args.model} --iterations "
             f"{args.iterations} --budget-ms {args.budget_ms:g} --long-ms {args.long_ms:g}`", "",
             f"One pinned core of this machine; predictions by SEMU on {costs.hardware.name}. "
             f"Targets: a plan in <= 1 s whose predicted time is within 1% of a 30 s search's.",
             "", "| iteration | short: wall (ms) | candidates | predicted (s) | long: wall (s) | "
             "candidates | predicted (s) | short vs long | long vs lower bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, lo = r["short"], r["long"]
        lines.append(f"| {r['iteration']} | {s['wall_ms']:.0f} | {s['evaluations']} | "
                     f"{s['predicted_s']:.3f} | {lo['wall_ms'] / 1000:.1f} | {lo['evaluations']} | "
                     f"{lo['predicted_s']:.3f} | {r['difference']:+.2%} | "
                     f"{lo['predicted_s'] / lo['lower_bound_s'] - 1:+.1%} |")
    text = "\n".join(lines + [""])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
