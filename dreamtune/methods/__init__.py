"""Personalization methods behind one protocol (see base.py), registered here by name."""

from __future__ import annotations

import importlib

from ..errors import ConfigError
from .base import Components, Method

# name -> "module:Class"; modules are imported on first use.
METHODS = {
    "dreambooth": "dreamtune.methods.dreambooth:DreamBooth",
    "custom_diffusion": "dreamtune.methods.custom_diffusion:CustomDiffusion",
    "textual_inversion": "dreamtune.methods.textual_inversion:TextualInversion",
    "lora": "dreamtune.methods.lora:LoRA",
}


def get_method(name: str) -> type[Method]:
    """The Method class registered under `name`."""
    if name not in METHODS:
        raise ConfigError(f"method: unknown method '{name}'; one of {', '.join(METHODS)}.")
    module_name, class_name = METHODS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise ConfigError(f"method: '{name}' is not available in this version of dreamtune.") from None
        raise
    return getattr(module, class_name)


__all__ = ["Components", "Method", "METHODS", "get_method"]
