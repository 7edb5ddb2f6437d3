"""Rewrite tests/golden/compile/*.txt: whole execution plans, one op per line, of a few
tables (Megatron 1F1B and interleaved, a modality-aware table with sub-microbatches, a
PipeWeaver plan with a SEMU timeline), so a change of the compiler shows as a diff.

    python tests/golden/make_compile_golden.py

Run it only where the plans are meant to change, and say why in the commit.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from test_ir import ONE_F_ONE_B_P2_M3, SUB_SCHEDULE, SUBS, lm_layout, table_of, vlm_layout  # noqa: E402

from pipeweaver_megatron.config import get_hardware, load_model  # noqa: E402
from pipeweaver_megatron.ir.messages import TensorSpec  # noqa: E402
from pipeweaver_megatron.planner import PipeWeaverPlanner, SearchSettings, partition  # noqa: E402
from pipeweaver_megatron.planner.compile import compile_table  # noqa: E402
from pipeweaver_megatron.planner.iteration import plan_iteration  # noqa: E402
from pipeweaver_megatron.schedules import build_baseline  # noqa: E402
from pipeweaver_megatron.semu import CostModel  # noqa: E402
from pipeweaver_megatron.workload import TokenRules, sample_workload  # noqa: E402


def shapes(src, dst, m, k):
    return (TensorSpec("hidden", (4, 1, 8), "float32"),)


def render(plan) -> str:
    lines = []
    for rank in plan.ranks:
        lines.append(f"# rank {rank.rank}")
        lines.extend(str(op) for op in rank.ops)
    return "\n".join(lines) + "\n"


def cases() -> dict[str, str]:
    vlm = load_model("tiny-vlm")
    out = {
        "1f1b_pp2_m3": render(compile_table(table_of(lm_layout(2), ONE_F_ONE_B_P2_M3, 3), shapes)),
        "1f1b_pp2_m3_lookahead0": render(compile_table(
            table_of(lm_layout(2), ONE_F_ONE_B_P2_M3, 3), shapes, lookahead=0)),
        "vlm_subs": render(compile_table(table_of(vlm_layout(), SUB_SCHEDULE, 2, SUBS), shapes)),
        "interleaved_pp2_vp2_m4": render(compile_table(
            build_baseline(vlm, "megatron-interleaved", 4, pp=2, vp=2), shapes)),
    }
    rules = TokenRules.from_model(vlm)
    batch = sample_workload(vlm, vlm.dataset, 1, 11)[0]
    costs = CostModel(vlm, get_hardware(vlm.hardware))
    chunks = partition(costs, num_ranks=2, reference=batch)
    result = PipeWeaverPlanner(costs, chunks, SearchSettings(max_evaluations=4)).plan(batch, 60_000, 0)
    plan = plan_iteration(vlm, result.table, batch, rules, members=result.sub_microbatches.members,
                          timeline=result.simulation, strategies=result.memory.strategies)
    out["pipeweaver_tiny_vlm_pp2"] = render(plan.execution)
    return out


def main() -> int:
    folder = HERE / "compile"
    folder.mkdir(exist_ok=True)
    for name, text in cases().items():
        (folder / f"{name}.txt").write_text(text)
        print(f"wrote {folder / name}.txt ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
