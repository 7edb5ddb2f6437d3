"""SEMU, the step emulator: op-level costs, schedule simulation, memory, traces.

Pure Python + numpy: no torch, no megatron (the profiler that measures a machine lives
in pipeweaver_megatron.profiler).
"""

from .calibration import (DEFAULT_FACTORS, Calibration, CalibrationError, ClassFactors, Point,
                          fit_factors, load_calibration)
from .core import StuckSchedule, Timeline, run_streams
from .costs import CostModel, ReuseStats, StageCost
from .graph import Parallel, PartGraph, part_graph
from .memory import StaticMemory, rank_params, static_memory
from .ops import Op, OpClass, Phase
from .shapes import ModuleShape, StageShapes, microbatch_shapes
from .runner import Planner, WorkloadSimulation, simulate_workload
from .simulate import (BatchShapes, Links, PricedBatch, SimResult, Transfer, batch_shapes, price,
                       simulate, transfer_delays)
from .trace import trace_events, write_plot, write_trace

__all__ = [
    "DEFAULT_FACTORS", "Calibration", "CalibrationError", "ClassFactors", "Point", "fit_factors",
    "load_calibration", "StuckSchedule", "Timeline", "run_streams", "CostModel", "ReuseStats",
    "StageCost", "Parallel", "PartGraph", "part_graph", "StaticMemory", "rank_params",
    "static_memory", "Op", "OpClass", "Phase", "ModuleShape", "StageShapes",
    "microbatch_shapes", "BatchShapes", "transfer_delays", "Transfer", "Links", "PricedBatch", "SimResult", "batch_shapes", "price",
    "simulate", "trace_events", "write_plot", "write_trace", "Planner", "WorkloadSimulation",
    "simulate_workload",
]
