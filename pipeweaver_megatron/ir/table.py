"""ScheduleTable: a Layout plus each rank's ordered compute actions, and its JSON form."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterator

from .action import Action, Op
from .errors import LayoutError, ScheduleFormatError
from .stage import Layout, ModuleInfo, Part, Stage

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ScheduleTable:
    """What every rank computes, in order, for one iteration.

    sub_microbatches maps a module to its sub-microbatch count per microbatch; a module
    not listed has one sub-microbatch everywhere. A count of 0 means the microbatch has no
    work for that module (an encoder given a text-only microbatch).
    """

    layout: Layout
    num_microbatches: int
    ranks: tuple[tuple[Action, ...], ...]
    sub_microbatches: tuple[tuple[str, tuple[int, ...]], ...] = ()
    name: str = ""
    metadata: tuple[tuple[str, Any], ...] = field(default=())

    def subs(self, stage: int, microbatch: int) -> int:
        """Sub-microbatches of a stage for one microbatch (its first part's module)."""
        return self.module_subs(self.layout.stages[stage].parts[0].module, microbatch)

    def module_subs(self, module: str, microbatch: int) -> int:
        """Sub-microbatches of a module for one microbatch (1 for an unlisted module)."""
        counts = self._sub_counts.get(module)
        return 1 if counts is None else counts[microbatch]

    @cached_property
    def _sub_counts(self) -> dict[str, tuple[int, ...]]:
        return dict(self.sub_microbatches)

    def actions(self) -> Iterator[tuple[int, int, Action]]:
        """(rank, step, action) for every action."""
        for rank, actions in enumerate(self.ranks):
            for step, action in enumerate(actions):
                yield rank, step, action

    # ---- JSON -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The versioned JSON form of DESIGN.md (enums by name)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "num_ranks": self.layout.num_ranks,
            "num_microbatches": self.num_microbatches,
            "modules": [{"name": m.name, "layers": m.num_layers, "inputs": list(m.inputs)}
                        for m in self.layout.modules],
            "stages": [{"stage": s.index, "rank": s.rank,
                        "parts": [{"module": p.module, "layers": [p.first_layer, p.last_layer]}
                                  for p in s.parts]}
                       for s in self.layout.stages],
            "sub_microbatches": {m: list(c) for m, c in self.sub_microbatches},
            "ranks": [[a.to_json() for a in actions] for actions in self.ranks],
            "metadata": dict(self.metadata),
        }

    def dumps(self) -> str:
        """Canonical JSON text (sorted keys, compact): the hashed form."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @cached_property
    def content_hash(self) -> str:
        """Stable SHA-256 of the canonical JSON form."""
        return hashlib.sha256(self.dumps().encode()).hexdigest()

    @staticmethod
    def from_json(data: Any) -> "ScheduleTable":
        """Read the JSON form; a malformed document raises ScheduleFormatError."""
        return _Reader().table(data)

    @staticmethod
    def loads(text: str) -> "ScheduleTable":
        """Read JSON text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ScheduleFormatError(f"not JSON: {exc}") from None
        return ScheduleTable.from_json(data)


class _Reader:
    """Strict reader of the JSON form; every error names the key path."""

    def get(self, obj: Any, key: str, kind: type, where: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise ScheduleFormatError(f"{where}{key}: missing")
        value = obj[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ScheduleFormatError(f"{where}{key}: expected an integer, got {value!r}")
        if not isinstance(value, kind):
            raise ScheduleFormatError(f"{where}{key}: expected {kind.__name__}, got {value!r}")
        return value

    def table(self, data: Any) -> ScheduleTable:
        if not isinstance(data, dict):
            raise ScheduleFormatError("the document must be a JSON object")
        version = self.get(data, "schema_version", int, "")
        if version != SCHEMA_VERSION:
            raise ScheduleFormatError(f"schema_version: {version} is not supported "
                                      f"(this reader knows {SCHEMA_VERSION})")
        modules = tuple(
            ModuleInfo(self.get(m, "name", str, f"modules[{i}]."),
                       self.get(m, "layers", int, f"modules[{i}]."),
                       tuple(self.get(m, "inputs", list, f"modules[{i}].")))
            for i, m in enumerate(self.get(data, "modules", list, "")))
        stages = tuple(self.stage(s, i) for i, s in enumerate(self.get(data, "stages", list, "")))
        try:
            layout = Layout(self.get(data, "num_ranks", int, ""), modules, stages)
        except LayoutError as exc:
            raise ScheduleFormatError(f"stages: {exc}") from None
        ranks = tuple(
            tuple(self.action(a, f"ranks[{r}][{k}].") for k, a in enumerate(actions))
            for r, actions in enumerate(self.get(data, "ranks", list, "")))
        subs = self.get(data, "sub_microbatches", dict, "") if "sub_microbatches" in data else {}
        return ScheduleTable(
            layout=layout,
            num_microbatches=self.get(data, "num_microbatches", int, ""),
            ranks=ranks,
            sub_microbatches=tuple((str(m), tuple(int(x) for x in c)) for m, c in subs.items()),
            name=data.get("name", "") or "",
            metadata=tuple(sorted((data.get("metadata") or {}).items())),
        )

    def stage(self, s: Any, i: int) -> Stage:
        where = f"stages[{i}]."
        parts = []
        for j, p in enumerate(self.get(s, "parts", list, where)):
            layers = self.get(p, "layers", list, f"{where}parts[{j}].")
            if len(layers) != 2 or not all(isinstance(x, int) for x in layers):
                raise ScheduleFormatError(f"{where}parts[{j}].layers: expected [first, last]")
            parts.append(Part(self.get(p, "module", str, f"{where}parts[{j}]."), *layers))
        return Stage(self.get(s, "stage", int, where), self.get(s, "rank", int, where),
                     tuple(parts))

    def action(self, a: Any, where: str) -> Action:
        op = self.get(a, "op", str, where)
        if op not in Op.__members__:
            raise ScheduleFormatError(f"{where}op: {op!r} is not one of "
                                      f"{', '.join(Op.__members__)}")
        return Action(Op[op], self.get(a, "stage", int, where),
                      self.get(a, "microbatch", int, where),
                      self.get(a, "sub", int, where) if "sub" in a else 0)
