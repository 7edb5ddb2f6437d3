"""Baseline schedules expressed in the IR, chosen from a registry keyed by name."""

from __future__ import annotations

import enum

from ..config import ModelSpec
from ..ir import ScheduleTable, validate
from .common import BaselineGenerator
from .errors import ScheduleError
from .gpipe import gpipe
from .megatron_1f1b import megatron_1f1b
from .megatron_interleaved import megatron_interleaved, virtual_microbatches
from .placement import megatron_layout, module_infos


class Baseline(str, enum.Enum):
    """Baseline schedules of the foundation issue."""

    GPIPE = "gpipe"
    MEGATRON_1F1B = "megatron-1f1b"
    MEGATRON_INTERLEAVED = "megatron-interleaved"


BASELINES: dict[Baseline, BaselineGenerator] = {
    Baseline.GPIPE: gpipe,
    Baseline.MEGATRON_1F1B: megatron_1f1b,
    Baseline.MEGATRON_INTERLEAVED: megatron_interleaved,
}


def build_baseline(model: ModelSpec, baseline: str | Baseline, num_microbatches: int | None = None,
                   pp: int | None = None, vp: int | None = None,
                   group_size: int | None = None) -> ScheduleTable:
    """A validated baseline table for a model on Megatron's static placement.

    Defaults come from the model's parallel settings; vp defaults to the model's vp for
    the interleaved schedule and to 1 otherwise.
    """
    try:
        kind = Baseline(baseline)
    except ValueError:
        raise ScheduleError(f"unknown baseline {baseline!r}; known: "
                            f"{', '.join(b.value for b in Baseline)}") from None
    par = model.parallel
    pp = pp or par.pp
    if vp is None:
        vp = par.vp if kind == Baseline.MEGATRON_INTERLEAVED else 1
    if pp < 1 or vp < 1:
        raise ScheduleError(f"pp and vp must be >= 1, got pp={pp} vp={vp}")
    layout = megatron_layout(model, pp, vp)
    table = BASELINES[kind](layout, num_microbatches or par.num_microbatches,
                            group_size if group_size is not None else par.microbatch_group_size)
    validate(table)
    return table


__all__ = ["Baseline", "BASELINES", "BaselineGenerator", "ScheduleError", "build_baseline",
           "gpipe", "megatron_1f1b", "megatron_interleaved", "megatron_layout", "module_infos",
           "virtual_microbatches"]
