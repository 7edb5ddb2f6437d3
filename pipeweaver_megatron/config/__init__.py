"""Typed, validated specs: modules, topology, parallel settings, hardware."""

from .errors import ConfigError, SpecError
from .hardware import PROFILES, HardwareProfile, get_hardware
from .loader import config_dir, list_models, load_model, resolve_model, spec_document
from .model import ModelSpec, model_to_dict
from .modules import ImageRule, ModuleKind, ModuleSpec, VideoRule
from .parallel import ParallelSpec

__all__ = [
    "ConfigError", "SpecError", "PROFILES", "HardwareProfile", "get_hardware", "config_dir",
    "list_models", "load_model", "resolve_model", "spec_document", "ModelSpec", "model_to_dict", "ImageRule", "ModuleKind",
    "ModuleSpec", "VideoRule", "ParallelSpec",
]
