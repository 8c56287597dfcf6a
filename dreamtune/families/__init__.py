"""Model families behind one protocol (see base.py), registered here by name.

The next family is one more module and one line here.
"""

from __future__ import annotations

import importlib

from ..errors import ModelLoadError
from .base import Family, PromptEmbeds, TextEncoderSlot, tokenize

# name -> "module:Class", most specific first: detection asks each in this order.
FAMILIES = {
    "sdxl": "dreamtune.families.sdxl:StableDiffusionXL",
    "sd": "dreamtune.families.sd:StableDiffusion",
}


def get_family(name: str) -> type[Family]:
    """The Family class registered under `name`."""
    if name not in FAMILIES:
        raise ModelLoadError(f"unknown model family '{name}'; one of {', '.join(FAMILIES)}.")
    module_name, class_name = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def family_of(pipe, source: str = "") -> Family:
    """The family of a loaded pipeline, checked to be trainable; a ModelLoadError names what it is otherwise."""
    source = source or type(pipe).__name__
    for name in FAMILIES:
        family = get_family(name)
        if family.matches(pipe):
            family.check_trainable(pipe, source)
            return family()
    raise ModelLoadError(
        f"{source}: a {type(pipe).__name__}, which dreamtune cannot train; supported: "
        + ", ".join(get_family(n).title for n in FAMILIES) + "."
    )


def encoder_slots(pipe) -> list[tuple[str, object, object]]:
    """(label, tokenizer, text encoder) of each text encoder of a pipeline, in its family's order."""
    family = family_of(pipe)
    return [(s.label, getattr(pipe, s.tokenizer), getattr(pipe, s.encoder)) for s in family.text_encoders]


def family_of_single_file(path, keys: list[str]) -> type[Family] | None:
    """The family whose single-file layout these tensor names follow, or None."""
    for name in FAMILIES:
        family = get_family(name)
        if family.matches_single_file(keys):
            return family
    return None


__all__ = ["FAMILIES", "Family", "PromptEmbeds", "TextEncoderSlot", "encoder_slots", "family_of", "family_of_single_file",
           "get_family", "tokenize"]
