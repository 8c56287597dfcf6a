"""The shipped shapes-world base model: loads with diffusers, its VAE keeps what the oracle reads, it renders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dreamtune.world import MODEL_DIR, oracle, render


@pytest.fixture(scope="module")
def pipe():
    from dreamtune.world.quality import load_base_pipeline

    torch.set_num_threads(1)
    return load_base_pipeline()


def test_shipped_model_is_a_small_stable_diffusion_pipeline(pipe):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())
    assert pipe.text_encoder.dtype == torch.float32
    assert len(pipe.tokenizer) == 49408
    assert len(pipe.tokenizer("sks").input_ids) == 3  # a rare identifier stays one token
    size = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 40 * 2**20
    scheduler = json.loads((MODEL_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["timestep_spacing"] == "trailing"


@torch.no_grad()
def test_oracle_reads_images_through_the_shipped_vae(pipe):
    rng = np.random.default_rng(2)
    scenes = [render.random_scene(rng, include_held_out=True) for _ in range(96)]
    subjects_like = []
    from dreamtune.world.subjects import SUBJECTS

    for subject in SUBJECTS.values():
        subjects_like += subject.reference_scenes()[:3]
    scenes += subjects_like
    pixels = torch.from_numpy(np.stack([render.render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    latents = pipe.vae.encode(pixels).latent_dist.mean
    decoded = pipe.vae.decode(latents).sample
    images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    hits = total = 0
    for image, scene in zip(images, scenes):
        got = oracle.read(image).attributes()
        for key, value in scene.attributes().items():
            total += 1
            hits += got.get(key) == value
    assert hits / total >= 0.97


def test_shipped_model_renders_with_its_scheduler(pipe):
    out = pipe(["a photo of a red square on a blue background", "a star"], height=32, width=32,
               num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert [im.size for im in out.images] == [(32, 32), (32, 32)]
    arrays = [np.asarray(im) for im in out.images]
    assert not np.array_equal(arrays[0], arrays[1])
    assert all(a.std() > 5 for a in arrays)  # not blank


def test_quality_measure_runs_on_a_few_samples(pipe):
    from dreamtune.world.quality import format_quality, measure_quality

    result = measure_quality(pipe=pipe, images_per_prompt=1, steps=4, max_prompts=3, include_seen=False,
                             progress=False)
    held = result["held_out"]
    assert held["samples"] == 3
    assert all(0.0 <= held[k] <= 1.0 for k in ("class", "colour", "background", "size"))
    assert "pattern" not in held  # no prompt names a pattern, so none is scored
    assert all(low <= held[k] <= high for k, (low, high) in held["intervals"].items())
    assert 0.0 <= held["two-colour"] <= 1.0 and "two-colour" in held["intervals"]
    table = format_quality(result)
    assert "held-out" in table and "two-colour" in table


def test_demo_runs_a_short_personalization_on_the_shipped_model(tmp_path, capsys, monkeypatch):
    import hashlib

    from dreamtune.cli import main

    # Two cores, as CI's machine: the models are trained and scored in two worker processes at a thread each.
    monkeypatch.setattr("dreamtune.world.demo._cores", lambda: 2)

    def digest():
        return {p.relative_to(MODEL_DIR).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in MODEL_DIR.rglob("*.safetensors")}

    before = digest()
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "5", "--method", "dreambooth", "--subject", "gen-0-1", "--images-per-prompt", "1",
                 "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["subject"] == "gen-0-1"  # a generated subject works wherever a subject is named
    assert [m["name"] for m in metrics["models"]] == ["base model", "dreambooth"]
    for m in metrics["models"]:
        assert 0.0 <= m["subject_fidelity"] <= 1.0 and 0.0 <= m["prompt_fidelity"] <= 1.0
        assert 0.0 <= m["joint"] <= m["subject_present"] <= 1.0
        low, high = m["intervals"]["subject_fidelity"]["low"], m["intervals"]["subject_fidelity"]["high"]
        assert low <= m["subject_fidelity"] <= high
    assert "joint" in printed and "subject" in printed
    assert "dreambooth" in printed and (out / "grid.png").stat().st_size > 0
    assert "<table>" in (out / "report.html").read_text()
    assert digest() == before  # personalizing never writes into the shipped model
    assert "2 worker processes" in printed

    # The same demo in this process, at the workers' one thread, gives the same figures and the same grid.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["demo", "--steps", "5", "--method", "dreambooth", "--subject", "gen-0-1", "--images-per-prompt",
                     "1", "--jobs", "1", "--output-dir", str(tmp_path / "in-process")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "worker processes" not in capsys.readouterr().out
    again = json.loads((tmp_path / "in-process" / "metrics.json").read_text())
    for row in metrics["models"] + again["models"]:
        row.pop("train_seconds")
    assert again["models"] == metrics["models"]
    assert (tmp_path / "in-process" / "grid.png").read_bytes() == (out / "grid.png").read_bytes()
    # A second run into the same folder is refused rather than overwriting it.
    assert main(["demo", "--steps", "5", "--method", "dreambooth", "--output-dir", str(out)]) != 0
    assert "--overwrite" in capsys.readouterr().err


def test_demo_without_the_shipped_model_says_so_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from dreamtune.cli import main

    monkeypatch.setattr("dreamtune.world.demo.MODEL_DIR", tmp_path / "missing")
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out)]) != 0
    assert "base model is missing" in capsys.readouterr().err
    assert not out.exists()
