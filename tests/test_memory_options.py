"""A VAE from another folder, kept in float32 under mixed precision; caption dropout keyed per example."""

from __future__ import annotations

import torch


def test_vae_from_another_folder_stays_float32(make_config, tmp_path):
    from dreamtune.tiny import tiny_components
    from dreamtune.training import train

    other = tiny_components(seed=7)["vae"]
    other.save_pretrained(tmp_path / "vae", safe_serialization=True)
    config = make_config(method="lora", max_train_steps=1, mixed_precision="bf16", vae_fp32=True,
                         vae_path=str(tmp_path / "vae"))
    pipe = train(config, progress=False).pipeline
    assert pipe.vae.dtype == torch.float32 and pipe.unet.conv_in.weight.dtype == torch.bfloat16
    mine, theirs = pipe.vae.state_dict(), other.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_bad_vae_path_names_the_option(make_config, tmp_path):
    import pytest

    from dreamtune.errors import ModelLoadError
    from dreamtune.training import train

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="vae_path .*not a VAE folder"):
        train(make_config(max_train_steps=1, vae_path=str(tmp_path / "empty")), progress=False)


def test_caption_dropout_is_keyed_and_changes_nothing_else(make_config):
    from dreamtune.data.concepts import load_concept
    from dreamtune.data.dataset import TrainData

    config = make_config()
    concepts = [load_concept(config.concepts[0])]
    args = dict(resolution=32, center_crop=False, random_flip=True, augment=False, latent_scale=2, seed=3)
    plain, dropped, again = (TrainData(concepts, None, caption_dropout=p, **args) for p in (0.0, 0.5, 0.5))
    prompts = [dropped.instance(k).prompt for k in range(40)]
    assert 5 < prompts.count("") < 35 and set(prompts) == {"", plain.instance(0).prompt}
    assert prompts == [again.instance(k).prompt for k in range(40)]
    assert all(torch.equal(plain.instance(k).pixels, dropped.instance(k).pixels) for k in range(8))
    assert "" in dropped.all_prompts() and "" not in plain.all_prompts()
