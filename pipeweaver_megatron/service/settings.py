"""Typed settings and results of the planner service (pure Python)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

from ..ir.plan import IterationPlan
from ..planner.search import SearchBudget
from ..planner.systems import PIPEWEAVER, RUNNABLE
from ..config import ModelSpec, load_model
from ..workload import GlobalBatch, TokenRules
from .fallback import FALLBACKS

FAULTS = ("planner-crash", "planner-hang", "bad-plan", "bad-samples")
"""Injected by tests at one iteration: the worker exits (os._exit(1)) while planning it,
sleeps forever, returns a table with two actions of rank 0 swapped (the execution plan
no longer matches it), or returns a plan whose batch lost a sample."""

PARTITIONS = ("balanced", "searched")
"""How the run's chunks are cut (ServiceSettings.partition)."""

UNLIMITED_MS = 3_600_000.0
"""Wall-clock budget handed to the search when max_evaluations bounds it instead."""


class ServiceError(RuntimeError):
    """The service cannot run as configured (a worker failed to start, used after close)."""


@dataclass(frozen=True, kw_only=True)
class ServiceSettings:
    """One planner service per pipeline-parallel group."""

    model: str
    """Model name (model_configs/) or path of a YAML file."""
    parallel: Mapping[str, int] = field(default_factory=dict)
    """Overrides of the model's parallel settings (the run's flags: dp,
    global_batch_size, microbatch_tokens, ...); see config.load_model."""
    hardware: str | None = None
    """Hardware profile name; None: the model's."""
    calibration: str | None = None
    """Calibration file written by `pipeweaver profile` (semu.load_calibration)."""
    pp: int | None = None
    """Pipeline ranks; None: the model's."""
    tp: int | None = None
    """Tensor-parallel size (message shapes); None: the model's."""
    sequence_parallel: bool | None = None
    """True / False: the run's chunks are (not) sequence-parallel (with tp > 1): messages
    carry each TP rank's rows (or whole sequences) and SEMU prices it so, whatever the
    model file says. None: messages whole, SEMU prices the model file's setting (the
    drop-in's LLaVA chunks: an SP language model that passes whole sequences)."""
    dtype: str = "float32"
    """Activation dtype name of the messages."""
    schedule: str = PIPEWEAVER
    """"pipeweaver" searches a plan per batch; megatron-1f1b / megatron-interleaved build
    the baseline plans in the workers, so comparisons run through the same path."""
    budget_ms: float | None = 500.0
    """Search budget per batch (wall clock); None: auto, each batch's budget follows the
    measured iteration time and the node's idle cores (budget.py)."""
    lookahead: int = 2
    """Batches the training side submits ahead (the auto budget's window)."""
    partition: str = "balanced"
    """The chunk cut: "balanced" (each module balanced on its own, partition.py) or
    "searched" (refined across modules by the plans it leads to, cut_search.py)."""
    online_calibration: bool = False
    """Refit SEMU's runtime terms from each trained iteration's measured times (the
    training side reports them with PlannerService.measured; semu/online.py)."""
    max_evaluations: int | None = None
    """Bound the search by candidate evaluations instead of the budget (reproducible
    across machines: a seed and a count always give the same plan)."""
    workers: int = 1
    """Planner processes (spawned)."""
    timeout_ms: float = 1000.0
    """How long `get` waits for a worker's plan before falling back."""
    hang_ms: float | None = None
    """A worker busy on one batch longer than this is killed and restarted; None:
    3 * the batch's budget + timeout_ms (set it when max_evaluations bounds the search)."""
    fallback: str = "megatron-1f1b"
    """Schedule of the fallback plans: megatron-1f1b or megatron-interleaved."""
    reference: GlobalBatch | None = None
    """A sample of the run's data for the chunk partitioner (None: largest shapes)."""
    seed: int = 0
    """The plan of iteration i uses seed + i."""
    max_restarts: int = 8
    """Worker restarts allowed over the service's life; beyond, every batch falls back."""
    startup_timeout_s: float = 120.0
    """How long `start` waits for the workers to be ready."""
    niceness: int = 19
    """Workers lower their scheduling priority by this much (0: unchanged) and, where
    the OS has it, run under SCHED_IDLE, so planning uses spare cores and barely slows
    the training ranks it plans for (on a 2-core machine at nice 10 it cost them ~10%)."""
    faults: Mapping[int, str] = field(default_factory=dict)
    """Fault injection for tests: {iteration: one of FAULTS}."""

    def __post_init__(self) -> None:
        if self.schedule not in RUNNABLE:
            raise ValueError(f"schedule {self.schedule!r}: the runtime runs {', '.join(RUNNABLE)}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback {self.fallback!r}: one of {', '.join(FALLBACKS)}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"partition {self.partition!r}: one of {', '.join(PARTITIONS)}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if (self.budget_ms is not None and self.budget_ms <= 0) or self.timeout_ms < 0:
            raise ValueError(f"budget_ms must be > 0 and timeout_ms >= 0, got "
                             f"{self.budget_ms} and {self.timeout_ms}")
        if self.max_evaluations is not None and self.max_evaluations < 1:
            raise ValueError(f"max_evaluations must be >= 1, got {self.max_evaluations}")
        for name in ("pp", "tp"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        bad = {i: f for i, f in self.faults.items() if f not in FAULTS}
        if bad:
            raise ValueError(f"unknown faults {bad}; known: {', '.join(FAULTS)}")

    def hang_limit_ms(self, wall_ms: float | None = None) -> float:
        """How long a worker may be busy on a task planned with wall_ms (None: the
        settings' budget_ms) before it counts as hung: hang_ms, or 3 * the budget +
        timeout_ms."""
        budget = wall_ms if wall_ms is not None else self.budget_ms
        if self.hang_ms is not None:
            return self.hang_ms
        return 3 * (budget if budget is not None else UNLIMITED_MS) + self.timeout_ms

    def resolve(self) -> "RunModel":
        """The model spec with the run's parallel overrides, its token rules, and the
        pipeline and tensor-parallel sizes (the model's where the settings leave them)."""
        model = load_model(self.model, self.parallel)
        tp = self.tp or model.parallel.tp
        return RunModel(model, TokenRules.from_model(model), self.pp or model.parallel.pp, tp,
                        bool(self.sequence_parallel) and tp > 1)


@dataclass(frozen=True)
class RunModel:
    """What ServiceSettings.resolve gives the service and its workers."""

    model: ModelSpec
    rules: TokenRules
    pp: int
    tp: int
    sequence_parallel: bool = False


Source = Literal["planner", "fallback"]


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What `get` hands the training step for one iteration."""

    iteration: int
    plan: IterationPlan
    source: Source
    reason: str | None = None
    """Why the fallback: "late", "planner died", "hung", "invalid plan: ...",
    "planner error: ..." (None for a planner plan)."""
    latency_ms: float
    """From submit to the plan being ready (for a fallback: to its being built)."""
    waited_ms: float
    """How long `get` blocked waiting for the worker (at most timeout_ms)."""
    predicted: tuple[float, float] | None = None
    """SEMU's (iteration time s, bubble ratio) of a searched plan, from the worker that
    simulated it anyway (None for fallbacks and baseline schedules)."""
    budget: SearchBudget | None = None
    """The auto budget the search ran with (None: the settings' budget_ms)."""
    search: Mapping[str, float] = field(default_factory=dict)
    """The worker's planning_ms, cpu_ms and evaluations (empty for fallbacks)."""


@dataclass(frozen=True, kw_only=True)
class ServiceStats:
    planned: int
    """Iterations served with the planner's plan."""
    fallbacks: dict[str, int]
    """Fallbacks per reason (the part before the first colon)."""
    restarts: int
    """Workers restarted after a crash or a hang."""
    discarded: int
    """Plans that arrived after their iteration had been served."""

    def to_dict(self) -> dict:
        return {"planned": self.planned, "fallbacks": dict(self.fallbacks),
                "restarts": self.restarts, "discarded": self.discarded}
