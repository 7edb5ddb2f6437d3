"""Large-scale simulation (PAPER.md: VLM-XL-8k and -16k, ViT 22B + GPT 175B on DP128 TP8
PP8/PP16; T2V-XL-3k and -6k, Qwen2 72B + DiT 30B on DP96 TP8 PP4/PP8, on H100: MFU 0.36
(VLM-XL) and 0.39 (T2V-XL), gains up to 82.8%, growing with PP).

Every system runs the same batches of each setup in SEMU (one pipeline of the
data-parallel group, with its gradient reduction and optimizer step); reported: mean
iteration time and MFU of each, PipeWeaver's gain against each baseline, and a bar plot.

Usage: python benchmarks/large_scale.py [--iterations 10] [--budget-ms 1000]
       [--setups vlm-xl-8k,...] [--out docs/results]
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from common import (BASELINES, SIMULATED, SYSTEMS, figure, gain, grouped_bars, header, parse,
                    save_figure, table, write_report)
from paper import LARGE_SCALE_MAX_GAIN, LARGE_SCALE_MFU
from planner_throughput import run_setup

SETUPS = ("vlm-xl-8k", "vlm-xl-16k", "t2v-xl-3k", "t2v-xl-6k")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--budget-ms", type=float, default=1000.0)
    parser.add_argument("--seed", type=int, default=0)
    args, shown = parse(parser, argv)
    results = [run_setup(name, args.iterations, args.budget_ms, args.seed)
               for name in args.setups.split(",")]
    lines = header("Large-scale simulation", "large_scale", shown,
                   SIMULATED + f" Mean over {args.iterations} batches of each setup's default "
                   "workload; the paper's figures are its own simulation.")
    rows, best = [], 0.0
    for r in results:
        s = r["systems"]
        pw = s["pipeweaver"]
        gains = [gain(s[b]["mean_iteration_time_s"], pw["mean_iteration_time_s"])
                 for b in BASELINES]
        best = max(best, *gains)
        family = r["model"].rsplit("-", 1)[0]
        rows.append([r["model"], *(f"{s[n]['mean_iteration_time_s']:.2f}" for n in SYSTEMS),
                     *(f"{s[n]['mfu']:.3f}" for n in SYSTEMS), *(f"{g:+.1%}" for g in gains),
                     f"{LARGE_SCALE_MFU.get(family, float('nan')):.2f}"])
    lines += table(["setup", *(f"{n} (s)" for n in SYSTEMS), *(f"{n} MFU" for n in SYSTEMS),
                    *(f"gain vs {b}" for b in BASELINES), "paper's PipeWeaver MFU"], rows)
    lines += ["", f"Largest gain: {best:+.1%} (paper: up to +{LARGE_SCALE_MAX_GAIN:.1%}, growing "
              "with PP).", "", "![large scale](large_scale.png)"]
    write_report(args.out, "large_scale", lines, results)
    fig, ax = figure(8, 3.6)
    grouped_bars(ax, [r["model"] for r in results],
                 {n: [r["systems"][n]["mfu"] for r in results] for n in SYSTEMS}, "MFU")
    for i, r in enumerate(results):
        paper = LARGE_SCALE_MFU.get(r["model"].rsplit("-", 1)[0])
        if paper:
            ax.plot([i - 0.4, i + 0.4], [paper] * 2, "k--", linewidth=0.8)
    ax.set_title("SEMU-predicted MFU (dashed: paper's PipeWeaver MFU)")
    save_figure(fig, args.out / "large_scale.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
