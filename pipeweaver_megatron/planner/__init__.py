"""The planner (work in progress): offline chunk partitioner, online sub-microbatch
partitioner and the greedy dual-queue interleaving. MCTS reordering, the per-layer
memory ILP and the planner API arrive with the rest of the planner milestone.
Pure Python + numpy: no torch.
"""

from .interleave import Interleaved, PlannerError, Problem, build_problem, interleave
from .partition import ChunkPlan, PartitionError, choose_sub_size, partition
from .submicro import SubMicrobatches, split_batch, split_evenly

__all__ = ["Interleaved", "PlannerError", "Problem", "build_problem", "interleave", "ChunkPlan",
           "PartitionError", "choose_sub_size", "partition", "SubMicrobatches", "split_batch",
           "split_evenly"]
