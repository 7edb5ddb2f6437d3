"""Real runs on this CPU: measured speedup of --pipeweaver over Megatron's static 1F1B,
and SEMU's predicted against measured iteration, per-rank and per-stage times.

The same training as `make demo` (pipeweaver_megatron/cli/demo.py's run_training:
tiny-vlm on 2 local processes, gloo, PP 2, one thread each, SEMU calibrated for one
thread per rank), --rounds times alternately with PipeWeaver plans and with
megatron-1f1b through the same runtime on the same batches, with
--pipeweaver-trace-dir: SEMU's predicted timeline and every rank's measured ops per
iteration. The first --warmup iterations of every run are left out. The machine is
shared, so medians are reported beside means.

Usage: python benchmarks/real_cpu.py [--iterations 20] [--rounds 2] [--budget-ms 100]
       [--out docs/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from common import figure, header, parse, save_figure, table, write_report
from paper import SEMU_ACCURACY
from pipeweaver_megatron.cli import demo

SCHEDULES = ("pipeweaver", "megatron-1f1b")
KEPT = ("iteration", "iteration_time_s", "predicted_time_s", "rank_compute_s", "source",
        "busiest_compute_s", "balanced_compute_s")
"""Fields of each training-log record kept in real_cpu.json."""


def train(schedule: str, args: argparse.Namespace, work: Path) -> list[dict]:
    """One training run of `schedule`; its JSON log records."""
    return demo.run_training(schedule, args, work / "log.jsonl",
                             extra_args=["--pipeweaver-trace-dir", str(work)])


def stage_of(action: str) -> tuple[int, str]:
    """'3F12' or '0B4.2' -> (3, 'F')."""
    for op in ("F", "B"):
        if op in action:
            return int(action.split(op)[0]), op
    raise ValueError(action)


def predicted_ops(work: Path, iteration: int) -> list[tuple[int, str, str, float, float]]:
    """(rank, action, module, start s, end s) of every compute action SEMU predicted."""
    events = json.loads((work / f"predicted_{iteration:06d}.json").read_text())["traceEvents"]
    return [(e["pid"], e["name"], e["args"]["module"], e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6)
            for e in events if e["ph"] == "X" and e.get("tid") == 0]


def measured_ops(work: Path, iteration: int) -> list[tuple[int, str, float, float]]:
    """(rank, action, start s, end s) of every compute action the ranks measured."""
    out = []
    for path in sorted(work.glob(f"measured_{iteration:06d}_rank*.json")):
        rank = int(path.stem.rsplit("rank", 1)[1])
        out += [(rank, m["op"][len("Compute("):-1], m["start_s"], m["end_s"])
                for m in json.loads(path.read_text()) if m["op"].startswith("Compute(")]
    return out


def read_traces(work: Path, iterations: Sequence[int]) -> dict:
    """Per (rank, stage, op): predicted and measured seconds of every compute action;
    per rank and iteration: predicted and measured busy seconds."""
    ops: dict = defaultdict(lambda: {"predicted": [], "measured": []})
    busy: dict = defaultdict(lambda: {"predicted": [], "measured": []})
    modules: dict[int, str] = {}
    for it in iterations:
        sides = {"predicted": [(r, a, s, e) for r, a, _, s, e in predicted_ops(work, it)],
                 "measured": measured_ops(work, it)}
        modules.update((stage_of(a)[0], m) for _, a, m, _, _ in predicted_ops(work, it))
        for side, spans in sides.items():
            totals: dict[int, float] = defaultdict(float)
            for rank, action, start, end in spans:
                stage, op = stage_of(action)
                ops[(rank, stage, op)][side].append(end - start)
                totals[rank] += end - start
            for rank, seconds in totals.items():
                busy[rank][side].append(seconds)
    return {"ops": {f"{r} {s} {o}": v for (r, s, o), v in sorted(ops.items())},
            "busy": {str(r): v for r, v in sorted(busy.items())},
            "modules": {str(s): m for s, m in modules.items()}}


def run_all(args: argparse.Namespace) -> dict:
    runs: dict[str, list] = {s: [] for s in SCHEDULES}
    for round_ in range(args.rounds):
        for schedule in SCHEDULES:
            with tempfile.TemporaryDirectory() as tmp:
                records = train(schedule, args, Path(tmp))
                steady = [r["iteration"] for r in records[args.warmup:]] or \
                    [r["iteration"] for r in records]
                runs[schedule].append({"records": records,
                                       "traces": read_traces(Path(tmp), steady),
                                       "timeline": timeline(Path(tmp), steady[-1])})
    return runs


def timeline(work: Path, iteration: int) -> dict:
    """One iteration's predicted and measured compute intervals per rank (for the plot)."""
    out: dict = {"iteration": iteration, "predicted": defaultdict(list),
                 "measured": defaultdict(list)}
    for rank, action, _, start, end in predicted_ops(work, iteration):
        out["predicted"][rank].append((start, end, action))
    for rank, action, start, end in measured_ops(work, iteration):
        out["measured"][rank].append((start, end, action))
    return out


def steady(runs: list[dict], warmup: int, key: str) -> list[float]:
    return [r[key] for run in runs for r in (run["records"][warmup:] or run["records"])]


def pooled(runs: list[dict], part: str) -> dict:
    """Merge the per-run lists of one traces part."""
    out: dict = defaultdict(lambda: {"predicted": [], "measured": []})
    for run in runs:
        for key, values in run["traces"][part].items():
            for side in ("predicted", "measured"):
                out[key][side] += values[side]
    return out


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def error(predicted: float, measured: float) -> str:
    return f"{predicted / measured - 1:+.1%}" if measured else "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-vlm")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget-ms", type=float, default=None, help="default: auto")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--port", type=int, default=29660)
    args, shown = parse(parser, argv)
    load = [os.getloadavg()[0]]
    runs = run_all(args)
    load.append(os.getloadavg()[0])
    summary = {}
    for s in SCHEDULES:
        measured = steady(runs[s], args.warmup, "iteration_time_s")
        predicted = steady(runs[s], args.warmup, "predicted_time_s")
        summary[s] = {"measured_mean_s": mean(measured),
                      "measured_median_s": statistics.median(measured),
                      "predicted_mean_s": mean(predicted), "iterations": len(measured),
                      "busiest_median_s": statistics.median(
                          steady(runs[s], args.warmup, "busiest_compute_s")),
                      "balanced_median_s": statistics.median(
                          steady(runs[s], args.warmup, "balanced_compute_s")),
                      "fallbacks": sum(r["records"][-1]["fallbacks"] for r in runs[s]),
                      "busy": {k: {side: mean(v[side]) for side in v}
                               for k, v in pooled(runs[s], "busy").items()},
                      "ops": {k: {side: mean(v[side]) for side in v} | {"count": len(v["measured"])}
                              for k, v in pooled(runs[s], "ops").items()},
                      "modules": runs[s][0]["traces"]["modules"]}
    pw, mg = summary["pipeweaver"], summary["megatron-1f1b"]
    speedup = mg["measured_median_s"] / pw["measured_median_s"]
    predicted_speedup = mg["predicted_mean_s"] / pw["predicted_mean_s"]
    lines = header(f"Real runs on this CPU: {args.model}", "real_cpu", shown,
                   f"Measured: training on 2 local CPU processes (gloo, PP 2, one thread each) of "
                   f"this shared 2-core machine, {args.rounds} alternating rounds of "
                   f"{args.iterations} iterations per schedule, the first {args.warmup} of each "
                   f"run left out; load average {load[0]:.1f} before and {load[1]:.1f} after "
                   "(other jobs slow the measured times). SEMU-predicted: SEMU with "
                   "docs/results/calibration_cpu_1thread.json (the same prediction the training "
                   "log carries).")
    lines += table(["schedule", "measured median (ms)", "measured mean (ms)",
                    "SEMU-predicted mean (ms)", "prediction error (mean)", "iterations",
                    "fallbacks"],
                   [[s, f"{v['measured_median_s'] * 1e3:.1f}", f"{v['measured_mean_s'] * 1e3:.1f}",
                     f"{v['predicted_mean_s'] * 1e3:.1f}",
                     error(v["predicted_mean_s"], v["measured_mean_s"]), v["iterations"],
                     v["fallbacks"]] for s, v in summary.items()])
    lines += ["", f"Measured speedup of --pipeweaver over megatron-1f1b (medians): "
              f"**{speedup:.2f}x**; SEMU-predicted: {predicted_speedup:.2f}x. Paper: SEMU "
              f"{SEMU_ACCURACY:.1%} average accuracy after calibration (on GPUs).", "",
              "Measured bounds (medians per iteration): the busiest rank's compute (no "
              "schedule of this partition beats it) and perfect balance, all ranks' compute / "
              "PP (no partition beats it); bubble = 1 - busiest / iteration time:", ""]
    lines += table(["schedule", "iteration (ms)", "busiest rank's compute (ms)",
                    "perfect balance (ms)", "bubble", "iteration over perfect balance"],
                   [[s, f"{v['measured_median_s'] * 1e3:.1f}", f"{v['busiest_median_s'] * 1e3:.1f}",
                     f"{v['balanced_median_s'] * 1e3:.1f}",
                     f"{1 - v['busiest_median_s'] / v['measured_median_s']:.1%}",
                     f"{v['measured_median_s'] / v['balanced_median_s']:.2f}x"]
                    for s, v in summary.items()])
    lines += ["", "Per rank, compute time per iteration (sum of the rank's forward and backward "
              "actions; the rest is waiting on P2P and the optimizer):", ""]
    lines += table(["schedule", "rank", "SEMU-predicted (ms)", "measured (ms)", "error"],
                   [[s, rank, f"{v['predicted'] * 1e3:.1f}", f"{v['measured'] * 1e3:.1f}",
                     error(v["predicted"], v["measured"])]
                    for s in SCHEDULES for rank, v in summary[s]["busy"].items()])
    lines += ["", "Per stage, mean time of one forward or backward action:", ""]
    rows = []
    for s in SCHEDULES:
        for key, v in summary[s]["ops"].items():
            rank, stage, op = key.split()
            rows.append([s, rank, stage, summary[s]["modules"].get(stage, "?"), op, v["count"],
                         f"{v['predicted'] * 1e3:.2f}", f"{v['measured'] * 1e3:.2f}",
                         error(v["predicted"], v["measured"])])
    lines += table(["schedule", "rank", "stage", "module", "op", "actions", "SEMU-predicted (ms)",
                    "measured (ms)", "error"], rows)
    lines += ["", "![iterations](real_cpu.png)", "", "![timeline](real_cpu_timeline.png)"]
    write_report(args.out, "real_cpu", lines,
                 {"summary": summary, "speedup_measured": speedup, "load_average": load,
                  "speedup_predicted": predicted_speedup,
                  "records": {s: [[{k: r[k] for k in KEPT} for r in run["records"]]
                                  for run in runs[s]] for s in SCHEDULES}})
    plot_iterations(runs, args.out / "real_cpu.png")
    plot_timeline(runs["pipeweaver"][-1]["timeline"], args.out / "real_cpu_timeline.png")
    return 0


def plot_iterations(runs: dict, path: Path) -> None:
    fig, ax = figure(8, 3.5)
    for s, colour in zip(SCHEDULES, ("tab:blue", "tab:orange")):
        measured = [r["iteration_time_s"] * 1e3 for run in runs[s] for r in run["records"]]
        predicted = [r["predicted_time_s"] * 1e3 for run in runs[s] for r in run["records"]]
        ax.plot(measured, "o-", color=colour, label=f"{s} measured", markersize=3)
        ax.plot(predicted, "--", color=colour, label=f"{s} SEMU-predicted")
    ax.set_xlabel("iteration (all rounds)")
    ax.set_ylabel("iteration time (ms)")
    ax.set_title("tiny-vlm on 2 CPU processes")
    ax.legend(fontsize="small")
    save_figure(fig, path)


def plot_timeline(trace: dict, path: Path) -> None:
    fig, axes = figure(10, 3.8, rows=2, sharex=True)
    for ax, side in zip(axes, ("predicted", "measured")):
        for rank, spans in sorted(trace[side].items()):
            for start, end, name in spans:
                backward = "B" in name
                ax.barh(int(rank), (end - start) * 1e3, left=start * 1e3,
                        color="tab:red" if backward else "tab:green", edgecolor="black",
                        linewidth=0.2)
        ax.set_yticks(sorted(int(r) for r in trace[side]))
        ax.set_ylabel("rank")
        ax.invert_yaxis()
        ax.set_title(f"PipeWeaver iteration {trace['iteration']}: "
                     f"{'SEMU-predicted' if side == 'predicted' else 'measured'} "
                     "(green forward, red backward)", fontsize="small")
    axes[-1].set_xlabel("ms from the start of the iteration")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
