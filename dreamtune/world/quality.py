"""Measure a shapes-world base model with the oracle: does it draw what the prompt asks for?

The main check prompts for combinations held out of training, so it measures composition of words
rather than recall of training images: objects in the colour-class pairs pretraining never drew
("a photo of a small blue triangle on a green background"), each with a background and a size.
Every attribute a prompt names is scored on every image, with a 95% bootstrap interval (prompts,
then images, resampled). Captions never name patterns (`render.CAPTION_KEEP`), so no prompt does;
beside the scores, the share of images showing a two-colour object tells whether the base model
draws the patterned half of its world at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import oracle, render
from .render import COLOURS, HELD_OUT, SIZES, describe

DEFAULT_GUIDANCE = 3.0
DEFAULT_STEPS = 25
DEFAULT_IMAGES_PER_PROMPT = 8
QUALITY_ATTRIBUTES = ("class", "colour", "background", "size")
# Not scored against a prompt: the share of images the oracle reads as a two-colour object.
TWO_COLOUR = "two-colour"


def load_base_pipeline(model_dir: str | Path | None = None):
    """Load a shapes-world model folder (default: the shipped one) as a float32 StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from ..errors import ModelLoadError
    from . import MODEL_DIR

    model_dir = Path(model_dir or MODEL_DIR)
    if not (model_dir / "model_index.json").exists():
        raise ModelLoadError(f"{model_dir}: no model_index.json; pass a diffusers pipeline folder")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: Sequence[str], *, images_per_prompt: int = 1, seed: int = 0,
             steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, batch_size: int = 32,
             progress: bool = False) -> list:
    """Sample images for prompts (each repeated `images_per_prompt` times), reproducibly from `seed`."""
    from tqdm.auto import tqdm

    queue = [p for p in prompts for _ in range(images_per_prompt)]
    images = []
    size = render.RESOLUTION
    for start in tqdm(range(0, len(queue), batch_size), desc="sampling", disable=not progress):
        chunk = queue[start:start + batch_size]
        generator = torch.Generator().manual_seed(seed * 100_003 + start)
        out = pipe(chunk, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                   generator=generator)
        images.extend(out.images)
    return images


def _layout(rng: np.random.Generator, colours: tuple[str, ...]) -> tuple[str, str]:
    background = str(rng.choice([c for c in COLOURS if c not in colours]))
    return background, str(rng.choice(list(SIZES)))


def held_out_prompts(per_pair: int = 6, seed: int = 0) -> list[tuple[str, dict]]:
    """Prompts for every held-out colour-class pair, `per_pair` of them with a seeded background and size.

    The pattern is left open, as in every caption.
    """
    rng = np.random.default_rng([seed, 7])
    prompts = []
    for colour, cls in HELD_OUT:
        for _ in range(per_pair):
            background, size = _layout(rng, (colour,))
            prompts.append((describe(cls, colour=colour, background=background, size=size),
                            {"class": cls, "colour": colour, "background": background, "size": size}))
    return prompts


def seen_prompts(count: int = 24, seed: int = 1) -> list[tuple[str, dict]]:
    """Prompts for random colour-class-background combinations of the training distribution."""
    prompts = []
    for scene in render.iter_scenes(seed, count):
        prompts.append((describe(scene.cls, colour=scene.colour, background=scene.background, size=scene.size),
                        {"class": scene.cls, "colour": scene.colour, "background": scene.background,
                         "size": scene.size}))
    return prompts


def score_prompts(readings: Sequence[oracle.Reading], truths: Sequence[dict], images_per_prompt: int,
                  seed: int = 0) -> dict:
    """Per-attribute share honoured over images (grouped `images_per_prompt` to a prompt), with intervals.

    Returns {attribute: share, ..., "intervals": {attribute: [low, high]}, "samples": n, "per_class": {...}}.
    """
    from .scores import bootstrap

    prompts = len(readings) // images_per_prompt
    shape = (prompts, images_per_prompt)
    result: dict = {"samples": len(readings), "intervals": {}}
    for key in QUALITY_ATTRIBUTES:
        if not any(key in t for t in truths):
            continue
        hits = np.array([r.attributes().get(key) == t.get(key) for r, t in zip(readings, truths)], dtype=float)
        named = np.array([key in t for t in truths], dtype=float)
        figure = bootstrap(hits.reshape(shape) * named.reshape(shape), named.reshape(shape), seed=seed)
        result[key] = figure.value
        result["intervals"][key] = [figure.low, figure.high]
    per_class = {}
    for cls in sorted({t["class"] for t in truths}):
        picked = [(r, t) for r, t in zip(readings, truths) if t["class"] == cls]
        per_class[cls] = float(np.mean([r.cls == t["class"] for r, t in picked]))
    result["per_class"] = per_class
    two_colour = np.array([r.pattern != "plain" for r in readings], dtype=float).reshape(shape)
    figure = bootstrap(two_colour, np.ones(shape), seed=seed)
    result[TWO_COLOUR] = figure.value
    result["intervals"][TWO_COLOUR] = [figure.low, figure.high]
    return result


def measure_quality(model_dir: str | Path | None = None, *, images_per_prompt: int = DEFAULT_IMAGES_PER_PROMPT,
                    steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, seed: int = 0,
                    max_prompts: int | None = None, include_seen: bool = True, progress: bool = True,
                    pipe=None) -> dict:
    """Sample the held-out prompts (with `include_seen`, seen ones too) and score them with the oracle.

    Returns {"held_out": {attribute: share, "two-colour": share, "intervals": {...}, "samples": n,
    "per_class": {...}}, "seen": {...}, "steps": ..., "guidance": ..., "images_per_prompt": ...}.
    `max_prompts` caps each prompt set (for quick checks).
    """
    pipe = pipe or load_base_pipeline(model_dir)
    sets = {"held_out": held_out_prompts(seed=seed)}
    if include_seen:
        sets["seen"] = seen_prompts()
    result: dict = {"steps": steps, "guidance": guidance, "images_per_prompt": images_per_prompt, "seed": seed}
    for name, prompts in sets.items():
        if max_prompts:
            prompts = prompts[:max_prompts]
        texts = [p for p, _ in prompts]
        truths = [t for _, t in prompts for _ in range(images_per_prompt)]
        images = generate(pipe, texts, images_per_prompt=images_per_prompt, seed=seed, steps=steps,
                          guidance=guidance, progress=progress)
        result[name] = score_prompts(oracle.read_all(images), truths, images_per_prompt, seed=seed)
    return result


_SET_NAMES = {"held_out": "held-out", "seen": "seen"}


def format_quality(result: dict) -> str:
    """A plain-text table of a `measure_quality` result: one row per prompt set, each figure with its interval."""
    lines = [f"sampling: {result['steps']} steps, guidance {result['guidance']}, "
             f"{result['images_per_prompt']} images per prompt; 95% bootstrap intervals in brackets"]
    columns = QUALITY_ATTRIBUTES + (TWO_COLOUR,)
    lines.append(f"{'prompts':<9} {'samples':>7}  " + "  ".join(f"{k:<16}" for k in columns))
    for name in ("held_out", "seen"):
        if name not in result:
            continue
        r = result[name]
        cells = []
        for key in columns:
            if key in r:
                low, high = r["intervals"][key]
                cells.append(f"{r[key]:.2f} [{low:.2f},{high:.2f}]")
            else:
                cells.append("-")
        lines.append(f"{_SET_NAMES[name]:<9} {r['samples']:>7}  " + "  ".join(f"{c:<16}" for c in cells))
        lines.append("  class by class: " + ", ".join(f"{k} {v:.0%}" for k, v in r["per_class"].items()))
    return "\n".join(lines)
