"""PipeWeaver for Megatron-LM.

The planning side (config, workload, ir, schedules, semu, planner, service) imports
neither torch nor megatron; see DESIGN.md for the layering.
"""

__version__ = "0.1.0"

from .megatron.arguments import add_arguments, chain_args  # argparse only: no torch


def install(schedule):
    """Hand a PipeWeaverSchedule to Megatron (see pipeweaver_megatron.megatron.install)."""
    from .megatron.install import install as _install

    return _install(schedule)


__all__ = ["add_arguments", "chain_args", "install", "__version__"]
