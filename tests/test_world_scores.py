"""Generated subjects and the scores of the papers' protocol: subject identity, prompt fidelity, joint success, intervals."""

from __future__ import annotations

import numpy as np
import pytest

from dreamtune.errors import DreamtuneError
from dreamtune.world import oracle, render, scores
from dreamtune.world.render import Scene
from dreamtune.world.scores import caption_attributes, caption_fits
from dreamtune.world.subjects import SUBJECTS, generate_subjects, get_subject, subject_prompts


def test_generated_subjects_are_seeded_reserved_and_readable():
    subjects = generate_subjects(6, seed=3)
    assert [s.name for s in subjects] == [f"gen-3-{k}" for k in range(6)]
    assert generate_subjects(3, seed=3) == subjects[:3]  # the k-th subject does not depend on n
    assert generate_subjects(6, seed=4) != subjects
    shipped = {(s.cls, s.pattern, s.colour, s.colour2) for s in SUBJECTS.values()}
    for subject in subjects:
        combination = (subject.cls, subject.pattern, subject.colour, subject.colour2)
        assert render.is_reserved(*combination) and combination not in shipped
        assert subject.colour not in subject.backgrounds() and subject.colour2 not in subject.backgrounds()
        readings = [oracle.read(image) for image in subject.reference_images()]
        assert oracle.subject_signature(readings) == subject.identity()
    assert len({s.variant for s in generate_subjects(12, seed=0)}) > 1
    assert get_subject("gen-3-4") == subjects[4]
    assert all(s.variant == 0 for s in SUBJECTS.values())
    with pytest.raises(DreamtuneError, match="gen-<seed>-<k>"):
        get_subject("gen-3")


def test_subjects_command_lists_and_writes_generated_subjects(tmp_path, capsys):
    from dreamtune.cli import main

    assert main(["world", "subjects", "--generate", "2", "--seed", "5"]) == 0
    listed = capsys.readouterr().out
    assert "gen-5-0" in listed and "gen-5-1" in listed and "striped_star" not in listed
    assert main(["world", "subjects", "--generate", "2", "--seed", "5", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "gen-5-1").glob("*.png")) == [f"{i:02d}.png" for i in range(5)]
    assert main(["world", "subjects", "--subject", "gen-5-1", "--out", str(tmp_path / "one")]) == 0
    assert len(list((tmp_path / "one").glob("*.png"))) == 5


def test_prompted_attributes_reads_the_words_of_world_prompts():
    subject = get_subject("striped_star")
    for prompt in subject_prompts(subject):
        assert scores.prompted_attributes(prompt.format("sks", "star")) == prompt.attributes
    assert scores.prompted_attributes("a photo of a small green sks star with white stripes on a blue "
                                      "background") == {"background": "blue", "size": "small", "colour": "green"}
    assert scores.prompted_attributes("a star with white stripes") == {}


def test_bootstrap_interval_holds_the_value_and_narrows_with_more_images():
    rng = np.random.default_rng(0)
    small = (rng.random((10, 2)) < 0.6).astype(float)
    large = (rng.random((10, 32)) < 0.6).astype(float)
    a, b = scores.bootstrap(small, seed=1), scores.bootstrap(large, seed=1)
    assert a.low <= a.value <= a.high and b.low <= b.value <= b.high
    assert (b.high - b.low) < (a.high - a.low)
    assert scores.bootstrap(np.ones((4, 8))) == scores.Figure(1.0, 1.0, 1.0)
    assert scores.bootstrap(small, seed=1) == a  # seeded
    assert str(scores.Figure(0.75, 0.7, 0.8)) == "0.75 [0.70,0.80]"


def _reading(subject, background="black", size="large", colour=None, variant=None):
    scene = Scene(subject.cls, colour or subject.colour, background, size, "center", subject.pattern, subject.colour2,
                  subject.variant if variant is None else variant)
    return oracle.read(render.render(scene))


def test_score_subject_counts_identity_prompt_and_joint_success_per_image():
    subject = get_subject("striped_star")
    wanted = [{}, {"background": "green"}, {"size": "medium"}, {"colour": "orange"}]
    good = [[_reading(subject)] * 2,
            [_reading(subject, "green")] * 2,
            [_reading(subject, size="medium")] * 2,
            [_reading(subject, colour="orange")] * 2]
    plain_class = [oracle.read(render.render(Scene("star", c, "black"))) for c in ("red", "yellow", "green")]
    result = scores.score_subject(good, wanted, subject.identity(), plain_class, seed=0)
    assert result.subject_fidelity.value == 1.0 and result.joint.value == 1.0
    assert result.prompt_fidelity.value == 1.0 and set(result.per_attribute) == {"background", "size", "colour"}
    assert result.language_drift.value == 0.0 and result.diversity.value > 0

    # Right prompt, wrong geometry: the prompt is honoured, the subject is not there, no joint success.
    other = (subject.variant + 1) % render.NUM_VARIANTS
    moved = [[_reading(subject, variant=other)] * 2, [_reading(subject, "green", variant=other)] * 2,
             [_reading(subject, size="medium", variant=other)] * 2,
             [_reading(subject, colour="orange", variant=other)] * 2]
    result = scores.score_subject(moved, wanted, subject.identity(), [_reading(subject)] * 3, seed=0)
    assert result.prompt_fidelity.value == 1.0
    assert result.subject_present.value == 0.0 and result.joint.value == 0.0
    assert result.subject_fidelity.value == pytest.approx(0.8, abs=0.02)
    assert result.language_drift.value == 1.0  # the class prompt shows the subject's look

    # The subject on the wrong background: present, but the background prompt fails and so does its joint.
    ignored = [good[0], [_reading(subject, "red")] * 2, good[2], good[3]]
    result = scores.score_subject(ignored, wanted, subject.identity(), plain_class, seed=0)
    assert result.per_attribute["background"].value == 0.0 and result.subject_present.value == 1.0
    assert result.joint.value == 0.75
    row = scores.format_scores("model", result)
    assert "subject 1.00 [1.00,1.00]" in row and "joint 0.75 [" in row and "drift 0.00" in row


def test_demo_rows_survive_a_json_round_trip_and_print_with_intervals():
    import dataclasses
    import json

    from dreamtune.world.demo import ModelScores, format_table

    subject = get_subject("split_heart")
    readings = [[_reading(subject, "black")] * 3, [_reading(subject, "green")] * 3]
    figures = scores.score_subject(readings, [{}, {"background": "green"}], subject.identity(),
                                   [_reading(subject)] * 4, seed=2)
    row = ModelScores("dreambooth", figures.subject_fidelity.value, figures.prompt_fidelity.value,
                      figures.language_drift.value, figures.diversity.value, figures=figures)
    back = ModelScores(**json.loads(json.dumps(dataclasses.asdict(row))))
    assert back.figures == figures
    table = format_table([back])
    assert table.splitlines()[0].startswith("dreambooth") and "subject 1.00 [1.00,1.00]" in table
    assert "drift 1.00" in table and "background 1.00 [" in table


def test_caption_attributes_reads_back_exactly_what_a_caption_names():
    import itertools

    rng = np.random.default_rng(3)
    for size, colour, background, prefix, article in itertools.product(
        (None, "small"), (None, "orange"), (None, "blue"), ("", "an image of "), (True, False)
    ):
        text = render.describe("star", colour=colour, background=background, size=size, prefix=prefix, article=article)
        named = {"class": "star", "colour": colour, "background": background, "size": size}
        assert caption_attributes(text) == {k: v for k, v in named.items() if v}, text
    for _ in range(500):
        scene = render.random_scene(rng, pattern_share=0.5)
        text = render.caption(scene, rng)
        named = caption_attributes(text)
        assert named["class"] == scene.cls and caption_fits(named, scene), text
        other = dict(named, **{"class": next(c for c in render.CLASSES if c != scene.cls)})
        assert not caption_fits(other, scene)
    with pytest.raises(ValueError, match="not a world caption"):
        caption_attributes("a photo of a red dog")
