"""Training examples: instance and class (prior) images, augmentation, loss masks and batch sampling.

Every random choice for one example (crop, flip, rescale, prompt words, and in the loop its noise and
timestep) comes from a generator keyed by (seed, what, stream index). The stream index counts examples
from the start of the run across steps, accumulation and processes, so a resumed run, a run split over
several processes and an uninterrupted single-process run see exactly the same examples.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .concepts import Concept

FAR_WORDS = ("a far away ", "very small ")
CLOSE_WORDS = ("zoomed in ", "close up ")


def keyed_generator(*key) -> torch.Generator:
    """A CPU generator seeded by a stable hash of `key` (same key, same numbers, on any machine)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _uniform(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high]."""
    return int(torch.randint(low, high + 1, (), generator=gen))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor CHW in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def resize_crop(image: Image.Image, size: int, *, center: bool, gen: torch.Generator | None) -> Image.Image:
    """Resize the shorter side to `size`, then crop a size x size square (centre or random)."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if center or gen is None:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    else:
        left, top = _randint(gen, 0, new_w - size), _randint(gen, 0, new_h - size)
    return image.crop((left, top, left + size, top + size))


def rescale_augment(pixels: torch.Tensor, latent_scale: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Custom Diffusion's augmentation of one image (CHW in [-1, 1]) -> (pixels, latent mask, prompt words).

    With probability 2/3 the image shrinks to between a third of the resolution and the full
    resolution and is pasted at a random place on a blank canvas; the loss mask covers the pasted
    region, inset by one latent pixel, and "a far away "/"very small " goes before the prompt when
    the scale is under 0.6. Otherwise it is enlarged 1.2-1.4x and randomly cropped, with
    "zoomed in "/"close up " when cropped. The mask is at latent resolution.
    """
    _, res, _ = pixels.shape
    lat = res // latent_scale
    mask = torch.ones(1, lat, lat)
    if _uniform(gen) < 2 / 3:
        scale = _randint(gen, max(res // 3, latent_scale * 3), res)
    else:
        scale = _randint(gen, int(1.2 * res), int(1.4 * res))
    scale += scale % 2
    words = ""
    if scale < 0.6 * res:
        words = FAR_WORDS[_randint(gen, 0, 1)]
    elif scale > res:
        words = CLOSE_WORDS[_randint(gen, 0, 1)]
    resized = torch.nn.functional.interpolate(
        pixels[None], size=(scale, scale), mode="bilinear", align_corners=False, antialias=scale < res
    )[0]
    if scale < res:
        canvas = torch.zeros_like(pixels)
        top, left = _randint(gen, 0, res - scale), _randint(gen, 0, res - scale)
        canvas[:, top : top + scale, left : left + scale] = resized
        mask.zero_()
        t0, l0 = top // latent_scale + 1, left // latent_scale + 1
        t1, l1 = (top + scale) // latent_scale - 1, (left + scale) // latent_scale - 1
        mask[:, t0 : max(t0 + 1, t1), l0 : max(l0 + 1, l1)] = 1.0
        return canvas, mask, words
    if scale > res:
        top, left = _randint(gen, 0, scale - res), _randint(gen, 0, scale - res)
        resized = resized[:, top : top + res, left : left + res]
    return resized.contiguous(), mask, words


@dataclass
class Example:
    """One training example before encoding."""

    pixels: torch.Tensor  # CHW in [-1, 1]
    prompt: str
    mask: torch.Tensor | None = None  # 1 x h x w at latent resolution, None: the whole image
    source: tuple = ()  # ("instance"|"prior", concept index, image index): the key for cached latents


@dataclass
class ImageSet:
    """Images with one prompt each (a concept's instances, or its class images)."""

    images: list[Image.Image]
    prompts: list[str]
    tensors: list[torch.Tensor] = field(default_factory=list)


class TrainData:
    """Instance and prior examples for one run, addressed by stream index."""

    def __init__(self, concepts: list[Concept], priors: list[ImageSet] | None, *, resolution: int,
                 center_crop: bool, random_flip: bool, augment: bool, latent_scale: int, seed: int,
                 repeats: int = 1):
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.augment = augment
        self.latent_scale = latent_scale
        self.seed = seed
        self.instances = [ImageSet(c.images * repeats, c.prompts * repeats) for c in concepts]
        self.priors = priors or []
        self._perms: dict[tuple, torch.Tensor] = {}
        # Fixed preprocessing is done once; random crops and flips are redone per example.
        if self.deterministic:
            for image_set in self.instances + self.priors:
                image_set.tensors = [self._fixed(im) for im in image_set.images]

    @property
    def deterministic(self) -> bool:
        """True when an image always gives the same pixels, so its latents can be cached."""
        return self.center_crop and not self.random_flip and not self.augment

    def _fixed(self, image: Image.Image) -> torch.Tensor:
        return to_tensor(resize_crop(image, self.resolution, center=True, gen=None))

    def _pick(self, kind: str, sets: list[ImageSet], k: int) -> tuple[int, int]:
        """Stream index -> (concept, image): concepts alternate; each concept walks its own shuffled epochs."""
        concept = k % len(sets)
        local = k // len(sets)
        n = len(sets[concept].images)
        epoch, pos = divmod(local, n)
        key = (kind, concept, epoch)
        if key not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            self._perms[key] = torch.randperm(n, generator=keyed_generator(self.seed, "perm", *key))
        return concept, int(self._perms[key][pos])

    def _pixels(self, image_set: ImageSet, index: int, gen: torch.Generator) -> torch.Tensor:
        if image_set.tensors:
            return image_set.tensors[index]
        image = resize_crop(image_set.images[index], self.resolution, center=self.center_crop, gen=gen)
        pixels = to_tensor(image)
        if self.random_flip and _uniform(gen) < 0.5:
            pixels = pixels.flip(-1)
        return pixels

    def instance(self, k: int) -> Example:
        """The k-th instance example of the run."""
        concept, index = self._pick("instance", self.instances, k)
        image_set = self.instances[concept]
        gen = keyed_generator(self.seed, "instance-aug", k)
        pixels = self._pixels(image_set, index, gen)
        prompt, mask = image_set.prompts[index], None
        if self.augment:
            pixels, mask, words = rescale_augment(pixels, self.latent_scale, gen)
            prompt = words + prompt
        return Example(pixels, prompt, mask, ("instance", concept, index))

    def prior(self, k: int) -> Example:
        """The k-th class example of the run (never masked, as in the paper)."""
        concept, index = self._pick("prior", self.priors, k)
        image_set = self.priors[concept]
        gen = keyed_generator(self.seed, "prior-aug", k)
        pixels = self._pixels(image_set, index, gen)
        return Example(pixels, image_set.prompts[index], None, ("prior", concept, index))

    def all_fixed_examples(self):
        """Every (source key, pixels) pair, for latent caching when preprocessing is deterministic."""
        for kind, sets in (("instance", self.instances), ("prior", self.priors)):
            for c, image_set in enumerate(sets):
                for i, pixels in enumerate(image_set.tensors):
                    yield (kind, c, i), pixels

    def all_prompts(self) -> list[str]:
        """Every prompt an example can have (for text-embedding caching; not with augmentation words)."""
        prompts = {p for s in self.instances + self.priors for p in s.prompts}
        if self.augment:
            prompts |= {w + p for s in self.instances for p in s.prompts for w in FAR_WORDS + CLOSE_WORDS}
        return sorted(prompts)
