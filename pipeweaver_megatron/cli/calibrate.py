"""`pipeweaver calibrate`: fit SEMU's runtime terms (per-action overhead and scale, and
the per-iteration overhead) from training runs' --pipeweaver-trace-dir (see
semu/runtime_fit.py)."""

from __future__ import annotations

import argparse

from ..semu import load_calibration
from ..semu.runtime_fit import fit_samples, runtime_samples


def cmd_calibrate(args: argparse.Namespace) -> None:
    calibration = load_calibration(args.calibration)
    samples = runtime_samples(args.trace_dir, args.skip)
    fitted = fit_samples(calibration, samples, ", ".join(args.trace_dir))
    fitted.save(args.out)
    (f0, b0), (f1, b1) = calibration.action_overhead_s, fitted.action_overhead_s
    print(f"{len(samples.actions['F'])} forwards, {len(samples.actions['B'])} backwards and "
          f"{len(samples.outside)} iterations matched; per action: forward {f0 * 1e3:.2f} -> "
          f"{f1 * 1e3:.2f} ms + x{fitted.action_scale[0]:.3f}, backward {b0 * 1e3:.2f} -> "
          f"{b1 * 1e3:.2f} ms + x{fitted.action_scale[1]:.3f}; per iteration "
          f"{fitted.iteration_overhead_s * 1e3:.2f} ms; written to {args.out}")
    for kind, terms in fitted.chunk_runtime.items():
        (f, b), (fs, bs) = terms.overhead_s, terms.scale
        print(f"  chunk {kind}: forward {f * 1e3:.2f} ms + x{fs:.3f}, backward {b * 1e3:.2f} ms "
              f"+ x{bs:.3f}")


def add_parser(sub) -> None:
    calibrate = sub.add_parser("calibrate", help="fit SEMU's runtime terms from training "
                                                 "runs' trace directories")
    calibrate.add_argument("--trace-dir", required=True, action="append",
                           help="written by pretrain_lmm --pipeweaver-trace-dir (repeat for "
                                "several runs)")
    calibrate.add_argument("--calibration", required=True,
                           help="the calibration the runs predicted with")
    calibrate.add_argument("--out", required=True)
    calibrate.add_argument("--skip", type=int, default=1, help="warm-up iterations to ignore")
    calibrate.set_defaults(func=cmd_calibrate)
