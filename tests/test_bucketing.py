"""Aspect-ratio bucketing: buckets, one size per batch, keyed and split-independent batches."""

from __future__ import annotations

import pytest
import torch

from dreamtune.data.dataset import TrainData, make_buckets, nearest_bucket


def _data(varied_subject_dir, priors=None, **overrides):
    from dreamtune.config import ConceptConfig
    from dreamtune.data.concepts import load_concept

    concept = load_concept(ConceptConfig(instance_data_dir=str(varied_subject_dir), class_noun="dog"))
    args = dict(resolution=32, center_crop=False, random_flip=True, augment=False, latent_scale=2, seed=5,
                bucketing=True, bucket_step=8, bucket_max_ratio=2.0)
    args.update(overrides)
    return TrainData([concept], priors, **args)


def test_buckets_keep_the_area_and_follow_the_aspect_ratio():
    assert make_buckets(32, 8, 2.0) == [(24, 40), (32, 32), (40, 24)]
    buckets = make_buckets(1024, 64, 2.0)
    assert (1024, 1024) in buckets and (1216, 832) in buckets and (832, 1216) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 for w, h in buckets)
    assert nearest_bucket(buckets, 1920, 1080) == (1344, 768)
    assert nearest_bucket(buckets, 1000, 1000) == (1024, 1024)


def test_each_batch_is_one_bucket_and_an_epoch_visits_every_image(varied_subject_dir):
    data = _data(varied_subject_dir)
    assert data.sizes == [[(40, 24), (24, 40), (32, 32), (32, 32)]]
    seen = set()
    for g in range(3):  # one epoch: (32, 32) holds two images, the other buckets one each
        ks, examples = data.instance_batch(g, 2)
        assert list(ks) == [2 * g, 2 * g + 1]
        assert len({tuple(e.pixels.shape) for e in examples}) == 1
        seen |= {e.source for e in examples}
        for e in examples:
            height, width = e.pixels.shape[-2:]
            image = data.instances[0].images[e.source[2]]
            assert e.original_size == (image.size[1], image.size[0])
            top, left = e.crop_top_left
            assert 0 <= top and 0 <= left and (width, height) == data.sizes[0][e.source[2]]
    assert {s[2] for s in seen} == {0, 1, 2, 3}


def test_batches_do_not_depend_on_the_process_split_or_the_order_asked(varied_subject_dir):
    one, two = _data(varied_subject_dir), _data(varied_subject_dir)
    for g in (4, 0, 7, 4):
        _, whole = one.instance_batch(g, 2)
        _, first = two.instance_batch(g, 1, rank=0, world=2)
        _, second = two.instance_batch(g, 1, rank=1, world=2)
        for a, b in zip(whole, first + second):
            assert a.source == b.source and a.crop_top_left == b.crop_top_left and torch.equal(a.pixels, b.pixels)
    other_seed = _data(varied_subject_dir, seed=6)
    orders = [[e.source for g in range(6) for e in d.instance_batch(g, 2)[1]] for d in (one, other_seed)]
    assert orders[0] != orders[1]


def test_bucketing_refuses_the_square_only_augmentation(varied_subject_dir):
    from dreamtune.errors import ConfigError

    with pytest.raises(ConfigError, match="bucketing: .*augment = 'off'"):
        _data(varied_subject_dir, augment=True)


def test_bucketed_class_images_come_from_their_own_bucket_uncropped(varied_subject_dir):
    from PIL import Image

    from dreamtune.data.dataset import ImageSet, class_image_counts

    # Class images are generated per bucket in proportion to the subject's images there, at least one each.
    assert class_image_counts([(40, 24), (24, 40), (32, 32), (32, 32)], 8) == {(24, 40): 2, (32, 32): 4, (40, 24): 2}
    assert class_image_counts([(40, 24), (24, 40), (32, 32), (32, 32)], 2) == {(24, 40): 1, (32, 32): 1, (40, 24): 1}
    sizes = [(40, 24), (40, 24), (24, 40), (32, 32), (32, 32)]
    images = [Image.new("RGB", size, (50 * i, 90, 160)) for i, size in enumerate(sizes)]
    data = _data(varied_subject_dir, priors=[ImageSet(images, ["a photo of dog"] * len(images))])
    used = {}
    for g in range(9):
        ks, examples = data.instance_batch(g, 2)
        height, width = examples[0].pixels.shape[-2:]
        for k in ks:
            prior = data.prior(k, (width, height))
            assert tuple(prior.pixels.shape[-2:]) == (height, width)
            # Its own size: nothing cropped away, so SDXL is told original = target and a (0, 0) corner.
            assert prior.original_size == (height, width) and prior.crop_top_left == (0, 0)
            used.setdefault((width, height), set()).add(prior.source[2])
    assert used == {(40, 24): {0, 1}, (24, 40): {2}, (32, 32): {3, 4}}
