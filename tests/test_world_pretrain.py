"""Pretraining the shapes world's base model: a genuine diffusers pipeline, resumable and reproducible."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dreamtune.errors import DreamtuneError
from dreamtune.world.pretrain import pretrain

TINY = {"vae_steps": 2, "text_steps": 2, "text_batch_size": 4, "unet_steps": 3, "batch_size": 2, "progress": False,
        "threads": 1, "vae_from": "shipped"}
# The VAE phase too, rather than the shipped VAE.
TINY_FROM_SCRATCH = {**TINY, "vae_from": ""}


def test_interrupted_pretraining_resumes_to_the_same_weights(tmp_path):
    TINY = TINY_FROM_SCRATCH
    whole = pretrain(tmp_path / "whole", **TINY)
    assert not (tmp_path / "parts" / "checkpoints").exists()
    pretrain(tmp_path / "parts", stop_after_steps=3, **TINY)  # the VAE's 2 steps and one text step
    assert '"step": 1' in (tmp_path / "parts" / "checkpoints" / "text" / "state.json").read_text()
    assert not (tmp_path / "parts" / "checkpoints" / "unet").exists()
    pretrain(tmp_path / "parts", stop_after_steps=2, **TINY)  # the last text step and one UNet step
    assert '"step": 1' in (tmp_path / "parts" / "checkpoints" / "unet" / "state.json").read_text()
    parts = pretrain(tmp_path / "parts", **TINY)
    for phase, name in [("text", "clip"), ("unet", "unet"), ("unet", "text_encoder"), ("unet", "ema")]:
        a = load_file(tmp_path / "whole" / "checkpoints" / phase / f"{name}.safetensors")
        b = load_file(tmp_path / "parts" / "checkpoints" / phase / f"{name}.safetensors")
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


def test_default_pretraining_is_stable_diffusion_shaped_on_the_shipped_vae(tmp_path):
    import json

    from dreamtune.world import MODEL_DIR

    pipe_dir = pretrain(tmp_path, **TINY)
    assert not (tmp_path / "checkpoints" / "vae").exists()  # no VAE phase: the shipped VAE is reused
    shipped = load_file(MODEL_DIR / "vae" / "diffusion_pytorch_model.safetensors")
    reused = load_file(pipe_dir / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(shipped[k], reused[k]) for k in shipped)
    config = json.loads((pipe_dir / "unet" / "config.json").read_text())
    # As in SD 1.x: attention at every level but the lowest, and in the middle; the prompt goes in through
    # cross-attention only (no pooled prompt in the time embedding).
    assert config["down_block_types"] == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    assert config["up_block_types"] == ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    assert config["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    assert config["addition_embed_type"] is None
    tokenizer = json.loads((pipe_dir / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer["model_max_length"] == 77


def test_the_command_line_can_add_the_pooled_prompt_and_the_earlier_rare_words(tmp_path):
    import json

    from dreamtune.cli import main

    assert main(["world", "pretrain", "--output-dir", str(tmp_path), "--vae-from", "shipped", "--text-steps", "0",
                 "--unet-steps", "2", "--batch-size", "2", "--threads", "1", "--pooled-prompt",
                 "--rare-words", "noise", "--pattern-share", "0.5"]) == 0
    config = json.loads((tmp_path / "pipeline" / "unet" / "config.json").read_text())
    assert config["addition_embed_type"] == "text"
    state = json.loads((tmp_path / "checkpoints" / "unet" / "state.json").read_text())
    assert state["settings"]["rare_words"] == "noise" and state["settings"]["pattern_share"] == 0.5
    # The pipeline folder says how it was pretrained; one without that file reads as runs before it.
    from dreamtune.world.pretrain import pretrained_settings

    told = pretrained_settings(tmp_path / "pipeline")
    assert (told.rare_words, told.pattern_share, told.text_time_embedding) == ("noise", 0.5, True)
    assert pretrained_settings(tmp_path / "checkpoints").rare_words == "noise"
    assert pretrained_settings(tmp_path / "checkpoints").pattern_share == 0.0
    assert main(["world", "pretrain", "--output-dir", str(tmp_path / "bad"), "--pattern-share", "1.5"]) != 0
    with pytest.raises(DreamtuneError, match="rare_words must be one of instances, noise"):
        pretrain(tmp_path / "other", rare_words="names", **TINY)


def test_a_plain_first_stage_and_hard_negatives_are_set_from_the_command_line(tmp_path, monkeypatch):
    import json

    from dreamtune.cli import main
    from dreamtune.world import pretrain as module
    from dreamtune.world import render

    seen = {}
    real = module._scene_batch

    def spy(settings, stream, index, size, plain=False):
        batch = real(settings, stream, index, size, plain=plain)
        if stream == settings.seed:  # the UNet phase's stream (the text phase has its own)
            seen[index] = batch
        return batch

    monkeypatch.setattr(module, "_scene_batch", spy)
    assert main(["world", "pretrain", "--output-dir", str(tmp_path), "--vae-from", "shipped", "--text-steps", "2",
                 "--unet-steps", "4", "--batch-size", "8", "--threads", "1", "--plain-steps", "2",
                 "--text-negatives"]) == 0
    assert sorted(seen) == [0, 1, 2, 3]
    words = set(render.rare_words())
    for index in (0, 1):
        _, captions, scenes = seen[index]
        assert all(s.pattern == "plain" and s.name is None for s in scenes)
        assert not any(words & set(c.split()) for c in captions)
    later = [s for index in (2, 3) for s in seen[index][2]]
    assert any(s.pattern != "plain" for s in later) and any(s.name for s in later)
    state = json.loads((tmp_path / "checkpoints" / "unet" / "state.json").read_text())
    assert state["settings"]["plain_steps"] == 2 and state["settings"]["text_negatives"] is True
    assert main(["world", "pretrain", "--output-dir", str(tmp_path / "bad"), "--plain-steps", "-1"]) != 0
    with pytest.raises(DreamtuneError, match="plain_steps"):  # a UNet-phase setting: fixed once the phase began
        pretrain(tmp_path, **{**TINY, "unet_steps": 4, "batch_size": 8, "text_steps": 2, "text_batch_size": 64,
                              "text_negatives": True})


def test_resume_with_other_settings_is_refused(tmp_path):
    pretrain(tmp_path, stop_after_steps=5, **TINY)  # into the UNet phase, whose settings are then fixed
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

    # A run of the first version's layout, its state written before unet_layout and vae_from existed.
    pretrain(tmp_path, stop_after_steps=3, unet_layout="low", text_time_embedding=False,
             **{**TINY_FROM_SCRATCH, "text_steps": 0})
    state_file = tmp_path / "checkpoints" / "unet" / "state.json"
    state = json.loads(state_file.read_text())
    for key in ("max_length", "text_time_embedding", "attention_at_top", "object_weight", "unet_layout",
                "pattern_share", "vae_from", "text_steps", "hold_out_second_colour", "rare_words", "plain_steps", "text_negatives"):
        del state["settings"][key]
    state_file.write_text(json.dumps(state))
    pipe_dir = export_checkpoint(tmp_path, tmp_path / "exported")
    config = json.loads((pipe_dir / "unet" / "config.json").read_text())
    assert config["addition_embed_type"] is None
    assert config["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    with pytest.raises(DreamtuneError, match="unet_layout=low differs from sd"):
        pretrain(tmp_path, text_time_embedding=False, **{**TINY_FROM_SCRATCH, "text_steps": 0})  # today's layout differs


def test_continued_pretraining_copies_matching_tensors_and_starts_new_attention_as_identity(tmp_path):
    source = pretrain(tmp_path / "first", unet_layout="low", **TINY)
    # No step taken: the exported pipeline holds the initial weights.
    copy = pretrain(tmp_path / "second", init_from=str(source), stop_after_steps=0, **TINY)
    theirs = load_file(source / "unet" / "diffusion_pytorch_model.safetensors")
    ours = load_file(copy / "unet" / "diffusion_pytorch_model.safetensors")
    shared = [k for k in ours if k in theirs and ours[k].shape == theirs[k].shape]
    assert len(shared) > len(ours) / 2
    assert all(torch.equal(ours[k], theirs[k]) for k in shared)
    new_out = [k for k in ours if ".attentions." in k and ".proj_out." in k and k not in theirs]
    assert new_out and all(torch.count_nonzero(ours[k]) == 0 for k in new_out)
    a = load_file(source / "text_encoder" / "model.safetensors")
    b = load_file(copy / "text_encoder" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    pretrain(tmp_path / "second", init_from=str(source), stop_after_steps=1, **TINY)
    with pytest.raises(DreamtuneError, match="init_from"):
        pretrain(tmp_path / "second", **TINY)  # resuming it from scratch instead is refused


def test_the_text_encoder_learns_in_its_own_phase_and_can_stay_frozen_while_the_unet_learns(tmp_path):
    from dreamtune.world.pretrain import PretrainSettings, build_components

    pipe_dir = pretrain(tmp_path, text_joint_lr=0.0, **TINY)
    initial = build_components(PretrainSettings(**{k: v for k, v in TINY.items() if k in ("text_steps",)}))
    initial = initial["text_encoder"].state_dict()
    phase = load_file(tmp_path / "checkpoints" / "text" / "clip.safetensors")
    after_phase = {k[len("text_model."):]: v for k, v in phase.items() if k.startswith("text_model.")}
    assert after_phase.keys() == initial.keys()
    assert not torch.equal(after_phase["embeddings.token_embedding.weight"], initial["embeddings.token_embedding.weight"])
    after_unet = load_file(tmp_path / "checkpoints" / "unet" / "text_encoder.safetensors")
    assert all(torch.equal(after_unet[k], after_phase[k]) for k in after_phase)
    shipped = load_file(pipe_dir / "text_encoder" / "model.safetensors")
    assert all(torch.equal(shipped[k], after_phase[k].half()) for k in shipped)
    assert not any(k.startswith("text_encoder.") for k in load_file(tmp_path / "checkpoints" / "unet" / "ema.safetensors"))


def test_with_no_text_phase_the_text_encoder_trains_with_the_unet(tmp_path):
    pretrain(tmp_path, **{**TINY, "text_steps": 0})
    assert not (tmp_path / "checkpoints" / "text").exists()
    ema = load_file(tmp_path / "checkpoints" / "unet" / "ema.safetensors")
    assert any(k.startswith("text_encoder.") for k in ema)


def test_after_its_phase_the_text_encoder_keeps_learning_with_the_unet_at_its_own_rate(tmp_path):
    import json

    from dreamtune.world.pretrain import PretrainSettings

    pretrain(tmp_path, **TINY)  # the default: learning on at text_joint_lr
    phase = load_file(tmp_path / "checkpoints" / "text" / "clip.safetensors")
    after_phase = {k[len("text_model."):]: v for k, v in phase.items() if k.startswith("text_model.")}
    after_unet = load_file(tmp_path / "checkpoints" / "unet" / "text_encoder.safetensors")
    assert not torch.equal(after_unet["embeddings.token_embedding.weight"],
                           after_phase["embeddings.token_embedding.weight"])
    assert any(k.startswith("text_encoder.") for k in load_file(tmp_path / "checkpoints" / "unet" / "ema.safetensors"))
    state = json.loads((tmp_path / "checkpoints" / "unet" / "state.json").read_text())
    assert [g["initial_lr"] for g in state["optimizer"]["param_groups"]] == [PretrainSettings().learning_rate,
                                                                            PretrainSettings().text_joint_lr]
    assert 0 < PretrainSettings().text_joint_lr < PretrainSettings().learning_rate


def test_the_contrastive_loss_is_clips_when_each_caption_fits_only_its_image():
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    from dreamtune.world.pretrain import _contrastive_loss

    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_contrastive_loss(logits, torch.eye(6, dtype=torch.bool)), image_text_contrastive_loss(logits.T))
    # A second caption that fits image 0 takes half of its image's target: the loss falls when both score high.
    fits = torch.eye(6, dtype=torch.bool)
    fits[0, 1] = True
    low, high = logits.clone(), logits.clone()
    low[0, 1], high[0, 1] = -5.0, 5.0
    assert _contrastive_loss(high, fits) < _contrastive_loss(low, fits)


def test_hard_negative_captions_change_only_the_objects_colour_and_count_only_against_images():
    import numpy as np

    from dreamtune.world import render
    from dreamtune.world.pretrain import _colour_swaps, _contrastive_loss, _fits
    from dreamtune.world.scores import caption_attributes

    _, captions, scenes = render.training_batch(5000, 3, 64, pattern_share=0.4, rare_words_mode="instances")
    negatives, sources = _colour_swaps(captions, scenes, np.random.default_rng(0))
    assert len(negatives) >= 20
    for text, index in zip(negatives, sources):
        scene, source = scenes[index], caption_attributes(captions[index])
        swapped = caption_attributes(text)
        assert scene.name is None and source["colour"] == scene.colour
        assert swapped["colour"] not in (scene.colour, scene.background)
        assert {k: v for k, v in swapped.items() if k != "colour"} == {k: v for k, v in source.items() if k != "colour"}
        article = text.split(f" {swapped['colour']} ")[0].split()[-1]
        assert article not in ("a", "an") or article == render._article(swapped["colour"])
    assert not any(scenes[i].name for i in sources) and any(s.name for s in scenes)  # names are never swapped
    fits = _fits(captions + negatives, scenes, scenes + [scenes[i] for i in sources])
    assert fits.shape == (64, 64 + len(negatives))
    assert not any(fits[index, 64 + k] for k, index in enumerate(sources))  # a negative never fits its own image
    # A caption no image fits adds to the images' side only: the loss stays finite, and a negative that
    # scores high raises it.
    logits = torch.randn(64, fits.shape[1], generator=torch.Generator().manual_seed(0))
    high = logits.clone()
    high[sources[0], 64] = 10.0
    assert torch.isfinite(_contrastive_loss(logits, fits))
    assert _contrastive_loss(high, fits) > _contrastive_loss(logits, fits)
