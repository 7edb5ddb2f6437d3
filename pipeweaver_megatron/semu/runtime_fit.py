"""Fit SEMU's runtime terms from measured training runs.

`scripts/pretrain_lmm.py --pipeweaver-trace-dir DIR` writes, per iteration, SEMU's
predicted trace (predicted_<iteration>.json), every rank's measured ops
(measured_<iteration>_rank<r>.json, seconds from the iteration's start) and the
iteration's measured time (iteration_<iteration>.json). From them:

- per phase (forward, backward), every compute action present in both gives a pair
  (SEMU's compute time without the runtime terms, measured time); a least-squares fit on
  relative error of measured = overhead + scale * compute gives action_overhead_s and
  action_scale (overhead >= 0, scale > 0);
- per iteration, the measured time minus the longest rank's span from its first to its
  last op is what the iteration spends outside the pipeline; its median is
  iteration_overhead_s.

Iterations before `skip` (warm-up) are ignored. Several directories (runs of several
schedules or seeds) may be fitted together.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import median
from typing import Iterable

from .calibration import Calibration, CalibrationError, fit_linear

_ACTION = re.compile(r"^(\d+)([FB])(\d+)(?:\.(\d+))?$")
_MEASURED = re.compile(r"^measured_(\d+)_rank(\d+)\.json$")


@dataclass(frozen=True)
class RuntimeSamples:
    """What the traces say about the runtime."""

    actions: dict[str, list[tuple[float, float]]]
    """Per phase ("F", "B"): (predicted, measured) seconds of every matched action."""
    outside: list[float]
    """Per iteration: measured time outside the longest rank's first-to-last op span."""


def runtime_samples(directories: Iterable[str | Path], skip: int = 1) -> RuntimeSamples:
    """Every matched action and every iteration of the trace directories."""
    actions: dict[str, list[tuple[float, float]]] = {"F": [], "B": []}
    outside: list[float] = []
    for directory in map(Path, directories):
        spans: dict[str, list[float]] = {}
        for path in sorted(directory.iterdir()):
            found = _MEASURED.match(path.name)
            if found is None or int(found.group(1)) < skip:
                continue
            ops = json.loads(path.read_text())
            if ops:
                spans.setdefault(found.group(1), []).append(ops[-1]["end_s"] - ops[0]["start_s"])
            predicted_path = directory / f"predicted_{found.group(1)}.json"
            if not predicted_path.exists():
                continue  # only the group's first rank writes predictions
            predicted = _predicted(predicted_path)
            for op in ops:
                name = op["op"][len("Compute("):-1] if op["op"].startswith("Compute(") else None
                if name in predicted:
                    phase = _ACTION.match(name).group(2)
                    actions[phase].append((predicted[name], op["end_s"] - op["start_s"]))
        for iteration, found in spans.items():
            path = directory / f"iteration_{iteration}.json"
            if path.exists():
                took = json.loads(path.read_text())["iteration_time_s"]
                outside.append(max(0.0, took - max(found)))
    return RuntimeSamples(actions, outside)


def _predicted(path: Path) -> dict[str, float]:
    events = json.loads(path.read_text()).get("traceEvents", [])
    out = {}
    for event in events:
        name = str(event.get("name", "")).split(" ")[0]
        if event.get("ph") == "X" and _ACTION.match(name):
            out[name] = event["dur"] / 1e6
    return out


def fit_runtime(calibration: Calibration, directories: Iterable[str | Path],
                skip: int = 1) -> Calibration:
    """The calibration with its runtime terms fitted to the traces (the traces must have
    been predicted with `calibration`: its own runtime terms are taken out first)."""
    directories = list(directories)
    samples = runtime_samples(directories, skip)
    if not samples.actions["F"] or not samples.actions["B"]:
        raise CalibrationError(f"{', '.join(map(str, directories))}: no measured forward and "
                               "backward actions to match with predictions (run pretrain_lmm "
                               "with --pipeweaver-trace-dir)")
    fitted = []
    for phase, old_overhead, old_scale in zip("FB", calibration.action_overhead_s,
                                              calibration.action_scale):
        pairs = samples.actions[phase]
        compute = [max((p - old_overhead) / old_scale, 1e-9) for p, _ in pairs]
        fitted.append(fit_linear(compute, [m for _, m in pairs]))
    (forward, forward_scale), (backward, backward_scale) = fitted
    iteration = median(samples.outside) if samples.outside else calibration.iteration_overhead_s
    return replace(calibration, action_overhead_s=(forward, backward),
                   action_scale=(forward_scale, backward_scale), iteration_overhead_s=iteration)
