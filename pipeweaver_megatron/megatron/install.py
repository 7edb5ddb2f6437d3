"""Hand forward_backward_pipeweaver to Megatron's training loop.

install(schedule) rebinds get_forward_backward_func in megatron.core.pipeline_parallel
(and its schedules module) and, when Megatron-LM is importable, in
megatron.training.training (which imported the name at load time), so that it returns
`schedule` (a runtime.PipeWeaverSchedule). install(None) or uninstall() restores
Megatron's own functions; without --pipeweaver, callers never install and Megatron's
forward_backward function runs untouched.
"""

from __future__ import annotations

import importlib
from typing import Callable

_TARGETS = ("megatron.core.pipeline_parallel", "megatron.core.pipeline_parallel.schedules",
            "megatron.training.training")
_original: dict[str, Callable] = {}


def install(schedule: Callable | None) -> list[str]:
    """Make get_forward_backward_func return `schedule`; returns the modules rebound."""
    if schedule is None:
        uninstall()
        return []
    rebound = []
    for name in _TARGETS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue  # Megatron-LM (megatron.training) is optional
        if not hasattr(module, "get_forward_backward_func"):
            continue
        _original.setdefault(name, module.get_forward_backward_func)

        def pipeweaver_forward_backward_func(pp_size=None, vp_size=None, _schedule=schedule):
            return _schedule

        module.get_forward_backward_func = pipeweaver_forward_backward_func
        rebound.append(name)
    return rebound


def uninstall() -> None:
    """Restore Megatron's get_forward_backward_func everywhere install() changed it."""
    for name, original in list(_original.items()):
        importlib.import_module(name).get_forward_backward_func = original
        del _original[name]
