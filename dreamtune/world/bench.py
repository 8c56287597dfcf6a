"""The shapes world inside `dreamtune bench`: its subjects, their prompts, and the oracle as a scorer.

A bench spec names a world subject with `[[subject]] world = "striped_star"` (or a generated one,
"gen-0-1"); the bench then writes the subject's reference images into its output folder, takes its
class noun, and by default gives it the world's own prompts (`subject_prompts`). `scorers =
["world"]` reads every rendered image with the oracle and reports, per image and its prompt, what
`dreamtune.world.scores` defines: subject fidelity, subject present, prompt fidelity (overall and
per attribute) and joint success, each with a 95% bootstrap interval (prompts resampled, then images).

Language drift and class diversity are not among them: they need images of the plain class prompt,
which a bench scorer is not given (`dreamtune world compare` reports them).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import ConfigError, DreamtuneError

# The columns the bench's tables show for this scorer (key -> title); cells.csv has every key.
TABLE_COLUMNS = {"subject_fidelity": "Subject", "subject_present": "Present", "prompt_fidelity": "Prompt",
                 "joint": "Joint"}


def world_subject(name: str, where: str):
    """The world subject of that name (shipped or "gen-<seed>-<k>"); a ConfigError naming `where` otherwise."""
    from .subjects import get_subject

    try:
        return get_subject(name)
    except DreamtuneError as e:
        raise ConfigError(f"{where}: {e}") from None


def eval_prompts(name: str) -> list:
    """The world's prompts for a subject as bench `EvalPrompt`s ({identifier} filled per cell)."""
    from ..evaluate.prompts import EvalPrompt
    from .subjects import subject_prompts

    return [EvalPrompt(p.template, p.kind) for p in subject_prompts(world_subject(name, "world subject"))]


def write_references(name: str, folder: Path) -> Path:
    """Write a world subject's reference images into `folder` unless they are all there already."""
    from .subjects import write_subject_images

    subject = world_subject(name, "world subject")
    expected = [folder / f"{i:02d}.png" for i in range(len(subject.reference_scenes()))]
    if not all(p.is_file() for p in expected):
        write_subject_images(subject, folder)
    return folder


def _figures(prefix: str, figure) -> dict:
    def plain(x: float):
        return None if math.isnan(x) else x

    return {prefix: plain(figure.value), f"{prefix}_low": plain(figure.low), f"{prefix}_high": plain(figure.high)}


def _by_prompt(readings: list, prompts: list[str]) -> tuple[list[list], list[str]]:
    """Consecutive images of one prompt form a group (as the bench passes them); uneven groups fall back to one image each."""
    groups: list[list] = []
    texts: list[str] = []
    for reading, text in zip(readings, prompts):
        if texts and texts[-1] == text:
            groups[-1].append(reading)
        else:
            groups.append([reading])
            texts.append(text)
    if len({len(g) for g in groups}) > 1:
        return [[r] for r in readings], list(prompts)
    return groups, texts


def world_scorer(images, prompts, subject) -> dict:
    """The oracle's scores of a bench cell (registered in the bench as the scorer "world").

    `images` and `prompts` are the cell's images and the prompt of each (identifier filled in);
    `subject` the bench subject. The subject's identity is the world's truth for a world subject,
    else what the oracle reads on its real images (`subject.images_dir`). The attributes a prompt
    names are read from its words (`scores.prompted_attributes`). Keys: subject_fidelity,
    subject_present, prompt_fidelity, joint and prompt_<attribute>, each with _low and _high (its
    95% bootstrap interval); None where nothing was measured.
    """
    from ..data.images import list_images, load_image
    from . import oracle
    from .scores import prompted_attributes, score_subject

    if len(images) != len(prompts):
        raise ValueError(f"world scorer: {len(images)} images but {len(prompts)} prompts")
    if getattr(subject, "world", None):
        identity = world_subject(subject.world, "world scorer").identity()
    else:
        references = oracle.read_all(load_image(p) for p in list_images(subject.images_dir, what="subject images"))
        identity = oracle.subject_signature(references)
    groups, texts = _by_prompt(oracle.read_all(images), list(prompts))
    figures = score_subject(groups, [prompted_attributes(t) for t in texts], identity, [])
    out: dict = {}
    for key in ("subject_fidelity", "subject_present", "prompt_fidelity", "joint"):
        out.update(_figures(key, getattr(figures, key)))
    for attribute, figure in figures.per_attribute.items():
        out.update(_figures(f"prompt_{attribute}", figure))
    return out


world_scorer.table_columns = TABLE_COLUMNS


def real_class_images(class_noun: str, folder: Path, seed: int = 0, base_model: str | Path | None = None) -> Path:
    """World scenes of a class with their captions, the world's "real images" of it (Custom Diffusion's
    regularisation), captioned as `base_model` (a world pipeline folder; default the shipped one) was pretrained."""
    from .compare import write_real_class_images
    from .render import CLASSES

    if class_noun not in CLASSES:
        raise ConfigError(f"class_data_dir = \"world\": '{class_noun}' is not a shapes-world class ({', '.join(CLASSES)}).")
    if base_model is not None and not (Path(base_model) / "model_index.json").exists():
        base_model = None  # not a world pipeline folder: caption as the shipped model's data
    return write_real_class_images(class_noun, folder, seed=seed, base_model=base_model)
