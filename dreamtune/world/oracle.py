"""The oracle: read a shapes-world image back into its attributes by analysing its pixels.

No learned model: the background is the median colour of the image's border; the object is the
largest connected region that differs from it; its class is the template (circle, square, ...)
whose outline, fitted to the region's bounding box, overlaps the region best; size and position
come from that fit. Colours come from unmixing: every object pixel is explained as a blend of the
background with one palette colour or with two, and the object is two-coloured when a pair explains
the pixels far better than any single colour (so a blurred blue-and-white object reads as blue and
white, never as the purple its average would be). The pattern and its geometry (variant) are the
template whose second-colour map, fitted to the object, matches each pixel's share of the second
colour best; which of the two colours is the first follows from that fit.

On top of `read` sit the measures: prompt fidelity, subject fidelity, language drift, diversity.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from . import render
from .render import CLASSES, NUM_VARIANTS, PALETTE, PATTERNS, RESOLUTION, SIZES

_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.array([PALETTE[n] for n in _PALETTE_NAMES], dtype=np.float32)

# A pixel belongs to the object when its colour is this far (RGB distance, 0-255 scale) from the
# background: half the smallest distance between two palette colours.
_OBJECT_THRESHOLD = 40.0
_MIN_OBJECT_PIXELS = 6

# Shapes and patterns rasterised once on a fine grid in object coordinates; reading looks them up.
_LOOKUP_SIZE = 512
_LOOKUP_SPAN = 1.25


def _lookup_tables() -> tuple[dict[str, np.ndarray], dict[tuple[str, int], np.ndarray]]:
    coords = (np.arange(_LOOKUP_SIZE) + 0.5) / _LOOKUP_SIZE * 2 * _LOOKUP_SPAN - _LOOKUP_SPAN
    u, v = np.meshgrid(coords, coords)
    shapes = {c: render.shape_mask(c, u, v) for c in CLASSES}
    patterns = {(p, k): render.pattern_mask(p, u, v, k) for p in PATTERNS[1:] for k in range(NUM_VARIANTS)}
    return shapes, patterns


_SHAPES, _PATTERN_TABLES = _lookup_tables()
# Objects drawn by a fine-tuned model come a little rotated: each class is also fitted turned by these
# angles (degrees; round classes need none).
_ANGLES = (0.0, -4.0, 4.0, -8.0, 8.0)


def _rotated_extent(cls: str, angle: float) -> tuple[float, float, float, float]:
    if angle == 0.0:
        return render.shape_extent(cls)
    coords = (np.arange(_LOOKUP_SIZE) + 0.5) / _LOOKUP_SIZE * 2 * _LOOKUP_SPAN - _LOOKUP_SPAN
    v, u = (coords[i] for i in np.nonzero(_SHAPES[cls]))
    t = np.radians(angle)
    x, y = u * np.cos(t) - v * np.sin(t), u * np.sin(t) + v * np.cos(t)
    return float(x.min()), float(x.max()), float(y.min()), float(y.max())


_EXTENTS = {(c, a): _rotated_extent(c, a) for c in CLASSES for a in _ANGLES if a == 0.0 or c not in ("circle", "ring")}
_SUB = 4


def _sample_grid(sub: int) -> tuple[np.ndarray, np.ndarray]:
    offsets = (np.arange(sub) + 0.5) / sub
    pixel = np.arange(RESOLUTION, dtype=np.float32)
    sx = (pixel[None, :, None, None] + offsets[None, None, None, :]).repeat(RESOLUTION, 0).repeat(sub, 2)
    sy = (pixel[:, None, None, None] + offsets[None, None, :, None]).repeat(RESOLUTION, 1).repeat(sub, 3)
    shape = (RESOLUTION, RESOLUTION, sub * sub)
    return sx.reshape(shape).astype(np.float32), sy.reshape(shape).astype(np.float32)


_SAMPLES = {_SUB: _sample_grid(_SUB), 2: _sample_grid(2)}


def _cells(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Flat indices into a lookup table of object coordinates; points outside it index a False cell."""
    scale = _LOOKUP_SIZE / (2 * _LOOKUP_SPAN)
    iu = np.floor((u + _LOOKUP_SPAN) * scale).astype(np.int32)
    iv = np.floor((v + _LOOKUP_SPAN) * scale).astype(np.int32)
    valid = (iu >= 0) & (iu < _LOOKUP_SIZE) & (iv >= 0) & (iv < _LOOKUP_SIZE)
    return np.where(valid, iv * _LOOKUP_SIZE + iu, _LOOKUP_SIZE * _LOOKUP_SIZE)


def _flat(table: np.ndarray) -> np.ndarray:
    return np.append(table.ravel(), False)


def _lookup(table: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _flat(table)[_cells(u, v)]


_FLAT_SHAPES = {c: _flat(t) for c, t in _SHAPES.items()}
_FLAT_PATTERNS = {k: _flat(t) for k, t in _PATTERN_TABLES.items()}


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
    # The pattern's geometry (0 .. NUM_VARIANTS - 1); None for a plain object.
    variant: int | None = None
    # How well the pattern template explains the object's second-colour map (1: exactly, 0: not at all).
    pattern_score: float = 0.0

    def attributes(self) -> dict:
        """The reading as a dict with the keys of `Scene.attributes()` ("class", "colour", ...)."""
        out = asdict(self)
        out["class"] = out.pop("cls")
        out.pop("class_score")
        out.pop("pattern_score")
        if self.pattern == "plain":
            out.pop("colour2")
            out.pop("variant")
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


def _box_centre(key: tuple[str, float], fit: tuple[float, float, float, float]) -> tuple[float, float]:
    cx, cy, rx, ry = fit
    u0, u1, v0, v1 = _EXTENTS[key]
    return cx + (u0 + u1) / 2 * rx, cy + (v0 + v1) / 2 * ry


def _object_coords(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, window=(slice(None),) * 2,
                   sub: int = _SUB) -> tuple[np.ndarray, np.ndarray]:
    # Sub-pixel sample positions of the window's pixels, in object coordinates: shape (h, w, sub*sub).
    sample_x, sample_y = _SAMPLES[sub]
    u = (sample_x[window] - cx) / rx
    v = (sample_y[window] - cy) / ry
    if angle:
        t = np.radians(angle)
        u, v = u * np.cos(t) + v * np.sin(t), -u * np.sin(t) + v * np.cos(t)
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


def _fit(key: tuple[str, float], bbox: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    x0, x1, y0, y1 = bbox
    u0, u1, v0, v1 = _EXTENTS[key]
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

    best_cls, best_iou, best_fit, best_angle = CLASSES[0], -1.0, None, 0.0
    # Templates are compared on the object's box with a margin (the largest template reaches past it
    # by a fifth), two by two samples a pixel: enough to rank them, at a quarter of the cost.
    x0, x1, y0, y1 = bbox
    margin = 0.25 * max(x1 - x0, y1 - y0) + 1
    window = (slice(max(0, int(y0 - margin)), int(np.ceil(y1 + margin))),
              slice(max(0, int(x0 - margin)), int(np.ceil(x1 + margin))))
    alpha_window = alpha[window]
    for cls, angle in _EXTENTS:
        base_fit = _fit((cls, angle), bbox)
        # Blur shortens points and rounds corners, so a pointed shape's box underestimates its
        # size: try the template a little larger too, about the same centre.
        for grow in _GROWTH:
            cx, cy, rx, ry = base_fit
            centre_x, centre_y = _box_centre((cls, angle), base_fit)
            fit = (centre_x + (cx - centre_x) * grow, centre_y + (cy - centre_y) * grow, rx * grow, ry * grow)
            cover = _FLAT_SHAPES[cls][_cells(*_object_coords(*fit, angle, window, sub=2))].mean(axis=2)
            # Soft overlap of the template's coverage with the object's, pixel by pixel.
            iou = float(np.minimum(cover, alpha_window).sum() / max(1e-6, np.maximum(cover, alpha_window).sum()))
            if iou > best_iou:
                best_cls, best_iou, best_fit, best_angle = cls, iou, fit, angle
    cx, cy, rx, ry = best_fit
    size = _size(float(np.sqrt(rx * ry)))
    position = _position(cx, cy, size)
    # The object with its blurred rim: pixels the edge blends towards the background belong to it too.
    area = _dilate(region) & (distance > _OBJECT_THRESHOLD / 3)
    # Pixels well inside the object hold no background: there a pale colour is not a blend of a
    # strong one with the background (orange on red would read as yellow thinned by red).
    u, v = _object_coords(*best_fit, best_angle)
    interior = _erode(region) & (_FLAT_SHAPES[best_cls][_cells(u, v)].mean(axis=2) >= 0.99)
    colours = _read_colours(pixels[area], background_rgb, nearest_colour(background_rgb), interior[area])
    if len(colours) == 1:
        return Reading(background, best_cls, colours[0], size, position, "plain", None, best_iou)
    pattern, variant, colour, colour2, score = _read_pattern(colours, area, best_cls, best_fit, best_angle)
    return Reading(background, best_cls, colour, size, position, pattern, colour2, best_iou, variant, score)


# A residual this far (RGB) from every blend counts no more than this: a stray pixel must not decide.
_RESIDUAL_CAP = 45.0
# A pixel this far (RGB) from every blend of a colour (or pair) is not explained by it: beyond what
# noise and a colour drawn a little off move a pixel, short of half the distance between two palette
# colours. Two colours are read when the pair explains at least _MIN_SECOND_PIXELS pixels' worth (and
# _MIN_SECOND_SHARE of the object) of its other colour where the best single colour explains nothing.
_UNEXPLAINED = 30.0
_MIN_SECOND_PIXELS = 2.0
_MIN_SECOND_SHARE = 0.03


# The least share of the object's colours in a pixel well inside it (blur lets in a little background).
_INTERIOR_SHARE = 0.75


def _erode(mask: np.ndarray) -> np.ndarray:
    return ~_dilate(~mask)


def _read_colours(values: np.ndarray, background_rgb: np.ndarray, background: str, interior: np.ndarray):
    """The object's colours: `[colour]`, or `[a, b, share_of_b_per_pixel, weight_per_pixel]` for two.

    Each pixel is a blend of the background with one palette colour, or with two; the colour (or
    pair) whose blends explain the pixels best wins, a pair only when it explains them far better.
    """
    offsets = values - background_rgb
    names = [n for n in _PALETTE_NAMES if n != background]
    directions = np.array([PALETTE[n] for n in names], dtype=np.float32) - background_rgb
    lengths = (directions**2).sum(axis=1)

    def cost(residuals: np.ndarray) -> float:
        return float((np.minimum(residuals, _RESIDUAL_CAP) ** 2).sum())

    low = np.where(interior, _INTERIOR_SHARE, 0.0)[:, None]
    shares = np.clip(offsets @ directions.T / lengths, low, 1.0)
    single = np.linalg.norm(offsets[:, None, :] - shares[..., None] * directions[None], axis=2)
    single_costs = [cost(single[:, k]) for k in range(len(names))]
    best_single = int(np.argmin(single_costs))
    best_pair, best_pair_cost, best_weights = None, float("inf"), None
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            di, dj = directions[i], directions[j]
            gram = np.array([[di @ di, di @ dj], [di @ dj, dj @ dj]], dtype=np.float64)
            if abs(np.linalg.det(gram)) < 1e-3 * gram[0, 0] * gram[1, 1]:
                continue
            weights = np.linalg.solve(gram, np.stack([offsets @ di, offsets @ dj]).astype(np.float64)).T
            # A negative share is no blend: fall back to the other colour alone for that pixel.
            only_j = weights[:, 0] < 0
            only_i = weights[:, 1] < 0
            weights[only_j] = np.stack([np.zeros(only_j.sum()), shares[only_j, j]], axis=1)
            weights[only_i] = np.stack([shares[only_i, i], np.zeros(only_i.sum())], axis=1)
            weights = np.clip(weights, 0.0, 1.0)
            total = weights.sum(axis=1, keepdims=True)
            # A pixel is at most all object: without this, two colours on opposite sides of the
            # background would "explain" a third colour as their sum.
            weights = np.where(total < low, weights * low / np.maximum(total, 1e-6), weights)
            weights = np.where(total > 1.0, weights / np.maximum(total, 1e-6), weights)
            weights[(total[:, 0] <= 1e-6) & interior] = [_INTERIOR_SHARE / 2, _INTERIOR_SHARE / 2]
            residual = np.linalg.norm(offsets - weights[:, :1] * di - weights[:, 1:] * dj, axis=1)
            pair_cost = cost(residual)
            if pair_cost < best_pair_cost:
                best_pair, best_pair_cost, best_weights, pair_residual = (i, j), pair_cost, weights, residual
    if best_pair is None:
        return [names[best_single]]
    # Two colours only where the best single colour leaves pixels unexplained that the pair explains
    # as mostly its other colour: noise, a colour a little off, or a JPEG fringe never do that.
    others = [k for k, c in enumerate(best_pair) if c != best_single] or [int(np.argmin(best_weights.sum(axis=0)))]
    evidence = ((single[:, best_single] > _UNEXPLAINED) & (pair_residual < 0.5 * single[:, best_single])
                & (best_weights[:, others].max(axis=1) >= 0.4))
    other_mass = float(best_weights[evidence][:, others].sum())
    if other_mass < max(_MIN_SECOND_PIXELS, _MIN_SECOND_SHARE * float(best_weights.sum())):
        return [names[best_single]]
    total = best_weights.sum(axis=1)
    second_share = np.where(total > 0, best_weights[:, 1] / np.maximum(total, 1e-6), 0.5)
    return [names[best_pair[0]], names[best_pair[1]], second_share, np.clip(total, 0.0, 1.0)]


_PATTERN_BLURS = (0.0, 0.7)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return image
    radius = int(np.ceil(2.5 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = image
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(2)], mode="edge")
        out = sum(w * np.take(padded, np.arange(i, i + out.shape[axis]), axis=axis) for i, w in enumerate(taps))
    return out


def _read_pattern(colours, area, cls, fit, angle) -> tuple[str, int, str, str, float]:
    """The pattern, its variant, first and second colour and the fit's score, for a two-coloured object.

    Every pattern geometry's map of the second colour, fitted to the object, is compared with the
    share of each colour in each pixel, both ways round; the closest map names the pattern and
    which colour is the second.
    """
    first, second, share, weight = colours
    shares = np.full(area.shape, 0.5, dtype=np.float32)
    weights = np.zeros(area.shape, dtype=np.float32)
    shares[area] = share
    weights[area] = weight
    # Pixels mostly of the background say little about the pattern.
    weights = np.where(weights >= 0.4, weights, 0.0)
    cells = _cells(*_object_coords(*fit, angle))
    inside = _FLAT_SHAPES[cls][cells]
    inside_count = inside.sum(axis=2)
    total = max(float(weights.sum()), 1e-6)
    best = (float("inf"), "plain", 0, first, second)
    for (pattern, variant), table in _FLAT_PATTERNS.items():
        mask = table[cells]
        # The template's share of the second colour in each pixel, counted over the object's part of
        # the pixel (over the whole pixel where the object reaches beyond the template).
        template = np.where(inside_count > 0, (mask & inside).sum(axis=2) / np.maximum(inside_count, 1),
                            mask.mean(axis=2))
        for sigma in _PATTERN_BLURS:
            expected = _blur(template, sigma)
            forward = float((weights * (shares - expected) ** 2).sum()) / total
            backward = float((weights * (1.0 - shares - expected) ** 2).sum()) / total
            if forward < best[0]:
                best = (forward, pattern, variant, first, second)
            if backward < best[0]:
                best = (backward, pattern, variant, second, first)
    error, pattern, variant, colour, colour2 = best
    return pattern, variant, colour, colour2, float(1.0 - min(1.0, 4.0 * error))


def read_all(images: Iterable) -> list[Reading]:
    """Read many images."""
    return [read(image) for image in images]


# ---------------------------------------------------------------- measures

_ATTRIBUTES = ("class", "colour", "background", "size", "position", "pattern")


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


# What makes a subject itself: every one must match for the subject to be present in an image.
IDENTITY = render.IDENTITY


def subject_signature(references: Sequence[Reading]) -> dict:
    """The subject as the oracle sees its reference images: the most common class, colours, pattern and variant.

    Keys are those of IDENTITY (a `Subject.identity()` has the same form, from the subject's truth).
    """
    def mode(values):
        values = [v for v in values if v is not None]
        return max(sorted(set(values), key=str), key=values.count) if values else None

    readings = [r.attributes() for r in references]
    return {key: mode([r.get(key) for r in readings]) for key in IDENTITY}


def subject_match(reading: Reading, signature: dict) -> float:
    """Subject fidelity of one image: the share of the identity attributes (IDENTITY) it matches (0-1)."""
    got = reading.attributes()
    return float(np.mean([got.get(key) == signature.get(key) for key in IDENTITY]))


def subject_present(reading: Reading, signature: dict) -> bool:
    """Whether one image shows the subject: every identity attribute matches."""
    got = reading.attributes()
    return all(got.get(key) == signature.get(key) for key in IDENTITY)


def shows_identity(reading: Reading, signature: dict) -> bool:
    """Whether an image shows the subject's look (pattern, its variant and both colours), whatever its class."""
    got = reading.attributes()
    return all(got.get(key) == signature.get(key) for key in IDENTITY if key != "class")


def subject_fidelity(readings: Sequence[Reading], references: Sequence[Reading] | dict) -> float:
    """Mean `subject_match` of generated images against the subject (reference readings or an identity dict)."""
    signature = references if isinstance(references, dict) else subject_signature(references)
    return float(np.mean([subject_match(r, signature) for r in readings])) if readings else float("nan")


def language_drift(class_readings: Sequence[Reading], references: Sequence[Reading] | dict) -> float:
    """Share of images of the plain class prompt ("a star") that show the subject's look (`shows_identity`)."""
    signature = references if isinstance(references, dict) else subject_signature(references)
    if not class_readings:
        return float("nan")
    return float(np.mean([shows_identity(r, signature) for r in class_readings]))


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
