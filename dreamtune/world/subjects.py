"""Subjects the base model never saw, and DreamBench-style prompts for them.

A subject is a distinct instance of a known class: a star with blue and white stripes, a triangle
with a yellow band, each pattern in one of its geometries (`variant`). Its class, pattern and colour
pair form a combination that pretraining never drew (`render.is_reserved`), and captions never name
a geometry, so words alone cannot pin it down. Each subject has 5 reference images that vary in
size and background, the way DreamBench's photos of one subject do.

Beside the shipped subjects (on which method settings are chosen), `generate_subjects(n, seed)`
draws new ones from the reserved combinations, named "gen-<seed>-<k>"; `get_subject` accepts those
names wherever a subject is named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DreamtuneError
from ..io import save_image
from . import render
from .render import CLASSES, COLOURS, NUM_VARIANTS, PATTERNS, Scene, describe


@dataclass(frozen=True)
class Subject:
    """A named subject: a class, a two-colour pattern, and how to draw its reference images."""

    name: str
    cls: str
    pattern: str
    colour: str
    colour2: str
    description: str
    num_references: int = 5
    # The pattern's geometry (0 .. NUM_VARIANTS - 1): part of the identity, never named in a prompt.
    variant: int = 0

    @property
    def class_noun(self) -> str:
        """The subject's class word, e.g. "star"."""
        return self.cls

    def backgrounds(self) -> tuple[str, ...]:
        """Background colours that leave both of the subject's colours visible."""
        return tuple(c for c in COLOURS if c not in (self.colour, self.colour2))

    def scene(self, background: str, size: str = "large", position: str = "center", **jitter: float) -> Scene:
        """The subject drawn on a background, at a size and position."""
        return Scene(self.cls, self.colour, background, size, position, self.pattern, self.colour2, self.variant,
                     **jitter)

    def identity(self) -> dict:
        """What makes this subject itself, with the keys the oracle reads: class, colours, pattern, variant."""
        return {"class": self.cls, "colour": self.colour, "colour2": self.colour2, "pattern": self.pattern,
                "variant": self.variant}

    def reference_scenes(self) -> list[Scene]:
        """The subject's reference images: varied sizes and backgrounds, seeded by name (always centred:
        position is not in the world's vocabulary)."""
        rng = np.random.default_rng([sum(self.name.encode()), len(self.name)])
        backgrounds = list(self.backgrounds())
        rng.shuffle(backgrounds)
        sizes = ("large", "medium", "large", "medium", "medium", "large")
        scenes = []
        for i in range(self.num_references):
            scenes.append(self.scene(
                backgrounds[i % len(backgrounds)], sizes[i % len(sizes)],
                jitter_x=float(rng.uniform(-0.7, 0.7)), jitter_y=float(rng.uniform(-0.7, 0.7)),
                jitter_scale=float(rng.uniform(0.96, 1.04)),
            ))
        return scenes

    def reference_images(self, resolution: int = render.RESOLUTION) -> list:
        """The reference images as PIL images."""
        return [render.render_pil(s, resolution) for s in self.reference_scenes()]


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in (
        Subject("striped_star", "star", "stripes", "blue", "white", "a blue star with white stripes"),
        Subject("banded_triangle", "triangle", "band", "red", "yellow", "a red triangle with a yellow band"),
        Subject("dashed_ring", "ring", "dashes", "purple", "yellow", "a purple ring with a yellow dashed rim"),
        Subject("eye_circle", "circle", "spot", "green", "white", "a green circle with a white spot in the middle"),
        Subject("checker_square", "square", "checker", "orange", "blue", "an orange and blue checkered square"),
        Subject("split_heart", "heart", "split", "red", "white", "a heart, red on the left and white on the right"),
        Subject("framed_square", "square", "border", "yellow", "purple", "a yellow square with a purple frame"),
    )
}


_GENERATED = re.compile(r"gen-(\d+)-(\d+)")
# The most generated subjects one name may reach into (gen-S-K with K below this).
MAX_GENERATED = 1000


# A subject's second colour covers at least this share of it (and its first colour too): its identity
# must be plain to see, not a star's tips or a spot inside a ring's hole.
SUBJECT_MIN_SHARE = 0.15


def _clearly_two_coloured(cls: str, pattern: str, variant: int) -> bool:
    return render.pattern_visible(Scene(cls, "red", "black", "large", "center", pattern, "white", variant), SUBJECT_MIN_SHARE)


def generate_subjects(n: int, seed: int = 0) -> list[Subject]:
    """`n` new subjects drawn, seeded, from the combinations pretraining never drew, each with a random variant.

    The k-th subject of a seed is the same whatever `n` is, and is named "gen-<seed>-<k>". Shipped
    subjects' combinations and patterns that a class would hide are skipped.
    """
    if n < 0 or n > MAX_GENERATED:
        raise DreamtuneError(f"the number of generated subjects must be 0 to {MAX_GENERATED}, got {n}")
    shipped = {(s.cls, s.pattern, s.colour, s.colour2) for s in SUBJECTS.values()}
    rng = np.random.default_rng([seed, 12])
    subjects: list[Subject] = []
    seen: set = set()
    while len(subjects) < n:
        cls = CLASSES[rng.integers(len(CLASSES))]
        pattern = PATTERNS[1 + rng.integers(len(PATTERNS) - 1)]
        colour, colour2 = (str(c) for c in rng.choice(COLOURS, size=2, replace=False))
        variant = int(rng.integers(NUM_VARIANTS))
        combination = (cls, pattern, colour, colour2)
        if (not render.is_reserved(*combination) or combination in shipped or combination in seen
                or not _clearly_two_coloured(cls, pattern, variant)):
            continue
        seen.add(combination)
        description = describe(cls, colour=colour, pattern=pattern, colour2=colour2, prefix="")
        subjects.append(Subject(f"gen-{seed}-{len(subjects)}", cls, pattern, colour, colour2, description,
                                variant=variant))
    return subjects


def get_subject(name: str) -> Subject:
    """The shipped subject of that name, or a generated one ("gen-<seed>-<k>"); a DreamtuneError otherwise."""
    if name in SUBJECTS:
        return SUBJECTS[name]
    match = _GENERATED.fullmatch(name)
    if match and int(match.group(2)) < MAX_GENERATED:
        seed, index = int(match.group(1)), int(match.group(2))
        return generate_subjects(index + 1, seed)[index]
    raise DreamtuneError(f"unknown subject {name!r}; choose one of: {', '.join(SUBJECTS)}, "
                         f"or a generated one as gen-<seed>-<k> (see `dreamtune world subjects --generate`)")


def write_subject_images(subject: str | Subject, out_dir: str | Path, resolution: int = render.RESOLUTION,
                         captions: bool = False, identifier: str = "sks") -> list[Path]:
    """Write a subject's reference images as PNG files (`00.png`, ...) into `out_dir`; return their paths.

    With `captions`, a same-named .txt beside each image holds "a photo of a <identifier> <class>".
    """
    subject = get_subject(subject) if isinstance(subject, str) else subject
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DreamtuneError(f"{out} is a file; --out needs a folder")
    paths = []
    for i, image in enumerate(subject.reference_images(resolution)):
        path = out / f"{i:02d}.png"
        save_image(image, path)
        if captions:
            from ..io import write_text

            write_text(path.with_suffix(".txt"), f"a photo of a {identifier} {subject.class_noun}\n")
        paths.append(path)
    return paths


@dataclass(frozen=True)
class SubjectPrompt:
    """One evaluation prompt: a template with {identifier} and {class_noun}, and the attributes it asks for."""

    template: str
    kind: str  # "recontextualisation", "size" or "property"
    attributes: dict = field(default_factory=dict)

    def format(self, identifier: str, class_noun: str) -> str:
        """The prompt text for an identifier and class noun."""
        return self.template.format(identifier=identifier, class_noun=class_noun)


def _template(background=None, size=None, position=None, colour=None, prefix="a photo of ") -> str:
    # describe() puts words in the same order as the training captions; "{identifier} {class_noun}"
    # stands where the class word would be.
    text = describe("{identifier} {class_noun}", colour=colour, background=background, size=size,
                    position=position, prefix=prefix)
    # The identifier is not a vowel-initial word, so the article is always "a".
    return text.replace(" an {identifier}", " a {identifier}")


def subject_prompts(subject: str | Subject) -> list[SubjectPrompt]:
    """DreamBench-style prompts for a subject: backgrounds, sizes and property changes.

    Each carries the ground truth the oracle checks: the background, size or colour it asks for
    (the class is always the subject's).
    """
    subject = get_subject(subject) if isinstance(subject, str) else subject
    prompts = [SubjectPrompt(_template(), "recontextualisation", {})]
    for background in subject.backgrounds():
        prompts.append(SubjectPrompt(_template(background=background), "recontextualisation",
                                     {"background": background}))
    for size in ("small", "large"):
        prompts.append(SubjectPrompt(_template(size=size), "size", {"size": size}))
    backgrounds = subject.backgrounds()
    for i, size in enumerate(("small", "large", "small", "large", "medium", "medium")):
        background = backgrounds[(i * 2 + 1) % len(backgrounds)]
        prompts.append(SubjectPrompt(_template(background=background, size=size), "recontextualisation",
                                     {"background": background, "size": size}))
    others = [c for c in COLOURS if c not in (subject.colour, subject.colour2, "black")]
    for colour in others[:3]:
        prompts.append(SubjectPrompt(_template(colour=colour), "property", {"colour": colour}))
    return prompts


def class_prompt(subject: str | Subject) -> str:
    """The plain class prompt ("a photo of a star") used for prior preservation and for drift."""
    subject = get_subject(subject) if isinstance(subject, str) else subject
    return describe(subject.class_noun)


__all__ = ["SUBJECTS", "Subject", "SubjectPrompt", "class_prompt", "generate_subjects", "get_subject",
           "subject_prompts", "write_subject_images"]
