"""summary.md: the headline tables of the evaluation, built from the items' JSON files,
with the paper's numbers beside ours and what is simulated and what is measured.

Usage: python benchmarks/summary.py [--out docs/results]  (run_all.py calls it)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from common import BASELINES, RESULTS, gain, table
import paper

SIM, MEAS = "SEMU-predicted", "measured"


def load(out: Path, stem: str) -> Any:
    path = out / f"{stem}.json"
    return json.loads(path.read_text()) if path.exists() else None


def pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.1%}"


def setups_table(results: list[dict]) -> list[str]:
    rows = []
    for r in results:
        s = r["systems"]
        ours = s["pipeweaver"]["mean_iteration_time_s"]
        low, high = paper.THROUGHPUT_GAIN[r["model"][:3]]
        rows.append([r["model"], f"{ours:.2f}", f"{s['pipeweaver']['mfu']:.2f}",
                     " / ".join(pct(gain(s[b]["mean_iteration_time_s"], ours)) for b in BASELINES),
                     f"{low:+.1%} to {high:+.1%}"])
    return table(["setup (H800)", "PipeWeaver s/iter", "PipeWeaver MFU",
                  "gain vs Megatron-LM VPP / nnScaler* / Optimus", "paper's gain (range over "
                  "the family's setups and baselines)"], rows)


def figures_table(out: Path) -> list[str]:
    rows: list[list[str]] = []
    ablation = load(out, "planner_ablation")
    if ablation:
        t = ablation["mean_iteration_time_s"]
        rows.append(["VLM-S ablation: full PipeWeaver faster than Megatron-LM",
                     pct(t[0] / t[-1] - 1),
                     pct(paper.ABLATION_S[0] / paper.ABLATION_S[-1] - 1), SIM])
    dynamic = load(out, "dynamic_workload")
    if dynamic:
        rows += [["Dynamic workload: Megatron-LM slower at iteration 6",
                  pct(dynamic["megatron_slower_at_6"]), pct(paper.DYNAMIC_MEGATRON_SLOWER_AT_6),
                  SIM],
                 ["Dynamic workload: nnScaler* slower in iterations 15-20",
                  pct(dynamic["nnscaler_slower_15_20"]),
                  pct(paper.DYNAMIC_NNSCALER_DEGRADES_15_20), SIM]]
    sweep = load(out, "submicro_sweep")
    if sweep:
        best = min(sweep["sizes"], key=lambda r: r["mean_s"])
        rows.append(["Best sub-microbatch size (images)", str(best["size"]),
                     str(paper.SUBMICRO_BEST), SIM])
    search = load(out, "search_efficiency")
    if search:
        s = search["strategies"]
        n = s["checkpoints"][-1]
        rows.append([f"Search at {n} candidates, excess over best found: MCTS / random / DFS",
                     " / ".join(f"{s['strategies'][k]['excess'][-1]:.2%}"
                                for k in ("mcts", "random", "dfs")),
                     "MCTS better than random and DFS (no numbers)", SIM])
    ilp = load(out, "monolithic_ilp")
    if ilp:
        solved = [r["microbatches"] for r in ilp["rows"] if r["status"] == "Optimal"]
        rows.append(["Monolithic ILP (HiGHS): largest batch solved to optimality",
                     f"{max(solved, default=0)} microbatches in "
                     f"{max(r['ilp_wall_s'] for r in ilp['rows']):.0f} s limit",
                     f"~{paper.ILP_LIMIT_MICROBATCHES} microbatches in "
                     f"{paper.ILP_LIMIT_MINUTES} min (Z3, Gurobi)", f"{MEAS} (solver)"])
    large = load(out, "large_scale")
    if large:
        for r in large:
            family = r["model"].rsplit("-", 1)[0]
            ours = r["systems"]["pipeweaver"]
            best = max(gain(r["systems"][b]["mean_iteration_time_s"], ours["mean_iteration_time_s"])
                       for b in BASELINES)
            rows.append([f"{r['model']} (H100): PipeWeaver MFU; best gain",
                         f"{ours['mfu']:.2f}; {pct(best)}",
                         f"{paper.LARGE_SCALE_MFU[family]:.2f}; up to "
                         f"+{paper.LARGE_SCALE_MAX_GAIN:.1%} (all four)", SIM])
    memory = load(out, "memory_profile")
    if memory:
        m = memory["systems"]
        rows += [["VLM-M rank 0: Optimus peak above Megatron-LM",
                  pct(m["optimus"]["peak_gib"][0] / m["megatron-vpp"]["peak_gib"][0] - 1),
                  pct(paper.MEMORY_OPTIMUS_PEAK_ABOVE_MEGATRON), SIM],
                 ["VLM-M: PipeWeaver at Optimus's peak faster than Optimus",
                  pct(gain(m["optimus"]["mean_iteration_time_s"],
                           m["pipeweaver at optimus's peak"]["mean_iteration_time_s"])),
                  pct(paper.MEMORY_FASTER_THAN_OPTIMUS_AT_EQUAL_PEAK), SIM]]
    real = load(out, "real_cpu")
    if real:
        s = real["summary"]
        rows += [["CPU, tiny-vlm, 2 processes: speedup of --pipeweaver over Megatron 1F1B",
                  f"{real['speedup_measured']:.2f}x (SEMU predicted "
                  f"{real['speedup_predicted']:.2f}x)", "not in the paper (its runs are on GPUs)",
                  MEAS],
                 ["CPU: SEMU iteration-time error, PipeWeaver / 1F1B",
                  " / ".join(pct(v["predicted_mean_s"] / v["measured_mean_s"] - 1)
                             for v in s.values()),
                  f"{paper.SEMU_ACCURACY:.1%} average accuracy (GPUs)",
                  f"{SIM} against {MEAS}"]]
    return table(["figure", "ours", "paper", "ours is"], rows)


def write_summary(out: Path, timings: dict[str, float], total_s: float, made_by: str) -> Path:
    old = load(out, "summary") or {}
    timings = {**old.get("timings_s", {}), **timings}
    throughput = load(out, "planner_throughput")
    lines = ["# Where PipeWeaver stands: headline results", "",
             f"Made by `{made_by}` (`python benchmarks/run_all.py`); the items took "
             f"{sum(timings.values()) / 60:.0f} min in all on this shared 2-core machine. "
             "Every item's own file names its command.", "",
             "Simulated and measured: every GPU figure (iteration times, MFU, memory, gains) "
             "is SEMU-predicted on the setup's hardware profile: no GPU was used. Measured "
             "figures are the CPU training runs (real_cpu.md) and wall times of the planner "
             "and solvers on this 2-core machine. The paper's numbers are its measurements "
             "on 8x8 H800 (large-scale: its own simulation on H100).", ""]
    if throughput:
        n = len(throughput[0]["systems"]["pipeweaver"]["iteration_time_s"])
        lines += [f"Throughput ({SIM}, {n} iterations of each setup's workload; "
                  "planner_throughput.md):", ""] + setups_table(throughput) + [""]
    lines += ["Other figures (details in each item's file):", ""] + figures_table(out)
    lines += ["", "Run time of each item (s):", ""]
    lines += table(["item", "seconds"], [[k, f"{v:.0f}"] for k, v in timings.items()])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({"timings_s": timings, "total_s": total_s},
                                                 indent=1) + "\n")
    print("\n".join(lines))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    old = load(args.out, "summary") or {}
    write_summary(args.out, {}, old.get("total_s", 0.0), "python benchmarks/summary.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
