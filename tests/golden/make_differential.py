"""Regenerate differential.json: what the planning side produces for a fixed set of
random batches (table, execution plan and iteration plan hashes, SEMU's predicted
iteration time and bubble), so a refactor can show it changes none of them.

    python tests/golden/make_differential.py          # rewrite the golden file
    python tests/golden/make_differential.py --check  # compare, exit 1 on a difference

Run it only where a change of the outputs is intended, and say why in the commit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeweaver_megatron.config import get_hardware, load_model
from pipeweaver_megatron.planner import PipeWeaverPlanner, SearchSettings, partition
from pipeweaver_megatron.planner.iteration import plan_iteration
from pipeweaver_megatron.semu import CostModel
from pipeweaver_megatron.service.fallback import fallback_plan
from pipeweaver_megatron.workload import TokenRules, sample_workload

GOLDEN = Path(__file__).with_name("differential.json")
CASES = (("tiny-vlm", 2, 80), ("tiny-vlm", 4, 80), ("tiny-t2v", 2, 80), ("tiny-t2v", 4, 80))
"""(model, PP, batches): 320 random batches, each planned by PipeWeaver and by two
baselines (960 tables, plans and simulations)."""


def outcomes() -> dict[str, list]:
    out: dict[str, list] = {}
    for name, pp, count in CASES:
        model = load_model(name)
        rules = TokenRules.from_model(model)
        batches = sample_workload(model, model.dataset, count, 2026)
        costs = CostModel(model, get_hardware(model.hardware))
        chunks = partition(costs, num_ranks=pp, reference=batches[0])
        planner = PipeWeaverPlanner(costs, chunks, SearchSettings(max_evaluations=6))
        rows = []
        for i, batch in enumerate(batches):
            result = planner.plan(batch, 60_000, i)
            plan = plan_iteration(model, result.table, batch, rules, tp=1,
                                  members=result.sub_microbatches.members,
                                  timeline=result.simulation,
                                  strategies=result.memory.strategies)
            row = {"table": result.table.content_hash[:16],
                   "execution": plan.execution.content_hash[:16],
                   "plan": plan.content_hash[:16],
                   "predicted_s": round(result.predicted_iteration_time_s, 12),
                   "bubble": round(result.simulation.bubble_ratio, 12)}
            for schedule in ("megatron-1f1b", "megatron-interleaved"):
                row[schedule] = fallback_plan(model, batch, rules, schedule, pp).content_hash[:16]
            rows.append(row)
        out[f"{name}/pp{pp}"] = rows
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    found = outcomes()
    if args.check:
        want = json.loads(GOLDEN.read_text())
        bad = [(case, i) for case in want for i, (a, b) in enumerate(zip(want[case], found[case]))
               if a != b]
        print(f"{len(bad)} differences" + (f": first {bad[0]}" if bad else ""))
        return 1 if bad or want.keys() != found.keys() else 0
    GOLDEN.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}: {sum(len(r) for r in found.values())} batches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
