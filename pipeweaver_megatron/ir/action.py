"""Actions: the immutable instructions of a schedule.

An Action is ``(op, stage, microbatch, sub)``: run the forward (F) or backward (B) of
one stage on one (sub-)microbatch. Its canonical string is ``{stage}{op}{microbatch}``,
with ``.{sub}`` appended when sub > 0, e.g. ``3F12`` or ``0B4.2``.
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple


class Op(str, enum.Enum):
    """What an action computes."""

    F = "F"
    """Forward of a stage."""
    B = "B"
    """Backward of a stage (input and weight gradients together)."""


_ACTION_RE = re.compile(r"^(\d+)([A-Z]+)(\d+)(?:\.(\d+))?$")


class Action(NamedTuple):
    """One compute instruction of a rank."""

    op: Op
    stage: int
    microbatch: int
    sub: int = 0

    def __str__(self) -> str:
        text = f"{self.stage}{self.op.value}{self.microbatch}"
        return f"{text}.{self.sub}" if self.sub else text

    @staticmethod
    def from_str(text: str) -> "Action":
        """Parse the canonical string form (inverse of str())."""
        match = _ACTION_RE.match(text.strip())
        if match is None:
            raise ValueError(f"{text!r} is not an action like '3F12' or '0B4.2'")
        stage, op, microbatch, sub = match.groups()
        try:
            kind = Op[op]
        except KeyError:
            raise ValueError(f"{text!r}: unknown op {op!r}; known: "
                             f"{', '.join(o.name for o in Op)}") from None
        return Action(kind, int(stage), int(microbatch), int(sub or 0))

    def to_json(self) -> dict[str, object]:
        """The JSON object form (enums by name)."""
        return {"op": self.op.name, "stage": self.stage, "microbatch": self.microbatch,
                "sub": self.sub}
