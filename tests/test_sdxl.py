"""SDXL: conditioning as the pipeline computes it, every method trains, artifacts load with diffusers' loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamtune.config import load_config
from dreamtune.pipeline import load_base, load_pipeline, sample
from dreamtune.training import train

PROMPTS = ["a photo of sks dog", "a dog on the beach"]


def _config(model_dir, subject_dir, output_dir, **overrides):
    values = dict(pretrained_model_name_or_path=str(model_dir), output_dir=str(output_dir), resolution=32,
                  max_train_steps=3, train_batch_size=2, learning_rate=1e-3, validation_steps=0,
                  checkpointing_steps=0, num_validation_images=1, validation_inference_steps=2,
                  validation_prompts=["a photo of {identifier} {class_noun}"],
                  concepts=[{"instance_data_dir": str(subject_dir), "class_noun": "dog"}])
    values.update(overrides)
    return load_config(None, **values)


def _images(pipe, prompts=PROMPTS):
    return [np.asarray(im) for im in sample(pipe, prompts, num_images=1, seed=3, steps=2, height=32, width=32)]


def _fresh(model_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _frozen_unchanged(base, pipe, components, strip=lambda k: k) -> None:
    for component in components:
        before = getattr(base, component).state_dict()
        after = {strip(k): v for k, v in getattr(pipe, component).state_dict().items() if "lora_" not in k}
        assert after.keys() == before.keys(), component
        assert all(torch.equal(before[k], after[k]) for k in before), f"{component}: a frozen weight changed"


def test_family_is_read_from_the_pipeline(tiny_sdxl_model_dir, tiny_model_dir):
    from dreamtune.families import family_of

    assert family_of(load_base(str(tiny_sdxl_model_dir))).name == "sdxl"
    assert family_of(load_base(str(tiny_model_dir))).name == "sd"


def test_conditioning_matches_the_pipeline(tiny_sdxl_model_dir, subject_dir):
    """Both encoders' penultimate states side by side and the second's pooled output, as encode_prompt gives."""
    from dreamtune.families import tokenize
    from dreamtune.methods import Components

    pipe = load_base(str(tiny_sdxl_model_dir))
    components = Components.from_pipeline(pipe, str(tiny_sdxl_model_dir))
    with torch.no_grad():
        ids = [tokenize(t, PROMPTS) for t in components.tokenizers]
        ours = components.family.encode(ids, components.text_encoders)
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    assert ours.embeds.shape == (2, 77, 72) and torch.equal(ours.embeds, embeds)
    assert torch.equal(ours.pooled, pooled)


def test_time_ids_come_from_each_example(tiny_sdxl_model_dir, subject_dir):
    from dreamtune.data.concepts import load_concept
    from dreamtune.data.dataset import TrainData
    from dreamtune.families import PromptEmbeds, get_family

    config = _config(tiny_sdxl_model_dir, subject_dir, "unused", center_crop=False)
    data = TrainData([load_concept(c) for c in config.concepts], None, resolution=32, center_crop=False,
                     random_flip=False, augment=False, latent_scale=2, seed=0)
    examples = [data.instance(k) for k in range(4)]
    prompt = PromptEmbeds(torch.zeros(4, 77, 72), torch.zeros(4, 32))
    ids = get_family("sdxl")().added_conditions(prompt, examples, torch.float32)["time_ids"]
    # The subject images are 40 x 48 (w x h): resized to 32 x 38, a random 32 px crop is taken from the 38.
    assert ids[:, :2].tolist() == [[48.0, 40.0]] * 4 and ids[:, 4:].tolist() == [[32.0, 32.0]] * 4
    assert set(ids[:, 3].tolist()) == {0.0} and all(0 <= t <= 6 for t in ids[:, 2].tolist())
    again = [data.instance(k).crop_top_left for k in range(4)]
    assert [e.crop_top_left for e in examples] == again


@pytest.fixture(scope="module")
def dreambooth_run(tiny_sdxl_model_dir, subject_dir, tmp_path_factory):
    config = _config(tiny_sdxl_model_dir, subject_dir, tmp_path_factory.mktemp("xl-db") / "run", train_text_encoder=True)
    result = train(config, progress=False)
    return result, _images(result.pipeline)


def test_dreambooth_trains_unet_and_both_encoders(dreambooth_run, tiny_sdxl_model_dir):
    result, trained = dreambooth_run
    base = load_base(str(tiny_sdxl_model_dir))
    _frozen_unchanged(base, result.pipeline, ["vae"])
    for component in ("unet", "text_encoder", "text_encoder_2"):
        before, after = getattr(base, component).state_dict(), getattr(result.pipeline, component).state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), f"{component} did not train"
    reloaded = _fresh(result.artifact_dir)
    assert _same(trained, _images(reloaded))
    assert _same(trained, _images(load_pipeline(None, result.output_dir)))
    assert not _same(trained, _images(base))


@pytest.fixture(scope="module")
def lora_run(tiny_sdxl_model_dir, subject_dir, tmp_path_factory):
    config = _config(tiny_sdxl_model_dir, subject_dir, tmp_path_factory.mktemp("xl-lora") / "run", method="lora",
                     train_text_encoder=True, lora_rank=4, lora_alpha=8.0, learning_rate=1e-2)
    result = train(config, progress=False)
    return result, _images(result.pipeline)


def test_lora_trains_adapters_only_and_loads_in_diffusers(lora_run, tiny_sdxl_model_dir):
    from safetensors.torch import load_file

    result, trained = lora_run
    base = load_base(str(tiny_sdxl_model_dir))
    _frozen_unchanged(base, result.pipeline, ["unet", "text_encoder", "text_encoder_2", "vae"],
                      strip=lambda k: k.replace(".base_layer.", "."))
    keys = load_file(str(result.artifact_dir / "pytorch_lora_weights.safetensors")).keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    pipe = _fresh(tiny_sdxl_model_dir)
    pipe.load_lora_weights(str(result.artifact_dir))
    assert _same(trained, _images(pipe))
    assert _same(trained, _images(load_pipeline(None, result.output_dir)))
    assert not _same(trained, _images(base))


def test_bucketed_resume_equals_uninterrupted(tiny_sdxl_model_dir, varied_subject_dir, tmp_path, resume_after_kill):
    """Bucketed batches, class images generated by the SDXL pipeline at each bucket's size, text encoders trained."""
    from PIL import Image

    from dreamtune.data.priors import default_class_dir

    common = dict(method="lora", max_train_steps=4, checkpointing_steps=2, train_text_encoder=True,
                  center_crop=False, random_flip=True, learning_rate=1e-2, bucketing=True, bucket_step=8,
                  with_prior_preservation=True, num_class_images=2, class_generation_steps=1,
                  concepts=[{"instance_data_dir": str(varied_subject_dir), "class_noun": "dog"}])
    sizes = []
    full_config = _config(tiny_sdxl_model_dir, varied_subject_dir, tmp_path / "full", **common)
    with pytest.MonkeyPatch.context() as mp:
        import dreamtune.training as training

        real = training.diffusion_loss

        def spy(unet, scheduler, latents, *args, added_conditions=None, **kwargs):
            sizes.append((tuple(latents.shape), added_conditions["time_ids"].tolist()))
            return real(unet, scheduler, latents, *args, added_conditions=added_conditions, **kwargs)

        mp.setattr(training, "diffusion_loss", spy)
        full = train(full_config, progress=False)
    # Several buckets were trained, and SDXL was told each batch's own target size.
    assert len({shape for shape, _ in sizes}) > 1
    for shape, time_ids in sizes:
        assert [t[4:] for t in time_ids] == [[shape[2] * 2, shape[3] * 2]] * shape[0]
        # The class half: generated at the bucket's size, so uncropped (original = target, corner 0, 0).
        assert all(t[:4] == t[4:] + [0, 0] for t in time_ids[shape[0] // 2 :])
    # At least one class image per bucket of the subject's images (num_class_images = 2 < 3 buckets).
    class_dir = default_class_dir(str(tiny_sdxl_model_dir), "a photo of dog", resolution=32, steps=1, guidance=7.5)
    made = {p.name: Image.open(p).size for p in class_dir.glob("*.png")}
    assert {n: size for n, size in made.items() if "-" in n} == {"00000-40x24.png": (40, 24), "00000-24x40.png": (24, 40)}
    assert made["00000.png"] == (32, 32)
    resumed = resume_after_kill(_config(tiny_sdxl_model_dir, varied_subject_dir, tmp_path / "cut", **common))
    for component in ("unet", "text_encoder", "text_encoder_2"):
        a = getattr(full.pipeline, component).state_dict()
        b = getattr(resumed.pipeline, component).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), component
    assert resumed.losses == full.losses[2:]


def test_refiner_and_inpainting_models_are_refused_with_the_fix():
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    from dreamtune.errors import ModelLoadError
    from dreamtune.families import family_of
    from dreamtune.tiny import tiny_pipeline, tiny_sdxl_components

    parts = tiny_sdxl_components()
    refiner = StableDiffusionXLImg2ImgPipeline(**{**parts, "text_encoder": None, "tokenizer": None},
                                               requires_aesthetics_score=True)
    with pytest.raises(ModelLoadError, match="refiner.*Use the SDXL base model"):
        family_of(refiner, "refiner")
    inpaint = tiny_pipeline()
    inpaint.unet = UNet2DConditionModel.from_config({**inpaint.unet.config, "in_channels": 9})
    with pytest.raises(ModelLoadError, match="inpainting model .*9 input channels"):
        family_of(inpaint, "inpaint")


def test_textual_inversion_learns_the_token_in_both_encoders(tiny_sdxl_model_dir, subject_dir, tmp_path):
    from safetensors.torch import load_file

    config = _config(tiny_sdxl_model_dir, subject_dir, tmp_path / "ti", method="textual_inversion",
                     learning_rate=5e-2, num_vectors=2, concepts=[{"instance_data_dir": str(subject_dir),
                                                                  "class_noun": "dog", "identifier": "<sks>"}])
    result = train(config, progress=False)
    prompts = ["a photo of <sks> dog", "a dog on the beach"]
    trained = _images(result.pipeline, prompts)
    base = load_base(str(tiny_sdxl_model_dir))
    _frozen_unchanged(base, result.pipeline, ["unet", "vae"])
    state = load_file(str(result.artifact_dir / "learned_embeds.safetensors"))
    assert {k: tuple(v.shape) for k, v in state.items()} == {"clip_l": (2, 32), "clip_g": (2, 40)}
    pipe = _fresh(tiny_sdxl_model_dir)
    pipe.load_textual_inversion(state["clip_l"], token="<sks>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<sks>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    assert _same(trained, _images(pipe, prompts))
    assert _same(trained, _images(load_pipeline(None, result.output_dir), prompts))
    assert not _same(trained[:1], _images(base, prompts[:1]))


@pytest.fixture(scope="module")
def custom_diffusion_run(tiny_sdxl_model_dir, subject_dir, tmp_path_factory):
    config = _config(tiny_sdxl_model_dir, subject_dir, tmp_path_factory.mktemp("xl-cd") / "run",
                     method="custom_diffusion", learning_rate=5e-2,
                     concepts=[{"instance_data_dir": str(subject_dir), "class_noun": "dog", "identifier": "<new1>"}])
    result = train(config, progress=False)
    return result, _images(result.pipeline, ["a photo of <new1> dog", "a dog on the beach"])


def test_custom_diffusion_trains_kv_and_both_token_rows(custom_diffusion_run, tiny_sdxl_model_dir):
    from safetensors.torch import load_file

    result, trained = custom_diffusion_run
    prompts = ["a photo of <new1> dog", "a dog on the beach"]
    base = load_base(str(tiny_sdxl_model_dir))
    before, after = base.unet.state_dict(), result.pipeline.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)
    tokens = load_file(str(result.artifact_dir / "<new1>.safetensors"))
    assert {k: tuple(v.shape) for k, v in tokens.items()} == {"clip_l": (1, 32), "clip_g": (1, 40)}
    pipe = _fresh(tiny_sdxl_model_dir)
    for label, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                                      ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
        pipe.load_textual_inversion(tokens[label], token="<new1>", text_encoder=encoder, tokenizer=tokenizer)
    pipe.unet.load_attn_procs(str(result.artifact_dir), weight_name="pytorch_custom_diffusion_weights.safetensors",
                              _pipeline=pipe)
    loaded = _images(pipe, prompts)
    assert _same(loaded, _images(load_pipeline(None, result.output_dir), prompts))
    # diffusers' Custom Diffusion processor is another attention kernel than training's: equal to rounding.
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 2 for a, b in zip(trained, loaded))
    assert not _same(loaded[:1], _images(base, prompts[:1]))


def test_kohya_export_has_sdxl_prefixes_and_reloads_to_the_same_image(lora_run, tiny_sdxl_model_dir, tmp_path):
    from safetensors.torch import load_file

    from dreamtune.kohya import export_kohya

    result, trained = lora_run
    out = export_kohya(result.output_dir, tmp_path / "xl_lora.safetensors")
    state = load_file(str(out))
    assert {k.split("_")[1] for k in state} == {"unet", "te1", "te2"}
    assert "lora_te2_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight" in state
    assert all(float(v) == 8.0 for k, v in state.items() if k.endswith(".alpha"))
    pipe = _fresh(tiny_sdxl_model_dir)
    pipe.load_lora_weights(str(out.parent), weight_name=out.name)
    assert _same(trained, _images(pipe))


def test_dreambooth_single_file_export_loads_in_from_single_file(dreambooth_run, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from dreamtune.artifacts import read_artifact
    from dreamtune.export import export

    result, trained = dreambooth_run
    out = export(read_artifact(result.output_dir), "single-file", tmp_path / "xl.safetensors")
    keys = load_file(str(out)).keys()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "conditioner"}
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    pipe = StableDiffusionXLPipeline.from_single_file(str(out), config=str(result.artifact_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert _same(trained, _images(pipe))
    # dreamtune reads it as an SDXL base model too (the family comes from the file's keys).
    ours = load_base(str(out), single_file_config=str(result.artifact_dir))
    assert type(ours).__name__ == "StableDiffusionXLPipeline" and _same(trained, _images(ours))


def test_eval_scores_an_sdxl_run_and_the_example_config_loads(lora_run, tmp_path):
    import shutil
    from pathlib import Path

    from dreamtune.evaluate.runner import ScoringModels, evaluate_run
    from dreamtune.evaluate.tiny_models import save_tiny_clip, save_tiny_dino

    example = load_config(Path(__file__).parents[1] / "examples" / "sdxl_lora.toml")
    assert example.bucketing and example.method == "lora" and example.method_options.rank == 16
    result, _ = lora_run
    run = tmp_path / "run"
    shutil.copytree(result.output_dir, run)
    models = ScoringModels.load(str(save_tiny_dino(tmp_path / "dino")), str(save_tiny_clip(tmp_path / "clip")),
                                device="cpu")
    scores = evaluate_run(run, prompts=["a {identifier} {class_noun} on a table"], images_per_prompt=1, seed=0,
                          steps=2, models=models, progress=False)
    assert scores["rendered"] == 2 and -1 <= scores["summary"]["clip_t"] <= 1


def test_custom_diffusion_merge_keeps_the_concept_on_sdxl_shapes(custom_diffusion_run, tmp_path):
    """The closed-form merge reads SDXL's cross-attention input (both encoders, 72 wide) and keeps C W^T."""
    from safetensors.torch import load_file

    from dreamtune.merge import concept_features, merge
    from dreamtune.methods.custom_diffusion import WEIGHT_NAME, weights_from_diffusers

    result, _ = custom_diffusion_run
    captions = [f"a photo of a {c} {t} {w}" for c in ("red", "blue", "green", "small", "large")
                for t in ("dog", "cat", "house", "tree") for w in ("on the grass", "in a room", "at night")]
    merge([result.output_dir], captions, tmp_path / "merged")
    pipe = load_pipeline(None, tmp_path / "merged")
    features = concept_features(pipe, "<new1>", "dog")
    assert features.shape[1] == 72
    trained = weights_from_diffusers(load_file(result.artifact_dir / WEIGHT_NAME))
    merged = weights_from_diffusers(load_file(tmp_path / "merged" / WEIGHT_NAME))
    for name, w in trained.items():
        target = features @ w.double().T
        assert torch.linalg.matrix_norm(features @ merged[name].double().T - target) / torch.linalg.matrix_norm(target) < 1e-5
    assert load_file(tmp_path / "merged" / "<new1>.safetensors").keys() == {"clip_l", "clip_g"}


def test_compressed_custom_diffusion_and_checkpointed_encoders(tiny_sdxl_model_dir, subject_dir, tmp_path):
    """compress_rank on SDXL's K/V shapes loads with load_lora_weights; gradient checkpointing of the UNet and
    both text encoders changes no loss."""
    import json

    cd = _config(tiny_sdxl_model_dir, subject_dir, tmp_path / "cd", method="custom_diffusion", max_train_steps=2,
                 learning_rate=5e-2, compress_rank=4,
                 concepts=[{"instance_data_dir": str(subject_dir), "class_noun": "dog", "identifier": "<new1>"}])
    result = train(cd, progress=False)
    report = json.loads((result.artifact_dir / "dreamtune.json").read_text())["compression"]
    assert report["rank"] == 4 and 0 <= report["relative_error"] < 1
    pipe = _fresh(tiny_sdxl_model_dir)
    from dreamtune.methods.custom_diffusion import CustomDiffusion

    CustomDiffusion.apply_artifact(pipe, result.artifact_dir)
    assert "custom_diffusion_0" in pipe.get_list_adapters()["unet"]
    assert all(np.isfinite(im.astype(float)).all() for im in _images(pipe, ["a photo of <new1> dog"]))

    common = dict(max_train_steps=2, train_text_encoder=True)
    plain = train(_config(tiny_sdxl_model_dir, subject_dir, tmp_path / "plain", **common), progress=False)
    saved = train(_config(tiny_sdxl_model_dir, subject_dir, tmp_path / "ckpt", gradient_checkpointing=True, **common),
                  progress=False)
    assert saved.pipeline.text_encoder_2.is_gradient_checkpointing and saved.pipeline.unet.is_gradient_checkpointing
    np.testing.assert_allclose(plain.losses, saved.losses, rtol=1e-5)
