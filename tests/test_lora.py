"""LoRA: only the adapters train, the artifact and its kohya export load in diffusers, resume, bad targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreamtune.errors import ConfigError, DreamtuneError
from dreamtune.kohya import export_kohya
from dreamtune.pipeline import load_base, load_pipeline, sample
from dreamtune.training import train

PROMPTS = ["a photo of sks dog", "a dog on the beach"]


def _small(tiny_model_dir, subject_dir, output_dir, **overrides):
    from dreamtune.config import load_config

    values = dict(pretrained_model_name_or_path=str(tiny_model_dir), output_dir=str(output_dir), method="lora",
                  resolution=32, max_train_steps=4, train_batch_size=2, learning_rate=1e-2, validation_steps=0,
                  checkpointing_steps=0, num_validation_images=1, validation_inference_steps=2,
                  validation_prompts=["a photo of {identifier} {class_noun}"],
                  concepts=[{"instance_data_dir": str(subject_dir), "class_noun": "dog"}])
    values.update(overrides)
    return load_config(None, **values)


def _images(pipe):
    return [np.asarray(im) for im in sample(pipe, PROMPTS, num_images=1, seed=3, steps=2, height=32, width=32)]


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, subject_dir, tmp_path_factory):
    """One LoRA run with text-encoder LoRA and alpha != rank (so the scale must survive every format)."""
    config = _small(tiny_model_dir, subject_dir, tmp_path_factory.mktemp("lora") / "run", train_text_encoder=True,
                    lora_rank=4, lora_alpha=8.0)
    result = train(config, progress=False)
    return result, _images(result.pipeline)


def _base_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


def test_only_lora_parameters_train(lora_run, tiny_model_dir):
    result, _ = lora_run
    base = load_base(str(tiny_model_dir))
    pipe = result.pipeline
    for component in ("unet", "text_encoder", "vae"):
        before = getattr(base, component).state_dict()
        after = getattr(pipe, component).state_dict()
        frozen = {_base_name(k): v for k, v in after.items() if "lora_" not in k}
        assert frozen.keys() == before.keys(), component
        assert all(torch.equal(before[k], frozen[k]) for k in before), f"{component}: a base weight changed"
    for component in ("unet", "text_encoder"):
        lora_b = {k: v for k, v in getattr(pipe, component).state_dict().items() if "lora_B" in k}
        # B starts at zero: every adapter moved away from it.
        assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values()), component
    trained = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)


def test_trainable_set_follows_target_modules(make_config, tiny_model_dir):
    from dreamtune.data.concepts import load_concept
    from dreamtune.methods import Components
    from dreamtune.methods.lora import LoRA

    config = make_config(method="lora", lora_target_modules=["attn2.to_k", "attn2.to_v"], lora_rank=2)
    components = Components.from_pipeline(load_base(str(tiny_model_dir)), str(tiny_model_dir))
    groups = LoRA(config).prepare(components, [load_concept(c) for c in config.concepts])
    params = {id(p) for g in groups for p in g["params"]}
    names = [n for n, p in components.unet.named_parameters() if id(p) in params]
    assert names and all(".attn2.to_k.lora_" in n or ".attn2.to_v.lora_" in n for n in names)
    assert not any(p.requires_grad for p in components.text_encoder.parameters())
    assert {p.shape[0] for n, p in components.unet.named_parameters() if "lora_A" in n} == {2}


def test_diffusers_load_lora_weights_reproduces_the_sample(lora_run, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    result, trained = lora_run
    with safe_open(str(result.artifact_dir / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        header = f.metadata()
    assert header["format"] == "pt" and header["method"] == "lora"
    assert '"unet.lora_alpha": 8.0' in header["lora_adapter_metadata"]
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(result.artifact_dir))
    assert all(np.array_equal(a, b) for a, b in zip(trained, _images(pipe)))
    ours = _images(load_pipeline(None, result.output_dir))
    assert all(np.array_equal(a, b) for a, b in zip(trained, ours))
    base = _images(load_base(str(tiny_model_dir)))
    assert not np.array_equal(trained[0], base[0])


def test_kohya_export_reloads_to_the_same_image(lora_run, tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    result, trained = lora_run
    out = export_kohya(result.output_dir, tmp_path / "subject_lora.safetensors")
    state = load_file(str(out))
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= state.keys()
    assert "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in state
    assert "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight" in state
    assert all(float(v) == 8.0 for k, v in state.items() if k.endswith(".alpha"))
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in state)
    with safe_open(str(out), framework="pt") as f:
        assert "lora_adapter_metadata" not in f.metadata() and f.metadata()["ss_network_dim"] == "4"
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out.parent), weight_name=out.name)
    assert all(np.array_equal(a, b) for a, b in zip(trained, _images(pipe)))


def test_two_lora_artifacts_stay_active_together(lora_run):
    result, _ = lora_run
    pipe = load_pipeline(None, result.artifact_dir, result.artifact_dir)
    assert len(pipe.get_active_adapters()) == 2


def test_resume_equals_uninterrupted(tiny_model_dir, subject_dir, tmp_path, resume_after_kill):
    common = dict(max_train_steps=4, checkpointing_steps=2, lr_scheduler="linear", lr_warmup_steps=1,
                  train_text_encoder=True, lora_dropout=0.1)
    full = train(_small(tiny_model_dir, subject_dir, tmp_path / "full", **common), progress=False)
    resumed = resume_after_kill(_small(tiny_model_dir, subject_dir, tmp_path / "cut", **common))
    for component in ("unet", "text_encoder"):
        a = getattr(full.pipeline, component).state_dict()
        b = getattr(resumed.pipeline, component).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), component
    assert resumed.losses == full.losses[2:]


@pytest.mark.parametrize("target, message", [
    ("to_qq", "'to_qq' matches no layer of the UNet2DConditionModel. Valid names: .*to_out.0.*to_q"),
    ("attn1", "'attn1' matches only Attention modules"),
])
def test_bad_target_module_lists_valid_names(make_config, target, message):
    with pytest.raises(ConfigError, match=message):
        train(make_config(method="lora", lora_target_modules=["to_q", target]), progress=False)


def test_kohya_export_rejects_what_is_not_a_lora(tmp_path, lora_run):
    with pytest.raises(DreamtuneError, match="no pytorch_lora_weights.safetensors"):
        export_kohya(tmp_path, tmp_path / "x.safetensors")
    with pytest.raises(DreamtuneError, match=".safetensors"):
        export_kohya(lora_run[0].artifact_dir, tmp_path / "x.ckpt")
