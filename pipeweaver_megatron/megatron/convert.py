"""Convert a training checkpoint between layouts: Megatron's static stages (the layout of
--pipeweaver-schedule megatron-1f1b or megatron-interleaved) and PipeWeaver's modality
chunks (--pipeweaver-schedule pipeweaver); what `pipeweaver checkpoint convert` runs.

    result = convert_checkpoint(ConvertRequest(load="ckpt", save="ckpt_pw", model="tiny-vlm",
                                               source="megatron", target="pipeweaver", pp=2))

How the layouts are known (the files' ``meta``, see [Note: checkpoint metadata]):

- source: read from the checkpoint. Each rank file records its chunks' parts; chunk c of
  pipeline rank r is stage c*P + r in every layout the runtime runs, so the files give
  the whole Layout. It must be the one `source` names: Megatron's placement for pp (and
  the model's vp when interleaved), or, for pipeweaver, a modality layout (no stage
  holds layers of two transformer modules).
- target: rebuilt as the resumed run builds it. Megatron's placement from the model and
  pp; PipeWeaver's from the chunk partitioner with the run's cost model (hardware,
  calibration, tp) and reference batch (virtual_stages.layout_reference: workload, seed), as the planner
  service cuts it, so pass the resumed run's values. A run whose layout differs refuses
  the checkpoint at load, naming both.
- each target chunk's tensor names, optimizer order and shapes: the chunk built on the
  meta device (no memory, no values).

What moves, per (tp_rank, dp_rank) group of pipeline ranks: every chunk tensor by name to
the target chunk holding it, and its parameter's Adam state (exp_avg, exp_avg_sq, step)
with it, re-keyed by the parameter's position on its new rank. Hyperparameters, the
iteration and each global rank's RNG states stay with the global rank: ranks and their
data streams are unchanged, so the resumed run sees the same batches. Tensor-parallel
shards move whole (a layer's shard on TP rank t is the same in every layout). Tensors are
moved, never recomputed, so a round trip is bitwise identical; tensors are read onto the
host, so a GPU checkpoint comes back with host tensors.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..config import ModelSpec, load_model
from ..ir import Layout, LayoutError, Part, Stage
from ..schedules.placement import module_infos
from ..service import baseline_layout
from .checkpoint import chunk_parts, describe_parts, rank_path, read_latest, write_latest, \
    write_rank_file

KINDS = ("megatron", "megatron-1f1b", "megatron-interleaved", "pipeweaver")
"""Layouts by the schedule that runs on them ("megatron" is megatron-1f1b's)."""


class ConvertError(ValueError):
    """A checkpoint that cannot be converted as asked; the message names the file."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ConvertRequest:
    """What to convert, and the resumed run's settings that decide a PipeWeaver layout."""

    load: str
    """Checkpoint directory to read (holds `latest` and iter_*/rank_*.pt)."""
    save: str
    """Directory to write (iter_*/rank_*.pt and `latest`)."""
    model: str
    """Model name or YAML path; must be the checkpoint's model."""
    source: str
    """Layout of the checkpoint: one of KINDS."""
    target: str
    """Layout to write: one of KINDS."""
    pp: int
    """Pipeline ranks; must be the checkpoint's."""
    tp: int | None = None
    """Tensor-parallel size; None: the checkpoint's (checked when given)."""
    iteration: int | None = None
    """Iteration to convert; None: the one `latest` names."""
    seed: int = 1234
    """--seed of the resumed run (pipeweaver target: its first batch)."""
    workload: str | None = None
    """--workload of the resumed run (None: the model's dataset)."""
    hardware: str | None = None
    """--pipeweaver-hardware of the resumed run (None: the calibration's, else the model's)."""
    calibration: str | None = None
    """--pipeweaver-calibration of the resumed run."""
    global_batch_size: int | None = None
    """--global-batch-size of the resumed run (None: the model's)."""
    seq_length: int | None = None
    """--seq-length of the resumed run (None: the model's microbatch_tokens)."""
    partition: str = "balanced"
    """--pipeweaver-partition of the resumed run."""

    def __post_init__(self) -> None:
        for name in ("source", "target"):
            if getattr(self, name) not in KINDS:
                raise ConvertError(f"{name} {getattr(self, name)!r}: one of {', '.join(KINDS)}")
        if self.pp < 1 or (self.tp is not None and self.tp < 1):
            raise ConvertError(f"pp and tp must be >= 1, got {self.pp} and {self.tp}")
        if os.path.realpath(self.load) == os.path.realpath(self.save):
            raise ConvertError(f"{self.save}: write the converted checkpoint to another directory")


@dataclass(frozen=True, kw_only=True, slots=True)
class ConvertResult:
    iteration: int
    files: tuple[str, ...]
    """The rank files written, by global rank."""
    source: Layout
    target: Layout
    tensors: int
    """Chunk tensors written, over all files."""
    moved: int
    """Of those, the ones now on another pipeline rank."""


@dataclass(frozen=True, slots=True)
class _RankFile:
    path: str
    rank: int
    state: dict[str, Any]

    @property
    def meta(self) -> dict[str, Any]:
        return self.state["meta"]


@dataclass(frozen=True, slots=True)
class _Chunk:
    """A target chunk's tensors (name -> shape on a TP rank) and parameters, in order."""

    shapes: dict[str, tuple[int, ...]]
    params: tuple[str, ...]


def convert_checkpoint(request: ConvertRequest) -> ConvertResult:
    """Read request.load in the source layout, write request.save in the target one."""
    iteration = read_latest(request.load) if request.iteration is None else request.iteration
    files = _read(request, load_model(request.model), iteration)
    tp = files[0].meta["tp"]
    parallel = _parallel(request, files[0].meta)
    model = load_model(request.model, parallel)
    groups: dict[tuple[int, int], dict[int, _RankFile]] = {}
    for f in files:
        groups.setdefault((f.meta["tp_rank"], f.meta["dp_rank"]), {})[f.meta["pp_rank"]] = f
    written, tensors, moved, source, target = [], 0, 0, None, None
    chunks: dict[Layout, list[_Chunk]] = {}
    for _, group in sorted(groups.items()):
        source = _source_layout(request, model, group)
        target = _target_layout(request, model, parallel)
        if target not in chunks:
            chunks[target] = _target_chunks(model, target, tp)
        states, n, m = _convert_group(request, group, target, chunks[target])
        tensors, moved = tensors + n, moved + m
        for rank, state in states.items():
            path = rank_path(request.save, iteration, rank)
            write_rank_file(path, state)
            written.append(path)
    write_latest(request.save, iteration)
    return ConvertResult(iteration=iteration, files=tuple(sorted(written)), source=source,
                         target=target, tensors=tensors, moved=moved)


def _parallel(request: ConvertRequest, meta: dict[str, Any]) -> dict[str, int]:
    """The model's parallel settings as the resumed run sets them (trainer.run_parallel)."""
    parallel = {"tp": meta["tp"], "pp": meta["pp"], "dp": meta["dp"]}
    if request.global_batch_size:
        parallel["global_batch_size"] = request.global_batch_size
    if request.seq_length:
        parallel["microbatch_tokens"] = request.seq_length
    return parallel


def _read(request: ConvertRequest, model: ModelSpec, iteration: int) -> list[_RankFile]:
    """Every rank file of the iteration, checked against the request and each other."""
    first = rank_path(request.load, iteration, 0)
    folder = os.path.dirname(first)
    if not os.path.isdir(folder):
        raise ConvertError(f"{folder}: no checkpoint of iteration {iteration}")
    ranks = sorted(int(m.group(1)) for name in os.listdir(folder)
                   if (m := re.fullmatch(r"rank_(\d{5})\.pt", name)))
    files = [_load(rank_path(request.load, iteration, r), r) for r in ranks]
    if not files:
        raise ConvertError(f"{first}: missing (no rank files in {folder})")
    world = files[0].meta["world"]
    for f in files:
        meta, why = f.meta, None
        if meta["model"] != model.name:
            why = f"saved for model {meta['model']!r}, not {model.name!r}"
        elif meta["pp"] != request.pp:
            why = f"saved with pp={meta['pp']}, not {request.pp}"
        elif request.tp is not None and meta["tp"] != request.tp:
            why = f"saved with tp={meta['tp']}, not {request.tp}"
        elif meta["world"] != world or meta["pp"] * meta["tp"] * meta["dp"] != world:
            why = f"saved by a run of {meta['world']} ranks (pp x tp x dp), rank 0's has {world}"
        elif f.rank >= world:
            why = f"a rank beyond the run's {world}"
        elif f.state.get("iteration") != iteration:
            why = f"holds iteration {f.state.get('iteration')}, not {iteration}"
        if why:
            raise ConvertError(f"{f.path}: {why}")
    for rank in range(world):
        if rank not in ranks:
            raise ConvertError(f"{rank_path(request.load, iteration, rank)}: missing (the "
                               f"checkpoint has {world} ranks)")
    return files


def _load(path: str, rank: int) -> _RankFile:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise ConvertError(f"{path}: not a checkpoint file ({exc})") from None
    if not isinstance(state, dict) or not {"chunks", "optimizer", "rng"} <= set(state):
        raise ConvertError(f"{path}: not a pretrain_lmm checkpoint file")
    if "meta" not in state:
        raise ConvertError(f"{path}: saved before checkpoint format 2 (no layout metadata); "
                           "resume it in its own layout and save again")
    return _RankFile(path, rank, state)


def _source_layout(request: ConvertRequest, model: ModelSpec,
                   group: dict[int, _RankFile]) -> Layout:
    """The layout the group's files hold (chunk c of rank r is stage c*P + r)."""
    pp = request.pp
    where = os.path.dirname(group[min(group)].path)
    for rank in range(pp):
        if rank not in group:
            raise ConvertError(f"{where}: no file holds pipeline rank {rank} of tp_rank "
                               f"{group[min(group)].meta['tp_rank']}")
    counts = {len(group[r].meta["parts"]) for r in range(pp)}
    if len(counts) != 1:
        raise ConvertError(f"{where}: pipeline ranks hold different numbers of chunks "
                           f"({sorted(counts)}), which no runtime layout does")
    stages = [Stage(c * pp + r, r, tuple(Part(m, lo, hi) for m, lo, hi in group[r].meta["parts"][c]))
              for c in range(counts.pop()) for r in range(pp)]
    try:
        layout = Layout(pp, module_infos(model), tuple(sorted(stages, key=lambda s: s.index)))
    except LayoutError as exc:
        raise ConvertError(f"{where}: the rank files' chunks are no layout of "
                           f"{model.name}: {exc}") from None
    if request.source.startswith("megatron"):
        expected = _megatron_layout(request.source, model, pp)
        ok = layout == expected
    else:
        ok = all(sum(model.module(m).is_transformer for m in s.modules) <= 1 for s in layout.stages)
    if not ok:
        saved = "; ".join(f"rank {r}: {describe_parts(group[r].meta['parts'])}" for r in range(pp))
        raise ConvertError(f"{where}: its chunks ({saved}) are not {request.source}'s layout")
    return layout


def _megatron_layout(kind: str, model: ModelSpec, pp: int) -> Layout:
    return baseline_layout(model, "megatron-1f1b" if kind == "megatron" else kind, pp)


def _target_layout(request: ConvertRequest, model: ModelSpec,
                   parallel: dict[str, int]) -> Layout:
    """The layout the resumed run builds (PlanFeed and PlannerService.start)."""
    if request.target.startswith("megatron"):
        return _megatron_layout(request.target, model, request.pp)
    from ..planner import PartitionError, partition
    from ..semu import load_calibration
    from ..service import ServiceSettings
    from ..service.worker import make_costs
    from .virtual_stages import layout_reference

    calibration = load_calibration(request.calibration) if request.calibration else None
    hardware = request.hardware or (calibration.hardware if calibration else model.hardware)
    reference = layout_reference(model, request.workload, request.seed)
    settings = ServiceSettings(model=request.model, parallel=parallel, hardware=hardware,
                               pp=request.pp, tp=parallel["tp"],
                               calibration=request.calibration, reference=reference,
                               seed=request.seed)
    try:
        return partition(make_costs(settings, model), num_ranks=request.pp,
                         reference=reference, search=request.partition == "searched").layout
    except PartitionError as exc:
        raise ConvertError(f"{model.name} has no pipeweaver layout for pp={request.pp}: "
                           f"{exc}") from None


def _target_chunks(model: ModelSpec, layout: Layout, tp: int) -> list[_Chunk]:
    """Per stage, its chunk's tensor shapes on one TP rank and its parameter order."""
    from ..models import stage_chunk

    out = []
    with _names_world() as world_tp, torch.device("meta"):
        for stage in layout.stages:
            chunk = stage_chunk(model, layout, stage.index, tp=world_tp, use_te=False)
            params = dict(chunk.named_parameters())
            shapes = {}
            for name, tensor in chunk.state_dict(keep_vars=True).items():
                if isinstance(tensor, torch.Tensor):
                    shape = list(tensor.shape)
                    if getattr(tensor, "tensor_model_parallel", False):
                        shape[tensor.partition_dim] = shape[tensor.partition_dim] * world_tp // tp
                    shapes[name] = tuple(shape)
            out.append(_Chunk(shapes, tuple(params)))
    return out


@contextlib.contextmanager
def _names_world() -> Iterator[int]:
    """parallel_state to build chunks in (TP 1 in a process of its own, else the caller's
    TP); yields that TP size and undoes only what it set up, RNG state included."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from ..models import init_single_process

    if parallel_state.model_parallel_is_initialized():
        yield parallel_state.get_tensor_model_parallel_world_size()
        return
    rng, had_world = torch.get_rng_state(), dist.is_initialized()
    init_single_process(0)
    try:
        yield 1
    finally:
        parallel_state.destroy_model_parallel()
        if not had_world:
            dist.destroy_process_group()
        torch.set_rng_state(rng)


def _convert_group(request: ConvertRequest, group: dict[int, _RankFile], target: Layout,
                   chunks: list[_Chunk]) -> tuple[dict[int, dict], int, int]:
    """The target states of one (tp_rank, dp_rank) group, by global rank; with the number
    of tensors and how many changed pipeline rank."""
    tensors, adam = _gather(group)
    states, count, moved, where = {}, 0, 0, {}
    for pp_rank, f in group.items():
        stages = target.stages_of_rank(pp_rank)
        new_chunks = []
        for stage in stages:
            saved = {}
            for name, shape in chunks[stage.index].shapes.items():
                if name not in tensors:
                    raise ConvertError(f"{os.path.dirname(f.path)}: no rank file holds {name} "
                                       f"(stage {stage.index} of the {request.target} layout)")
                tensor, origin = tensors.pop(name)
                if tuple(tensor.shape) != shape:
                    raise ConvertError(f"{origin.path}: {name} has shape {tuple(tensor.shape)}, "
                                       f"the model's is {shape} (another model?)")
                saved[name], where[name] = tensor, (f, saved)
                moved += origin is not f
            new_chunks.append(saved)
        names = [n for stage in stages for n in chunks[stage.index].params]
        opt = f.state["optimizer"]
        groups = [{k: (list(range(len(names))) if k == "params" else v)
                   for k, v in opt["param_groups"][0].items()}]
        new_opt = {"state": {i: adam[n] for i, n in enumerate(names) if n in adam},
                   "param_groups": groups}
        meta = {**f.meta, "parts": chunk_parts(stages),
                "params": [list(chunks[s.index].params) for s in stages]}
        new = {"chunks": new_chunks, "optimizer": {k: new_opt.get(k, v) for k, v in opt.items()},
               "meta": meta}
        states[f.rank] = {k: new.get(k, v) for k, v in f.state.items()}
    for name, (tensor, origin) in tensors.items():
        owner = _extra_state_owner(name, where)
        if owner is None:
            raise ConvertError(f"{origin.path}: {name} is in no chunk of the {request.target} "
                               f"layout of {origin.meta['model']}")
        f, saved = owner
        saved[name] = tensor
        moved += origin is not f
    count = sum(len(c) for state in states.values() for c in state["chunks"])
    return states, count, moved


def _gather(group: dict[int, _RankFile]) -> tuple[dict[str, tuple[torch.Tensor, _RankFile]],
                                                    dict[str, dict]]:
    """Every chunk tensor of the group by name (with its file), and every parameter's
    optimizer state by name."""
    tensors: dict[str, tuple[torch.Tensor, _RankFile]] = {}
    adam: dict[str, dict] = {}
    hyper = None
    for f in group.values():
        for saved in f.state["chunks"]:
            for name, tensor in saved.items():
                if name in tensors:
                    raise ConvertError(f"{f.path}: {name} is also in {tensors[name][1].path}")
                tensors[name] = (tensor, f)
        names = [n for chunk in f.meta["params"] for n in chunk]
        opt = f.state["optimizer"]
        if not isinstance(opt, dict) or set(opt) != {"state", "param_groups"}:
            raise ConvertError(f"{f.path}: the optimizer state is not torch.optim's (keys "
                               f"{sorted(opt) if isinstance(opt, dict) else type(opt)}); the "
                               "converter moves the host path's torch Adam state only")
        groups = opt["param_groups"]
        if len(groups) != 1 or groups[0]["params"] != list(range(len(names))):
            raise ConvertError(f"{f.path}: the optimizer must hold one param group of the "
                               f"chunks' {len(names)} parameters in order")
        mine = {k: v for k, v in groups[0].items() if k != "params"}
        if hyper is not None and mine != hyper:
            raise ConvertError(f"{f.path}: optimizer settings {mine} differ from other ranks' "
                               f"{hyper}; parameters cannot change rank")
        hyper = mine
        for index, state in opt["state"].items():
            if not 0 <= index < len(names):
                raise ConvertError(f"{f.path}: optimizer state of parameter {index}, the chunks "
                                   f"have {len(names)}")
            adam[names[index]] = state
    return tensors, adam


def _extra_state_owner(name: str, where: dict[str, tuple[_RankFile, dict]]
                       ) -> tuple[_RankFile, dict] | None:
    """A module's ``_extra_state`` (Transformer Engine layers save one; the meta chunks,
    built with the local spec, have none) goes to the chunk holding that module's tensors."""
    module, _, last = name.rpartition(".")
    if last != "_extra_state":
        return None
    return next((owner for placed, owner in where.items() if placed.startswith(module + ".")),
                None)
