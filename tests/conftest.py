"""Shared fixtures: tiny real Stable Diffusion components saved once per test session, subject images."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

# Models this small gain nothing from a second thread; on a shared CPU it only adds waiting.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Generated class images go to a per-session cache, never the user's."""
    monkeypatch.setenv("DREAMTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny StableDiffusionPipeline saved as a diffusers folder (epsilon prediction)."""
    from dreamtune.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_vpred_model_dir(tmp_path_factory):
    """A tiny pipeline whose scheduler predicts v (as SD 2.x does)."""
    from dreamtune.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tinyv") / "model", seed=0, prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl_model_dir(tmp_path_factory):
    """A tiny StableDiffusionXLPipeline (two text encoders, text_time UNet) saved as a diffusers folder."""
    from dreamtune.tiny import save_tiny_sdxl_pipeline

    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tinyxl") / "model", seed=0)


def draw_subject(path, i: int, size=(40, 48)) -> None:
    image = Image.new("RGB", size, (40 * i % 255, 120, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse([4 + i, 6, 28 + i, 30], fill=(230, 30, 30))
    draw.rectangle([10, 14 + i, 20, 18 + i], fill=(250, 220, 0))
    image.save(path)


@pytest.fixture(scope="session")
def subject_dir(tmp_path_factory):
    """Four small images of one made-up subject."""
    folder = tmp_path_factory.mktemp("subject")
    for i in range(4):
        draw_subject(folder / f"{i}.png", i)
    return folder


@pytest.fixture(scope="session")
def varied_subject_dir(tmp_path_factory):
    """Four images of the subject in three aspect ratios (wide, tall, squarish), for bucketing."""
    folder = tmp_path_factory.mktemp("varied")
    for i, size in enumerate([(48, 24), (24, 48), (40, 40), (40, 48)]):
        draw_subject(folder / f"{i}.png", i, size)
    return folder


@pytest.fixture(scope="session")
def tiny_config(tiny_model_dir, subject_dir):
    """`tiny_config(output_dir, **overrides)`: a small, fast TrainConfig on the tiny model (any fixture scope)."""
    from dreamtune.config import load_config

    def make(output_dir, **overrides):
        values = dict(
            pretrained_model_name_or_path=str(tiny_model_dir),
            output_dir=str(output_dir),
            resolution=32,
            max_train_steps=4,
            train_batch_size=2,
            learning_rate=1e-3,
            validation_steps=0,
            checkpointing_steps=0,
            num_validation_images=1,
            validation_inference_steps=2,
            class_generation_steps=2,
            num_class_images=4,
            validation_prompts=["a photo of {identifier} {class_noun}"],
            concepts=[{"instance_data_dir": str(subject_dir), "class_noun": "dog"}],
        )
        values.update(overrides)
        return load_config(None, **values)

    return make


@pytest.fixture
def make_config(tiny_config, tmp_path):
    """Build a small, fast TrainConfig on the tiny model in this test's folder; keyword arguments override."""

    def make(**overrides):
        return tiny_config(overrides.pop("output_dir", tmp_path / "run"), **overrides)

    return make


@pytest.fixture
def resume_after_kill(monkeypatch):
    """Train `config`, dying right after its first checkpoint is on disk, then resume it with --resume latest.

    Returns the resumed run's result. `before_resume()`, if given, runs between the two.
    """
    import dreamtune.training as training

    def run(config, before_resume=None):
        real_save = training.save_checkpoint

        def save_then_die(*args, **kwargs):
            real_save(*args, **kwargs)
            raise KeyboardInterrupt

        monkeypatch.setattr(training, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            training.train(config, progress=False)
        monkeypatch.setattr(training, "save_checkpoint", real_save)
        if before_resume is not None:
            before_resume()
        return training.train(config, resume="latest", progress=False)

    return run


@pytest.fixture
def interrupted_run(make_config, monkeypatch):
    """Build a config with `make_config(**options)` and train it until checkpoint-`at_step` is on disk, then stop
    as a kill would (the artifact is never written). Returns the config."""
    import dreamtune.training as training

    def run(at_step=2, **options):
        config = make_config(**options)
        real_save = training.save_checkpoint

        def save(output_dir, step, *args, **kwargs):
            path = real_save(output_dir, step, *args, **kwargs)
            if step == at_step:
                raise KeyboardInterrupt
            return path

        monkeypatch.setattr(training, "save_checkpoint", save)
        with pytest.raises(KeyboardInterrupt):
            training.train(config, progress=False)
        monkeypatch.setattr(training, "save_checkpoint", real_save)
        return config

    return run
