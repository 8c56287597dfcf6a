"""Latents and prompt embeddings cached on disk: the same weights, reused by later runs, never stale."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreamtune.config import load_config
from dreamtune.training import train


def _weights(result, *components):
    return {(c, k): v.detach().clone() for c in components
            for k, v in getattr(result.pipeline, c).state_dict().items()}


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _entries(folder, kind) -> set:
    return {p.name for p in (folder / kind).rglob("*.safetensors")}


@pytest.fixture
def encodings(monkeypatch):
    """Counts the images the loop's Encoder passes through the VAE and the prompts through the text encoders."""
    import dreamtune.training as training

    counts = {"images": 0, "prompts": 0}
    real_distribution, real_text = training.Encoder._distribution, training.Encoder.text

    def distribution(self, pixels):
        counts["images"] += len(pixels)
        return real_distribution(self, pixels)

    def text(self, prompts, **kwargs):
        counts["prompts"] += sum(p not in self.text_cache for p in prompts)
        return real_text(self, prompts, **kwargs)

    monkeypatch.setattr(training.Encoder, "_distribution", distribution)
    monkeypatch.setattr(training.Encoder, "text", text)
    return counts


PRIOR = dict(max_train_steps=2, adam_epsilon=1e-3, with_prior_preservation=True, num_class_images=2,
             class_generation_steps=1)


def test_disk_cache_trains_the_same_weights_and_a_resumed_run_reuses_it(make_config, tmp_path, encodings,
                                                                         resume_after_kill):
    cache = tmp_path / "encoded"
    memory = train(make_config(output_dir=str(tmp_path / "m"), **PRIOR), progress=False)
    encodings.update(images=0, prompts=0)
    disk = train(make_config(output_dir=str(tmp_path / "d"), cache_to_disk=True, cache_dir=str(cache), **PRIOR),
                 progress=False)
    # Four subject images and two class images; the instance and the class prompt.
    assert encodings == {"images": 6, "prompts": 2}
    assert len(_entries(cache, "latents")) == 6 and len(_entries(cache, "text")) == 2
    # The in-memory caches match training without caches (test_training_options); these match them bit for bit.
    assert _equal(_weights(disk, "unet"), _weights(memory, "unet"))

    # Killed after its first checkpoint and resumed: both processes read every entry, none is written again.
    mtimes = {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")}
    encodings.update(images=0, prompts=0)
    resumed = resume_after_kill(make_config(output_dir=str(tmp_path / "r"), cache_to_disk=True, cache_dir=str(cache),
                                            checkpointing_steps=1, **PRIOR))
    assert encodings == {"images": 0, "prompts": 0}
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")} == mtimes
    assert _equal(_weights(resumed, "unet"), _weights(disk, "unet"))


def test_a_changed_image_or_another_base_model_gets_new_entries(make_config, subject_dir, tmp_path, encodings):
    from dreamtune.tiny import save_tiny_pipeline

    cache = tmp_path / "encoded"
    photos = tmp_path / "photos"
    shutil.copytree(subject_dir, photos)
    options = dict(max_train_steps=1, cache_to_disk=True, cache_dir=str(cache),
                   concepts=[{"instance_data_dir": str(photos), "class_noun": "dog"}])
    train(make_config(output_dir=str(tmp_path / "a"), **options), progress=False)
    before = _entries(cache, "latents")
    Image.new("RGB", (40, 48), (10, 200, 90)).save(photos / "2.png")  # same name, new content
    encodings.update(images=0, prompts=0)
    train(make_config(output_dir=str(tmp_path / "b"), **options), progress=False)
    assert encodings == {"images": 1, "prompts": 0}
    assert len(_entries(cache, "latents") - before) == 1 and len(before - _entries(cache, "latents")) == 0

    # Another base model (its own VAE and text encoder weights) reads nothing the first one wrote.
    encodings.update(images=0, prompts=0)
    text_before = _entries(cache, "text")
    other = save_tiny_pipeline(tmp_path / "other", seed=1)
    train(make_config(output_dir=str(tmp_path / "c"), pretrained_model_name_or_path=str(other),
                      **options), progress=False)
    assert encodings == {"images": 4, "prompts": 1}
    assert len(_entries(cache, "text") - text_before) == 1


def test_sdxl_entries_hold_both_encoders_the_pooled_embedding_and_time_ids(tiny_sdxl_model_dir, varied_subject_dir,
                                                                           tmp_path):
    def config(output_dir, **overrides):
        return load_config(None, pretrained_model_name_or_path=str(tiny_sdxl_model_dir), output_dir=str(output_dir),
                           resolution=32, max_train_steps=2, train_batch_size=1, learning_rate=1e-3, validation_steps=0,
                           checkpointing_steps=0, bucketing=True, bucket_step=8, method="lora",
                           concepts=[{"instance_data_dir": str(varied_subject_dir), "class_noun": "dog"}], **overrides)

    cache = tmp_path / "encoded"
    memory = train(config(tmp_path / "m"), progress=False)
    disk = train(config(tmp_path / "d", cache_to_disk=True, cache_dir=str(cache)), progress=False)
    assert _equal(_weights(disk, "unet"), _weights(memory, "unet"))
    [text] = (cache / "text").rglob("*.safetensors")
    entry = load_file(text)
    assert entry["embeds"].shape == (77, 72) and entry["pooled"].shape == (32,)  # 32 + 40 wide; projection 32
    time_ids = sorted(load_file(p)["time_ids"].tolist() for p in (cache / "latents").rglob("*.safetensors"))
    # (original h, w, crop top, left, target h, w) of each image at its bucket: 48x24 -> 40x24, 24x48 -> 24x40, ...
    assert [t[:2] for t in time_ids] == [[24, 48], [40, 40], [48, 24], [48, 40]]
    assert all(t[4:] in ([40, 24], [24, 40], [32, 32]) for t in time_ids)
