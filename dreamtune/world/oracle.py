"""The oracle: read a shapes-world image back into its attributes by analysing its pixels.

No learned model: the background is the median colour of the image's border; the object is the
largest connected region that differs from it; its class is the template (circle, square, ...)
whose outline, fitted to the region's bounding box, overlaps the region best; size and position
come from that fit; colour and pattern from the pixel colours inside it (the pattern whose split
into two colours explains the pixels best, or "plain").

On top of `read` sit the measures: prompt fidelity, subject fidelity, language drift, diversity.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from . import render
from .render import CLASSES, PALETTE, PATTERNS, RESOLUTION, SIZES

_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.array([PALETTE[n] for n in _PALETTE_NAMES], dtype=np.float32)

# A pixel belongs to the object when its colour is this far (RGB distance, 0-255 scale) from the
# background: half the smallest distance between two palette colours.
_OBJECT_THRESHOLD = 40.0
_MIN_OBJECT_PIXELS = 6

# Shapes and patterns rasterised once on a fine grid in object coordinates; reading looks them up.
_LOOKUP_SIZE = 512
_LOOKUP_SPAN = 1.25


def _lookup_tables() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    coords = (np.arange(_LOOKUP_SIZE) + 0.5) / _LOOKUP_SIZE * 2 * _LOOKUP_SPAN - _LOOKUP_SPAN
    u, v = np.meshgrid(coords, coords)
    shapes = {c: render.shape_mask(c, u, v) for c in CLASSES}
    patterns = {p: render.pattern_mask(p, u, v) for p in PATTERNS}
    return shapes, patterns


_SHAPES, _PATTERN_TABLES = _lookup_tables()
_EXTENTS = {c: render.shape_extent(c) for c in CLASSES}
_SUB = 4
_SUB_OFFSETS = (np.arange(_SUB) + 0.5) / _SUB


def _lookup(table: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    iu = np.floor((u + _LOOKUP_SPAN) / (2 * _LOOKUP_SPAN) * _LOOKUP_SIZE).astype(np.int64)
    iv = np.floor((v + _LOOKUP_SPAN) / (2 * _LOOKUP_SPAN) * _LOOKUP_SIZE).astype(np.int64)
    valid = (iu >= 0) & (iu < _LOOKUP_SIZE) & (iv >= 0) & (iv < _LOOKUP_SIZE)
    out = np.zeros(u.shape, dtype=bool)
    out[valid] = table[iv[valid], iu[valid]]
    return out


@dataclass
class Reading:
    """What the oracle reads from one image. `cls` is None when no object was found."""

    background: str
    cls: str | None
    colour: str | None
    size: str | None
    position: str | None
    pattern: str
    colour2: str | None
    class_score: float = 0.0

    def attributes(self) -> dict:
        """The reading as a dict with the keys of `Scene.attributes()` ("class", "colour", ...)."""
        out = asdict(self)
        out["class"] = out.pop("cls")
        out.pop("class_score")
        if self.pattern == "plain":
            out.pop("colour2")
        return out


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette colour nearest (RGB distance) to a colour."""
    distances = np.linalg.norm(_PALETTE_RGB - np.asarray(rgb, dtype=np.float32), axis=1)
    return _PALETTE_NAMES[int(np.argmin(distances))]


def _to_array(image) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        from PIL import Image

        image = image.convert("RGB")
        if image.size != (RESOLUTION, RESOLUTION):
            image = image.resize((RESOLUTION, RESOLUTION), Image.BOX)
        image = np.asarray(image)
    array = np.asarray(image, dtype=np.float32)
    if array.shape[:2] != (RESOLUTION, RESOLUTION):
        from PIL import Image

        array = np.asarray(
            Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).resize((RESOLUTION, RESOLUTION), Image.BOX),
            dtype=np.float32,
        )
    return array[..., :3]


def _dilate(mask: np.ndarray) -> np.ndarray:
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        stack = [(y0, x0)]
        labels[y0, x0] = current
        size = 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


_GROWTH = (1.0, 1.1, 1.2)


def _box_centre(cls: str, fit: tuple[float, float, float, float]) -> tuple[float, float]:
    cx, cy, rx, ry = fit
    u0, u1, v0, v1 = _EXTENTS[cls]
    return cx + (u0 + u1) / 2 * rx, cy + (v0 + v1) / 2 * ry


def _object_coords(cx: float, cy: float, rx: float, ry: float) -> tuple[np.ndarray, np.ndarray]:
    # Sub-pixel sample positions of every pixel, in object coordinates: shape (32, 32, SUB*SUB).
    pixel = np.arange(RESOLUTION, dtype=np.float32)
    sx = (pixel[None, :, None, None] + _SUB_OFFSETS[None, None, None, :]).repeat(RESOLUTION, 0).repeat(_SUB, 2)
    sy = (pixel[:, None, None, None] + _SUB_OFFSETS[None, None, :, None]).repeat(RESOLUTION, 1).repeat(_SUB, 3)
    u = ((sx - cx) / rx).reshape(RESOLUTION, RESOLUTION, -1)
    v = ((sy - cy) / ry).reshape(RESOLUTION, RESOLUTION, -1)
    return u, v


def _coverage(pixels: np.ndarray, background_rgb: np.ndarray, region: np.ndarray) -> np.ndarray:
    # An edge pixel is a blend of the background and one object colour: project it onto the line
    # from the background to each palette colour and keep the best-fitting blend's share.
    offsets = pixels[region] - background_rgb
    directions = _PALETTE_RGB - background_rgb
    lengths = (directions**2).sum(axis=1)
    usable = lengths > _OBJECT_THRESHOLD**2
    shares = np.clip(offsets @ directions[usable].T / lengths[usable], 0.0, 1.0)
    residuals = np.linalg.norm(offsets[:, None, :] - shares[..., None] * directions[usable][None], axis=2)
    alpha = np.zeros(region.shape, dtype=np.float32)
    alpha[region] = shares[np.arange(len(shares)), residuals.argmin(axis=1)]
    return alpha


def _subpixel_bbox(alpha: np.ndarray) -> tuple[float, float, float, float]:
    # How far into its edge pixel the object reaches, which an integer box would round away.
    cols, rows = alpha.max(axis=0), alpha.max(axis=1)
    xs, ys = np.nonzero(cols)[0], np.nonzero(rows)[0]
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    return (float(x0 + 1 - cols[x0]), float(x1 + cols[x1]), float(y0 + 1 - rows[y0]), float(y1 + rows[y1]))


def _fit(cls: str, bbox: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    x0, x1, y0, y1 = bbox
    u0, u1, v0, v1 = _EXTENTS[cls]
    rx = (x1 - x0) / (u1 - u0)
    ry = (y1 - y0) / (v1 - v0)
    return x0 - u0 * rx, y0 - v0 * ry, rx, ry


def _position(cx: float, cy: float, size: str) -> str:
    half = render.position_offset(size) / 2
    dx, dy = cx - RESOLUTION / 2, cy - RESOLUTION / 2
    horizontal = "left" if dx < -half else "right" if dx > half else ""
    vertical = "top" if dy < -half else "bottom" if dy > half else ""
    return " ".join(w for w in (vertical, horizontal) if w) or "center"


def _size(radius: float) -> str:
    names = list(SIZES)
    values = np.array([SIZES[n] for n in names])
    return names[int(np.argmin(np.abs(np.log(values / radius))))]


def read(image) -> Reading:
    """Read one image (PIL image or HxWx3 array; resized to 32 px) into a `Reading`."""
    pixels = _to_array(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background_rgb = np.median(border, axis=0)
    background = nearest_colour(background_rgb)
    distance = np.linalg.norm(pixels - background_rgb, axis=2)
    differs = distance > _OBJECT_THRESHOLD
    # Components are found on the mask grown by one pixel: a one-pixel seam where two object colours
    # blend into the background's colour (red and yellow make orange) must not split the object.
    region = _largest_component(_dilate(differs)) & differs
    if region.sum() < _MIN_OBJECT_PIXELS:
        return Reading(background, None, None, None, None, "plain", None, 0.0)
    alpha = _coverage(pixels, background_rgb, region)
    bbox = _subpixel_bbox(alpha)

    best_cls, best_iou, best_fit, best_cover = CLASSES[0], -1.0, None, None
    for cls in CLASSES:
        base_fit = _fit(cls, bbox)
        # Blur shortens points and rounds corners, so a pointed shape's box underestimates its
        # size: try the template a little larger too, about the same centre.
        for grow in _GROWTH:
            cx, cy, rx, ry = base_fit
            centre_x, centre_y = _box_centre(cls, base_fit)
            fit = (centre_x + (cx - centre_x) * grow, centre_y + (cy - centre_y) * grow, rx * grow, ry * grow)
            u, v = _object_coords(*fit)
            cover = _lookup(_SHAPES[cls], u, v).mean(axis=2)
            # Soft overlap of the template's coverage with the object's, pixel by pixel.
            iou = float(np.minimum(cover, alpha).sum() / max(1e-6, np.maximum(cover, alpha).sum()))
            if iou > best_iou:
                best_cls, best_iou, best_fit, best_cover = cls, iou, fit, cover
    cx, cy, rx, ry = best_fit
    size = _size(float(np.sqrt(rx * ry)))
    position = _position(cx, cy, size)
    pattern, colour, colour2 = _read_pattern(pixels, region, best_cover, best_fit)
    return Reading(background, best_cls, colour, size, position, pattern, colour2, best_iou)


def _read_pattern(pixels, region, cover, fit) -> tuple[str, str, str | None]:
    inner = region & (cover >= 0.95)
    if inner.sum() < 4:
        inner = region
    values = pixels[inner]
    plain_error = float(((values - values.mean(axis=0)) ** 2).sum(axis=1).mean())
    plain_colour = nearest_colour(np.median(values, axis=0))
    u, v = _object_coords(*fit)
    best = ("plain", plain_error, plain_colour, None)
    # A two-colour split must explain most of the spread, and the spread must be more than noise.
    if plain_error < 400.0:
        return "plain", plain_colour, None
    for pattern in PATTERNS[1:]:
        share = _lookup(_PATTERN_TABLES[pattern], u, v).mean(axis=2)
        second = inner & (share > 0.8)
        first = inner & (share < 0.2)
        if second.sum() < 2 or first.sum() < 2:
            continue
        a, b = pixels[first], pixels[second]
        error = float((((a - a.mean(axis=0)) ** 2).sum() + ((b - b.mean(axis=0)) ** 2).sum()) / (len(a) + len(b)))
        if error < best[1]:
            best = (pattern, error, nearest_colour(np.median(a, axis=0)), nearest_colour(np.median(b, axis=0)))
    pattern, error, colour, colour2 = best
    if pattern == "plain" or error > 0.35 * plain_error or colour == colour2:
        return "plain", plain_colour, None
    return pattern, colour, colour2


def read_all(images: Iterable) -> list[Reading]:
    """Read many images."""
    return [read(image) for image in images]


# ---------------------------------------------------------------- measures

_ATTRIBUTES = ("class", "colour", "background", "size", "position")


def attribute_accuracy(readings: Sequence[Reading], truths: Sequence[dict]) -> dict[str, float]:
    """Per attribute, the share of readings that equal the truth (only where the truth names it)."""
    hits: dict[str, list[bool]] = {}
    for reading, truth in zip(readings, truths):
        got = reading.attributes()
        for key, want in truth.items():
            hits.setdefault(key, []).append(got.get(key) == want)
    return {key: float(np.mean(values)) for key, values in hits.items()}


def prompt_fidelity(readings: Sequence[Reading], prompted: Sequence[dict]) -> float:
    """Share of prompted attributes honoured, over all images (each image with its prompt's attributes)."""
    honoured = total = 0
    for reading, wanted in zip(readings, prompted):
        got = reading.attributes()
        for key, value in wanted.items():
            total += 1
            honoured += got.get(key) == value
    return honoured / total if total else float("nan")


def subject_signature(references: Sequence[Reading]) -> dict:
    """The subject as the oracle sees its reference images: the most common class, pattern and colours."""
    def mode(values):
        values = [v for v in values if v is not None]
        return max(set(values), key=values.count) if values else None

    return {
        "class": mode([r.cls for r in references]),
        "pattern": mode([r.pattern for r in references]),
        "colours": mode([tuple(sorted((r.colour or "", r.colour2 or ""))) for r in references]),
    }


def subject_match(reading: Reading, signature: dict) -> float:
    """How much of the subject one image shows: mean of class, pattern and colour-pair agreement (0-1)."""
    colours = tuple(sorted((reading.colour or "", reading.colour2 or "")))
    return float(np.mean([reading.cls == signature["class"], reading.pattern == signature["pattern"],
                          colours == signature["colours"]]))


def subject_fidelity(readings: Sequence[Reading], references: Sequence[Reading]) -> float:
    """Mean `subject_match` of generated images against the subject's reference images (0-1)."""
    signature = subject_signature(references)
    return float(np.mean([subject_match(r, signature) for r in readings])) if readings else float("nan")


def language_drift(class_readings: Sequence[Reading], references: Sequence[Reading]) -> float:
    """Share of images of the plain class prompt ("a star") that show the subject's pattern."""
    pattern = subject_signature(references)["pattern"]
    if not class_readings:
        return float("nan")
    return float(np.mean([r.pattern == pattern for r in class_readings]))


def diversity(readings: Sequence[Reading], attributes: Sequence[str] = _ATTRIBUTES) -> float:
    """Spread among images of one prompt: the chance two of them differ in an attribute, averaged (0-1)."""
    if len(readings) < 2:
        return 0.0
    scores = []
    for key in attributes:
        values = [r.attributes().get(key) for r in readings]
        counts = np.array([values.count(v) for v in set(values)], dtype=np.float64)
        n = len(values)
        scores.append(1.0 - float((counts * (counts - 1)).sum() / (n * (n - 1))))
    return float(np.mean(scores))


def bench_scorer(images, prompts, subject) -> dict[str, float]:
    """The oracle's scores for `dreamtune bench` / `dreamtune.evaluate.bench.run_bench`.

    Name it in a bench spec as scorers = ["dreamtune.world.oracle:bench_scorer"]. `subject` is the
    bench's subject (its real images in `subject.images_dir`); the generated images are read by the
    oracle and compared with the readings of those references.
    """
    from ..data.images import list_images, load_image

    references = read_all(load_image(p) for p in list_images(subject.images_dir, what="subject images"))
    readings = read_all(images)
    return {"subject_fidelity": subject_fidelity(readings, references), "diversity": diversity(readings)}
