"""Custom Diffusion: what trains, what stays bit-identical, the diffusers-loadable artifact, tokens, augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dreamtune.errors import ConfigError

PROMPT_1 = "a photo of <new1> dog"
PROMPT_2 = "a photo of <new2> cat"


def _draw_second_subject(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        image = Image.new("RGB", (36, 36), (20, 200 - 30 * i, 60))
        ImageDraw.Draw(image).rectangle([6 + i, 8, 26, 28 - i], fill=(240, 240, 240))
        image.save(folder / f"{i}.png")
    return folder


def _cd_config(tiny_model_dir, subject_dir, tmp, **overrides):
    from dreamtune.config import load_config

    values = dict(
        pretrained_model_name_or_path=str(tiny_model_dir), output_dir=str(tmp / "run"), method="custom_diffusion",
        resolution=32, max_train_steps=3, train_batch_size=2, learning_rate=5e-3, validation_steps=0,
        checkpointing_steps=0, num_validation_images=1, validation_inference_steps=2, class_generation_steps=2,
        num_class_images=2, validation_prompts=["a photo of {identifier} {class_noun}"],
        concepts=[{"instance_data_dir": str(subject_dir), "class_noun": "dog", "identifier": "<new1>"}],
    )
    values.update(overrides)
    return load_config(None, **values)


def _probe(pipe, prompt):
    """The UNet's output for fixed latents and the prompt's text features (no sampling loop)."""
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
        return pipe.unet(latents, torch.tensor([500]), text).sample.clone()


@pytest.fixture(scope="module")
def joint_run(tiny_model_dir, subject_dir, tmp_path_factory):
    """Two concepts trained jointly with prior preservation (checkpoint at step 2 of 3).

    A spy on save_artifact keeps the trained modules' state for the tests to compare with the base.
    """
    from dreamtune.methods import custom_diffusion
    from dreamtune.training import train

    tmp = tmp_path_factory.mktemp("cd_joint")
    config = _joint_config(tiny_model_dir, subject_dir, tmp)
    seen = {}
    original = custom_diffusion.CustomDiffusion.save_artifact

    def spy(self, components, folder, meta):
        seen["unet"] = {k: v.clone() for k, v in components.unet.state_dict().items()}
        seen["vae"] = {k: v.clone() for k, v in components.vae.state_dict().items()}
        seen["text"] = {k: v.clone() for k, v in components.text_encoder.state_dict().items()}
        seen["tokens"] = self.token_embeddings()
        seen["projections"] = list(self.projections)
        seen["probe"] = _probe(components.pipe, PROMPT_1)
        seen["groups"] = [p for p in components.text_encoder.parameters() if p.requires_grad]
        return original(self, components, folder, meta)

    with pytest.MonkeyPatch.context() as mp:
        # Module fixtures start before the per-test cache fixture: keep class images out of the user's cache.
        mp.setenv("DREAMTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        mp.setattr(custom_diffusion.CustomDiffusion, "save_artifact", spy)
        result = train(config, progress=False)
    return result, seen


def _joint_config(tiny_model_dir, subject_dir, tmp):
    second = _draw_second_subject(tmp.parent / "cd_subject2")
    return _cd_config(tiny_model_dir, subject_dir, tmp, with_prior_preservation=True, checkpointing_steps=2, concepts=[
        {"instance_data_dir": str(subject_dir), "class_noun": "dog", "identifier": "<new1>"},
        {"instance_data_dir": str(second), "class_noun": "cat", "identifier": "<new2>", "initializer_token": "box"},
    ])


def test_only_cross_attention_kv_and_new_token_rows_change(joint_run, tiny_model_dir):
    from dreamtune.pipeline import load_base

    result, seen = joint_run
    base = load_base(str(tiny_model_dir))
    trained = {f"{p}.weight" for p in seen["projections"]}
    assert trained and all(name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for name in trained)
    for name, value in base.unet.state_dict().items():
        if name in trained:
            assert not torch.equal(seen["unet"][name], value), f"{name} did not train"
        else:
            assert torch.equal(seen["unet"][name], value), f"{name} changed"
    for name, value in base.vae.state_dict().items():
        assert torch.equal(seen["vae"][name], value), f"vae {name} changed"
    matrix_name = next(n for n in seen["text"] if n.endswith("token_embedding.weight"))
    for name, value in base.text_encoder.state_dict().items():
        if name == matrix_name:
            assert torch.equal(seen["text"][name][: value.shape[0]], value), "an existing embedding row changed"
        else:
            assert torch.equal(seen["text"][name], value), f"text encoder {name} changed"
    # The only text-encoder tensor with a gradient is the small block of new rows, not the vocabulary.
    assert [tuple(p.shape) for p in seen["groups"]] == [(2, 32)]
    rows = base.text_encoder.get_input_embeddings().weight
    tok = base.tokenizer
    for token, word in (("<new1>", "dog"), ("<new2>", "box")):
        init = rows[tok(word, add_special_tokens=False).input_ids[0]]
        assert not torch.equal(seen["tokens"][token]["clip"], init), f"{token} did not train"
    meta = json.loads((result.artifact_dir / "dreamtune.json").read_text())
    assert meta["tokens"] == ["<new1>", "<new2>"] and meta["initializers"] == {"<new1>": "dog", "<new2>": "box"}


def test_artifact_loads_with_diffusers_own_loaders_and_renders_the_same(joint_run, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    from dreamtune.pipeline import load_pipeline, sample

    result, seen = joint_run
    folder = result.artifact_dir
    ours = load_pipeline(None, result.output_dir)
    plain = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None,
                                                    requires_safety_checker=False)
    plain.unet.load_attn_procs(str(folder), weight_name="pytorch_custom_diffusion_weights.safetensors", _pipeline=plain)
    for token in ("<new1>", "<new2>"):
        plain.load_textual_inversion(str(folder / f"{token}.safetensors"), token=token)
    plain.set_progress_bar_config(disable=True)
    # dreamtune swaps diffusers' processors for their scaled_dot_product_attention twins holding the same
    # weights: the same model to float rounding.
    from diffusers.models.attention_processor import (
        AttnProcessor2_0,
        CustomDiffusionAttnProcessor,
        CustomDiffusionAttnProcessor2_0,
    )

    kinds = {name: type(p) for name, p in ours.unet.attn_processors.items()}
    assert set(kinds.values()) == {AttnProcessor2_0, CustomDiffusionAttnProcessor2_0}
    assert all(isinstance(p, CustomDiffusionAttnProcessor) for p in plain.unet.attn_processors.values())
    for name, processor in plain.unet.attn_processors.items():
        if processor.train_kv:
            assert kinds[name] is CustomDiffusionAttnProcessor2_0
            fused = ours.unet.attn_processors[name]
            assert torch.equal(fused.to_k_custom_diffusion.weight, processor.to_k_custom_diffusion.weight)
            assert torch.equal(fused.to_v_custom_diffusion.weight, processor.to_v_custom_diffusion.weight)
    torch.testing.assert_close(_probe(ours, PROMPT_1), _probe(plain, PROMPT_1), rtol=1e-4, atol=1e-5)
    for prompt in (PROMPT_1, PROMPT_2):
        a = np.asarray(sample(ours, prompt, num_images=1, steps=3, height=32, width=32)[0]).astype(int)
        b = np.asarray(sample(plain, prompt, num_images=1, steps=3, height=32, width=32)[0]).astype(int)
        assert np.abs(a - b).max() <= 1
    # The loaded model computes what the trained one did (other attention kernel: equal to rounding).
    torch.testing.assert_close(_probe(plain, PROMPT_1), seen["probe"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_probe(plain, PROMPT_1), _probe(plain, "a photo of dog"), atol=1e-4)
    # Two Custom Diffusion artifacts on one pipeline would overwrite each other's weights.
    from dreamtune.errors import ModelLoadError
    from dreamtune.methods.custom_diffusion import CustomDiffusion

    with pytest.raises(ModelLoadError, match="merge"):
        CustomDiffusion.apply_artifact(ours, folder)


def test_checkpoint_resume_matches_uninterrupted_run(joint_run, tiny_model_dir, subject_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from dreamtune.training import train

    full, _ = joint_run
    state = load_file(full.output_dir / "checkpoints" / "checkpoint-2" / "trainable.safetensors")
    assert any(k.endswith("added_rows") for k in state) and all(v.numel() < 10_000 for v in state.values())
    config = _joint_config(tiny_model_dir, subject_dir, tmp_path)
    shutil.copytree(full.output_dir / "checkpoints", tmp_path / "run" / "checkpoints")
    resumed = train(config, resume="latest", progress=False)
    for name in ("pytorch_custom_diffusion_weights.safetensors", "<new1>.safetensors", "<new2>.safetensors"):
        a, b = load_file(full.artifact_dir / name), load_file(resumed.artifact_dir / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_all_cross_attention_projections_and_compression(tiny_model_dir, subject_dir, tmp_path):
    from safetensors.torch import load_file

    from dreamtune.methods import Components
    from dreamtune.methods.custom_diffusion import CustomDiffusion, low_rank
    from dreamtune.pipeline import load_base, load_pipeline
    from dreamtune.training import train

    pipe = load_base(str(tiny_model_dir))
    config = _cd_config(tiny_model_dir, subject_dir, tmp_path, train_params="crossattn")
    from dreamtune.data.concepts import load_concept

    groups = CustomDiffusion(config).prepare(Components.from_pipeline(pipe, "tiny"), [load_concept(config.concepts[0])])
    names = {n for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert names and all(".attn2." in n for n in names)
    assert {n.split(".attn2.")[1] for n in names} == {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight",
                                                      "to_out.0.bias"}
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in pipe.unet.parameters() if p.requires_grad) + 32

    # The key layout holds all four projections: diffusers' loader rebuilds the same model from it.
    from dreamtune.methods.custom_diffusion import diffusers_state_dict

    with torch.no_grad():
        for name in names:
            pipe.unet.get_parameter(name).add_(0.05 * torch.randn_like(pipe.unet.get_parameter(name)))
    weights = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if p.requires_grad}
    fresh = load_base(str(tiny_model_dir))
    before = _probe(fresh, "a photo of dog")
    fresh.unet.load_attn_procs(diffusers_state_dict(fresh.unet, weights), _pipeline=fresh)
    torch.testing.assert_close(_probe(fresh, "a photo of dog"), _probe(pipe, "a photo of dog"), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(before, _probe(pipe, "a photo of dog"), atol=1e-4)

    # The SVD truncation keeps the best rank-r part: its error is the dropped singular values' share.
    matrix = torch.randn(12, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = torch.linalg.svdvals(matrix)
    up, down, error = low_rank(matrix, 4)
    assert error == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-6)
    assert low_rank(matrix, 9)[2] < 1e-6

    run = train(_cd_config(tiny_model_dir, subject_dir, tmp_path / "c", compress_rank=2), progress=False)
    meta = json.loads((run.artifact_dir / "dreamtune.json").read_text())
    assert meta["compression"]["rank"] == 2 and 0 < meta["compression"]["relative_error"] < 1
    lora = load_file(run.artifact_dir / "pytorch_lora_weights.safetensors")
    assert lora and all(v.shape[0] == 2 or v.shape[1] == 2 for v in lora.values())
    assert not (run.artifact_dir / "pytorch_custom_diffusion_weights.safetensors").exists()
    loaded = load_pipeline(None, run.output_dir)
    assert not torch.allclose(_probe(loaded, PROMPT_1), _probe(load_base(str(tiny_model_dir)), "a photo of dog"))


def test_token_helpers_and_their_errors(tiny_model_dir):
    from dreamtune.pipeline import load_base
    from dreamtune.tokens import TrainableTokens, add_tokens, is_new_token

    pipe = load_base(str(tiny_model_dir))
    tok, text = pipe.tokenizer, pipe.text_encoder
    before = text.get_input_embeddings().weight.detach().clone()
    ids = add_tokens(tok, text, ["<new1>", "<new2>"], ["dog", "cat"])
    matrix = text.get_input_embeddings().weight
    assert ids == [before.shape[0], before.shape[0] + 1]
    assert torch.equal(matrix[: before.shape[0]], before)
    assert torch.equal(matrix[ids[1]], before[tok("cat", add_special_tokens=False).input_ids[0]])
    assert tok("a <new2> cat").input_ids[2] == ids[1]

    with pytest.raises(ConfigError, match="already in the tokenizer"):
        add_tokens(tok, text, ["<new1>"], "dog")
    with pytest.raises(ConfigError, match="already in the tokenizer"):
        add_tokens(tok, text, ["<|endoftext|>"], "dog")
    with pytest.raises(ConfigError, match="2 tokens"):
        add_tokens(tok, text, ["<new3>"], "teddy bear")
    assert "<new3>" not in tok.get_vocab()
    assert is_new_token("<new1>") and not is_new_token("sks") and not is_new_token("<a b>")

    text.requires_grad_(False)
    rows = TrainableTokens(text, ids)
    optimizer = torch.optim.AdamW([rows.weight], lr=0.1)
    batch = tok(["a photo of <new1> dog", "a cat"], padding="max_length", max_length=77, return_tensors="pt")
    text(batch.input_ids)[0].square().mean().backward()
    optimizer.step()
    assert matrix.grad is None and torch.equal(text.get_input_embeddings().weight, matrix)
    assert not torch.equal(rows.weight[0], matrix[ids[0]])  # <new1> was in the batch and moved
    with torch.no_grad():
        spliced = text(batch.input_ids)[0]
    rows.write_back()
    assert torch.equal(matrix[: before.shape[0]], before)
    with torch.no_grad():
        torch.testing.assert_close(text(batch.input_ids)[0], spliced)
    assert not any("added_rows" in k for k in text.state_dict())


def test_class_prompts_are_cached_while_token_rows_train(tiny_model_dir, subject_dir, tmp_path):
    from dreamtune.data.concepts import load_concept
    from dreamtune.data.dataset import ImageSet, TrainData
    from dreamtune.families import tokenize
    from dreamtune.methods import Components
    from dreamtune.methods.custom_diffusion import CustomDiffusion
    from dreamtune.pipeline import load_base
    from dreamtune.training import Encoder

    config = _cd_config(tiny_model_dir, subject_dir, tmp_path)
    components = Components.from_pipeline(load_base(str(tiny_model_dir)), "tiny")
    method = CustomDiffusion(config)
    concept = load_concept(config.concepts[0])
    method.prepare(components, [concept])
    assert method.trains_text_encoder(components)
    assert method.frozen_prompt("a photo of dog") and not method.frozen_prompt("a photo of <NEW1> dog")
    prior = ImageSet(concept.images[:1], ["a photo of a dog"])
    data = TrainData([concept], [prior], resolution=32, center_crop=True, random_flip=False, augment=True,
                     latent_scale=2, seed=0)
    encoder = Encoder(components, data, cache_latents=False, cache_text=False, device="cpu", dtype=torch.float32,
                      frozen_prompt=method.frozen_prompt)
    assert set(encoder.text_cache) == {"a photo of a dog"}
    prompts = ["a photo of <new1> dog", "a photo of a dog"]
    embeds = encoder.text(prompts).embeds
    assert embeds.requires_grad
    embeds[0].sum().backward()
    assert method.token_rows["clip"].weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(embeds, components.text_encoder(tokenize(components.tokenizer, prompts))[0])


def test_method_errors(tiny_model_dir, subject_dir, tmp_path):
    from dreamtune.data.concepts import load_concept
    from dreamtune.methods import Components
    from dreamtune.methods.custom_diffusion import CustomDiffusion
    from dreamtune.pipeline import load_base

    def prepare(**concept):
        config = _cd_config(tiny_model_dir, subject_dir, tmp_path, concepts=[
            {"instance_data_dir": str(subject_dir), "class_noun": "dog", "identifier": "<new1>", **concept}])
        pipe = load_base(str(tiny_model_dir))
        return CustomDiffusion(config).prepare(Components.from_pipeline(pipe, "tiny"),
                                               [load_concept(c) for c in config.concepts])

    with pytest.raises(ConfigError, match="teddy bear"):
        prepare(class_noun="teddy bear")
    prepare(class_noun="teddy bear", initializer_token="toy")
    with pytest.raises(ConfigError, match="already in the tokenizer"):
        prepare(identifier="<|startoftext|>")
    with pytest.raises(ConfigError, match="compress_rank"):
        CustomDiffusion(_cd_config(tiny_model_dir, subject_dir, tmp_path, train_params="crossattn", compress_rank=2)
                        ).prepare(Components.from_pipeline(load_base(str(tiny_model_dir)), "tiny"), [])


# --- augmentation and joint batches (dreamtune.data.dataset) ---------------------------------
def _train_data(subject_dir, *, augment, random_flip=False, concepts=1):
    from dreamtune.config import ConceptConfig
    from dreamtune.data.concepts import Concept
    from dreamtune.data.dataset import ImageSet, TrainData

    images = [Image.open(p).convert("RGB") for p in sorted(subject_dir.glob("*.png"))]
    sets = [Concept(ConceptConfig(identifier=f"<new{i + 1}>", class_noun="dog"), images,
                    prompts=[f"photo of <new{i + 1}> dog"] * len(images)) for i in range(concepts)]
    priors = [ImageSet(images, [f"class {i}"] * len(images)) for i in range(concepts)]
    return TrainData(sets, priors, resolution=32, center_crop=True, random_flip=random_flip, augment=augment,
                     latent_scale=2, seed=0)


def test_rescale_augmentation_masks_words_and_flip(subject_dir):
    data = _train_data(subject_dir, augment=True)
    words = {"far": 0, "close": 0, "none": 0}
    for k in range(90):
        example = data.instance(k)
        assert example.mask is not None and example.mask.shape == (1, 16, 16)
        prompt, mask = example.prompt, example.mask
        if prompt.startswith(("a far away ", "very small ")):
            words["far"] += 1
            # A small pasted image: the loss covers its region only, the blank canvas outside is masked out.
            assert 0 < mask.sum() < 0.6**2 * 256
            inside = torch.nn.functional.interpolate(mask[None], scale_factor=2)[0].bool().expand(3, -1, -1)
            assert (example.pixels[~inside] == 0).float().mean() > 0.5
        elif prompt.startswith(("zoomed in ", "close up ")):
            words["close"] += 1
            assert mask.min() == 1
        else:
            words["none"] += 1
            assert prompt == "photo of <new1> dog"
    assert all(count > 0 for count in words.values()), words
    for k in range(10):
        assert data.prior(k).mask is None  # the prior loss is never masked

    plain = _train_data(subject_dir, augment=False)
    assert all(plain.instance(k).mask is None and plain.instance(k).prompt == "photo of <new1> dog" for k in range(10))
    assert plain.deterministic and not data.deterministic

    from dreamtune.config import load_config

    off = load_config(None, method="custom_diffusion", augment="off")
    assert load_config(None, method="custom_diffusion").augment_enabled and not off.augment_enabled
    assert not load_config(None, method="dreambooth").augment_enabled

    flipped = _train_data(subject_dir, augment=False, random_flip=True)
    base = [plain.instance(k) for k in range(16)]
    flips = [flipped.instance(k) for k in range(16)]
    outcomes = {torch.equal(f.pixels, b.pixels.flip(-1)) for f, b in zip(flips, base)}
    assert outcomes == {True, False}  # some examples flipped, some not
    assert all(torch.equal(f.pixels, b.pixels) or torch.equal(f.pixels, b.pixels.flip(-1)) for f, b in zip(flips, base))


def test_joint_training_mixes_concepts_in_every_batch(subject_dir):
    data = _train_data(subject_dir, augment=True, concepts=2)
    for step in range(6):
        batch = [data.instance(k) for k in range(2 * step, 2 * step + 2)]
        assert {e.source[1] for e in batch} == {0, 1}
        assert {e.prompt.split("<new")[1][0] for e in batch} == {"1", "2"}
        priors = [data.prior(k) for k in range(2 * step, 2 * step + 2)]
        assert {e.prompt for e in priors} == {"class 0", "class 1"}
