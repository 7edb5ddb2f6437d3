"""The ablation ladder on VLM-S (PAPER.md: Megatron-LM 26.13 s; + partitioner 22.27;
+ interleaving 18.81; + reordering 17.61; + per-layer memory optimisation 16.05).

Steps, each adding one piece to the previous (all simulated by SEMU on the same batches):
0. megatron-vpp: Megatron-LM interleaved 1F1B on parameter-balanced chunks, run-wide
   memory policy (no recompute if it fits, else full recompute);
1. + partitioner: modality-aware chunks and sub-microbatches, microbatch-order
   priorities, strict F/B alternation (no bubble filling), the same run-wide memory policy;
2. + interleaving: the greedy dual-queue fills bubbles with whichever queue starts first;
3. + reordering: MCTS over group priorities within --budget-ms;
4. + memory optimisation: per-layer recompute/offload chosen per stage by the ILP.

Usage: python benchmarks/planner_ablation.py [--iterations 20] [--budget-ms 500]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeweaver_megatron.config import get_hardware, load_model
from pipeweaver_megatron.planner import SearchSettings, make_system
from pipeweaver_megatron.semu import CostModel, simulate_workload
from pipeweaver_megatron.workload import sample_workload

PAPER = [26.13, 22.27, 18.81, 17.61, 16.05]
STEPS = [
    ("Megatron-LM (megatron-vpp)", None),
    ("+ partitioner", SearchSettings(reorder=False, fill_bubbles=False, memory_optimization=False)),
    ("+ interleaving", SearchSettings(reorder=False, memory_optimization=False)),
    ("+ reordering", SearchSettings(memory_optimization=False)),
    ("+ memory optimisation", SearchSettings()),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vlm-s")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--budget-ms", type=float, default=500.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/results/planner_ablation.md")
    args = parser.parse_args(argv)
    model = load_model(args.model)
    costs = CostModel(model, get_hardware(model.hardware))
    batches = sample_workload(model, model.dataset, args.iterations, args.seed)
    times = []
    for label, settings in STEPS:
        name = "megatron-vpp" if settings is None else "pipeweaver"
        plan = make_system(name, costs, batches[0], args.budget_ms, args.seed,
                           settings or SearchSettings())
        run = simulate_workload(costs, batches, plan, detail_first=False)
        times.append(run.mean_iteration_time_s)
        print(f"{label:28} {times[-1]:.3f} s  peak {max(run.peak_memory_gib):.1f} GiB", flush=True)
    lines = [f"# Ablation ladder on {model.name} (simulated)", "",
             f"Command: `python benchmarks/planner_ablation.py --model {args.model} --iterations "
             f"{args.iterations} --budget-ms {args.budget_ms:g} --seed {args.seed}`", "",
             f"SEMU predictions on {costs.hardware.name}, mean over {args.iterations} "
             f"{model.dataset} batches. The paper's column is its measured VLM-S ladder.", "",
             "| step | ours (s) | step gain | vs Megatron | paper (s) | paper vs Megatron |",
             "|---|---|---|---|---|---|"]
    for i, ((label, _), t) in enumerate(zip(STEPS, times)):
        step = f"{times[i - 1] / t - 1:+.1%}" if i else ""
        lines.append(f"| {label} | {t:.2f} | {step} | {times[0] / t - 1:+.1%} | {PAPER[i]:.2f} | "
                     f"{PAPER[0] / PAPER[i] - 1:+.1%} |")
    improving = all(b < a for a, b in zip(times, times[1:]))
    lines += ["", f"Every step improves on the one before: {'yes' if improving else 'no'}.", ""]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"steps": [s[0] for s in STEPS], "mean_iteration_time_s": times}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
