"""Training examples: instance and class (prior) images, augmentation, loss masks and batch sampling.

Every random choice for one example (crop, flip, rescale, prompt words, and in the loop its noise and
timestep) comes from a generator keyed by (seed, what, stream index). The stream index counts examples
from the start of the run across steps, accumulation and processes, so a resumed run, a run split over
several processes and an uninterrupted single-process run see exactly the same examples.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
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
    return resize_crop_at(image, size, center=center, gen=gen)[0]


def cover_size(width: int, height: int, target: tuple[int, int]) -> tuple[int, int]:
    """The size (w, h) an image is resized to so that it just covers `target` (w, h), aspect kept."""
    scale = max(target[0] / width, target[1] / height)
    return max(target[0], round(width * scale)), max(target[1], round(height * scale))


def resize_crop_at(image: Image.Image, size: int | tuple[int, int], *, center: bool,
                   gen: torch.Generator | None) -> tuple[Image.Image, tuple[int, int]]:
    """`resize_crop` to a square `size` or a (width, height) box, also returning the crop's top-left corner.

    The image is resized to just cover the box, then cropped to it. The corner (top, left) is in the
    resized image; it is what SDXL's micro-conditioning is told about the crop.
    """
    target = (size, size) if isinstance(size, int) else tuple(size)
    new_w, new_h = cover_size(*image.size, target)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if center or gen is None:
        left, top = (new_w - target[0]) // 2, (new_h - target[1]) // 2
    else:
        left, top = _randint(gen, 0, new_w - target[0]), _randint(gen, 0, new_h - target[1])
    return image.crop((left, top, left + target[0], top + target[1])), (top, left)


def make_buckets(resolution: int, step: int, max_ratio: float) -> list[tuple[int, int]]:
    """Bucket sizes (w, h): multiples of `step` with an area of at most resolution², aspect within `max_ratio`.

    For each width the tallest height that keeps the area is taken, so every bucket holds about
    as many pixels as the square one (which is always among them).
    """
    area, buckets = resolution * resolution, {(resolution, resolution)}
    for width in range(step, int(resolution * max_ratio) + 1, step):
        height = area // width // step * step
        if height >= step and max(width / height, height / width) <= max_ratio:
            buckets.add((width, height))
    return sorted(buckets)


def nearest_bucket(buckets: list[tuple[int, int]], width: int, height: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log ratio, so 2:1 and 1:2 are as far from 1:1)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def class_image_counts(sizes: list[tuple[int, int]], total: int) -> dict[tuple[int, int], int]:
    """How many of `total` class images each bucket gets: in proportion to its instance images (`sizes`, one
    bucket per image), at least one each, largest remainders first; ordered by bucket."""
    share = {size: sizes.count(size) * total / len(sizes) for size in sorted(set(sizes))}
    counts = {size: max(1, int(v)) for size, v in share.items()}
    for size in sorted(share, key=lambda s: (int(share[s]) - share[s], s)):
        if sum(counts.values()) >= total:
            break
        counts[size] += 1
    return counts


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
    original_size: tuple[int, int] = (0, 0)  # (height, width) of the image file, before any resizing
    crop_top_left: tuple[int, int] = (0, 0)  # where the crop starts in the resized image (top, left)


@dataclass
class ImageSet:
    """Images with one prompt each (a concept's instances, or its class images)."""

    images: list[Image.Image]
    prompts: list[str]
    tensors: list[torch.Tensor] = field(default_factory=list)
    crops: list[tuple[int, int]] = field(default_factory=list)


class TrainData:
    """Instance and prior examples for one run, addressed by stream index (and, bucketed, by batch index).

    With `bucketing`, each instance image goes to the bucket (see `make_buckets`) nearest its aspect
    ratio and is resized to cover it and cropped, not squared; every batch comes from one bucket and
    its class images are cropped to that bucket's size. Each epoch shuffles every bucket's images
    and the order of the batches by keys of (seed, epoch), so any batch can be computed on its own.
    """

    def __init__(self, concepts: list[Concept], priors: list[ImageSet] | None, *, resolution: int,
                 center_crop: bool, random_flip: bool, augment: bool, latent_scale: int, seed: int,
                 repeats: int = 1, bucketing: bool = False, bucket_step: int = 64, bucket_max_ratio: float = 2.0,
                 caption_dropout: float = 0.0, keep_pixels: bool = True):
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.augment = augment
        self.latent_scale = latent_scale
        self.seed = seed
        self.bucketing = bucketing
        self.caption_dropout = caption_dropout
        if bucketing and augment:
            raise ConfigError("bucketing: Custom Diffusion's rescale augmentation works on square crops; set "
                              "augment = 'off' or bucketing = false.")
        self.instances = [ImageSet(c.images * repeats, c.prompts * repeats) for c in concepts]
        self.priors = priors or []
        self._perms: dict[tuple, torch.Tensor] = {}
        self._epochs: dict[tuple, list] = {}
        self._fixed_priors: dict[tuple, tuple[torch.Tensor, tuple[int, int]]] = {}
        square = (resolution, resolution)
        self.buckets = make_buckets(resolution, bucket_step, bucket_max_ratio) if bucketing else [square]
        #: The (width, height) each instance image trains at, per concept.
        self.sizes = [[nearest_bucket(self.buckets, *im.size) if bucketing else square for im in s.images]
                      for s in self.instances]
        #: The bucket of each class image, per concept: a bucketed batch takes its class half from its own
        #: bucket (class images are generated at the buckets' sizes), else from all, cropped to it.
        self.prior_sizes = [[nearest_bucket(self.buckets, *im.size) if bucketing else square for im in p.images]
                            for p in self.priors]
        self.keep_pixels = keep_pixels
        # Fixed preprocessing is done once (unless the pixels may not all fit in memory); random crops
        # and flips are redone per example.
        if self.deterministic and keep_pixels:
            for image_set, sizes in zip(self.instances + self.priors, self.sizes + self.prior_sizes):
                fixed = [self._fixed(im, size) for im, size in zip(image_set.images, sizes)]
                image_set.tensors = [t for t, _ in fixed]
                image_set.crops = [c for _, c in fixed]

    @property
    def deterministic(self) -> bool:
        """True when an image always gives the same pixels, so its latents can be cached."""
        return self.center_crop and not self.random_flip and not self.augment

    def _fixed(self, image: Image.Image, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        image, crop = resize_crop_at(image, size, center=True, gen=None)
        return to_tensor(image), crop

    def _pick(self, kind: str, sets: list[ImageSet], k: int, bucket: tuple[int, int] | None = None) -> tuple[int, int]:
        """Stream index -> (concept, image): concepts alternate; each concept walks its own shuffled epochs
        (of its class images in `bucket`, when it has any there)."""
        concept = k % len(sets)
        local = k // len(sets)
        members = [i for i, size in enumerate(self.prior_sizes[concept]) if size == bucket] if bucket else []
        n = len(members) or len(sets[concept].images)
        epoch, pos = divmod(local, n)
        key = (kind, concept, *bucket, epoch) if members else (kind, concept, epoch)
        if key not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            self._perms[key] = torch.randperm(n, generator=keyed_generator(self.seed, "perm", *key))
        index = int(self._perms[key][pos])
        return concept, members[index] if members else index

    def _pixels(self, image_set: ImageSet, index: int, gen: torch.Generator,
                size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """An image's training pixels at `size` (w, h) and the top-left corner of its crop."""
        if image_set.tensors and tuple(image_set.tensors[index].shape[-2:]) == (size[1], size[0]):
            return image_set.tensors[index], image_set.crops[index]
        image = image_set.images[index]
        cropped, (top, left) = resize_crop_at(image, size, center=self.center_crop, gen=gen)
        pixels = to_tensor(cropped)
        if self.random_flip and _uniform(gen) < 0.5:
            pixels = pixels.flip(-1)
            # Mirrored, the crop starts as far from the resized image's left edge as it ended from its right.
            left = cover_size(*image.size, size)[0] - left - size[0]
        return pixels, (top, left)

    def _instance_example(self, k: int, concept: int, index: int) -> Example:
        image_set = self.instances[concept]
        gen = keyed_generator(self.seed, "instance-aug", k)
        pixels, crop = self._pixels(image_set, index, gen, self.sizes[concept][index])
        prompt, mask = image_set.prompts[index], None
        if self.augment:
            pixels, mask, words = rescale_augment(pixels, self.latent_scale, gen)
            prompt = words + prompt
        # Its own key, so that turning dropout on changes no other random choice.
        if self.caption_dropout and _uniform(keyed_generator(self.seed, "caption-dropout", k)) < self.caption_dropout:
            prompt = ""
        size = image_set.images[index].size
        return Example(pixels, prompt, mask, ("instance", concept, index), (size[1], size[0]), crop)

    def instance(self, k: int) -> Example:
        """The k-th instance example of the run (without bucketing; see `instance_batch`)."""
        return self._instance_example(k, *self._pick("instance", self.instances, k))

    def _epoch_batches(self, epoch: int, batch: int) -> list[list[tuple[int, int]]]:
        """The bucketed batches of one epoch, each a list of (concept, image) from one bucket."""
        key = (epoch, batch)
        if key not in self._epochs:
            if len(self._epochs) > 8:
                self._epochs.clear()
            batches = []
            for b, bucket in enumerate(self.buckets):
                members = [(c, i) for c, sizes in enumerate(self.sizes) for i, size in enumerate(sizes) if size == bucket]
                if not members:
                    continue
                perm = torch.randperm(len(members), generator=keyed_generator(self.seed, "bucket-perm", b, epoch))
                order = [members[int(p)] for p in perm]
                # The last batch of a bucket is filled from its start: every batch is full and one size.
                batches += [[order[(start + j) % len(order)] for j in range(batch)] for start in range(0, len(order), batch)]
            perm = torch.randperm(len(batches), generator=keyed_generator(self.seed, "bucket-order", epoch))
            self._epochs[key] = [batches[int(p)] for p in perm]
        return self._epochs[key]

    def instance_batch(self, g: int, batch: int, rank: int = 0, world: int = 1) -> tuple[range, list[Example]]:
        """Process `rank`'s share of the g-th global batch (`batch` examples per process): stream indices, examples.

        The global batch (batch x world examples, one bucket when bucketing) depends on g alone, so a
        run split over processes, resumed, or uninterrupted sees the same examples.
        """
        first = (g * world + rank) * batch
        ks = range(first, first + batch)
        if not self.bucketing:
            return ks, [self.instance(k) for k in ks]
        per_epoch = len(self._epoch_batches(0, batch * world))
        epoch, pos = divmod(g, per_epoch)
        picks = self._epoch_batches(epoch, batch * world)[pos][rank * batch : (rank + 1) * batch]
        return ks, [self._instance_example(k, c, i) for k, (c, i) in zip(ks, picks)]

    def prior(self, k: int, size: tuple[int, int] | None = None) -> Example:
        """The k-th class example of the run, at `size` (w, h; default square); never masked, as in the paper.

        Bucketed, it is one of the class images of that bucket when the concept has any there.
        """
        size = size or (self.resolution, self.resolution)
        concept, index = self._pick("prior", self.priors, k, size if self.bucketing else None)
        image_set = self.priors[concept]
        gen = keyed_generator(self.seed, "prior-aug", k)
        own_size = size == self.prior_sizes[concept][index]
        source = ("prior", concept, index) if own_size else ("prior", concept, index, *size)
        if self.deterministic and self.keep_pixels and not own_size:
            if source not in self._fixed_priors:
                self._fixed_priors[source] = self._fixed(image_set.images[index], size)
            pixels, crop = self._fixed_priors[source]
        else:
            pixels, crop = self._pixels(image_set, index, gen, size)
        original = image_set.images[index].size
        return Example(pixels, image_set.prompts[index], None, source, (original[1], original[0]), crop)

    def all_fixed_examples(self):
        """Every image as an Example at its own bucket (square unless bucketing), for latent caching when
        preprocessing is deterministic; made one at a time when the pixels are not kept."""
        for kind, sets, sizes in (("instance", self.instances, self.sizes), ("prior", self.priors, self.prior_sizes)):
            for c, image_set in enumerate(sets):
                for i, image in enumerate(image_set.images):
                    pixels, crop = (image_set.tensors[i], image_set.crops[i]) if image_set.tensors \
                        else self._fixed(image, sizes[c][i])
                    yield Example(pixels, image_set.prompts[i], None, (kind, c, i), (image.size[1], image.size[0]), crop)

    def all_prompts(self) -> list[str]:
        """Every prompt an example can have (for text-embedding caching; not with augmentation words)."""
        prompts = {p for s in self.instances + self.priors for p in s.prompts} | ({""} if self.caption_dropout else set())
        if self.augment:
            prompts |= {w + p for s in self.instances for p in s.prompts for w in FAR_WORDS + CLOSE_WORDS}
        return sorted(prompts)
