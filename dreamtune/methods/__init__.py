"""Personalization methods behind one protocol (see base.py), registered here by name.

A method is one module with a `Method` subclass that declares what it knows: its defaults, its own
options (a dataclass read from the config's `[<method name>]` table), its traits (new tokens, kind
of artifact, exports) and its extra commands. Adding one is that module plus one line in `METHODS`
(or `register_method` at run time, e.g. from a plugin or a test).
"""

from __future__ import annotations

import importlib

from ..errors import ConfigError
from .base import Components, Method

# name -> "module:Class"; modules are imported on first use.
METHODS: dict[str, str | type[Method]] = {
    "dreambooth": "dreamtune.methods.dreambooth:DreamBooth",
    "custom_diffusion": "dreamtune.methods.custom_diffusion:CustomDiffusion",
    "textual_inversion": "dreamtune.methods.textual_inversion:TextualInversion",
    "lora": "dreamtune.methods.lora:LoRA",
}


def register_method(method: str | type[Method], name: str | None = None) -> None:
    """Register a Method class (or its "module:Class" path) under `name` (default: the class's own `name`)."""
    if name is None:
        if isinstance(method, str):
            raise ValueError("register_method: give the name of a method registered by its path")
        name = method.name
    METHODS[name] = method


def get_method(name: str) -> type[Method]:
    """The Method class registered under `name`."""
    if name not in METHODS:
        raise ConfigError(f"method: unknown method '{name}'; one of {', '.join(METHODS)}.")
    target = METHODS[name]
    if not isinstance(target, str):
        return target
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise ConfigError(f"method: '{name}' is not available in this version of dreamtune.") from None
        raise
    return getattr(module, class_name)


def method_names() -> list[str]:
    """The names of the registered methods, in registration order."""
    return list(METHODS)


__all__ = ["Components", "Method", "METHODS", "get_method", "method_names", "register_method"]
