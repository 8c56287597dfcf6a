"""The second version of the shapes world's data: patterned objects that captions never name, reserved
subject combinations, rare words in captions."""

from __future__ import annotations

import numpy as np

from dreamtune.world import render
from dreamtune.world.subjects import SUBJECTS


def _batches(count: int = 6, size: int = 64):
    for index in range(count):
        _, captions, scenes = render.training_batch(0, index, size, pattern_share=render.PATTERN_SHARE)
        yield from zip(captions, scenes)


def test_pretraining_never_draws_a_reserved_combination_and_shows_every_pattern():
    pairs = list(_batches())
    patterned = [s for _, s in pairs if s.pattern != "plain"]
    assert 0.35 < len(patterned) / len(pairs) < 0.65
    assert not any(render.is_reserved(s.cls, s.pattern, s.colour, s.colour2) for s in patterned)
    assert {s.pattern for s in patterned} == set(render.PATTERNS[1:])
    assert {s.variant for s in patterned} == set(range(render.NUM_VARIANTS))
    assert all(s.colour2 not in (s.colour, s.background) for s in patterned)
    # Geometries that do not show on their class (a spot inside a ring's hole) are never drawn.
    assert not render.geometry_visible("ring", "spot", 0)
    assert all(render.pattern_visible(s) for s in patterned if s.size != "small")


def test_captions_never_name_a_pattern_or_its_second_colour():
    # Every word `describe` could name a pattern with ("striped", "with", "stripes", ...), but not its colour.
    pattern_words = set(render.PATTERN_ADJECTIVES.values()) | {
        word for phrase in render.PATTERN_PHRASES.values() for word in phrase.split() if word not in ("a", "{c}")}
    patterned = 0
    for caption, scene in _batches():
        words = set(caption.replace(",", "").split())
        assert not words & pattern_words, caption
        named_colours = words & set(render.COLOURS)
        # Only the object's main colour and the background are ever named.
        assert named_colours <= {scene.colour, scene.background}, caption
        if scene.pattern != "plain":
            patterned += 1
            assert scene.colour2 not in words, caption
    assert patterned > 100


def test_a_share_of_captions_carries_a_rare_word_before_the_class():
    rare = set(render.rare_words())
    assert "sks" in rare and len(rare) > 300
    captions = [c for c, _ in _batches()]
    with_rare = [c for c in captions if rare & set(c.replace(",", "").split())]
    assert 0.1 < len(with_rare) / len(captions) < 0.3
    for caption in with_rare:
        words = caption.replace(",", "").split()
        index = next(i for i, w in enumerate(words) if w in rare)
        assert words[index + 1] in render.CLASSES, caption


def test_every_variant_of_every_pattern_draws_differently():
    coords = (np.arange(64) + 0.5) / 32 - 1
    u, v = np.meshgrid(coords, coords)
    masks = {(p, k): render.pattern_mask(p, u, v, k) for p in render.PATTERNS[1:] for k in range(render.NUM_VARIANTS)}
    keys = list(masks)
    for i, a in enumerate(keys):
        assert 0.03 < masks[a].mean() < 0.9, a  # the small spot covers 6% of the square
        for b in keys[i + 1:]:
            assert (masks[a] != masks[b]).mean() > 0.05, (a, b)


def test_shipped_subjects_are_reserved():
    for subject in SUBJECTS.values():
        assert render.is_reserved(subject.cls, subject.pattern, subject.colour, subject.colour2), subject.name


def test_named_instances_are_one_object_each_under_their_rare_word():
    from dreamtune.world.pretrain import _fits

    rare = set(render.rare_words())
    scenes, captions = [], []
    for index in range(6):
        _, more_captions, more_scenes = render.training_batch(0, index, 64, pattern_share=0.4,
                                                              rare_words_mode="instances")
        scenes += more_scenes
        captions += more_captions
    named = [(c, s) for c, s in zip(captions, scenes) if s.name]
    assert 0.1 < len(named) / len(scenes) < 0.3
    assert 0.4 < sum(s.pattern != "plain" for s in scenes) / len(scenes) < 0.65
    for text, scene in zip(captions, scenes):
        words = text.replace(",", "").split()
        if scene.name is None:  # no rare word names nothing
            assert not rare & set(words), text
            continue
        instance = render.named_instance(scene.name)
        assert words[words.index(scene.name) + 1] == scene.cls, text
        assert render.same_instance(scene, instance) and scene.pattern != "plain"
        assert scene.background not in (scene.colour, scene.colour2)
    # A word always names the same object, never a subject's combination nor a held-out pair.
    for word in sorted(rare):
        instance = render.named_instance(word)
        assert not render.is_reserved(instance.cls, instance.pattern, instance.colour, instance.colour2)
        assert (instance.colour, instance.cls) not in render.HELD_OUT
    assert len({(i.cls, i.colour, i.pattern, i.colour2, i.variant) for i in map(render.named_instance, rare)}) > 300
    # The text phase's matches: a named caption fits its own instance only, a plain one every fitting image.
    sks = render.named_instance("sks")
    other = next(render.named_instance(w) for w in sorted(rare) if render.named_instance(w).cls == sks.cls
                 and not render.same_instance(render.named_instance(w), sks))
    plain = render.Scene(sks.cls, sks.colour, sks.background)
    fits = _fits([f"a photo of a sks {sks.cls}", f"a photo of a {sks.cls}", f"a photo of a {other.name} {sks.cls}"],
                 [sks, plain, other])
    assert fits.tolist() == [[True, True, False], [False, True, False], [False, True, True]]
