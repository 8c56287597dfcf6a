"""Perturbed drawings of the shapes world: what fine-tuned models produce, for validating the oracle.

A personalized model does not draw the world's clean shapes: its objects are bent, its patterns
irregular or broken in places, its colours a little off, and the VAE blurs everything. This module
draws a `Scene` with such damage (a smooth warp of the shape, a stronger one of the pattern, patches
of the pattern flipped, shifted colours, blur, pixel noise, JPEG compression, a slight shift) while
the scene's attributes stay true, so the oracle can be scored against the truth on images like those.
Nothing here changes the training images of `dreamtune.world.render`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from . import render
from .render import PALETTE, RESOLUTION, SUPERSAMPLE, Scene

# The largest jitter plus shift (pixels) that keeps a scene's position word true: an off-centre
# large object sits 3.5 px from the centre and the oracle's boundary is half of that further in.
MAX_OFFSET = 1.25


@dataclass(frozen=True)
class Perturbation:
    """How one image is damaged. Zero everywhere draws the scene as `render.render` does."""

    rotation: float = 0.0  # degrees
    stretch: float = 0.0  # anisotropic scale: x by (1 + stretch), y by (1 - stretch)
    bend: float = 0.0  # u += bend * v^2: the shape curves
    warp: float = 0.0  # amplitude (object radii) of a smooth wave through the shape and pattern
    pattern_warp: float = 0.0  # amplitude of a further wave through the pattern only
    broken: float = 0.0  # share of coarse patches where the pattern's two colours are swapped
    colour_shift: float = 0.0  # max per-channel offset of each drawn colour (0-255)
    blur: float = 0.0  # Gaussian sigma in pixels
    noise: float = 0.0  # per-pixel Gaussian noise sigma (0-255)
    jpeg_quality: int = 0  # 0: no JPEG round trip
    shift_x: float = 0.0  # pixels, on top of the scene's jitter
    shift_y: float = 0.0
    seed: int = 0  # the waves' phases, the broken patches and the noise


def random_perturbation(rng: np.random.Generator, scene: Scene | None = None, strength: float = 1.0) -> Perturbation:
    """A random perturbation of every kind at once, each up to `strength` times its largest setting.

    With `scene`, the shift is bounded so that jitter plus shift stays within MAX_OFFSET.
    """
    def up_to(high: float) -> float:
        return float(rng.uniform(0.0, high * strength))

    shifts = []
    for jitter in ((scene.jitter_x, scene.jitter_y) if scene else (0.0, 0.0)):
        room = max(0.0, MAX_OFFSET - abs(jitter))
        shifts.append(float(rng.uniform(-room, room)) * strength)
    return Perturbation(
        rotation=float(rng.uniform(-5, 5)) * strength,
        stretch=float(rng.uniform(-0.06, 0.06)) * strength,
        bend=float(rng.uniform(-0.12, 0.12)) * strength,
        warp=up_to(0.07),
        pattern_warp=up_to(0.08),
        broken=up_to(0.06),
        colour_shift=up_to(12.0),
        blur=up_to(0.8),
        noise=up_to(8.0),
        jpeg_quality=int(rng.integers(70, 96)) if rng.random() < 0.5 else 0,
        shift_x=shifts[0],
        shift_y=shifts[1],
        seed=int(rng.integers(2**31)),
    )


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0.05:
        return image
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = image.astype(np.float32)
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(out.ndim)], mode="edge")
        out = sum(w * np.take(padded, np.arange(i, i + out.shape[axis]), axis=axis) for i, w in enumerate(taps))
    return out


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buffer = io.BytesIO()
    # Full-resolution colour (4:4:4): the DCT's blocks and ringing, as a decoder's artefacts look; the
    # usual half-resolution colour of a JPEG file would smear a 32 px image's colours by 2 px,
    # which no diffusion model's output shows.
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=0)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def render_perturbed(scene: Scene, perturbation: Perturbation) -> np.ndarray:
    """Draw a scene with a perturbation as an RGB uint8 array (RESOLUTION x RESOLUTION x 3)."""
    p = perturbation
    rng = np.random.default_rng(p.seed)
    n = RESOLUTION * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)
    cx, cy, radius = render.placement(scene)
    u = (x - cx - p.shift_x) / radius
    v = (y - cy - p.shift_y) / radius
    # Inverse map from the image to the object: rotate, stretch, bend, then a smooth wave.
    angle = math.radians(p.rotation)
    u, v = u * math.cos(angle) + v * math.sin(angle), -u * math.sin(angle) + v * math.cos(angle)
    u, v = u / (1 + p.stretch), v / (1 - p.stretch)
    u = u + p.bend * v * v
    phases = rng.uniform(0, 2 * math.pi, size=4)
    u = u + p.warp * np.sin(2.2 * v + phases[0])
    v = v + p.warp * np.sin(2.2 * u + phases[1])
    inside = render.shape_mask(scene.cls, u, v)
    canvas = np.empty(u.shape + (3,), dtype=np.float32)

    def shifted(name: str) -> np.ndarray:
        offset = rng.uniform(-p.colour_shift, p.colour_shift, size=3)
        return np.clip(np.array(PALETTE[name], dtype=np.float32) + offset, 0, 255)

    canvas[:] = shifted(scene.background)
    canvas[inside] = shifted(scene.colour)
    if scene.pattern != "plain":
        pu = u + p.pattern_warp * np.sin(3.1 * v + phases[2])
        pv = v + p.pattern_warp * np.sin(3.1 * u + phases[3])
        second = render.pattern_mask(scene.pattern, pu, pv, scene.variant)
        if p.broken > 0:
            # Patches about a pixel and a half across where the colours swap: a pattern with holes.
            cells = rng.random((n // 6 + 1, n // 6 + 1)) < p.broken
            second = second ^ np.kron(cells, np.ones((6, 6), dtype=bool))[:n, :n]
        canvas[inside & second] = shifted(scene.colour2 or scene.colour)
    image = canvas.reshape(RESOLUTION, SUPERSAMPLE, RESOLUTION, SUPERSAMPLE, 3).mean(axis=(1, 3))
    image = _gaussian_blur(image, p.blur)
    if p.noise > 0:
        image = image + rng.normal(0.0, p.noise, size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if p.jpeg_quality:
        image = _jpeg(image, p.jpeg_quality)
    return image


def random_scenes(seed: int, count: int, pattern_share: float = 0.6) -> list[Scene]:
    """`count` random scenes of every combination (held-out and reserved ones included), seeded."""
    rng = np.random.default_rng(seed)
    return [render.random_scene(rng, include_held_out=True, pattern_share=pattern_share, anywhere=True)
            for _ in range(count)]


def perturbed_set(seed: int, count: int, strength: float = 1.0,
                  pattern_share: float = 0.6) -> tuple[list[Scene], list[np.ndarray]]:
    """A seeded validation set: random scenes and their perturbed drawings."""
    scenes = random_scenes(seed, count, pattern_share)
    rng = np.random.default_rng([seed, 1])
    images = [render_perturbed(s, random_perturbation(rng, s, strength)) for s in scenes]
    return scenes, images


ORACLE_ATTRIBUTES = ("class", "colour", "background", "size", "position", "pattern", "colour2", "variant")


def through_vae(images: list[np.ndarray], model_dir=None, batch_size: int = 64) -> list[np.ndarray]:
    """Images encoded and decoded by a shapes-world model's VAE (default: the shipped model's)."""
    import torch
    from diffusers import AutoencoderKL

    from . import MODEL_DIR

    vae = AutoencoderKL.from_pretrained(str(model_dir or MODEL_DIR), subfolder="vae", torch_dtype=torch.float32)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.stack(images[start:start + batch_size])).permute(0, 3, 1, 2).float() / 127.5 - 1
            decoded = vae.decode(vae.encode(batch).latent_dist.mean).sample
            out += list(((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return out


def oracle_accuracy(count: int = 600, seed: int = 0, strength: float = 1.0, vae_model=None) -> dict:
    """The oracle's per-attribute accuracy on `count` seeded scenes, drawn clean and perturbed.

    Scenes whose pattern cannot be seen (`render.pattern_visible`) are left out and counted. Returns
    {"clean": {attribute: share}, "perturbed": {...}, "scenes": n, "left_out": k, "seed", "strength"};
    "colour2" and "variant" are counted over patterned scenes only. With `vae_model` (a pipeline
    folder, or True for the shipped model) a "vae" row reads the clean renders after that VAE's round trip.
    """
    from . import oracle

    scenes, images = perturbed_set(seed, count, strength)
    kept = [(s, im) for s, im in zip(scenes, images) if render.pattern_visible(s)]
    truths = [s.attributes() for s, _ in kept]
    result: dict = {"scenes": len(kept), "left_out": len(scenes) - len(kept), "seed": seed, "strength": strength}
    clean = [render.render(s) for s, _ in kept]
    sets = [("clean", clean), ("perturbed", [im for _, im in kept])]
    if vae_model:
        sets.append(("vae", through_vae(clean, None if vae_model is True else vae_model)))
    for name, drawn in sets:
        accuracy = oracle.attribute_accuracy(oracle.read_all(drawn), truths)
        result[name] = {k: accuracy[k] for k in ORACLE_ATTRIBUTES if k in accuracy}
    result["patterned"] = sum(s.pattern != "plain" for s, _ in kept)
    return result


def format_oracle_accuracy(result: dict) -> str:
    """A plain-text table of an `oracle_accuracy` result."""
    lines = [f"oracle accuracy on {result['scenes']} seeded scenes ({result['patterned']} patterned; seed "
             f"{result['seed']}, perturbation strength {result['strength']}; {result['left_out']} left out: "
             "pattern not visible)",
             f"{'set':<10} " + " ".join(f"{k:>9}" for k in ORACLE_ATTRIBUTES)]
    for name in ("clean", "perturbed", "vae"):
        if name not in result:
            continue
        row = result[name]
        lines.append(f"{name:<10} " + " ".join(f"{row[k]:>9.1%}" if k in row else f"{'-':>9}" for k in ORACLE_ATTRIBUTES))
    return "\n".join(lines)
