"""Planning speed on one core: VLM-L batches planned within 1 s against a 30 s search.

The process is pinned to one CPU core (os.sched_setaffinity). For each batch the same
seed plans with --budget-ms (target: <= 1 s wall) and with --long-ms (the reference);
reported: wall time, candidates scored, predicted iteration time, and how far the short
plan's prediction is from the long one's (target: within 1%).

Usage: python benchmarks/planner_speed.py [--model vlm-l] [--iterations 3]
       [--budget-ms 1000] [--long-ms 30000] [--out docs/results]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from common import header, load_setup, parse, table, warm_planner, write_report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vlm-l")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--budget-ms", type=float, default=1000.0)
    parser.add_argument("--long-ms", type=float, default=30000.0)
    parser.add_argument("--seed", type=int, default=0)
    args, shown = parse(parser, argv)
    setup = load_setup(args.model, args.iterations, args.seed)
    model, costs, batches = setup.model, setup.costs, setup.batches
    planner = warm_planner(setup, seed=args.seed)
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
    lines = header(f"Planning speed: {model.name} on one core", "planner_speed", shown,
                   f"One pinned core of this machine (measured wall time); predictions by SEMU "
                   f"on {costs.hardware.name}. Targets: a plan in <= 1 s whose predicted time is "
                   "within 1% of a 30 s search's.")
    lines += table(["iteration", "short: wall (ms)", "candidates", "predicted (s)",
                    "long: wall (s)", "candidates", "predicted (s)", "short vs long",
                    "long vs lower bound"],
                   [[r["iteration"], f"{r['short']['wall_ms']:.0f}", r["short"]["evaluations"],
                     f"{r['short']['predicted_s']:.3f}", f"{r['long']['wall_ms'] / 1000:.1f}",
                     r["long"]["evaluations"], f"{r['long']['predicted_s']:.3f}",
                     f"{r['difference']:+.2%}",
                     f"{r['long']['predicted_s'] / r['long']['lower_bound_s'] - 1:+.1%}"]
                    for r in rows])
    write_report(args.out, "planner_speed", lines, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
