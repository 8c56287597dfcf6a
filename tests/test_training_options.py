"""Options of the loop: accumulation, checkpointing, precision, optimizers, captions, caches."""

from __future__ import annotations

import pytest
import torch

from dreamtune.errors import ConfigError
from dreamtune.training import train


def _unet(result):
    return {k: v.detach().clone() for k, v in result.pipeline.unet.state_dict().items()}


def test_accumulation_matches_a_bigger_batch(make_config, tmp_path):
    # A larger Adam epsilon keeps rounding differences in near-zero gradients from being blown up to a
    # whole step by Adam's normalisation; the comparison is then tight.
    common = dict(max_train_steps=2, with_prior_preservation=True, adam_epsilon=1e-3)
    big = train(make_config(output_dir=str(tmp_path / "big"), train_batch_size=2, **common), progress=False)
    accumulated = train(make_config(output_dir=str(tmp_path / "acc"), train_batch_size=1, gradient_accumulation_steps=2,
                                    **common), progress=False)
    a, b = _unet(big), _unet(accumulated)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_weights(make_config, tmp_path):
    plain = train(make_config(output_dir=str(tmp_path / "plain"), max_train_steps=2, adam_epsilon=1e-3), progress=False)
    checkpointed = train(make_config(output_dir=str(tmp_path / "gc"), max_train_steps=2, adam_epsilon=1e-3,
                                     gradient_checkpointing=True), progress=False)
    a, b = _unet(plain), _unet(checkpointed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_caches_do_not_change_training(make_config, tmp_path):
    cached = train(make_config(output_dir=str(tmp_path / "c"), max_train_steps=2, adam_epsilon=1e-3), progress=False)
    uncached = train(make_config(output_dir=str(tmp_path / "u"), max_train_steps=2, adam_epsilon=1e-3, cache_latents=False,
                                 cache_text_embeddings=False), progress=False)
    a, b = _unet(cached), _unet(uncached)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_bf16_mixed_precision_trains_on_cpu(make_config):
    result = train(make_config(mixed_precision="bf16", max_train_steps=2), progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.pipeline.vae.dtype == torch.bfloat16  # frozen weights stored in the mixed dtype
    assert next(result.pipeline.unet.parameters()).dtype == torch.float32  # trained ones in fp32


def test_8bit_adam_without_bitsandbytes_says_what_to_do(make_config, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("no bitsandbytes")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        train(make_config(use_8bit_adam=True, max_train_steps=1), progress=False)


def test_captions_beside_images_become_prompts(tmp_path, subject_dir):
    import shutil

    from dreamtune.config import ConceptConfig
    from dreamtune.data.concepts import load_concept

    folder = tmp_path / "imgs"
    shutil.copytree(subject_dir, folder)
    (folder / "1.txt").write_text("a {identifier} {class_noun} on a red sofa")
    (folder / "2.txt").write_text("zwx plush toy in the snow")
    concept = load_concept(ConceptConfig(instance_data_dir=str(folder), identifier="zwx", class_noun="toy"))
    assert concept.prompts == ["a photo of zwx toy", "a zwx toy on a red sofa", "zwx plush toy in the snow",
                               "a photo of zwx toy"]


def test_examples_do_not_depend_on_process_split(make_config):
    """The stream index alone decides an example: its image, flip and crop."""
    from dreamtune.data.concepts import load_concept
    from dreamtune.data.dataset import TrainData

    config = make_config()
    concepts = [load_concept(config.concepts[0])]
    args = dict(resolution=32, center_crop=False, random_flip=True, augment=True, latent_scale=2, seed=3)
    a, b = TrainData(concepts, None, **args), TrainData(concepts, None, **args)
    for k in (7, 0, 3, 7):
        ea, eb = a.instance(k), b.instance(k)
        assert torch.equal(ea.pixels, eb.pixels) and ea.prompt == eb.prompt and torch.equal(ea.mask, eb.mask)
    first_epoch = {a.instance(k).source[2] for k in range(4)}
    assert first_epoch == {0, 1, 2, 3}  # each epoch visits every image once
