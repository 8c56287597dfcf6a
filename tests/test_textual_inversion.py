"""Textual Inversion: only the new vectors train, the artifact loads in diffusers, resume, bad tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dreamtune.errors import ConfigError, ModelLoadError
from dreamtune.pipeline import load_base, load_pipeline, sample
from dreamtune.training import train

PROMPTS = ["a photo of <sbj> dog", "a <sbj> on the beach"]


def _small(tiny_model_dir, subject_dir, output_dir, concepts=None, **overrides):
    from dreamtune.config import load_config

    values = dict(pretrained_model_name_or_path=str(tiny_model_dir), output_dir=str(output_dir),
                  method="textual_inversion", resolution=32, max_train_steps=4, train_batch_size=2, learning_rate=5e-2,
                  scale_lr=False, validation_steps=0, checkpointing_steps=0, num_validation_images=1,
                  validation_inference_steps=2, validation_prompts=["a photo of {identifier} {class_noun}"],
                  concepts=concepts or [{"instance_data_dir": str(subject_dir), "class_noun": "dog", "identifier": "<sbj>"}])
    values.update(overrides)
    return load_config(None, **values)


def _images(pipe, prompts=PROMPTS):
    return [np.asarray(im) for im in sample(pipe, prompts, num_images=1, seed=3, steps=2, height=32, width=32)]


@pytest.fixture(scope="module")
def ti_run(tiny_model_dir, subject_dir, tmp_path_factory):
    """One run with two vectors per token."""
    config = _small(tiny_model_dir, subject_dir, tmp_path_factory.mktemp("ti") / "run", num_vectors=2)
    result = train(config, progress=False)
    return result, _images(result.pipeline)


def test_only_the_new_vectors_train(ti_run, tiny_model_dir):
    result, _ = ti_run
    base, pipe = load_base(str(tiny_model_dir)), result.pipeline
    for component in ("unet", "vae"):
        before, after = getattr(base, component).state_dict(), getattr(pipe, component).state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), component
    before, after = base.text_encoder.state_dict(), pipe.text_encoder.state_dict()
    key = "embeddings.token_embedding.weight"
    vocab = before[key].shape[0]
    assert torch.equal(after[key][:vocab], before[key]), "an existing embedding row changed"
    assert all(torch.equal(before[k], after[k]) for k in before if k != key)
    ids = pipe.tokenizer.convert_tokens_to_ids(["<sbj>", "<sbj>_1"])
    assert ids == [vocab, vocab + 1]
    initial = before[key][pipe.tokenizer("dog", add_special_tokens=False).input_ids[0]]
    trained = load_file(str(result.artifact_dir / "learned_embeds.safetensors"))["<sbj>"]
    assert trained.shape == (2, initial.shape[0])
    # Both vectors moved: the training prompt held the token expanded to both of them.
    assert all(not torch.equal(row, initial) for row in trained)
    trainable = [n for n, p in pipe.text_encoder.named_parameters() if p.requires_grad]
    assert trainable == ["embeddings.token_embedding.added_rows"]


def test_optimizer_state_is_only_the_new_rows(make_config, tiny_model_dir):
    from dreamtune.data.concepts import load_concept
    from dreamtune.methods import Components
    from dreamtune.methods.textual_inversion import TextualInversion

    config = make_config(method="textual_inversion", num_vectors=3,
                         concepts=[{"instance_data_dir": make_config().concepts[0].instance_data_dir,
                                    "class_noun": "dog", "identifier": "<sbj>", "initializer_token": "toy"}])
    components = Components.from_pipeline(load_base(str(tiny_model_dir)), str(tiny_model_dir))
    groups = TextualInversion(config).prepare(components, [load_concept(c) for c in config.concepts])
    params = [p for g in groups for p in g["params"]]
    assert [tuple(p.shape) for p in params] == [(3, 32)]
    toy = components.text_encoder.get_input_embeddings().weight[components.tokenizer("toy", add_special_tokens=False).input_ids[0]]
    assert all(torch.equal(row, toy) for row in params[0].detach())
    # The loop's tokenizer expands the token to its three vectors, as diffusers does at inference.
    ids = components.tokenizer(["a <sbj> dog"]).input_ids[0]
    assert ids[2:5] == components.tokenizer.convert_tokens_to_ids(["<sbj>", "<sbj>_1", "<sbj>_2"])


def test_diffusers_load_textual_inversion_reproduces_the_sample(ti_run, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    result, trained = ti_run
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(result.artifact_dir))
    assert all(np.array_equal(a, b) for a, b in zip(trained, _images(pipe)))
    ours = load_pipeline(None, result.output_dir)
    assert all(np.array_equal(a, b) for a, b in zip(trained, _images(ours)))
    with pytest.raises(ModelLoadError, match="already in the pipeline's tokenizer"):
        load_pipeline(None, result.output_dir, result.output_dir)


def test_two_concepts_get_one_file_each(tiny_model_dir, subject_dir, tmp_path):
    concepts = [{"instance_data_dir": str(subject_dir), "class_noun": "dog", "identifier": "<a-dog>"},
                {"instance_data_dir": str(subject_dir), "class_noun": "toy", "identifier": "<b-toy>"}]
    result = train(_small(tiny_model_dir, subject_dir, tmp_path / "run", concepts=concepts, max_train_steps=1), progress=False)
    files = sorted(p.name for p in result.artifact_dir.glob("*.safetensors"))
    assert files == ["learned_embeds_a-dog.safetensors", "learned_embeds_b-toy.safetensors"]
    pipe = load_pipeline(None, result.output_dir)
    prompts = ["a <a-dog> and a <b-toy>"]
    assert np.array_equal(_images(result.pipeline, prompts)[0], _images(pipe, prompts)[0])


def test_resume_equals_uninterrupted(tiny_model_dir, subject_dir, tmp_path, resume_after_kill):
    common = dict(max_train_steps=4, checkpointing_steps=2, lr_scheduler="linear", lr_warmup_steps=1, num_vectors=2,
                  random_flip=True, center_crop=False)
    full = train(_small(tiny_model_dir, subject_dir, tmp_path / "full", **common), progress=False)
    resumed = resume_after_kill(_small(tiny_model_dir, subject_dir, tmp_path / "cut", **common))
    a, b = full.pipeline.text_encoder.state_dict(), resumed.pipeline.text_encoder.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.losses == full.losses[2:]


@pytest.mark.parametrize("concept, message", [
    ({"identifier": "<sbj>", "initializer_token": "teddy bear"}, "'teddy bear' is 2 tokens"),
    ({"identifier": "<sbj>", "class_noun": "teddy bear"}, "'teddy bear' is 2 tokens.*Set initializer_token"),
    ({"identifier": "sks"}, r"identifier: 'sks' is not a new token.*<sks>"),
    ({"identifier": "<sbj>_1"}, r"identifier: '<sbj>_1' is not a new token"),
])
def test_bad_tokens_give_clear_messages(make_config, subject_dir, concept, message):
    concept = {"instance_data_dir": str(subject_dir), "class_noun": "dog", **concept}
    with pytest.raises(ConfigError, match=message):
        train(make_config(method="textual_inversion", concepts=[concept]), progress=False)
