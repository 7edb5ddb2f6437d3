"""The one error type of the data layer: which file (and line), which sample, why."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data or a bad data flag. The message names the file or flag, the sample key
    where there is one, and the reason, on one line."""

    def __init__(self, source: str, reason: str, key: str | None = None) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        where = f"{source}: sample {key!r}" if key is not None else source
        super().__init__(f"{where}: {reason}")
