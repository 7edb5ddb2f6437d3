"""Regenerate every evaluation table and plot: `make bench` (full, into docs/results) or
`make bench-quick` (a smoke run of every item with tiny budgets, into build/bench-quick).

Items (issue 8), each a script of its own run in a fresh process:
1. planner_throughput: VLM-S/M/L and T2V-S/L against megatron-vpp, nnscaler, optimus;
2. planner_ablation: the ladder on VLM-S (and VLM-M);
3. dynamic_workload: 40 iterations of rising and falling image counts;
4. submicro_sweep: sub-microbatch sizes 4 to 32 images;
5. search_efficiency, monolithic_ilp, planner_speed: MCTS against random and DFS,
   planning cost against batch size, against a monolithic ILP, and on one core;
6. large_scale: VLM-XL-8k/16k and T2V-XL-3k/6k;
7. memory_profile: peak and fluctuation per rank;
8. real_cpu: measured runs on this CPU against SEMU's predictions;
9. default_flags: the user's command with default flags, against 1F1B and against the
   same plans replayed without the planner (issue 16).
Then summary.py writes summary.md (the headline tables, with the paper's numbers and
each item's run time).

Usage: python benchmarks/run_all.py [--quick] [--out DIR] [--only a,b]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from common import RESULTS
from summary import write_summary

ROOT = Path(__file__).resolve().parents[1]
QUICK_OUT = ROOT / "build" / "bench-quick"

ITEMS: list[tuple[str, str, list[str], list[str]]] = [
    # (name, script, full argv, quick argv)
    ("planner_throughput", "planner_throughput", ["--iterations", "100", "--budget-ms", "500"],
     ["--iterations", "2", "--budget-ms", "100"]),
    ("planner_ablation", "planner_ablation", ["--iterations", "50", "--budget-ms", "500"],
     ["--iterations", "2", "--budget-ms", "100"]),
    ("planner_ablation_vlm-m", "planner_ablation",
     ["--model", "vlm-m", "--iterations", "20", "--budget-ms", "500"],
     ["--model", "vlm-m", "--iterations", "1", "--budget-ms", "100"]),
    ("dynamic_workload", "dynamic_workload", ["--iterations", "40", "--budget-ms", "500"],
     ["--iterations", "8", "--budget-ms", "100"]),
    ("submicro_sweep", "submicro_sweep", ["--iterations", "10", "--budget-ms", "500",
                                          "--random", "24"],
     ["--sizes", "4,12,32", "--iterations", "1", "--budget-ms", "100", "--random", "4"]),
    ("search_efficiency", "search_efficiency", ["--iterations", "3", "--evaluations", "200",
                                                "--max-microbatches", "128"],
     ["--iterations", "1", "--evaluations", "10", "--max-microbatches", "16"]),
    ("monolithic_ilp", "monolithic_ilp", ["--microbatches", "1,2,4,8,16,32",
                                          "--time-limit", "120"],
     ["--microbatches", "1,2,4", "--time-limit", "5", "--budget-ms", "200"]),
    ("planner_speed", "planner_speed", ["--iterations", "3"],
     ["--iterations", "1", "--budget-ms", "200", "--long-ms", "1000"]),
    ("large_scale", "large_scale", ["--iterations", "10", "--budget-ms", "1000"],
     ["--iterations", "1", "--budget-ms", "200"]),
    ("memory_profile", "memory_profile", ["--iterations", "10", "--budget-ms", "2000"],
     ["--iterations", "2", "--budget-ms", "200"]),
    ("real_cpu", "real_cpu", ["--iterations", "20", "--rounds", "3"],
     ["--iterations", "4", "--rounds", "1"]),
    ("default_flags", "default_flags", ["--rounds", "3"],
     ["--rounds", "1", "--iterations", "2"]),
    ("activation_memory", "activation_memory", [], ["--models", "tiny-vlm"]),
    ("packed_attention", "packed_attention", ["--repeats", "5"], ["--repeats", "1"]),
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (minutes)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"default: {RESULTS} (full) or {QUICK_OUT} (--quick)")
    parser.add_argument("--only", default="", help="comma-separated item names")
    args = parser.parse_args(argv)
    out = args.out or (QUICK_OUT if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [i for i in ITEMS if not args.only or i[0] in args.only.split(",")]
    timings: dict[str, float] = {}
    failed = []
    began = time.perf_counter()
    for name, script, full, quick in chosen:
        command = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"),
                   *(quick if args.quick else full), "--out", str(out)]
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT)
        timings[name] = time.perf_counter() - start
        print(f"== {name}: {'ok' if done.returncode == 0 else 'FAILED'} in "
              f"{timings[name]:.0f} s", flush=True)
        if done.returncode != 0:
            failed.append(name)
    total = time.perf_counter() - began
    write_summary(out, timings, total, "make bench-quick" if args.quick else "make bench")
    print(f"== all items in {total / 60:.1f} min; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
