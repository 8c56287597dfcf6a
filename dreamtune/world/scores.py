"""Scores of a personalized model in the papers' protocol, read by the oracle, with bootstrap intervals.

Personalized prompts ("a photo of a small sks star on a green background") are scored
image by image for both things at once, the DreamBench way:

- subject fidelity: the share of the subject's identity (class, colour, second colour, pattern,
  pattern geometry) the image matches; "subject present" when it matches all of it. An attribute
  the prompt itself changes (a property prompt's colour) is left out of the identity for that image.
- prompt fidelity: the share of the attributes the prompt names (background, size, colour)
  that the image honours, per attribute and overall. The subject's own class is never counted: it is
  the subject's, not the prompt's.
- joint success: the share of images with the subject present and every named attribute honoured.

Images of the plain class prompt ("a photo of a star") give language drift (the share that show the
subject's look: pattern, its geometry and both colours) and diversity (the chance two of them differ
in an attribute). Every figure has a 95% bootstrap interval that resamples prompts, then images
within each, so a reader can tell a difference from noise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import oracle
from .render import CLASSES, COLOURS, SIZES, Scene

# Position is not in the world's vocabulary (render.CAPTION_KEEP): no prompt names a place.
PROMPT_ATTRIBUTES = ("background", "size", "colour")
BOOTSTRAP_SAMPLES = 1000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Figure:
    """A measured share with its bootstrap interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        if np.isnan(self.value):
            return "  -"
        return f"{self.value:.2f} [{self.low:.2f},{self.high:.2f}]"

    def as_dict(self) -> dict:
        """{"value", "low", "high"}."""
        return {"value": self.value, "low": self.low, "high": self.high}


def bootstrap(numerators: np.ndarray, denominators: np.ndarray | None = None, *, seed: int = 0,
              samples: int = BOOTSTRAP_SAMPLES) -> Figure:
    """Ratio of sums of a [prompts, images] table with a bootstrap interval: prompts resampled, then images.

    `denominators` (default all ones) lets a cell count for several checks or for none (0).
    """
    num = np.asarray(numerators, dtype=np.float64)
    den = np.ones_like(num) if denominators is None else np.asarray(denominators, dtype=np.float64)
    if num.ndim != 2 or num.size == 0 or den.sum() == 0:
        return Figure(float("nan"), float("nan"), float("nan"))
    value = float(num.sum() / den.sum())
    prompts, images = num.shape
    rng = np.random.default_rng(seed)
    pick_prompt = rng.integers(prompts, size=(samples, prompts, 1))
    pick_image = rng.integers(images, size=(samples, prompts, images))
    totals = den[pick_prompt, pick_image].sum(axis=(1, 2))
    ratios = num[pick_prompt, pick_image].sum(axis=(1, 2)) / np.where(totals > 0, totals, np.nan)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.nanpercentile(ratios, [tail, 100 - tail])
    return Figure(value, float(low), float(high))


_BACKGROUND = re.compile(r"on an? (\w+) background")
_COLOUR_WORDS = "|".join(COLOURS)
_SIZE_WORDS = "|".join(SIZES)


def prompted_attributes(text: str) -> dict:
    """The attributes a shapes-world prompt names, read from its words (the class is left out).

    "a photo of a small green sks star on a blue background" gives
    {"background": "blue", "size": "small", "colour": "green"}.
    """
    wanted: dict = {}
    match = _BACKGROUND.search(text)
    if match and match.group(1) in COLOURS:
        wanted["background"] = match.group(1)
        text = text[:match.start()] + text[match.end():]
    # Size and colour stand before the noun phrase's last words ("a small green sks star").
    words = re.sub(r"[^a-z ]", " ", text.lower()).split()
    for word in words:
        if re.fullmatch(_SIZE_WORDS, word):
            wanted["size"] = word
        elif re.fullmatch(_COLOUR_WORDS, word) and "colour" not in wanted:
            # A pattern's colour follows "with": "a star with white stripes" names the second colour.
            index = words.index(word)
            if "with" not in words[:index]:
                wanted["colour"] = word
    return {k: wanted[k] for k in PROMPT_ATTRIBUTES if k in wanted}


_CLASS = re.compile(r"\b(" + "|".join(CLASSES) + r")\b")


def caption_attributes(text: str) -> dict:
    """Every attribute a world caption names, its class included (`prompted_attributes` and the class noun).

    Raises ValueError when the text names no class of the world.
    """
    found = _CLASS.search(text)
    if not found:
        raise ValueError(f"not a world caption (no class noun): {text!r}")
    return {"class": found.group(1), **prompted_attributes(text)}


def caption_fits(named: dict, scene: Scene) -> bool:
    """True when a caption naming `named` (from `caption_attributes`) describes the scene."""
    have = {"class": scene.cls, "colour": scene.colour, "background": scene.background, "size": scene.size}
    return all(have[k] == v for k, v in named.items())


@dataclass
class SubjectScores:
    """Every figure of one model on one subject (each a `Figure`)."""

    subject_fidelity: Figure
    subject_present: Figure
    prompt_fidelity: Figure
    joint: Figure
    per_attribute: dict[str, Figure]
    language_drift: Figure
    diversity: Figure
    images_per_prompt: int
    prompts: int

    def as_dict(self) -> dict:
        """Plain numbers for JSON: each figure as {"value", "low", "high"}."""
        out = {k: getattr(self, k).as_dict() for k in ("subject_fidelity", "subject_present", "prompt_fidelity",
                                                        "joint", "language_drift", "diversity")}
        out["per_attribute"] = {k: f.as_dict() for k, f in self.per_attribute.items()}
        out["images_per_prompt"] = self.images_per_prompt
        out["prompts"] = self.prompts
        return out

    @classmethod
    def from_dict(cls, data: dict) -> SubjectScores:
        """The inverse of `as_dict` (and of `dataclasses.asdict`), for scores read back from JSON."""
        def figure(d: dict) -> Figure:
            return Figure(float(d["value"]), float(d["low"]), float(d["high"]))

        names = ("subject_fidelity", "subject_present", "prompt_fidelity", "joint", "language_drift", "diversity")
        return cls(**{k: figure(data[k]) for k in names},
                   per_attribute={k: figure(v) for k, v in data.get("per_attribute", {}).items()},
                   images_per_prompt=int(data["images_per_prompt"]), prompts=int(data["prompts"]))


def _diversity_figure(readings: Sequence[oracle.Reading], seed: int, samples: int = 300) -> Figure:
    value = oracle.diversity(readings)
    if len(readings) < 2:
        return Figure(value, value, value)
    rng = np.random.default_rng(seed)
    values = [oracle.diversity([readings[i] for i in rng.integers(len(readings), size=len(readings))])
              for _ in range(samples)]
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Figure(value, float(low), float(high))


def score_subject(readings: Sequence[Sequence[oracle.Reading]], wanted: Sequence[dict], identity: dict,
                  class_readings: Sequence[oracle.Reading], *, seed: int = 0) -> SubjectScores:
    """Score a model on a subject from oracle readings.

    `readings[p]` are the images of prompt p (the same number for every prompt), `wanted[p]` the
    attributes it names (`SubjectPrompt.attributes`; a class there is ignored), `identity` the
    subject's (`Subject.identity()` or `oracle.subject_signature(references)`), `class_readings` the
    images of the plain class prompt.
    """
    counts = {len(r) for r in readings}
    if len(counts) != 1:
        raise ValueError(f"every prompt needs the same number of images, got {sorted(counts)}")
    shape = (len(readings), counts.pop())
    match, present, joint = (np.zeros(shape) for _ in range(3))
    honoured = {k: np.zeros(shape) for k in PROMPT_ATTRIBUTES}
    named = {k: np.zeros(shape) for k in PROMPT_ATTRIBUTES}
    for p, (images, asked) in enumerate(zip(readings, wanted)):
        asked = {k: v for k, v in asked.items() if k in PROMPT_ATTRIBUTES}
        # What the prompt changes is no longer the subject's to keep.
        keys = [k for k in oracle.IDENTITY if k not in asked]
        for i, reading in enumerate(images):
            got = reading.attributes()
            same = [got.get(k) == identity.get(k) for k in keys]
            match[p, i] = np.mean(same)
            present[p, i] = all(same)
            ok = [got.get(k) == v for k, v in asked.items()]
            for (k, _), hit in zip(asked.items(), ok):
                honoured[k][p, i] = hit
                named[k][p, i] = 1
            joint[p, i] = present[p, i] and all(ok)
    all_honoured = sum(honoured.values())
    all_named = sum(named.values())
    per_attribute = {k: bootstrap(honoured[k], named[k], seed=seed) for k in PROMPT_ATTRIBUTES if named[k].sum()}
    drift = np.array([[oracle.shows_identity(r, identity) for r in class_readings]], dtype=np.float64)
    return SubjectScores(
        subject_fidelity=bootstrap(match, seed=seed),
        subject_present=bootstrap(present, seed=seed),
        prompt_fidelity=bootstrap(all_honoured, all_named, seed=seed),
        joint=bootstrap(joint, seed=seed),
        per_attribute=per_attribute,
        language_drift=bootstrap(drift, seed=seed) if len(class_readings) else Figure(*(3 * [float("nan")])),
        diversity=_diversity_figure(class_readings, seed),
        images_per_prompt=shape[1],
        prompts=shape[0],
    )


def format_scores(name: str, scores: SubjectScores, width: int = 18) -> str:
    """One row: `name  subject 0.75 [0.70,0.80]  present ...  prompt ...  joint ...  drift ...  div ...`."""
    return (f"{name:<{width}} subject {scores.subject_fidelity}  present {scores.subject_present}  "
            f"prompt {scores.prompt_fidelity}  joint {scores.joint}  drift {scores.language_drift}  "
            f"div {scores.diversity}")


def format_attributes(scores: SubjectScores, width: int = 18) -> str:
    """The per-attribute prompt fidelity of one model, on one line."""
    return f"{'':<{width}} " + "  ".join(f"{k} {f}" for k, f in scores.per_attribute.items())
