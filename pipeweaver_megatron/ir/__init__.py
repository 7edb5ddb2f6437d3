"""The schedule language shared by every layer: stages, layouts, actions, tables."""

from .action import Action, Op
from .errors import LayoutError, ScheduleFormatError, ScheduleValidationError
from .render import render_grid, render_ranks
from .stage import Layout, ModuleInfo, Part, Stage, StageEdge, matching_subs
from .table import SCHEMA_VERSION, ScheduleTable
from .validate import dependencies, required_actions, validate
from .orders import random_order

__all__ = [
    "Action", "Op", "LayoutError", "ScheduleFormatError", "ScheduleValidationError",
    "render_grid", "render_ranks", "Layout", "ModuleInfo", "Part", "Stage", "StageEdge",
    "matching_subs",
    "SCHEMA_VERSION", "ScheduleTable", "dependencies", "required_actions", "validate",
    "random_order",
]
