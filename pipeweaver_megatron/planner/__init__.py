"""The planner: offline chunk partitioner, online sub-microbatch partitioner, and the
per-batch search (MCTS reordering, greedy dual-queue interleaving, per-layer memory
ILP) behind PipeWeaverPlanner.plan; the paper's comparison baselines; a registry of
every schedule SEMU can compare; and the compilation of a table into per-rank
execution plans with the shapes of every message. Pure Python + numpy + HiGHS: no torch.
"""

from .baselines import Comparison, ComparisonBaseline, build_comparison
from .candidates import Strategy
from .interleave import Interleaved, PlannerError, Problem, build_problem, interleave
from .mcts import SequenceTree, TreeResult
from .memopt import MemoryPlan, optimize_memory, summarize, transformer_layers
from .partition import ChunkPlan, PartitionError, choose_sub_size, partition
from .search import PipeWeaverPlanner, PlanResult, SearchBudget, SearchSettings, SearchStats
from .submicro import SubMicrobatches, split_batch, split_evenly
from .systems import PIPEWEAVER, SYSTEMS, make_system
from ..ir.messages import TensorSpec, stage_inputs, stage_outputs
from ..ir.execplan import ExecutionPlan, Kind, Message, RankPlan, rank_plan_stats
from ..ir.graph import table_flows
from .compile import PlanCheckError, check_plan, compile_table

__all__ = ["Comparison", "ComparisonBaseline", "build_comparison", "Strategy", "Interleaved",
           "PlannerError", "Problem", "build_problem", "interleave", "SequenceTree",
           "TreeResult", "MemoryPlan", "optimize_memory", "summarize", "transformer_layers",
           "ChunkPlan", "PartitionError", "choose_sub_size", "partition", "PipeWeaverPlanner",
           "PlanResult", "SearchBudget", "SearchSettings", "SearchStats", "SubMicrobatches", "split_batch",
           "split_evenly", "PIPEWEAVER", "SYSTEMS", "make_system", "TensorSpec", "stage_inputs",
           "stage_outputs", "ExecutionPlan", "Kind", "Message", "RankPlan", "rank_plan_stats",
           "PlanCheckError", "check_plan", "compile_table", "table_flows"]
