"""Errors of the schedule generators."""


class ScheduleError(ValueError):
    """A baseline cannot be built for these settings; the message says why."""
