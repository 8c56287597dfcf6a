"""Measure a shapes-world base model with the oracle: does it draw what the prompt asks for?

The main check prompts for colour-class pairs held out of training ("a photo of a blue triangle on a
green background"), so it measures composition of words rather than recall of training images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import oracle, render
from .render import COLOURS, HELD_OUT, describe

DEFAULT_GUIDANCE = 3.0
DEFAULT_STEPS = 25


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


def held_out_prompts() -> list[tuple[str, dict]]:
    """Prompts for every held-out colour-class pair on every other background, with their truths."""
    prompts = []
    for colour, cls in HELD_OUT:
        for background in COLOURS:
            if background != colour:
                prompts.append((describe(cls, colour=colour, background=background),
                                {"class": cls, "colour": colour, "background": background}))
    return prompts


def seen_prompts(count: int = 24, seed: int = 1) -> list[tuple[str, dict]]:
    """Prompts for random colour-class-background combinations of the training distribution."""
    prompts = []
    for scene in render.iter_scenes(seed, count):
        prompts.append((describe(scene.cls, colour=scene.colour, background=scene.background),
                        {"class": scene.cls, "colour": scene.colour, "background": scene.background}))
    return prompts


def measure_quality(model_dir: str | Path | None = None, *, images_per_prompt: int = 4, steps: int = DEFAULT_STEPS,
                    guidance: float = DEFAULT_GUIDANCE, seed: int = 0, max_prompts: int | None = None,
                    include_seen: bool = True, progress: bool = True, pipe=None) -> dict:
    """Sample the held-out prompts (and, with `include_seen`, seen ones) and score them with the oracle.

    Returns {"held_out": {"class": share, "colour": ..., "background": ..., "samples": n, "per_class": {...}},
    "seen": {...}, "steps": ..., "guidance": ...}. `max_prompts` caps each prompt set (for quick checks).
    """
    pipe = pipe or load_base_pipeline(model_dir)
    sets = {"held_out": held_out_prompts()}
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
        readings = oracle.read_all(images)
        scores = oracle.attribute_accuracy(readings, truths)
        per_class = {}
        for cls in sorted({t["class"] for t in truths}):
            picked = [(r, t) for r, t in zip(readings, truths) if t["class"] == cls]
            per_class[cls] = float(np.mean([r.cls == t["class"] for r, t in picked]))
        result[name] = {**scores, "samples": len(images), "per_class": per_class}
    return result


def format_quality(result: dict) -> str:
    """A short plain-text table of a `measure_quality` result."""
    lines = [f"sampling: {result['steps']} steps, guidance {result['guidance']}, "
             f"{result['images_per_prompt']} images per prompt"]
    lines.append(f"{'prompts':<10} {'samples':>7} {'class':>6} {'colour':>7} {'backgr.':>7}")
    for name in ("held_out", "seen"):
        if name in result:
            r = result[name]
            lines.append(f"{name:<10} {r['samples']:>7} {r['class']:>6.1%} {r['colour']:>7.1%} {r['background']:>7.1%}")
            lines.append("  per class: " + ", ".join(f"{k} {v:.0%}" for k, v in r["per_class"].items()))
    return "\n".join(lines)
