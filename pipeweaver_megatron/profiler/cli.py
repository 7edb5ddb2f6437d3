"""`pipeweaver profile`: measure this machine and write SEMU's calibration file.

    pipeweaver profile --device {cpu,cuda} --out FILE [--hardware NAME] [--quick]

The `pipeweaver` command registers it with add_parser(subparsers); main(argv) runs it
standalone. Errors are ValueError with a one-line message.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..config import get_hardware
from ..semu.calibration import Calibration
from ..semu.ops import OpClass
from .args import add_arguments
from .comm import comm_skip_reason, measure_comm
from .compute import ComputeSetup, measure_attention, measure_elementwise, measure_gemm
from .fit import fit_calibration
from .layers import fit_layers
from .measurement import Measurement
from .timing import TimingPlan, default_hardware, dtype_for, resolve_device

QUICK_PLAN = TimingPlan(warmup=1, min_repeats=3, max_repeats=9, budget_s=0.1)
FULL_PLAN = TimingPlan()


def profile(dev: torch.device, hardware: str, quick: bool,
            log: Callable[[str], object] = print) -> Calibration:
    """Run every microbenchmark on dev and fit the factors against the profile."""
    hw = get_hardware(hardware)  # an unknown name is a ConfigError, a ValueError
    setup = ComputeSetup(dev=dev, dtype=dtype_for(hw.dtype_bytes),
                         plan=QUICK_PLAN if quick else FULL_PLAN, quick=quick)
    started = time.perf_counter()
    measurements: list[Measurement] = []
    timings: dict[str, float] = {}
    for name, bench in (("gemm", measure_gemm), ("attention", measure_attention),
                        ("elementwise", measure_elementwise)):
        start = time.perf_counter()
        measurements.extend(bench(setup))
        timings[name] = time.perf_counter() - start
        log(f"  {name:<12} {timings[name]:6.1f} s")
    skipped: dict[str, str] = {}
    reason = comm_skip_reason(dev)
    if reason is None:
        start = time.perf_counter()
        measurements.extend(measure_comm(dev, quick))
        timings["communication"] = time.perf_counter() - start
        log(f"  {'communication':<12} {timings['communication']:6.1f} s")
    else:
        skipped = {OpClass.COLLECTIVE.value: reason, OpClass.P2P.value: reason}
        log(f"  communication skipped: {reason} (default factors kept)")
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "dtype": str(setup.dtype).removeprefix("torch."), "quick": quick,
            "machine": platform.machine(), "processor": platform.processor(),
            "seconds": {**timings, "total": time.perf_counter() - started}}
    calibration = fit_calibration(measurements, hw, str(dev), info, skipped)
    start = time.perf_counter()
    calibration = fit_layers(calibration, dev, quick, log)
    info["seconds"]["layers"] = time.perf_counter() - start
    info["seconds"]["total"] = time.perf_counter() - started
    return calibration


def run(args: argparse.Namespace) -> None:
    """Measure, fit, write args.out and print the factors."""
    out = Path(args.out)
    if not out.parent.is_dir():
        raise ValueError(f"--out {args.out}: directory {out.parent} does not exist")
    dev = resolve_device(args.device)
    hardware = get_hardware(args.hardware or default_hardware(dev)).name
    mode = "quick" if args.quick else "full"
    print(f"profiling {dev} against the {hardware} profile ({mode} set)")
    calibration = profile(dev, hardware, args.quick)
    calibration.save(out)
    fit = calibration.measurements["fit"]
    print(f"{'class':<12} {'a_f':>8} {'a_m':>8} {'a_n':>8} {'overhead':>10} {'points':>6} "
          f"{'median err':>10}")
    for cls, f in calibration.factors.items():
        row = fit.get(cls.value)
        err = f"{row['median_abs_error_pct']:9.1f}%" if row else "   default"
        points = row["points"] if row else 0
        print(f"{cls.value:<12} {f.a_f:8.3f} {f.a_m:8.3f} {f.a_n:8.3f} "
              f"{f.overhead_s * 1e6:8.1f}us {points:6d} {err}")
    total = calibration.measurements["info"]["seconds"]["total"]
    print(f"roofline: {calibration.peak_flops / 1e9:.0f} GFLOP/s, "
          f"{calibration.memory_bandwidth / 1e9:.0f} GB/s; causal attention costs "
          f"{calibration.causal_fraction:.2f} of full")
    for kind, f in calibration.layer_factors.items():
        for name, phase in (("forward", f.forward), ("backward", f.backward)):
            print(f"layer {kind:<15} {name:<8} gemm x{phase.gemm:.2f} attention "
                  f"x{phase.attention:.2f} elementwise x{phase.elementwise:.2f} + "
                  f"{phase.overhead_s * 1e6:.0f}us")
    print(f"wrote {out} in {total:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry: `python -m pipeweaver_megatron.profiler.cli --device cpu --out F`."""
    parser = argparse.ArgumentParser(prog="pipeweaver profile", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as exc:
        print(f"pipeweaver profile: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
