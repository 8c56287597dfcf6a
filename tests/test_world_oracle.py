"""The oracle on what models draw: perturbed renders, irregular two-colour patterns, the pattern's geometry."""

from __future__ import annotations

import numpy as np

from dreamtune.world import oracle, perturb, render
from dreamtune.world.render import NUM_VARIANTS, Scene


def test_oracle_reads_every_attribute_of_perturbed_renders():
    # Bent shapes, irregular and broken patterns, shifted colours, blur, noise, JPEG blocks, shifts.
    scenes, images = perturb.perturbed_set(seed=2026, count=220, strength=1.0)
    kept = [(s, im) for s, im in zip(scenes, images) if render.pattern_visible(s)]
    assert len(kept) >= 200 and sum(s.pattern != "plain" for s, _ in kept) >= 100
    accuracy = oracle.attribute_accuracy(oracle.read_all(im for _, im in kept), [s.attributes() for s, _ in kept])
    assert set(accuracy) == set(perturb.ORACLE_ATTRIBUTES)
    assert min(accuracy.values()) >= 0.97, accuracy


def test_perturbation_changes_pixels_but_zero_perturbation_draws_the_clean_scene():
    scene = Scene("star", "blue", "red", "large", "center", "stripes", "white", 2)
    assert np.array_equal(perturb.render_perturbed(scene, perturb.Perturbation()), render.render(scene))
    rng = np.random.default_rng(0)
    damaged = perturb.render_perturbed(scene, perturb.random_perturbation(rng, scene))
    assert np.abs(damaged.astype(int) - render.render(scene)).mean() > 3


def test_an_irregular_blue_and_white_object_reads_as_blue_and_white_not_their_average():
    # The failure of a per-channel median: a blurred, broken blue-and-white pattern read as plain purple.
    scene = Scene("star", "blue", "red", "large", "center", "stripes", "white", 0)
    damage = perturb.Perturbation(pattern_warp=0.15, broken=0.12, blur=0.8, noise=6.0, warp=0.06, seed=3)
    reading = oracle.read(perturb.render_perturbed(scene, damage))
    assert {reading.colour, reading.colour2} == {"blue", "white"}
    assert reading.pattern == "stripes"
    # A plain object with the same damage stays plain, in its own colour.
    plain = oracle.read(perturb.render_perturbed(Scene("star", "purple", "red", "large"), damage))
    assert (plain.pattern, plain.colour, plain.colour2) == ("plain", "purple", None)


def test_oracle_tells_the_geometries_of_each_pattern_apart():
    for pattern in render.PATTERNS[1:]:
        for variant in range(NUM_VARIANTS):
            scene = Scene("square", "orange", "black", "large", "center", pattern, "blue", variant)
            got = oracle.read(render.render(scene))
            assert (got.pattern, got.variant, got.colour, got.colour2) == (pattern, variant, "orange", "blue"), scene


def test_invisible_patterns_are_recognised_as_such():
    assert not render.pattern_visible(Scene("ring", "red", "blue", "large", "center", "spot", "white", 0))
    assert render.pattern_visible(Scene("ring", "red", "blue", "large", "center", "stripes", "white", 0))
    assert render.pattern_visible(Scene("ring", "red", "blue"))


def test_oracle_check_command_prints_both_tables(capsys, tmp_path):
    import json

    from dreamtune.cli import main

    assert main(["world", "oracle-check", "--count", "12", "--seed", "4", "--json", str(tmp_path / "o.json")]) == 0
    printed = capsys.readouterr().out
    assert "clean" in printed and "perturbed" in printed and "variant" in printed
    figures = json.loads((tmp_path / "o.json").read_text())
    assert figures["scenes"] + figures["left_out"] == 12
    assert all(0.0 <= v <= 1.0 for v in figures["perturbed"].values())
    assert main(["world", "oracle-check", "--count", "0"]) != 0


def test_oracle_check_reads_through_the_shipped_vae():
    result = perturb.oracle_accuracy(count=10, seed=1, vae_model=True)
    assert set(result["vae"]) == set(result["clean"]) and all(0.0 <= v <= 1.0 for v in result["vae"].values())
    assert "vae" in perturb.format_oracle_accuracy(result)
