"""Pretraining the shapes world's base model: a genuine diffusers pipeline, resumable and reproducible."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dreamtune.errors import DreamtuneError
from dreamtune.world.pretrain import pretrain

TINY = {"vae_steps": 2, "unet_steps": 3, "batch_size": 2, "progress": False, "threads": 1}


def test_interrupted_pretraining_resumes_to_the_same_weights(tmp_path):
    whole = pretrain(tmp_path / "whole", **TINY)
    assert not (tmp_path / "parts" / "checkpoints").exists()
    pretrain(tmp_path / "parts", stop_after_steps=3, **TINY)  # the VAE's 2 steps and one UNet step
    state = (tmp_path / "parts" / "checkpoints" / "unet" / "state.json").read_text()
    assert '"step": 1' in state
    parts = pretrain(tmp_path / "parts", **TINY)
    for name in ("unet", "text_encoder", "ema"):
        a = load_file(tmp_path / "whole" / "checkpoints" / "unet" / f"{name}.safetensors")
        b = load_file(tmp_path / "parts" / "checkpoints" / "unet" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    initial = load_file(tmp_path / "whole" / "checkpoints" / "vae" / "vae.safetensors")
    assert initial  # the VAE phase left its own checkpoint

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(parts, torch_dtype=torch.float32)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.tokenizer("a photo of sks star").input_ids == [49406, 320, 1125, 539, 48136, 1565, 49407]
    image = pipe("a red star", height=32, width=32, num_inference_steps=2, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    assert whole.name == "pipeline" and (whole / "model_index.json").exists()


def test_resume_with_other_settings_is_refused(tmp_path):
    pretrain(tmp_path, stop_after_steps=3, **TINY)  # into the UNet phase, whose settings are then fixed
    with pytest.raises(DreamtuneError, match="batch_size"):
        pretrain(tmp_path, **{**TINY, "batch_size": 3})


def test_unknown_setting_is_named(tmp_path):
    with pytest.raises(DreamtuneError, match="object_wieght"):
        pretrain(tmp_path, object_wieght=3.0, **TINY)


def test_object_weights_cover_the_object_and_its_rim():
    from dreamtune.world import render
    from dreamtune.world.pretrain import _object_weights

    scenes = list(render.iter_scenes(3, 4))
    weights = _object_weights(scenes, 16, 5.0)
    assert weights.shape == (4, 1, 16, 16)
    for scene, w in zip(scenes, weights[:, 0]):
        cover = torch.from_numpy(render.object_coverage(scene, 16))
        assert torch.all(w[cover == 1] == 5.0)  # inside
        assert torch.all(w[cover > 0] > 1.0)  # on the edge
        rim = (w == 5.0) & (cover < 1)  # next to a fully covered pixel
        assert rim.sum() > 0
        far = torch.nn.functional.max_pool2d(cover[None, None], 3, stride=1, padding=1)[0, 0] == 0
        assert far.sum() > 0 and torch.all(w[far] == 1.0)


def test_runs_saved_before_a_setting_existed_keep_their_meaning(tmp_path):
    import json

    from dreamtune.world.pretrain import export_checkpoint

    pretrain(tmp_path, stop_after_steps=3, text_time_embedding=False, max_length=77, **TINY)
    state_file = tmp_path / "checkpoints" / "unet" / "state.json"
    state = json.loads(state_file.read_text())
    for key in ("max_length", "text_time_embedding", "attention_at_top", "object_weight"):
        del state["settings"][key]
    state_file.write_text(json.dumps(state))
    pipe_dir = export_checkpoint(tmp_path, tmp_path / "exported")
    config = json.loads((pipe_dir / "unet" / "config.json").read_text())
    assert config["addition_embed_type"] is None
    with pytest.raises(DreamtuneError, match="max_length=77 differs from 32"):
        pretrain(tmp_path, **TINY)  # today's defaults differ from what that run used
