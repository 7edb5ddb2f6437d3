"""The worker pool behind PlannerService: spawned workers and the collector thread.

The Board holds what the training side and the collector share, guarded by its
condition. The collector hands each ready, idle worker the oldest pending iteration,
reads answers, checks every plan (wire.read_plan: the samples, layout, dtype and hash;
the worker already validated the table and execution plan, off the training ranks'
critical path) outside the lock, notices a dead
worker (its process sentinel) or one busy on one batch longer than the hang limit,
kills and restarts it: the iteration it held fails ("planner died", "hung"), the
pending ones go to the new worker. Workers start with the "spawn" context (no fork:
the trainer has torch and threads).

[Note: a worker imports the planner only] spawn re-imports the parent's __main__ in
the child (the training script: torch, megatron, the user's model code), seconds of CPU
and hundreds of MB per worker, while rank 0 waits for it to be ready. The pool hides
__main__ while it starts a worker (a bare module stands in for the few milliseconds of
Process.start, under a lock), so the child imports only pipeweaver_megatron.service:
everything a worker receives is this package's own values.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import sys
import threading
import time
import types
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_any

from ..ir import Layout
from ..ir.plan import IterationPlan
from ..planner.partition import ChunkPlan
from ..planner.search import SearchBudget
from ..workload import GlobalBatch
from .budget import BudgetPolicy
from .settings import ServiceSettings
from .wire import InvalidPlan, decode, read_plan
from .worker import Measurement, worker_main

log = logging.getLogger("pipeweaver.service")
_POLL_S = 0.05
OUTBOX = 8
"""Measurements kept for a busy worker (the oldest go first: refits use recent ones)."""


@dataclass
class Entry:
    """One submitted iteration until `get` takes it."""

    iteration: int
    batch: GlobalBatch
    submitted: float
    plan: IterationPlan | None = None
    ready: float = 0.0
    failure: str | None = None
    predicted: tuple[float, float] | None = None
    """The worker's (iteration time, bubble ratio) prediction of the plan."""
    budget: SearchBudget | None = None
    """The search budget it was dispatched with (auto budgets; None: the settings')."""
    search: dict = field(default_factory=dict)
    """The worker's facts about the search (planning_ms, cpu_ms, evaluations)."""

    @property
    def done(self) -> bool:
        return self.plan is not None or self.failure is not None


@dataclass
class Board:
    """State shared by the training side and the collector (guarded by cond)."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    entries: dict[int, Entry] = field(default_factory=dict)
    pending: deque[int] = field(default_factory=deque)
    fallbacks: Counter[str] = field(default_factory=Counter)
    planned: int = 0
    restarts: int = 0
    discarded: int = 0
    broken: str | None = None
    """Why no worker can plan any more (every batch then falls back)."""
    running: bool = True
    policy: BudgetPolicy | None = None
    """Each task's budget under the auto budget (None: the settings' budget_ms)."""


@dataclass
class _Worker:
    index: int
    process: mp.process.BaseProcess
    tasks: object
    results: object
    ready: bool = False
    alive: bool = True
    current: int | None = None
    since: float = 0.0
    limit_s: float = 0.0
    """Busy on one task longer than this: hung."""
    outbox: deque = field(default_factory=lambda: deque(maxlen=OUTBOX))
    """Measurements waiting for the worker to be idle (sent before its next task)."""


_MAIN_LOCK = threading.Lock()


@contextlib.contextmanager
def _bare_main():
    """__main__ as a module with no file or spec: spawn then leaves it alone in the
    child (see [Note: a worker imports the planner only])."""
    with _MAIN_LOCK:
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            if main is not None:
                sys.modules["__main__"] = main


class WorkerPool:
    def __init__(self, settings: ServiceSettings, chunks: ChunkPlan | None, layout: Layout,
                 tp: int, board: Board) -> None:
        self.settings, self.chunks, self.layout = settings, chunks, layout
        self.tp, self.board = tp, board
        self._ctx = mp.get_context("spawn")
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._workers = [self._spawn(i) for i in range(settings.workers)]
        self._thread = threading.Thread(target=self._collect, name="pipeweaver-planner-service",
                                        daemon=True)
        self._thread.start()

    def all_ready(self) -> bool:
        return all(w.ready for w in self._workers)

    def wake(self) -> None:
        """Tell the collector there is new work (one byte on a pipe: never blocks)."""
        self._wake_w.send_bytes(b"")

    def close(self) -> None:
        with self.board.cond:
            self.board.running = False
        try:
            self.wake()
        except OSError:
            pass
        if self._thread is not threading.current_thread():
            self._thread.join(5)
        for worker in self._workers:
            self._stop(worker, gently=True)
        self._wake_r.close()
        self._wake_w.close()

    def _spawn(self, index: int) -> _Worker:
        tasks_r, tasks_w = self._ctx.Pipe(duplex=False)
        results_r, results_w = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=worker_main, name=f"pipeweaver-planner-{index}",
                                    args=(tasks_r, results_w, self.settings, self.chunks, self.layout),
                                    daemon=True)
        with _bare_main():
            process.start()
        tasks_r.close()
        results_w.close()
        return _Worker(index, process, tasks_w, results_r)

    def _collect(self) -> None:
        while self.board.running:
            workers = [w for w in self._workers if w.alive]
            sources = {w.results: w for w in workers}
            sentinels = {w.process.sentinel: w for w in workers}
            ready = wait_any([self._wake_r, *sources, *sentinels], _POLL_S)
            if not self.board.running:
                return
            while self._wake_r in ready and self._wake_r.poll():
                self._wake_r.recv_bytes()
            for conn in ready:
                if conn in sources and sources[conn].alive:
                    self._receive(sources[conn])
            for sentinel in ready:
                if sentinel in sentinels and sentinels[sentinel].alive:
                    self._receive(sentinels[sentinel])  # what it sent before dying
                    self._replace(sentinels[sentinel], "planner died")
            now = time.perf_counter()
            for worker in [w for w in self._workers if w.alive and w.current is not None]:
                if now - worker.since > worker.limit_s:
                    self._replace(worker, "hung")
            self._dispatch()

    def _receive(self, worker: _Worker) -> None:
        """Handle every message waiting on a worker's pipe."""
        try:
            while worker.alive and worker.results.poll():
                self._handle(worker, decode(worker.results.recv_bytes()))
        except (EOFError, OSError, ValueError):
            pass  # a dead worker's pipe; its sentinel reports it

    def _handle(self, worker: _Worker, message: dict) -> None:
        board, kind = self.board, message["kind"]
        if kind == "ready":
            with board.cond:
                worker.ready = True
                board.cond.notify_all()
            return
        if kind == "error":
            log.error("planner worker %d failed to start:\n%s", worker.index, message.get("error"))
            lines = str(message.get("error", "")).strip().splitlines()
            with board.cond:
                board.broken = lines[-1] if lines else "error"
            self._replace(worker, "planner died")
            return
        iteration = int(message.get("iteration", -1))
        if kind == "predicted":  # a plan already served or waiting, predicted again
            with board.cond:
                entry = board.entries.get(iteration)
                if entry is not None and entry.plan is not None:
                    entry.predicted = (float(message["predicted_iteration_time_s"]),
                                       float(message["predicted_bubble_ratio"]))
            return
        with board.cond:
            entry = board.entries.get(iteration)
            if worker.current == iteration:
                worker.current = None
        plan, failure = None, None
        if entry is not None and not entry.done and kind == "plan":
            try:  # the worker validated the table and execution plan (off the critical path)
                plan = read_plan(message, entry.batch, self.layout, self.settings.dtype, self.tp,
                                 bool(self.settings.sequence_parallel),
                                 validated=bool(message.get("validated")))
            except InvalidPlan as exc:
                failure = f"invalid plan: {exc}"
        elif kind == "invalid":
            failure = f"invalid plan: {message.get('error')}"
        elif kind != "plan":
            failure = f"planner error: {message.get('error', kind)}"
            log.debug("planner error on iteration %d:\n%s", iteration, message.get("traceback"))
        with board.cond:
            if entry is None or entry.done or board.entries.get(iteration) is not entry:
                board.discarded += 1
                return
            entry.plan, entry.failure, entry.ready = plan, failure, time.perf_counter()
            info = message.get("info") if isinstance(message.get("info"), dict) else {}
            entry.search = {k: info[k] for k in ("planning_ms", "cpu_ms", "evaluations",
                                                        "calibration_fits")
                            if isinstance(info.get(k), (int, float))}
            if plan is not None and "predicted_iteration_time_s" in info:
                entry.predicted = (float(info["predicted_iteration_time_s"]),
                                   float(info["predicted_bubble_ratio"]))
            board.cond.notify_all()

    def _replace(self, worker: _Worker, reason: str) -> None:
        """Kill a dead or hung worker, fail the iteration it held, start another."""
        board = self.board
        with board.cond:
            worker.alive = False
            entry = board.entries.get(worker.current) if worker.current is not None else None
            if entry is not None and not entry.done:
                entry.failure, entry.ready = reason, time.perf_counter()
            restart = (board.restarts < self.settings.max_restarts and board.running
                       and board.broken is None)
            board.restarts += restart
            board.cond.notify_all()
        self._stop(worker, gently=False)
        log.warning("planner worker %d (pid %s) %s on iteration %s; %s", worker.index,
                    worker.process.pid, "hung" if reason == "hung" else "died", worker.current,
                    "restarting it" if restart else "not restarting it")
        fresh = self._spawn(worker.index) if restart else None
        with board.cond:
            if fresh is not None:
                self._workers[worker.index] = fresh
            elif not any(w.alive for w in self._workers):
                board.broken = board.broken or "no planner worker left"
                for i in board.pending:
                    board.entries[i].failure = "planner died"
                board.pending.clear()
                board.cond.notify_all()

    def measured(self, measurement: Measurement) -> None:
        """Queue a trained iteration's measurements for every worker (call under the
        board's lock); each gets them when next idle."""
        for worker in self._workers:
            if worker.alive:
                worker.outbox.append(measurement)

    def _dispatch(self) -> None:
        """Give each ready, idle worker its measurements and the oldest pending iteration."""
        sends, board = [], self.board
        with board.cond:
            for worker in self._workers:
                if not (worker.alive and worker.ready and worker.current is None):
                    continue
                while worker.outbox:
                    sends.append((worker, worker.outbox.popleft()))
                while board.pending and board.pending[0] not in board.entries:
                    board.pending.popleft()
                if not board.pending:
                    continue
                iteration = board.pending.popleft()
                entry = board.entries[iteration]
                entry.budget = board.policy.next() if board.policy is not None else None
                worker.current, worker.since = iteration, time.perf_counter()
                worker.limit_s = self.settings.hang_limit_ms(
                    entry.budget.wall_ms if entry.budget is not None else None) / 1000
                sends.append((worker, (iteration, entry.batch, entry.budget)))
        for worker, task in sends:
            try:
                worker.tasks.send(task)
            except (OSError, ValueError):
                pass  # it died: its sentinel fails the iteration

    def _stop(self, worker: _Worker, gently: bool) -> None:
        if gently and worker.process.is_alive():
            try:
                worker.tasks.send(None)
            except (OSError, ValueError):
                pass
            worker.process.join(1.0)
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(1.0)
        for conn in (worker.tasks, worker.results):
            conn.close()
