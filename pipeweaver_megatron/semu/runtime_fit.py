"""Fit SEMU's per-action runtime overhead from measured training runs.

`scripts/pretrain_lmm.py --pipeweaver-trace-dir DIR` writes, per iteration, SEMU's
predicted trace (predicted_<iteration>.json) and every rank's measured ops
(measured_<iteration>_rank<r>.json). For every compute action present in both, the
difference measured - predicted is what the model misses per action; its median over
forwards and over backwards (never below 0) is added to the calibration's
action_overhead_s. Iterations before `skip` (warm-up) are ignored.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from statistics import median

from .calibration import Calibration, CalibrationError

_ACTION = re.compile(r"^(\d+)([FB])(\d+)(?:\.(\d+))?$")
_MEASURED = re.compile(r"^measured_(\d+)_rank(\d+)\.json$")


def action_gaps(directory: str | Path, skip: int = 1) -> dict[str, list[float]]:
    """Per phase ("F", "B"): measured - predicted seconds of every matched action."""
    directory = Path(directory)
    gaps: dict[str, list[float]] = {"F": [], "B": []}
    for path in sorted(directory.iterdir()):
        found = _MEASURED.match(path.name)
        if found is None or int(found.group(1)) < skip:
            continue
        predicted_path = directory / f"predicted_{found.group(1)}.json"
        if not predicted_path.exists():
            continue  # only the group's first rank writes predictions
        predicted = _predicted(predicted_path)
        for op in json.loads(path.read_text()):
            name = op["op"][len("Compute("):-1] if op["op"].startswith("Compute(") else None
            if name in predicted:
                phase = _ACTION.match(name).group(2)
                gaps[phase].append(op["end_s"] - op["start_s"] - predicted[name])
    return gaps


def _predicted(path: Path) -> dict[str, float]:
    events = json.loads(path.read_text()).get("traceEvents", [])
    out = {}
    for event in events:
        name = str(event.get("name", "")).split(" ")[0]
        if event.get("ph") == "X" and _ACTION.match(name):
            out[name] = event["dur"] / 1e6
    return out


def fit_action_overhead(calibration: Calibration, directory: str | Path,
                        skip: int = 1) -> Calibration:
    """The calibration with action_overhead_s raised by the median per-action gap."""
    gaps = action_gaps(directory, skip)
    if not gaps["F"] or not gaps["B"]:
        raise CalibrationError(f"{directory}: no measured forward and backward actions to match "
                               "with predictions (run pretrain_lmm with --pipeweaver-trace-dir)")
    forward, backward = calibration.action_overhead_s
    return replace(calibration, action_overhead_s=(max(0.0, forward + median(gaps["F"])),
                                                   max(0.0, backward + median(gaps["B"]))))
