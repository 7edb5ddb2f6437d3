"""The planner service: side processes that plan upcoming global batches ahead of
training, check every plan, time out, fall back to Megatron's schedules and restart
crashed or hung workers. Pure Python: no torch, no megatron."""

from .fallback import FALLBACKS, baseline_layout, baseline_table, fallback_plan
from .planner_service import PlannerService
from .prefetch import PrefetchingIterator
from .settings import FAULTS, Outcome, ServiceError, ServiceSettings, ServiceStats
from .wire import InvalidPlan, read_plan
from .worker import BatchPlanner

__all__ = ["FALLBACKS", "baseline_layout", "baseline_table", "fallback_plan", "PlannerService",
           "PrefetchingIterator", "FAULTS", "Outcome", "ServiceError", "ServiceSettings",
           "ServiceStats", "InvalidPlan", "read_plan", "BatchPlanner"]
