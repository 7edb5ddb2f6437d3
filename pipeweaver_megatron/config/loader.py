"""Load model specs from YAML into validated dataclasses.

Every error names the file, the key path and the reason, e.g.
``model_configs/vlm-s.yaml: modules[0].num_attention_heads: 15 heads do not divide
hidden_size 1792``. Unknown keys are errors, never ignored.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.resources
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, SpecError
from .model import ModelSpec, model_to_dict
from .modules import ImageRule, ModuleSpec, VideoRule
from .parallel import ParallelSpec

_MODEL_KEYS = {"name", "description", "hardware", "dataset", "modules", "topology", "parallel"}


def config_dir() -> Path:
    """The directory holding the shipped model_configs/*.yaml."""
    return Path(str(importlib.resources.files("pipeweaver_megatron.model_configs")))


def list_models() -> list[str]:
    """Names of the shipped setups."""
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def resolve_model(model: str | Path) -> Path:
    """A MODEL argument: an existing path, or a name from model_configs/ (any case)."""
    path = Path(model)
    if path.is_file():
        return path
    candidate = config_dir() / f"{str(model).lower()}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(str(model), "", f"no such file and no shipped model of that name; "
                                      f"known: {', '.join(list_models())}")


def load_model(model: str | Path, parallel: typing.Mapping[str, int] | None = None) -> ModelSpec:
    """Load and validate a setup given by name or path.

    parallel: overrides of its `parallel:` settings (a run's tp, pp, dp,
    global_batch_size, ... flags), validated like the file's own values.
    """
    path = resolve_model(model)
    data = _read_yaml(path)
    spec = _build_model(data, str(path))
    if not parallel:
        return spec
    try:
        unknown = set(parallel) - {f.name for f in dataclasses.fields(spec.parallel)}
        if unknown:
            raise SpecError("parallel", f"unknown settings {sorted(unknown)}")
        return dataclasses.replace(spec, parallel=dataclasses.replace(spec.parallel, **parallel))
    except SpecError as error:
        key = error.key if error.key.startswith("parallel") else f"parallel.{error.key}"
        raise ConfigError(str(path), key,
                          f"{error.reason} (with the run's overrides {dict(parallel)})") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(str(path), "", f"not valid YAML{where}: "
                                         f"{getattr(exc, 'problem', exc)}") from None
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "", "the top level must be a mapping")
    return data


def _build_model(data: dict[str, Any], source: str) -> ModelSpec:
    unknown = sorted(set(data) - _MODEL_KEYS)
    if unknown:
        raise ConfigError(source, unknown[0], f"unknown key; allowed: {', '.join(sorted(_MODEL_KEYS))}")
    for key in ("name", "modules", "topology", "parallel"):
        if key not in data:
            raise ConfigError(source, key, "missing")
    if not isinstance(data["modules"], list) or not data["modules"]:
        raise ConfigError(source, "modules", "must be a non-empty list")
    modules = tuple(_build_module(entry, source, f"modules[{i}]")
                    for i, entry in enumerate(data["modules"]))
    topology = _parse_topology(data["topology"], source)
    parallel = build_dataclass(ParallelSpec, data["parallel"], source, "parallel")
    fields = {k: data[k] for k in ("name", "description", "hardware", "dataset") if k in data}
    for key, value in fields.items():
        if not isinstance(value, str):
            raise ConfigError(source, key, f"expected a string, got {value!r}")
    try:
        return ModelSpec(modules=modules, topology=topology, parallel=parallel, source=source,
                         **fields)
    except SpecError as exc:
        raise ConfigError(source, exc.key, exc.reason) from None


def _build_module(entry: Any, source: str, key: str) -> ModuleSpec:
    if not isinstance(entry, dict):
        raise ConfigError(source, key, "must be a mapping")
    entry = dict(entry)
    component = entry.pop("component", None)
    if component is not None:
        comp_path = config_dir() / "components" / f"{component}.yaml"
        if not comp_path.is_file():
            known = sorted(p.stem for p in (config_dir() / "components").glob("*.yaml"))
            raise ConfigError(source, f"{key}.component",
                              f"unknown component {component!r}; known: {', '.join(known)}")
        base = _read_yaml(comp_path)
        # Keys of the component file are checked against its own name first.
        build_dataclass(ModuleSpec, {"name": "component", **base}, str(comp_path), "",
                        partial=True)
        entry = {**base, **entry}
    return build_dataclass(ModuleSpec, entry, source, key)


def spec_document(model: ModelSpec) -> dict[str, Any]:
    """A spec as the YAML document load_model reads back into an equal spec (a spec
    derived from Megatron-LM's flags travels to the planner workers this way):
    model_to_dict's keys that a setup file has, unset rules left out."""
    data = model_to_dict(model)
    data["modules"] = [{k: v for k, v in m.items() if v is not None} for m in data["modules"]]
    return {key: data[key] for key in sorted(_MODEL_KEYS)}


def _parse_topology(value: Any, source: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list):
        raise ConfigError(source, "topology", 'must be a list of chains like "vision -> lm"')
    edges: list[tuple[str, str]] = []
    for i, chain in enumerate(value):
        names = [n.strip() for n in str(chain).split("->")]
        if len(names) < 2 or not all(names):
            raise ConfigError(source, f"topology[{i}]", f'{chain!r} is not a chain "a -> b"')
        edges.extend(zip(names, names[1:]))
    return tuple(edges)


def build_dataclass(cls: type, data: Any, source: str, key: str, partial: bool = False) -> Any:
    """Build a config dataclass from a mapping, converting and checking every field.

    partial=True only checks the keys and value types present (for component files that
    are completed by the setup that uses them).
    """
    if not isinstance(data, dict):
        raise ConfigError(source, key, f"must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    allowed = [name for name in fields if name != "source"]
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub = f"{key}.{name}" if key else str(name)
        if name not in allowed:
            raise ConfigError(source, sub, f"unknown key; allowed: {', '.join(allowed)}")
        kwargs[name] = _convert(hints[name], value, source, sub)
    if partial:
        return kwargs
    try:
        return cls(**kwargs)
    except SpecError as exc:
        raise ConfigError(source, f"{key}.{exc.key}" if key else exc.key, exc.reason) from None
    except TypeError as exc:
        missing = [n for n, f in fields.items() if n not in kwargs
                   and f.default is dataclasses.MISSING and n != "source"]
        reason = f"missing keys: {', '.join(missing)}" if missing else str(exc)
        raise ConfigError(source, key, reason) from None


def _convert(hint: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, source, key)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, source, key)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            choices = ", ".join(e.value for e in hint)
            raise ConfigError(source, key, f"{value!r} is not one of: {choices}") from None
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(source, key, f"unsupported field type {hint}")  # pragma: no cover


__all__ = ["load_model", "resolve_model", "list_models", "config_dir", "build_dataclass", "spec_document",
           "ImageRule", "VideoRule"]
