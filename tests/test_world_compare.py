"""`dreamtune world compare`: every method on the same subjects, resumable, with the two-concept rows."""

from __future__ import annotations

import json

import pytest

from dreamtune.cli import main
from dreamtune.world import render
from dreamtune.world.compare import run_compare, write_real_class_images


def test_real_class_images_are_captioned_world_scenes_of_the_class(tmp_path):
    folder = write_real_class_images("star", tmp_path / "stars", count=12, seed=3)
    images = sorted(folder.glob("*.png"))
    captions = [p.with_suffix(".txt").read_text() for p in images]
    assert len(images) == 12 and all("star" in c for c in captions)
    again = write_real_class_images("star", tmp_path / "stars", count=12, seed=3)
    assert again == folder and sorted(folder.glob("*.png")) == images


def test_real_class_images_are_captioned_as_the_base_model_was_pretrained(tmp_path):
    from dreamtune.io import write_json

    model = tmp_path / "model"
    write_json(model / "world_pretrain.json", {"settings": {"rare_words": "instances"}})
    folder = write_real_class_images("ring", tmp_path / "rings", count=60, seed=1, base_model=model)
    words = set(render.rare_words())
    named = [c.split() for c in (p.read_text() for p in folder.glob("*.txt")) if words & set(c.split())]
    assert 3 <= len(named) <= 30  # about a fifth are named instances, as in that pretraining
    for caption in named:
        word = next(w for w in caption if w in words)
        assert caption[caption.index(word) + 1] == "ring" and render.named_instance(word).cls == "ring"


@pytest.mark.slow  # about 1.5 minutes: six models sampled on 20 prompts each
def test_compare_trains_scores_merges_and_resumes(tmp_path, capsys):
    out = tmp_path / "compare"
    # In two worker processes (the default on 2 cores); the second run below, in this process, reuses their cells.
    rows = run_compare(["striped_star", "split_heart"], models=["custom_diffusion"], output_dir=out, steps=2,
                       images_per_prompt=1, progress=False, quiet=True, jobs=2)
    names = [(r["subject"], r["name"]) for r in rows]
    for subject in ("striped_star", "split_heart"):
        for model in ("custom_diffusion", "custom_diffusion joint", "custom_diffusion merged"):
            assert (subject, model) in names
    merged = json.loads((out / "runs" / "striped_star+split_heart" / "custom_diffusion-merged" / "dreamtune.json")
                        .read_text())
    assert sorted(merged["tokens"]) == ["<new1>", "<new2>"]
    # Each concept is held on the prompt it was trained on; both classes' captions regularise the merge.
    assert [c["instance_prompt"] for c in merged["concepts"]] == ["a photo of a <new1> star", "a photo of a <new2> heart"]
    assert merged["merge"]["num_reg_captions"] == 400
    table = (out / "table.txt").read_text()
    assert "subject striped_star" in table and "subject split_heart" in table
    # Finished cells are reused: a second run trains and samples nothing and gives the same rows.
    cells = sorted(out.glob("cells/*/*.json"))
    stamps = [p.stat().st_mtime_ns for p in cells]
    assert main(["world", "compare", "--subjects", "striped_star,split_heart", "--models", "custom_diffusion",
                 "--output-dir", str(out), "--steps", "2", "--images-per-prompt", "1", "--jobs", "1"]) == 0
    assert [p.stat().st_mtime_ns for p in sorted(out.glob("cells/*/*.json"))] == stamps
    assert json.loads((out / "compare.json").read_text())["rows"] == rows
    assert "custom_diffusion merged" in capsys.readouterr().out
    assert render.CLASSES  # the world module stays importable beside the CLI
