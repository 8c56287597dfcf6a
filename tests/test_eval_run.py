"""`dreamtune eval` on a run trained for a few steps on the tiny model, scored by tiny DINO/CLIP models."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dreamtune.errors import DreamtuneError
from dreamtune.evaluate import metrics
from dreamtune.evaluate.prompts import builtin_prompts, parse_dreambench_file, read_prompt_file
from dreamtune.evaluate.runner import ScoringModels, evaluate_run, score_folders
from dreamtune.evaluate.tiny_models import save_tiny_clip, save_tiny_dino

TEMPLATES = ["a {identifier} {class_noun} on a table", "a red {identifier} {class_noun}"]


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    base = tmp_path_factory.mktemp("scorers")
    return ScoringModels.load(str(save_tiny_dino(base / "dino")), str(save_tiny_clip(base / "clip")), device="cpu")


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, subject_dir, tmp_path_factory):
    from dreamtune.config import load_config
    from dreamtune.training import train

    out = tmp_path_factory.mktemp("evalrun") / "run"
    config = load_config(None, pretrained_model_name_or_path=str(tiny_model_dir), output_dir=str(out), resolution=32,
                         max_train_steps=2, train_batch_size=1, learning_rate=1e-3, validation_steps=0,
                         checkpointing_steps=0, num_validation_images=1, validation_inference_steps=2,
                         concepts=[{"instance_data_dir": str(subject_dir), "class_noun": "dog"}])
    train(config, progress=False)
    return out


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_eval_renders_scores_reports_and_reuses_images(run_dir, scorers, subject_dir):
    first = evaluate_run(run_dir, prompts=TEMPLATES, images_per_prompt=2, seed=0, steps=2, models=scorers, progress=False)
    eval_dir = run_dir / "eval"
    assert first["rendered"] == 6  # 2 prompts + the class prompt, 2 images each
    for name in ("metrics.json", "report.md", "report.html"):
        assert (eval_dir / name).is_file()
    saved = json.loads((eval_dir / "metrics.json").read_text())
    assert saved["summary"] == first["summary"] and len(saved["prompts"]) == 2
    row = saved["prompts"][0]
    assert row["prompt"] == "a sks dog on a table" and row["scoring_prompt"] == "a dog on a table"
    assert "| a sks dog on a table |" in (eval_dir / "report.md").read_text()

    # The summary is the papers' metric over all images, computed here without the runner.
    generated = [eval_dir / p for r in saved["prompts"] for p in r["images"]]
    real = sorted(subject_dir.iterdir())
    assert first["summary"]["dino"] == pytest.approx(metrics.dino_score(generated, real, model=scorers.dino), abs=1e-6)
    assert first["summary"]["clip_t"] == pytest.approx(metrics.clip_t_score(
        generated, [r["scoring_prompt"] for r in saved["prompts"] for _ in r["images"]], model=scorers.clip), abs=1e-6)
    class_images = [eval_dir / p for p in saved["class_prompt"]["images"]]
    assert first["summary"]["pres"] == pytest.approx(metrics.pres_score(class_images, real, model=scorers.dino), abs=1e-6)

    # Same settings: nothing rendered again, same numbers.
    from dreamtune.pipeline import load_pipeline

    pipe = load_pipeline(None, run_dir / "artifact")
    again = evaluate_run(run_dir, prompts=TEMPLATES, images_per_prompt=2, seed=0, steps=2, models=scorers, progress=False)
    assert again["rendered"] == 0 and again["summary"] == first["summary"]

    # One image lost: only it is rendered, and it comes back the same (its own seed, any batch).
    lost = eval_dir / saved["prompts"][1]["images"][1]
    before = _pixels(lost)
    lost.unlink()
    third = evaluate_run(run_dir, prompts=TEMPLATES, images_per_prompt=2, seed=0, steps=2, models=scorers, pipe=pipe, progress=False)
    assert third["rendered"] == 1
    assert np.abs(_pixels(lost) - before).max() <= 1

    # Another seed is another set of images.
    other = evaluate_run(run_dir, prompts=TEMPLATES[:1], images_per_prompt=2, seed=5, steps=2, pres=False, models=scorers,
                         pipe=pipe, progress=False)
    assert other["rendered"] == 2 and other["prompts"][0]["images"] != saved["prompts"][0]["images"]


def test_cached_images_are_the_pipeline_samples(run_dir, scorers):
    from dreamtune.pipeline import load_pipeline, sample

    result = evaluate_run(run_dir, prompts=TEMPLATES[:1], images_per_prompt=2, seed=3, steps=2, pres=False,
                          models=scorers, progress=False)
    pipe = load_pipeline(None, run_dir / "artifact")
    fresh = sample(pipe, ["a sks dog on a table"], num_images=2, seed=3, steps=2, guidance=7.5, height=32, width=32)
    for path, image in zip(result["prompts"][0]["images"], fresh):
        assert np.abs(_pixels(run_dir / "eval" / path) - np.asarray(image, dtype=np.int16)).max() <= 1


def test_eval_errors_name_the_fix(run_dir, tmp_path, scorers):
    with pytest.raises(DreamtuneError, match="not a dreamtune run folder"):
        evaluate_run(tmp_path, models=scorers)
    with pytest.raises(DreamtuneError, match="--prompts"):
        evaluate_run(run_dir, prompts=str(tmp_path / "nope.txt"), models=scorers)
    with pytest.raises(DreamtuneError, match="--real-images"):
        evaluate_run(run_dir, real_images=str(tmp_path / "empty"), prompts=TEMPLATES, models=scorers)


def test_builtin_and_dreambench_file_prompts(tmp_path):
    objects, live = builtin_prompts(live=False), builtin_prompts(live=True)
    assert len(objects) == len(live) == 25 and len(set(p.template for p in objects)) == 25
    assert [p.kind for p in live].count("accessorization") == 10 and [p.kind for p in objects].count("recontextualization") == 20
    assert all("{identifier} {class_noun}" in p.template for p in objects + live)
    # google/dreambooth's layout, with prompts of our own.
    text = ("Classes\n\nsubject_name,class\nmug,cup\nrex,dog\n\nPrompts\n\nObject Prompts\n\nprompt_list = [\n"
            "'a {0} {1} on a shelf'.format(unique_token, class_token),\n'a blue {0} {1}'.format(unique_token, class_token)\n]\n\n"
            "Live Subject Prompts\n\nprompt_list = [\n'a {0} {1} asleep'.format(unique_token, class_token)\n]\n")
    (tmp_path / "prompts_and_classes.txt").write_text(text)
    parsed = parse_dreambench_file(tmp_path / "prompts_and_classes.txt")
    assert parsed.classes == {"mug": "cup", "rex": "dog"}
    assert [p.fill("sks", "cup") for p in parsed.object_prompts] == ["a sks cup on a shelf", "a blue sks cup"]
    assert [p.fill("<new1>", "dog") for p in read_prompt_file(tmp_path / "prompts_and_classes.txt", live=True)] == ["a <new1> dog asleep"]
    (tmp_path / "mine.txt").write_text("# mine\na {identifier} {class} in space\n\nplain prompt\n")
    assert [p.fill("sks", "cat") for p in read_prompt_file(tmp_path / "mine.txt")] == ["a sks cat in space", "plain prompt"]


def test_score_folders_uses_captions(tmp_path, scorers, subject_dir):
    images = tmp_path / "gen"
    images.mkdir()
    for i, src in enumerate(sorted(subject_dir.iterdir())[:3]):
        Image.open(src).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("a sks dog" if i < 2 else "a sks dog swimming")
    result = score_folders(images, subject_dir, identifier="sks", class_noun="dog", models=scorers, output_dir=tmp_path / "out")
    assert [r["scoring_prompt"] for r in result["prompts"]] == ["a dog", "a dog swimming"]
    all_images = sorted(images.glob("*.png"))
    assert result["summary"]["dino"] == pytest.approx(metrics.dino_score(all_images, sorted(subject_dir.iterdir()), model=scorers.dino), abs=1e-6)
    assert (tmp_path / "out" / "report.html").is_file()


def test_cli_eval_and_metrics(run_dir, scorers, subject_dir, tmp_path, capsys):
    from dreamtune.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TEMPLATES) + "\n")
    models = ["--dino-model", scorers.dino.model_id, "--clip-model", scorers.clip.model_id, "--device", "cpu"]
    assert main(["eval", str(run_dir), "--prompts", str(prompts), "--images-per-prompt", "2", "--steps", "2",
                 "--quiet", *models]) == 0
    out = capsys.readouterr().out
    assert "DINO" in out and "CLIP-T" in out and "PRES" in out
    saved = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert [r["prompt"] for r in saved["prompts"]] == ["a sks dog on a table", "a red sks dog"]
    assert main(["metrics", str(run_dir / "eval" / "images"), str(subject_dir), "--prompt", "a sks dog",
                 "--identifier", "sks", "--class-noun", "dog", "--json", *models]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) >= {"dino", "clip_i", "clip_t", "clipscore", "div"}
    assert main(["metrics", str(tmp_path / "nothing"), str(subject_dir), *models]) == 2
    assert "IMAGES" in capsys.readouterr().err
