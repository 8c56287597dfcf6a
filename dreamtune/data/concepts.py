"""Concepts: a subject's images, identifier, class noun and prompts, loaded for training."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..config import ConceptConfig
from ..errors import ConfigError
from .images import list_images, load_images, read_caption


@dataclass
class Concept:
    """A concept ready to train: its config, its loaded images and one prompt per image."""

    config: ConceptConfig
    images: list[Image.Image] = field(default_factory=list)
    image_paths: list[Path] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)

    @property
    def class_prompt(self) -> str:
        return self.config.class_prompt_text


def load_concept(config: ConceptConfig, *, skip_bad_images: bool = False, index: int = 0) -> Concept:
    """Load a concept's images; a caption file beside an image replaces the instance prompt for it.

    Captions may use {identifier} and {class_noun}; they are filled in.
    """
    where = f"concepts[{index}].instance_data_dir"
    if not config.instance_data_dir:
        raise ConfigError(f"{where} is not set: give the folder of the subject's images (--instance-data-dir).")
    if not config.class_noun:
        raise ConfigError(f"concepts[{index}].class_noun is not set: give the subject's class, e.g. --class-noun dog.")
    loaded = load_images(list_images(config.instance_data_dir, what=where), skip_bad_images=skip_bad_images)
    if not loaded:
        raise ConfigError(f"{where}: every image in '{config.instance_data_dir}' was unreadable.")
    prompts = []
    for path, _ in loaded:
        caption = read_caption(path)
        prompts.append(config.format(caption) if caption and "{" in caption else caption or config.prompt)
    return Concept(config, [im for _, im in loaded], [p for p, _ in loaded], prompts)
