"""Errors of the schedule language."""

from __future__ import annotations


class LayoutError(ValueError):
    """A Layout is inconsistent (layers uncovered, stages out of order, ...)."""


class ScheduleFormatError(ValueError):
    """A serialized schedule cannot be read; the message names the key and the reason."""


class ScheduleValidationError(ValueError):
    """A ScheduleTable breaks a global rule. str() shows the reason and the marked grid."""

    def __init__(self, reason: str, grid: str = "") -> None:
        self.reason = reason
        self.grid = grid
        super().__init__(f"{reason}\n{grid}" if grid else reason)
