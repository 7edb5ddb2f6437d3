"""PipeWeaver for Megatron-LM.

The planning side (config, workload, ir, schedules, and later semu, planner, service)
imports neither torch nor megatron; see DESIGN.md for the layering.
"""

__version__ = "0.1.0"
