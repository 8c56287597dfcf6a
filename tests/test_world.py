"""The shapes world: rendering, captions, subjects and the oracle (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dreamtune.errors import DreamtuneError
from dreamtune.world import oracle, render
from dreamtune.world.render import HELD_OUT, Scene
from dreamtune.world.subjects import (
    SUBJECTS,
    class_prompt,
    get_subject,
    subject_prompts,
    write_subject_images,
)


def test_batches_are_deterministic_and_differ_by_index():
    a_images, a_captions, _ = render.training_batch(3, 7, 8)
    b_images, b_captions, _ = render.training_batch(3, 7, 8)
    c_images, _, _ = render.training_batch(3, 8, 8)
    assert np.array_equal(a_images, b_images) and a_captions == b_captions
    assert not np.array_equal(a_images, c_images)
    assert a_images.shape == (8, 32, 32, 3) and a_images.dtype == np.uint8


def test_captions_leave_attributes_out_and_never_show_held_out_pairs():
    captions, scenes = [], []
    for index in range(4):
        _, more_captions, more_scenes = render.training_batch(0, index, 500)
        captions += more_captions
        scenes += more_scenes
    bare = [c for c, s in zip(captions, scenes) if c.removeprefix("a photo of ") in (f"a {s.cls}", f"an {s.cls}")]
    with_colour = [c for c, s in zip(captions, scenes) if f" {s.colour} " in f" {c} "]
    with_background = [c for c in captions if "background" in c]
    assert bare, "bare class captions ('a star') must occur"
    assert 0.5 < len(with_colour) / len(captions) < 0.9
    assert 0.4 < len(with_background) / len(captions) < 0.8
    # Position is not in the vocabulary: every object is centred and no caption names a place.
    assert all(s.position == "center" for s in scenes)
    assert not any(phrase in c for c in captions for phrase in render.POSITION_PHRASES.values())
    assert all(s.cls in c for c, s in zip(captions, scenes))
    assert not any((s.colour, s.cls) in HELD_OUT for s in scenes)
    assert all(s.pattern == "plain" and s.colour != s.background for s in scenes)


def test_held_out_pairs_can_be_kept_out_of_second_colours_too():
    def second_colour_pairs(hold_out: bool) -> set:
        scenes = [s for index in range(4)
                  for s in render.training_batch(0, index, 500, pattern_share=0.5, hold_out_second_colour=hold_out)[2]]
        assert not any((s.colour, s.cls) in HELD_OUT for s in scenes)
        return {(s.colour2, s.cls) for s in scenes if s.pattern != "plain"} & set(HELD_OUT)

    assert second_colour_pairs(False), "a held-out pair is drawn as a second colour unless asked not to"
    assert not second_colour_pairs(True)


def test_render_draws_the_object_where_the_scene_says():
    image = render.render(Scene("square", "red", "blue", "small", "top left"))
    assert tuple(image[0, -1]) == render.PALETTE["blue"]
    assert tuple(image[8, 8]) == render.PALETTE["red"]
    assert tuple(image[24, 24]) == render.PALETTE["blue"]


def test_object_coverage_marks_exactly_the_object_pixels():
    for scene in render.iter_scenes(5, 12):
        image = render.render(scene).astype(int)
        cover = render.object_coverage(scene, render.RESOLUTION)
        background = np.all(image == render.PALETTE[scene.background], axis=-1)
        colour = np.all(image == render.PALETTE[scene.colour], axis=-1)
        assert np.array_equal(cover == 0, background), scene
        assert np.array_equal(cover == 1, colour), scene
        half = render.object_coverage(scene, render.RESOLUTION // 2, supersample=2 * render.SUPERSAMPLE)
        assert half.shape == (16, 16)
        assert np.allclose(half, cover.reshape(16, 2, 16, 2).mean(axis=(1, 3)), atol=1e-6)


def _attribute_share(readings, scenes) -> float:
    hits = total = 0
    for reading, scene in zip(readings, scenes):
        got = reading.attributes()
        for key, value in scene.attributes().items():
            total += 1
            hits += got.get(key) == value
    return hits / total


def _subject_like_scenes(rng, count):
    # The subjects' class-pattern pairs in random colours, at the sizes subjects are shown.
    subjects = list(SUBJECTS.values())
    scenes = []
    for _ in range(count):
        subject = subjects[rng.integers(len(subjects))]
        colour, colour2, background = rng.choice(render.COLOURS, size=3, replace=False)
        scenes.append(Scene(subject.cls, str(colour), str(background), str(rng.choice(["medium", "large"])),
                            str(rng.choice(render.POSITIONS)), subject.pattern, str(colour2),
                            int(rng.integers(render.NUM_VARIANTS)), jitter_x=float(rng.uniform(-1, 1)), jitter_y=float(rng.uniform(-1, 1))))
    return scenes


def test_oracle_reads_rendered_images():
    rng = np.random.default_rng(11)
    scenes = [render.random_scene(rng, include_held_out=True, pattern_share=0.4) for _ in range(120)]
    scenes += _subject_like_scenes(rng, 40)
    readings = [oracle.read(render.render(s)) for s in scenes]
    assert _attribute_share(readings, scenes) >= 0.99
    accuracy = oracle.attribute_accuracy(readings, [s.attributes() for s in scenes])
    assert min(accuracy[k] for k in ("class", "colour", "background")) >= 0.98


def test_oracle_reads_pil_images_of_other_sizes():
    scene = Scene("heart", "purple", "yellow", "large", "right")
    image = render.render_pil(scene, resolution=64)
    assert image.size == (64, 64)
    assert oracle.read(image).attributes() == scene.attributes()


def test_oracle_finds_no_object_in_an_empty_image():
    empty = np.full((32, 32, 3), render.PALETTE["green"], dtype=np.uint8)
    reading = oracle.read(empty)
    assert reading.cls is None and reading.background == "green"


def test_subjects_write_readable_references(tmp_path):
    assert len(SUBJECTS) >= 6
    for subject in SUBJECTS.values():
        scenes = subject.reference_scenes()
        assert 4 <= len(scenes) <= 6
        assert len({(s.background, s.size) for s in scenes}) == len(scenes)
    paths = write_subject_images("striped_star", tmp_path / "star", captions=True)
    assert [p.name for p in paths] == [f"{i:02d}.png" for i in range(len(paths))]
    assert paths[0].with_suffix(".txt").read_text().strip() == "a photo of a sks star"
    readings = [oracle.read(Image.open(p)) for p in paths]
    assert all(r.cls == "star" and r.pattern == "stripes" for r in readings)
    with pytest.raises(DreamtuneError, match="unknown subject"):
        get_subject("no_such_subject")


@pytest.mark.parametrize("name", sorted(SUBJECTS))
def test_oracle_recognises_each_subject_and_not_its_plain_class(name):
    subject = SUBJECTS[name]
    references = [oracle.read(image) for image in subject.reference_images()]
    signature = oracle.subject_signature(references)
    assert signature == subject.identity()
    plain = [oracle.read(render.render(Scene(subject.cls, subject.colour, bg, "large")))
             for bg in subject.backgrounds()[:3]]
    assert oracle.subject_fidelity(references, references) == 1.0
    assert oracle.subject_fidelity(plain, references) < 0.5
    assert oracle.language_drift(references, references) == 1.0
    assert oracle.language_drift(plain, references) == 0.0
    # The same look in another geometry is not the subject.
    other = (subject.variant + 1) % render.NUM_VARIANTS
    moved = [oracle.read(render.render(Scene(subject.cls, subject.colour, bg, "large", "center", subject.pattern,
                                             subject.colour2, other))) for bg in subject.backgrounds()[:3]]
    assert oracle.subject_fidelity(moved, references) == pytest.approx(0.8)
    assert not any(oracle.subject_present(r, signature) for r in moved)
    assert oracle.language_drift(moved, references) == 0.0


def test_subject_prompts_carry_their_ground_truth():
    subject = get_subject("banded_triangle")
    prompts = subject_prompts(subject)
    kinds = {p.kind for p in prompts}
    assert kinds == {"recontextualisation", "size", "property"}
    for prompt in prompts:
        assert "{identifier} {class_noun}" in prompt.template
        text = prompt.format("sks", subject.class_noun)
        assert "sks triangle" in text
        for key, value in prompt.attributes.items():
            assert value in text, (key, text)
    assert class_prompt(subject) == "a photo of a triangle"


def test_prompt_fidelity_and_diversity_measure_what_they_say():
    scenes = [Scene("star", "red", bg, "medium", pos) for bg, pos in (("blue", "left"), ("green", "top"))]
    readings = [oracle.read(render.render(s)) for s in scenes]
    assert oracle.prompt_fidelity(readings, [{"colour": "red", "background": "blue"},
                                             {"colour": "red", "background": "green"}]) == 1.0
    assert oracle.prompt_fidelity(readings, [{"colour": "red", "background": "white"},
                                             {"colour": "blue", "background": "green"}]) == 0.5
    same = [readings[0], readings[0], readings[0]]
    assert oracle.diversity(same) == 0.0
    assert oracle.diversity(readings) > 0.3
