"""The shapes world: a procedural image world, its shipped tiny base model, subjects and an exact oracle.

The world is a user of the dreamtune library (the library never imports it). `MODEL_DIR` is the
shipped base model: a diffusers `StableDiffusionPipeline` folder trained on this world.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"

from .oracle import Reading, read  # noqa: E402
from .render import CLASSES, COLOURS, HELD_OUT, Scene, render_pil  # noqa: E402
from .subjects import (  # noqa: E402
    SUBJECTS,
    Subject,
    generate_subjects,
    get_subject,
    subject_prompts,
    write_subject_images,
)

__all__ = [
    "CLASSES",
    "COLOURS",
    "HELD_OUT",
    "MODEL_DIR",
    "SUBJECTS",
    "Reading",
    "Scene",
    "Subject",
    "generate_subjects",
    "get_subject",
    "read",
    "render_pil",
    "subject_prompts",
    "write_subject_images",
]
