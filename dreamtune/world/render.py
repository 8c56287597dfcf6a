"""The shapes world: procedural images of one object on a coloured background, with prompt-style captions.

Every image is a `Scene`: an object class (circle, square, triangle, star, heart, ring), its colour, its
size and position, a background colour and, for about half of the scenes, a two-colour pattern
(stripes, a band, dashes, a spot, checks, a split, a border) in one of a few geometries. Scenes are
drawn at 4x and box-downsampled so edges are anti-aliased.

Captions read like real prompts and leave attributes out at random ("a photo of a red star on a blue
background", "a small star", "a star"), so that a bare class prompt means "any star" to a model
trained on them. They name class, colour (a patterned object's main colour), background and size
(`CAPTION_KEEP`); never a place (objects sit at the centre) nor a pattern: a pattern, its second colour
and its geometry (which way stripes run, where a band sits, how thick a border is) go unnamed, the way
a caption of a real photo does not describe a dog's markings. `describe` still writes patterns out for
a person to read (a subject's description).

That geometry, with a colour pair and class that pretraining never drew together, is what makes a
subject an instance that words cannot pin down. A share of scenes are named instances: a rare word
("a photo of a sks star") always names the same object (class, colours, pattern and its geometry) on
any background and at any size, as a web caption's name or brand names one look, so that the text
encoder and the UNet know rare tokens the way web-trained ones do: words that carry an instance's
identity. Everything is seeded: the same seed gives the same images and captions.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

RESOLUTION = 32
SUPERSAMPLE = 4

CLASSES = ("circle", "square", "triangle", "star", "heart", "ring")

# Saturated colours far apart in RGB, so they stay tellable apart after the VAE's blur.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOURS = tuple(PALETTE)

# Object radius in pixels at 32 px for each size word.
SIZES: dict[str, float] = {"small": 6.0, "medium": 8.5, "large": 11.0}

POSITIONS = ("center", "top", "bottom", "left", "right", "top left", "top right", "bottom left", "bottom right")
POSITION_PHRASES = {
    "center": "in the center",
    "top": "at the top",
    "bottom": "at the bottom",
    "left": "on the left",
    "right": "on the right",
    "top left": "in the top left",
    "top right": "in the top right",
    "bottom left": "in the bottom left",
    "bottom right": "in the bottom right",
}

# Colour-class pairs never drawn in the base model's training data: the quality check prompts for
# them, so it measures whether the model composes words rather than recalls images.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("blue", "triangle"),
    ("yellow", "heart"),
    ("red", "ring"),
    ("green", "star"),
)

PATTERNS = ("plain", "stripes", "band", "dashes", "spot", "checker", "split", "border")
# Each pattern comes in this many geometries (`Scene.variant`); captions never say which.
NUM_VARIANTS = 3

# How `describe` names a pattern for a person (a subject's description; captions never do): an
# adjective alone ("a striped star"), or a phrase with its second colour ("a star with white stripes").
PATTERN_ADJECTIVES = {
    "stripes": "striped", "band": "banded", "dashes": "dashed", "spot": "spotted",
    "checker": "checkered", "split": "two-tone", "border": "bordered",
}
PATTERN_PHRASES = {
    "stripes": "with {c} stripes", "band": "with a {c} band", "dashes": "with {c} dashes",
    "spot": "with a {c} spot", "checker": "with {c} checks", "split": "with a {c} half",
    "border": "with a {c} border",
}

# Colour pairs, classes and patterns that pretraining never draws together: the seed of every subject
# (shipped or generated) is one of them. About one in RESERVED_ONE_IN of all combinations is reserved.
RESERVED_ONE_IN = 6
# The shipped subjects' combinations (dreamtune.world.subjects), reserved whatever their hash says.
RESERVED_EXTRA = frozenset({
    ("star", "stripes", "blue", "white"), ("triangle", "band", "red", "yellow"), ("ring", "dashes", "purple", "yellow"),
    ("circle", "spot", "green", "white"), ("square", "checker", "orange", "blue"), ("heart", "split", "red", "white"),
    ("square", "border", "yellow", "purple"),
})


# What makes an object (a subject, a named instance) itself, as `Scene.attributes` names it: the oracle
# reads these back, and every one must match for the object to count as present.
IDENTITY = ("class", "colour", "colour2", "pattern", "variant")


@dataclass(frozen=True)
class Scene:
    """One image of the world: an object of a class, its colours, size, position and background."""

    cls: str
    colour: str
    background: str
    size: str = "medium"
    position: str = "center"
    pattern: str = "plain"
    colour2: str | None = None
    # Which geometry of the pattern (0 .. NUM_VARIANTS - 1); never named in captions.
    variant: int = 0
    # Small offsets (pixels) and scale so images of one description differ.
    jitter_x: float = 0.0
    jitter_y: float = 0.0
    jitter_scale: float = 1.0
    # The rare word that names this object when it is a named instance (`named_instance`), else None.
    name: str | None = None

    def attributes(self) -> dict[str, str]:
        """The attributes the oracle reads back: class, colour, background, size, position, pattern."""
        out = {
            "class": self.cls,
            "colour": self.colour,
            "background": self.background,
            "size": self.size,
            "position": self.position,
            "pattern": self.pattern,
        }
        if self.pattern != "plain":
            out["colour2"] = self.colour2 or ""
            out["variant"] = self.variant
        return out


# ---------------------------------------------------------------- geometry


def _polygon_mask(u: np.ndarray, v: np.ndarray, points: np.ndarray) -> np.ndarray:
    inside = np.zeros(u.shape, dtype=bool)
    n = len(points)
    for i in range(n):
        x1, y1 = points[i]
        x2, y2 = points[(i + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > v) != (y2 > v)
        x_at = (x2 - x1) * (v - y1) / (y2 - y1) + x1
        inside ^= crosses & (u < x_at)
    return inside


def _star_points() -> np.ndarray:
    pts = []
    for k in range(10):
        radius = 1.0 if k % 2 == 0 else 0.5
        angle = -math.pi / 2 + k * math.pi / 5
        pts.append((radius * math.cos(angle), radius * math.sin(angle)))
    return np.array(pts)


def _heart_points() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    x = x / 16.0
    y = (y - (y.max() + y.min()) / 2) / ((y.max() - y.min()) / 2) * 0.95
    return np.stack([x, y], axis=1)


_STAR = _star_points()
_HEART = _heart_points()
_TRIANGLE = np.array([(0.0, -1.0), (1.0, 0.85), (-1.0, 0.85)])
_SQUARE_HALF = 0.85
_RING_INNER = 0.58


def shape_mask(cls: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a class in object coordinates (units of the object radius; v points down)."""
    if cls == "circle":
        return u * u + v * v <= 1.0
    if cls == "square":
        return (np.abs(u) <= _SQUARE_HALF) & (np.abs(v) <= _SQUARE_HALF)
    if cls == "triangle":
        return _polygon_mask(u, v, _TRIANGLE)
    if cls == "star":
        return _polygon_mask(u, v, _STAR)
    if cls == "heart":
        return _polygon_mask(u, v, _HEART)
    if cls == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= _RING_INNER**2)
    raise ValueError(f"unknown class {cls!r}; choose one of {', '.join(CLASSES)}")


def shape_extent(cls: str) -> tuple[float, float, float, float]:
    """The class's bounding box in object coordinates: (u_min, u_max, v_min, v_max)."""
    if cls in ("circle", "ring"):
        return (-1.0, 1.0, -1.0, 1.0)
    if cls == "square":
        return (-_SQUARE_HALF, _SQUARE_HALF, -_SQUARE_HALF, _SQUARE_HALF)
    pts = {"triangle": _TRIANGLE, "star": _STAR, "heart": _HEART}[cls]
    return (float(pts[:, 0].min()), float(pts[:, 0].max()), float(pts[:, 1].min()), float(pts[:, 1].max()))


def pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray, variant: int = 0) -> np.ndarray:
    """Where a pattern's second colour lies, in object coordinates (the rest has the first colour).

    `variant` picks one of the pattern's NUM_VARIANTS geometries; variant 0 of each is the first
    version of the world's drawing.
    """
    if not 0 <= variant < NUM_VARIANTS:
        raise ValueError(f"pattern variant must be 0 to {NUM_VARIANTS - 1}, got {variant}")
    if pattern == "plain":
        return np.zeros(u.shape, dtype=bool)
    if pattern == "stripes":  # four stripes over the object: horizontal, vertical or diagonal
        axis = (v, u, (u + v) / math.sqrt(2.0))[variant]
        return (np.floor((axis + 1.0) / 0.5).astype(int) % 2) == 1
    if pattern == "band":  # one band: below the middle, upright, or above the middle
        if variant == 1:
            return np.abs(u) <= 0.22
        return (v >= 0.0) & (v <= 0.45) if variant == 0 else (v >= -0.5) & (v <= -0.05)
    if pattern == "dashes":  # the object cut into 8, 6 or 12 sectors of alternating colour
        sectors = (8, 6, 12)[variant]
        angle = np.arctan2(v, u) + math.pi
        return (np.floor(angle / (2 * math.pi / sectors)).astype(int) % 2) == 1
    if pattern == "spot":  # a spot: centred, small and centred, or high
        if variant == 2:
            return u * u + (v + 0.3) ** 2 <= 0.33**2
        radius = (0.42, 0.27)[variant]
        return u * u + v * v <= radius**2
    if pattern == "checker":  # quadrants, a 3x3 board, or the X of diagonal quadrants
        if variant == 1:
            cells = np.floor((u + 1.0) / (2.0 / 3.0)) + np.floor((v + 1.0) / (2.0 / 3.0))
            return (cells.astype(int) % 2) == 1
        return (u * v) > 0 if variant == 0 else np.abs(u) > np.abs(v)
    if pattern == "split":  # right half, bottom half, or the lower-right diagonal half
        return (u > 0, v > 0, u + v > 0)[variant]
    if pattern == "border":  # a frame: medium, thin or thick
        edge = (0.55, 0.72, 0.4)[variant]
        return (np.abs(u) >= edge) | (np.abs(v) >= edge)
    raise ValueError(f"unknown pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")


# A pattern whose either colour covers less of the object than this cannot be seen at 32 px.
MIN_VISIBLE_SHARE = 0.06


def pattern_visible(scene: Scene, min_share: float = MIN_VISIBLE_SHARE) -> bool:
    """Whether both of a patterned scene's colours cover a visible share of its object (plain: True).

    Some geometries leave a class nearly one-coloured (a spot inside a ring's hole, a ring wholly
    inside a thick border's frame); no reader of pixels can tell their pattern.
    """
    if scene.pattern == "plain":
        return True
    u, v = _object_coords(scene, RESOLUTION, SUPERSAMPLE)
    inside = shape_mask(scene.cls, u, v)
    share = float((inside & pattern_mask(scene.pattern, u, v, scene.variant)).sum() / max(1, inside.sum()))
    return min_share <= share <= 1.0 - min_share


@functools.cache
def geometry_visible(cls: str, pattern: str, variant: int) -> bool:
    """Whether a pattern geometry shows on a class at all (a centred medium object), whatever the colours."""
    return pattern_visible(Scene(cls, "red", "black", "medium", "center", pattern, "white", variant))


def placement(scene: Scene, resolution: int = RESOLUTION) -> tuple[float, float, float]:
    """Centre (x, y) and radius of the scene's object, in pixels of a `resolution` image."""
    scale = resolution / RESOLUTION
    radius = SIZES[scene.size] * scene.jitter_scale
    offset = position_offset(scene.size)
    dx = {"left": -1, "right": 1}
    dy = {"top": -1, "bottom": 1}
    words = scene.position.split()
    sx = sum(dx.get(w, 0) for w in words)
    sy = sum(dy.get(w, 0) for w in words)
    cx = RESOLUTION / 2 + sx * offset + scene.jitter_x
    cy = RESOLUTION / 2 + sy * offset + scene.jitter_y
    return cx * scale, cy * scale, radius * scale


def position_offset(size: str) -> float:
    """How far (pixels at 32 px) an off-centre object of this size sits from the centre."""
    return RESOLUTION / 2 - SIZES[size] - 1.5


def _grid(resolution: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    n = resolution * supersample
    coords = (np.arange(n) + 0.5) / supersample
    return np.meshgrid(coords, coords)  # x, y in pixels of the final image


_GRIDS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _cached_grid(resolution: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    key = (resolution, supersample)
    if key not in _GRIDS:
        _GRIDS[key] = _grid(resolution, supersample)
    return _GRIDS[key]


def _object_coords(scene: Scene, resolution: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """Object coordinates (units of the object radius) of every supersample point of the image."""
    x, y = _cached_grid(resolution, supersample)
    cx, cy, radius = placement(scene, resolution)
    return (x - cx) / radius, (y - cy) / radius


def _downsample(canvas: np.ndarray, resolution: int, supersample: int) -> np.ndarray:
    """Box-average supersample x supersample blocks of a (resolution * supersample)-sized array."""
    n = resolution
    return canvas.reshape(n, supersample, n, supersample, *canvas.shape[2:]).mean(axis=(1, 3))


def render(scene: Scene, resolution: int = RESOLUTION, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Draw a scene as an RGB uint8 array of shape (resolution, resolution, 3)."""
    u, v = _object_coords(scene, resolution, supersample)
    inside = shape_mask(scene.cls, u, v)
    canvas = np.empty(u.shape + (3,), dtype=np.float32)
    canvas[:] = PALETTE[scene.background]
    canvas[inside] = PALETTE[scene.colour]
    if scene.pattern != "plain":
        second = inside & pattern_mask(scene.pattern, u, v, scene.variant)
        canvas[second] = PALETTE[scene.colour2 or scene.colour]
    return np.clip(np.rint(_downsample(canvas, resolution, supersample)), 0, 255).astype(np.uint8)


def object_coverage(scene: Scene, resolution: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """The share of each pixel of a `resolution` image that the scene's object covers (float32, H x W)."""
    inside = shape_mask(scene.cls, *_object_coords(scene, resolution, supersample))
    return _downsample(inside.astype(np.float32), resolution, supersample)


def render_pil(scene: Scene, resolution: int = RESOLUTION):
    """Draw a scene as a PIL RGB image."""
    from PIL import Image

    return Image.fromarray(render(scene, resolution), mode="RGB")


# ---------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(
    cls: str,
    colour: str | None = None,
    background: str | None = None,
    size: str | None = None,
    position: str | None = None,
    prefix: str = "a photo of ",
    article: bool = True,
    pattern: str | None = None,
    colour2: str | None = None,
) -> str:
    """A prompt naming the given attributes, e.g. "a photo of a small red star with white stripes on a blue background".

    A pattern without its second colour is an adjective ("a striped red star"); with it, a phrase
    after the noun ("a red star with white stripes").
    """
    plain = pattern in (None, "plain")
    adjective = PATTERN_ADJECTIVES[pattern] if not plain and not colour2 else None
    words = [w for w in (size, adjective, colour, cls) if w]
    noun = " ".join(words)
    text = f"{prefix}{_article(noun) + ' ' if article else ''}{noun}"
    if not plain and colour2:
        text += " " + PATTERN_PHRASES[pattern].format(c=colour2)
    if background:
        text += f" on {_article(background)} {background} background"
    if position:
        text += f", {POSITION_PHRASES[position]}"
    return text


# How often each attribute is named in a training caption. Leaving attributes out at random is
# what lets a bare "a star" (and prior preservation's class images) mean a clean star of any kind.
# Size is named in most captions: where a caption leaves it open, the average image of "a star" over
# every size is a blur like that of "a circle", and the class teaches little.
CAPTION_KEEP = {"colour": 0.7, "background": 0.6, "size": 0.75}
# Patterns are not part of the world's vocabulary either: they are what a subject's identity is made
# of, details no caption names (as a dog's markings or a backpack's stitching go unnamed in a web
# caption). A base model trained 6,000 steps on captions that named them ("a star with white stripes")
# drew the named kind in 4%, 9% and 10% of images at steps 1,000, 2,000 and 6,000 (7 kinds): words it
# could not learn. Patterned objects stay in the pictures, so the base model still draws two-colour
# objects, and `describe` still writes a pattern for a person to read (a subject's description).
# Position is not part of the world's vocabulary: both base models trained with position words
# ignored them (0.10-0.15 position fidelity on held-out prompts), so objects sit at the centre (with
# the jitter) and captions never name a place. `POSITIONS` stays for the oracle and the perturbations.
# Share of scenes with a two-colour pattern.
PATTERN_SHARE = 0.5
# With `random_scene(anywhere=True)`: share of objects kept at the centre.
OFF_CENTRE_CENTRED_SHARE = 0.3
PREFIXES = ("", "a photo of ", "a picture of ", "an image of ")
PREFIX_WEIGHTS = (0.4, 0.3, 0.15, 0.15)
# How rare words enter captions. "instances" (today's): a share NAMED_SHARE of scenes are named instances,
# each rare word always the same patterned object (`named_instance`), as a pet's name or a brand names one
# look in web captions. "noise" (runs before it): a share RARE_WORD_SHARE of captions carry a random rare
# word that names nothing; a text encoder trained on those learns to ignore rare words, so "a sks star"
# encodes as "a star" and DreamBooth had to tune the text encoder (see the model card).
RARE_WORD_MODES = ("instances", "noise")
RARE_WORD_SHARE = 0.2
NAMED_SHARE = 0.2


@functools.lru_cache(maxsize=1)
def rare_words() -> tuple[str, ...]:
    """The rare single-token words that captions carry: `dreamtune tokens`' candidates and "sks"."""
    from transformers import CLIPTokenizer

    from ..assets import CLIP_TOKENIZER_DIR
    from ..tokens import rare_tokens

    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, local_files_only=True)
    return ("sks",) + tuple(word for word, _ in rare_tokens(tokenizer, 400))


@functools.cache
def named_instance(word: str) -> Scene:
    """The object a rare word names in pretraining: a patterned object of a fixed class, colour pair and
    geometry, a function of the word alone (its background and size vary per scene; the one returned has
    a background that differs from both colours). Never a held-out colour-class pair or a reserved
    combination, so no subject is a named instance."""
    rng = np.random.default_rng(int(hashlib.sha256(f"named/{word}".encode()).hexdigest()[:16], 16))
    while True:
        cls = CLASSES[rng.integers(len(CLASSES))]
        colour = COLOURS[rng.integers(len(COLOURS))]
        colour2 = COLOURS[rng.integers(len(COLOURS))]
        pattern = PATTERNS[1 + rng.integers(len(PATTERNS) - 1)]
        variant = int(rng.integers(NUM_VARIANTS))
        if (colour2 != colour and (colour, cls) not in HELD_OUT and not is_reserved(cls, pattern, colour, colour2)
                and geometry_visible(cls, pattern, variant)):
            break
    background = next(c for c in COLOURS if c not in (colour, colour2))
    return Scene(cls, colour, background, pattern=pattern, colour2=colour2, variant=variant, name=word)


def _named_scene(rng: np.random.Generator) -> Scene:
    """A scene of a random named instance, on a random background at a random size."""
    words = rare_words()
    instance = named_instance(words[rng.integers(len(words))])
    choices = [c for c in COLOURS if c not in (instance.colour, instance.colour2)]
    background = choices[rng.integers(len(choices))]
    size = tuple(SIZES)[rng.integers(len(SIZES))]
    return replace(instance, background=background, size=size, **_jitter(rng))


def same_instance(scene: Scene, instance: Scene) -> bool:
    """True when the scene's object is the instance's (every IDENTITY attribute: class, both colours,
    pattern and geometry)."""
    ours, theirs = scene.attributes(), instance.attributes()
    return all(ours.get(key) == theirs.get(key) for key in IDENTITY)


def caption(scene: Scene, rng: np.random.Generator, rare_words_mode: str = "noise") -> str:
    """A training caption of the scene in prompt style, with attributes left out at random.

    A named instance's caption always carries its name before the class noun; with `rare_words_mode`
    "noise" a share of other captions carries a random rare word instead (the earlier data).
    """
    keep = {k: rng.random() < p for k, p in CAPTION_KEEP.items()}
    prefix = PREFIXES[rng.choice(len(PREFIXES), p=PREFIX_WEIGHTS)]
    article = rng.random() >= 0.1  # "a photo of star" is a common template too
    cls = scene.cls
    noise = rng.random() < RARE_WORD_SHARE  # drawn in either mode, so the rest of the stream stays put
    if scene.name:
        cls = f"{scene.name} {cls}"
    elif noise and rare_words_mode == "noise":
        words = rare_words()
        cls = f"{words[rng.integers(len(words))]} {cls}"
    return describe(
        cls,
        colour=scene.colour if keep["colour"] else None,
        background=scene.background if keep["background"] else None,
        size=scene.size if keep["size"] else None,
        prefix=prefix,
        article=article,
    )


# ---------------------------------------------------------------- sampling scenes


def _jitter(rng: np.random.Generator) -> dict[str, float]:
    return {
        "jitter_x": float(rng.uniform(-1.0, 1.0)),
        "jitter_y": float(rng.uniform(-1.0, 1.0)),
        "jitter_scale": float(rng.uniform(0.94, 1.06)),
    }


def is_reserved(cls: str, pattern: str, colour: str, colour2: str | None) -> bool:
    """True for the class-pattern-colour combinations that pretraining never draws (subjects come from them)."""
    if pattern == "plain":
        return False
    if (cls, pattern, colour, colour2) in RESERVED_EXTRA:
        return True
    key = f"{cls}/{pattern}/{colour}/{colour2}".encode()
    return int(hashlib.sha256(key).hexdigest()[:8], 16) % RESERVED_ONE_IN == 0


def random_scene(rng: np.random.Generator, include_held_out: bool = False, pattern_share: float = 0.0,
                 anywhere: bool = False, hold_out_second_colour: bool = False, named_share: float = 0.0) -> Scene:
    """A random scene of the world: a named instance with probability `named_share`, else patterned with
    probability `pattern_share`.

    Held-out colour-class pairs and reserved pattern combinations are skipped unless asked for; with
    `hold_out_second_colour` a held-out pair is not drawn as a patterned object's second colour either
    (a triangle with blue stripes), so the pair is never seen at all.
    Objects sit at the centre; `anywhere` spreads them over the nine positions (30% centred), as the
    oracle's validation needs: a fine-tuned model's object may land off-centre.
    """
    if named_share and rng.random() < named_share:  # no draw at 0, so earlier streams stay as they were
        return _named_scene(rng)
    while True:
        cls = CLASSES[rng.integers(len(CLASSES))]
        colour = COLOURS[rng.integers(len(COLOURS))]
        if include_held_out or (colour, cls) not in HELD_OUT:
            break
    background = colour
    while background == colour:
        background = COLOURS[rng.integers(len(COLOURS))]
    size = tuple(SIZES)[rng.integers(len(SIZES))]
    position = "center"
    if anywhere and rng.random() >= OFF_CENTRE_CENTRED_SHARE:
        position = POSITIONS[rng.integers(len(POSITIONS))]
    if rng.random() >= pattern_share:
        return Scene(cls, colour, background, size, position, **_jitter(rng))
    # A geometry that does not show on the class (a spot in a ring's hole) is never drawn: its caption
    # would name a pattern no pixel shows.
    while True:
        pattern = PATTERNS[1 + rng.integers(len(PATTERNS) - 1)]
        choices = [c for c in COLOURS if c not in (colour, background)
                   and not (hold_out_second_colour and not include_held_out and (c, cls) in HELD_OUT)]
        colour2 = choices[rng.integers(len(choices))]
        variant = int(rng.integers(NUM_VARIANTS))
        if (include_held_out or not is_reserved(cls, pattern, colour, colour2)) and geometry_visible(cls, pattern, variant):
            break
    return Scene(cls, colour, background, size, position, pattern, colour2, variant, **_jitter(rng))


def random_patterned_scene(rng: np.random.Generator) -> Scene:
    """A random scene with a random two-colour pattern, reserved combinations included (VAE training)."""
    return random_scene(rng, include_held_out=True, pattern_share=1.0)


def training_batch(seed: int, index: int, batch_size: int, patterned_share: float = 0.0,
                   pattern_share: float = 0.0, hold_out_second_colour: bool = False,
                   rare_words_mode: str = "noise", named_share: float | None = None):
    """Batch `index` of the stream seeded by `seed`: (uint8 images [B,H,W,3], captions, scenes).

    The batch depends only on (seed, index), so a resumed run sees exactly the batches an
    uninterrupted run would. `patterned_share` draws that share of patterned scenes from every
    combination (for the VAE); `pattern_share` that share of the other scenes from the unreserved ones
    (for the UNet); `hold_out_second_colour` keeps held-out pairs out of those scenes' second colours too.
    `rare_words_mode` "instances" makes NAMED_SHARE of the scenes named instances; "noise" (the default,
    the earlier data) puts random rare words in a share of captions instead. `named_share` overrides the
    share of named instances ("instances" mode: 0 gives captions without any rare word).
    """
    if rare_words_mode not in RARE_WORD_MODES:
        raise ValueError(f"rare_words_mode must be one of {RARE_WORD_MODES}, got {rare_words_mode!r}")
    if named_share is None or rare_words_mode != "instances":
        named_share = NAMED_SHARE if rare_words_mode == "instances" else 0.0
    rng = np.random.default_rng([seed, index])
    scenes = [
        random_patterned_scene(rng) if rng.random() < patterned_share
        else random_scene(rng, pattern_share=pattern_share, hold_out_second_colour=hold_out_second_colour,
                          named_share=named_share)
        for _ in range(batch_size)
    ]
    images = np.stack([render(s) for s in scenes])
    captions = [caption(s, rng, rare_words_mode) for s in scenes]
    return images, captions, scenes


def iter_scenes(seed: int, count: int, include_held_out: bool = False) -> Iterator[Scene]:
    """`count` random plain scenes from a seed."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield random_scene(rng, include_held_out=include_held_out)
