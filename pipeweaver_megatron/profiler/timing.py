"""Devices and timing for the microbenchmarks: the user's device only, medians of repeats."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import PROFILES


def host_type() -> str:
    """torch's name of the host device type."""
    return str(torch.cpu.current_device())


def is_accelerator(dev: torch.device) -> bool:
    """dev is the machine's accelerator (CUDA, ...), not the host."""
    accel = torch.accelerator.current_accelerator()
    return accel is not None and dev.type == accel.type


def resolve_device(name: str) -> torch.device:
    """The torch device the user named, or ValueError with one line saying why not."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device {name!r}: not a torch device "
                         f"({str(exc).splitlines()[0]})") from None
    if dev.type == host_type():
        return dev
    if not is_accelerator(dev):
        accel = torch.accelerator.current_accelerator()
        found = accel.type if accel is not None else "none"
        raise ValueError(f"--device {name}: no such device on this machine (accelerator "
                         f"found: {found}); use --device {host_type()}")
    count = torch.accelerator.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"--device {name}: this machine has {count} {dev.type} device(s)")
    return dev


def default_hardware(dev: torch.device) -> str:
    """Hardware profile for dev: the profile named like the device type on the host
    (cpu), else the one the GPU's name contains (H100, H200, A100, ...), else H100."""
    names = {key.lower(): key for key in PROFILES}
    if dev.type.lower() in names:
        return names[dev.type.lower()]
    label = torch.cuda.get_device_name(dev) if torch.cuda.is_available() else ""
    matches = [key for key in PROFILES if key.lower() in label.lower()]
    return max(matches, key=len) if matches else "H100"


def dtype_for(dtype_bytes: int) -> torch.dtype:
    """The training dtype a hardware profile's element size stands for."""
    table = {4: torch.float32, 2: torch.bfloat16}
    if dtype_bytes not in table:
        raise ValueError(f"no training dtype of {dtype_bytes} bytes")
    return table[dtype_bytes]


def synchronize(dev: torch.device) -> None:
    """Wait for queued work on dev (nothing to wait for on the host)."""
    if is_accelerator(dev):
        torch.accelerator.synchronize(dev)


@dataclass(frozen=True, slots=True)
class TimingPlan:
    """How hard to measure each case."""

    warmup: int = 2
    """Untimed calls first (allocator, kernel selection, caches)."""
    min_repeats: int = 3
    """Fewest timed samples."""
    max_repeats: int = 25
    """Most timed samples."""
    budget_s: float = 0.25
    """Aim for about this much timed work per case."""
    min_sample_s: float = 1e-3
    """Calls are grouped so one sample lasts at least this long (clock resolution)."""


def median_seconds(fn: Callable[[], object], dev: torch.device, plan: TimingPlan) -> float:
    """Median seconds of one fn() call on dev.

    After the warmup one call estimates the cost; then samples of k back-to-back calls
    (k so that a sample lasts min_sample_s) are timed between synchronisations, as many
    as fit budget_s within [min_repeats, max_repeats], and the median per call returned.
    """
    for _ in range(plan.warmup):
        fn()
    synchronize(dev)
    start = time.perf_counter()
    fn()
    synchronize(dev)
    estimate = max(time.perf_counter() - start, 1e-7)
    calls = max(1, min(100, math.ceil(plan.min_sample_s / estimate)))
    samples = int(plan.budget_s / (estimate * calls))
    samples = max(plan.min_repeats, min(plan.max_repeats, samples))
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(dev)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)
