"""A host-backed ``torch.cuda``: the part of its surface Megatron-LM calls.

A CPU-only torch build keeps ``torch.cuda`` importable but every function either reports
"no device" (is_available, device_count) or raises "Torch not compiled with CUDA". Megatron
refuses to start without a GPU and calls into torch.cuda all over (devices, streams, events,
RNG, memory statistics, NVTX). :func:`install` replaces those attributes with host versions
(the RNG's are in rng.py):

- one "GPU" per local process whose tensors live on the host (see devices.CpuDeviceMode);
- streams and events that are already complete (host ops run synchronously), with events
  timing on ``time.perf_counter`` so Megatron's timers still measure something;
- memory statistics that read zero, NVTX ranges that do nothing.
"""

from __future__ import annotations

import contextlib
import os
import time
from types import SimpleNamespace
from typing import Any, Iterator

import torch


class _State:
    """The current "device" and stream of this process."""

    device: int = int(os.environ.get("LOCAL_RANK", "0"))
    stream: "Stream | None" = None


def _index(device: Any = None) -> int:
    if device is None:
        return _State.device
    if isinstance(device, int):
        return _State.device if device < 0 else device
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        return _State.device if device.index is None else device.index
    return _State.device


def device_count() -> int:
    """One device per local process (torchrun's LOCAL_WORLD_SIZE), so local_rank is valid."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), _State.device + 1)


def current_device() -> int:
    return _State.device


def set_device(device: Any) -> None:
    _State.device = _index(device)


class device(contextlib.ContextDecorator):
    """``with torch.cuda.device(i):`` switches the recorded device index."""

    def __init__(self, device: Any) -> None:
        self.idx = _index(device)
        self.prev = _State.device

    def __enter__(self) -> "device":
        self.prev, _State.device = _State.device, self.idx
        return self

    def __exit__(self, *exc: Any) -> None:
        _State.device = self.prev


def get_device_name(device: Any = None) -> str:
    return "CPU stand-in"


def get_device_capability(device: Any = None) -> tuple[int, int]:
    # Ampere: recent enough that Megatron's capability checks pass (bf16 support and such),
    # old enough that it does not switch to Hopper-only paths.
    return (8, 0)


def get_device_properties(device: Any = None) -> SimpleNamespace:
    major, minor = get_device_capability()
    return SimpleNamespace(name=get_device_name(), major=major, minor=minor,
                           total_memory=_total_memory(), multi_processor_count=1,
                           is_integrated=False, is_multi_gpu_board=False,
                           L2_cache_size=0, uuid="cpu-standin", gcnArchName="")


def _host_pages(name: str) -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf(name)


def _total_memory() -> int:
    return _host_pages("SC_PHYS_PAGES")


def mem_get_info(device: Any = None) -> tuple[int, int]:
    """(free, total) bytes: the host's available and physical memory."""
    return _host_pages("SC_AVPHYS_PAGES"), _total_memory()


def synchronize(device: Any = None) -> None:
    """Host ops have finished when they return."""


class Stream:
    """A stream whose work is always complete (host ops run synchronously)."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any) -> None:
        self.device = torch.device("cpu")
        self.device_index = _index(device)
        self.priority = priority
        self.cuda_stream = 0

    def wait_stream(self, stream: Any) -> None: ...
    def wait_event(self, event: Any) -> None: ...
    def synchronize(self) -> None: ...

    def query(self) -> bool:
        return True

    def record_event(self, event: "Event | None" = None) -> "Event":
        event = event or Event()
        event.record(self)
        return event

    def __enter__(self) -> "Stream":
        self._ctx = stream(self)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


ExternalStream = Stream
_DEFAULT_STREAM = Stream()


def current_stream(device: Any = None) -> Stream:
    return _State.stream or _DEFAULT_STREAM


def default_stream(device: Any = None) -> Stream:
    return _DEFAULT_STREAM


def set_stream(s: Stream | None) -> None:
    _State.stream = s


@contextlib.contextmanager
def stream(s: Stream | None) -> Iterator[None]:
    """``with torch.cuda.stream(s):`` makes ``s`` the current stream (None: unchanged)."""
    prev = _State.stream
    if s is not None:
        _State.stream = s
    try:
        yield
    finally:
        _State.stream = prev


class Event:
    """An event recorded at the host time it is recorded at; elapsed_time in milliseconds."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False,
                 interprocess: bool = False, **kwargs: Any) -> None:
        self.time: float | None = None

    def record(self, stream: Any = None) -> None:
        self.time = time.perf_counter()

    def synchronize(self) -> None: ...
    def wait(self, stream: Any = None) -> None: ...

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "Event") -> float:
        if self.time is None or end.time is None:
            raise RuntimeError("elapsed_time needs both events recorded")
        return (end.time - self.time) * 1000.0


# --- memory ---------------------------------------------------------------------------------

def _zero(*args: Any, **kwargs: Any) -> int:
    return 0


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


_MEMORY_ZERO = ("memory_allocated", "max_memory_allocated", "memory_reserved",
                "max_memory_reserved", "memory_cached", "max_memory_cached",
                "device_memory_used", "memory_usage", "utilization", "temperature",
                "power_draw", "clock_rate")
_MEMORY_NOOP = ("empty_cache", "reset_peak_memory_stats", "reset_max_memory_allocated",
                "reset_max_memory_cached", "reset_accumulated_memory_stats", "ipc_collect",
                "set_per_process_memory_fraction", "_record_memory_history", "set_sync_debug_mode")


class _Nvtx:
    """NVTX markers annotate GPU timelines; there is none, so they do nothing."""

    range_push = staticmethod(_zero)
    range_pop = staticmethod(_zero)
    range_start = staticmethod(_zero)
    range_end = staticmethod(_nothing)
    mark = staticmethod(_nothing)

    @staticmethod
    @contextlib.contextmanager
    def range(msg: str, *args: Any, **kwargs: Any) -> Iterator[None]:
        yield


def install() -> None:
    """Replace the attributes of torch.cuda (and its memory/nvtx submodules)."""
    cuda = torch.cuda
    plain = dict(
        # is_initialized: torch.cuda._lazy_call runs a callback at once only when CUDA is
        # initialised (else queues it for an init that never comes); Megatron sets RNG
        # states through it. _lazy_init then has nothing to do.
        is_available=lambda: True, is_initialized=lambda: True, init=_nothing,
        _lazy_init=_nothing, is_bf16_supported=lambda *a, **k: True,
        device_count=device_count, current_device=current_device, set_device=set_device,
        device=device, get_device_name=get_device_name,
        get_device_capability=get_device_capability,
        get_device_properties=get_device_properties, mem_get_info=mem_get_info,
        synchronize=synchronize, Stream=Stream, ExternalStream=ExternalStream,
        current_stream=current_stream, default_stream=default_stream, set_stream=set_stream,
        stream=stream, Event=Event, memory_stats=lambda *a, **k: {},
        memory_summary=lambda *a, **k: "CPU stand-in: no device memory statistics",
        memory_snapshot=lambda *a, **k: [],
    )
    for name, value in plain.items():
        setattr(cuda, name, value)
    for name in _MEMORY_ZERO:
        setattr(cuda, name, _zero)
        setattr(cuda.memory, name, _zero)
    for name in _MEMORY_NOOP:
        setattr(cuda, name, _nothing)
        setattr(cuda.memory, name, _nothing)
    for name in ("memory_stats", "memory_summary", "memory_snapshot", "mem_get_info"):
        setattr(cuda.memory, name, plain[name])
    for name in ("range_push", "range_pop", "range_start", "range_end", "mark", "range"):
        setattr(cuda.nvtx, name, getattr(_Nvtx, name))
