"""`pipeweaver calibrate`: fit SEMU's per-action runtime overhead from a training run's
--pipeweaver-trace-dir (see semu/runtime_fit.py)."""

from __future__ import annotations

import argparse

from ..semu import load_calibration
from ..semu.runtime_fit import action_gaps, fit_action_overhead


def cmd_calibrate(args: argparse.Namespace) -> None:
    calibration = load_calibration(args.calibration)
    fitted = fit_action_overhead(calibration, args.trace_dir, args.skip)
    gaps = action_gaps(args.trace_dir, args.skip)
    fitted.save(args.out)
    before, after = calibration.action_overhead_s, fitted.action_overhead_s
    print(f"{len(gaps['F'])} forwards and {len(gaps['B'])} backwards matched; action overhead "
          f"forward {before[0] * 1e3:.2f} -> {after[0] * 1e3:.2f} ms, backward "
          f"{before[1] * 1e3:.2f} -> {after[1] * 1e3:.2f} ms; written to {args.out}")


def add_parser(sub) -> None:
    calibrate = sub.add_parser("calibrate", help="fit SEMU's per-action runtime overhead from "
                                                 "a training run's trace directory")
    calibrate.add_argument("--trace-dir", required=True,
                           help="written by pretrain_lmm --pipeweaver-trace-dir")
    calibrate.add_argument("--calibration", required=True,
                           help="the calibration the run predicted with")
    calibrate.add_argument("--out", required=True)
    calibrate.add_argument("--skip", type=int, default=1, help="warm-up iterations to ignore")
    calibrate.set_defaults(func=cmd_calibrate)
