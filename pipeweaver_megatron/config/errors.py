"""The one error type of the config layer: which file, which key, why."""

from __future__ import annotations


class ConfigError(ValueError):
    """A spec is malformed. The message names the file, the key path and the reason."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {reason}")


class SpecError(ValueError):
    """Raised by a spec's own checks; the loader adds the file and the key prefix."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")
