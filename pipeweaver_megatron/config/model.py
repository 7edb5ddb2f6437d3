"""A whole training setup: modules, their topology, parallel settings, hardware."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from .errors import SpecError
from .hardware import PROFILES
from .modules import ModuleKind, ModuleSpec
from .parallel import ParallelSpec


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    """An LMM and how it is trained.

    topology holds directed edges (producer, consumer) between module names, e.g.
    vision -> projector -> lm for a VLM and lm -> dit for text-to-video.
    """

    name: str
    """Setup name (VLM-S, tiny-vlm, ...)."""
    description: str = ""
    """One line for humans."""
    modules: tuple[ModuleSpec, ...]
    """The modules, in any order; `order` gives the topological one."""
    topology: tuple[tuple[str, str], ...]
    """Edges (producer, consumer)."""
    parallel: ParallelSpec
    """Parallel and batching settings."""
    hardware: str = "H800"
    """Default hardware profile name."""
    dataset: str = "obelics"
    """Default workload generator name."""
    source: str = ""
    """File the spec was loaded from."""

    def __post_init__(self) -> None:
        names = [m.name for m in self.modules]
        if len(set(names)) != len(names):
            raise SpecError("modules", f"duplicate module names in {names}")
        if not any(m.kind == ModuleKind.LANGUAGE_MODEL for m in self.modules):
            raise SpecError("modules", "a model needs one language_model module")
        if sum(m.kind == ModuleKind.LANGUAGE_MODEL for m in self.modules) > 1:
            raise SpecError("modules", "more than one language_model module")
        if self.hardware.lower() not in {k.lower() for k in PROFILES}:
            raise SpecError("hardware", f"unknown profile {self.hardware!r}; known: "
                                        f"{', '.join(PROFILES)}")
        self._check_topology(set(names))
        self._check_parallel()

    def _check_topology(self, names: set[str]) -> None:
        for src, dst in self.topology:
            for end in (src, dst):
                if end not in names:
                    raise SpecError("topology", f"unknown module {end!r} in edge {src} -> {dst}")
            if src == dst:
                raise SpecError("topology", f"self edge {src} -> {dst}")
        connected = {n for edge in self.topology for n in edge}
        if len(names) > 1 and connected != names:
            raise SpecError("topology", f"modules not connected: {sorted(names - connected)}")
        self.order  # raises on a cycle
        for module in self.modules:
            ups = [self.module(u).kind for u in self.upstream(module.name)]
            if module.kind == ModuleKind.PROJECTOR and ups != [ModuleKind.VISION_ENCODER]:
                raise SpecError("topology", f"projector {module.name!r} must follow one "
                                            "vision encoder")
            if module.kind == ModuleKind.GENERATOR and ModuleKind.LANGUAGE_MODEL not in ups:
                raise SpecError("topology", f"generator {module.name!r} must be conditioned "
                                            "on the language model")
            if module.kind == ModuleKind.VISION_ENCODER and ups:
                raise SpecError("topology", f"vision encoder {module.name!r} has inputs")
            if module.kind == ModuleKind.PROJECTOR:
                self._check_projector(module)

    def _check_projector(self, projector: ModuleSpec) -> None:
        encoder = self.module(self.upstream(projector.name)[0])
        merge = encoder.image.merge_size if encoder.image else 1
        if projector.input_size != encoder.hidden_size * merge**2:
            raise SpecError("modules", f"projector {projector.name!r}: input_size "
                            f"{projector.input_size} != {encoder.name} hidden_size * "
                            f"merge_size**2 = {encoder.hidden_size * merge**2}")
        for name in self.downstream(projector.name):
            if self.module(name).hidden_size != projector.hidden_size:
                raise SpecError("modules", f"projector {projector.name!r}: hidden_size "
                                f"{projector.hidden_size} != {name} hidden_size "
                                f"{self.module(name).hidden_size}")

    def _check_parallel(self) -> None:
        par = self.parallel
        for module in self.modules:
            if not module.is_transformer:
                continue
            if module.num_attention_heads % par.tp:
                raise SpecError("parallel.tp", f"tp={par.tp} does not divide the "
                                f"{module.num_attention_heads} heads of {module.name!r}")
            if module.query_groups % par.tp:
                raise SpecError("parallel.tp", f"tp={par.tp} does not divide the "
                                f"{module.query_groups} query groups of {module.name!r}")
            if par.pp > module.num_layers:
                raise SpecError("parallel.pp", f"pp={par.pp} is larger than the "
                                f"{module.num_layers} layers of {module.name!r}")
        layers = sum(m.num_layers for m in self.modules if m.is_transformer)
        if par.pp * par.vp > layers:
            raise SpecError("parallel.vp", f"pp*vp={par.pp * par.vp} stages exceed the "
                                           f"{layers} transformer layers")

    @property
    def order(self) -> tuple[str, ...]:
        """Module names in topological order (ties kept in listing order)."""
        names = [m.name for m in self.modules]
        indegree = {n: 0 for n in names}
        for _, dst in self.topology:
            indegree[dst] += 1
        done: list[str] = []
        ready = [n for n in names if indegree[n] == 0]
        while ready:
            name = ready.pop(0)
            done.append(name)
            for src, dst in self.topology:
                if src == name:
                    indegree[dst] -= 1
                    if indegree[dst] == 0:
                        ready.append(dst)
            ready.sort(key=names.index)
        if len(done) != len(names):
            raise SpecError("topology", "the module graph has a cycle")
        return tuple(done)

    def module(self, name: str) -> ModuleSpec:
        """The module of this name."""
        for module in self.modules:
            if module.name == name:
                return module
        raise KeyError(f"{self.name} has no module {name!r}")

    def upstream(self, name: str) -> tuple[str, ...]:
        """Modules feeding this one."""
        return tuple(src for src, dst in self.topology if dst == name)

    def downstream(self, name: str) -> tuple[str, ...]:
        """Modules this one feeds."""
        return tuple(dst for src, dst in self.topology if src == name)

    @property
    def language_model(self) -> ModuleSpec:
        """The LM module."""
        return next(m for m in self.modules if m.kind == ModuleKind.LANGUAGE_MODEL)

    def modules_of(self, kind: ModuleKind) -> tuple[ModuleSpec, ...]:
        """Modules of one kind, in topological order."""
        return tuple(self.module(n) for n in self.order if self.module(n).kind == kind)

    def condition_hidden(self, name: str) -> int:
        """Width of the sequence a cross-attending module is conditioned on."""
        ups = [self.module(u) for u in self.upstream(name)]
        return max((u.hidden_size for u in ups), default=0)

    def layer_params(self, name: str) -> int:
        """Weights of one layer of a module."""
        return self.module(name).layer_params(self.condition_hidden(name))

    def has_head(self, name: str) -> bool:
        """The module ends in its own output head and loss: every module but an LM that
        only conditions a downstream generator (text-to-video)."""
        return self.module(name).kind != ModuleKind.LANGUAGE_MODEL or not self.downstream(name)

    def output_params(self, name: str) -> int:
        """Weights behind a module's last layer, as this model uses it."""
        return self.module(name).output_params(self.has_head(name))

    def part_params(self, name: str, first: int, last: int) -> int:
        """Weights of layers [first, last) of a module, with its input weights when
        first == 0 and its output weights when last is its last layer."""
        module = self.module(name)
        count = (last - first) * self.layer_params(name)
        if first == 0:
            count += module.input_params()
        if last == module.num_layers:
            count += self.output_params(name)
        return count

    def module_params(self, name: str) -> int:
        """All weights of a module."""
        return self.module(name).params(self.condition_hidden(name), self.has_head(name))

    @property
    def total_params(self) -> int:
        """All weights of the model."""
        return sum(self.module_params(m.name) for m in self.modules)


def model_to_dict(model: ModelSpec) -> dict:
    """Plain JSON-ready form of a spec (enums by value, derived counts added)."""
    def plain(value):
        if isinstance(value, enum.Enum):
            return value.value
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    data = plain(model)
    data["topology"] = [f"{src} -> {dst}" for src, dst in model.topology]
    data["order"] = list(model.order)
    data["params"] = {m.name: model.module_params(m.name) for m in model.modules}
    data["total_params"] = model.total_params
    data["num_microbatches"] = model.parallel.num_microbatches
    data["world_size"] = model.parallel.world_size
    return data
