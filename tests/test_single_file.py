"""Single-file (LDM layout) export, read back with diffusers' own single-file loader."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from dreamtune.errors import DreamtuneError, ModelLoadError
from dreamtune.single_file import export_single_file, inspect_single_file, load_single_file
from dreamtune.tiny import tiny_components, tiny_pipeline


def _pipeline(unet=None, vae=None, text_encoder=None, seed: int = 0):
    """The tiny pipeline with some components swapped for differently shaped ones."""
    from diffusers import StableDiffusionPipeline

    components = tiny_components(seed)
    components.update({k: v for k, v in {"unet": unet, "vae": vae, "text_encoder": text_encoder}.items() if v})
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _three_block_sd2_style(seed: int = 1):
    """Three blocks, two layers each, attention skipping the middle level, linear projections (as SD 2.x),
    per-block head dims and an OpenCLIP-style (gelu) text encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 24, 32), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=(2, 4, 8), use_linear_projection=True, norm_num_groups=8,
        transformer_layers_per_block=(1, 1, 2),
    )
    vae = AutoencoderKL(
        block_out_channels=[8, 16, 16], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=2,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=24, intermediate_size=40,
        num_attention_heads=4, num_hidden_layers=3, vocab_size=49408, max_position_embeddings=77,
        hidden_act="gelu",
    ))
    return _pipeline(unet, vae, text_encoder, seed)


def _sd15_shaped_unet(seed: int = 2):
    """SD 1.5's UNet layout (four blocks, two layers, attention in the first three) at a tiny width."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 8, 16, 16), layers_per_block=2, sample_size=16, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, norm_num_groups=8,
    )


def _image(pipe, size: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe("a photo of a red circle", num_inference_steps=3, generator=generator, height=size, width=size,
                output_type="np").images


def _assert_same_weights(original, loaded):
    for name in ("unet", "vae", "text_encoder"):
        before = getattr(original, name).state_dict()
        after = getattr(loaded, name).state_dict()
        assert before.keys() == after.keys(), name
        for key, tensor in before.items():
            assert torch.equal(tensor, after[key]), f"{name}.{key}"


@pytest.mark.parametrize("make, size", [(lambda: _pipeline(), 32), (_three_block_sd2_style, 32)],
                         ids=["tiny-sd1", "three-blocks-sd2-style"])
def test_export_loads_with_diffusers_single_file_loader_identically(tmp_path, make, size):
    from diffusers import StableDiffusionPipeline

    pipe = make()
    pipe.save_pretrained(tmp_path / "base", safe_serialization=True)
    out = export_single_file(pipe, tmp_path / "model.safetensors", metadata={"method": "dreambooth"})

    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(tmp_path / "base"), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    _assert_same_weights(pipe, loaded)
    assert np.array_equal(_image(pipe, size), _image(loaded, size))


def test_layout_keys_follow_the_original_stable_diffusion_files(tmp_path):
    pipe = _pipeline(unet=_sd15_shaped_unet())
    out = export_single_file(pipe, tmp_path / "model.safetensors")
    keys, _ = inspect_single_file(out)
    unet_keys = [k.split(".")[2:] for k in keys if k.startswith("model.diffusion_model.")]
    # input/output blocks are numbered twice (block, then part); the middle block once.
    blocks = {".".join(p[:3] if p[0] != "middle_block" else p[:2]) for p in unet_keys if p[0].endswith("_block")
              or p[0].endswith("_blocks")}
    # The block structure of SD 1.5's v1-5-pruned checkpoint: resnet (.0), attention (.1), down/upsampler.
    expected = {"input_blocks.0.0", "middle_block.0", "middle_block.1", "middle_block.2"}
    expected |= {f"input_blocks.{i}.{j}" for i in (1, 2, 4, 5, 7, 8) for j in (0, 1)}
    expected |= {f"input_blocks.{i}.0" for i in (3, 6, 9, 10, 11)}
    expected |= {f"output_blocks.{i}.0" for i in range(12)} | {f"output_blocks.{i}.1" for i in range(3, 12)}
    expected |= {"output_blocks.2.1", "output_blocks.5.2", "output_blocks.8.2"}
    assert blocks == expected
    for key in ("model.diffusion_model.input_blocks.3.0.op.weight", "model.diffusion_model.output_blocks.2.1.conv.weight",
                "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
                "model.diffusion_model.time_embed.0.weight", "model.diffusion_model.out.2.weight",
                "first_stage_model.decoder.up.0.block.1.conv1.weight", "first_stage_model.encoder.norm_out.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        assert key in keys, key

    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        # LDM's VAE attention is 1x1 convolutions.
        assert f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape() == [64, 64, 1, 1]
        assert f.get_slice("first_stage_model.decoder.mid.attn_1.proj_out.weight").get_shape() == [64, 64, 1, 1]


def test_sd15_shaped_unet_round_trips(tmp_path):
    # Twelve input and output blocks: indices past 9 are where a naive prefix match would go wrong.
    pipe = _pipeline(unet=_sd15_shaped_unet())
    pipe.save_pretrained(tmp_path / "base", safe_serialization=True)
    out = export_single_file(pipe, tmp_path / "model.safetensors")
    loaded = load_single_file(out, config=tmp_path / "base")
    _assert_same_weights(pipe, loaded)


def test_open_clip_layout_fuses_qkv(tmp_path):
    pipe = _three_block_sd2_style()
    keys, meta = inspect_single_file(export_single_file(pipe, tmp_path / "m.safetensors"))
    assert meta["text_encoder_layout"] == "open_clip"
    assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in keys
    assert "cond_stage_model.model.positional_embedding" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)


def test_metadata_dtype_and_dreamtune_loader(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "base", safe_serialization=True)
    out = export_single_file(tmp_path / "base", tmp_path / "half.safetensors", dtype=torch.float16,
                             metadata={"base_model": "shapes-world", "method": "lora", "tokens": ["sks"]})
    _, meta = inspect_single_file(out)
    assert meta["format"] == "ldm-single-file"
    assert meta["base_model"] == "shapes-world" and meta["method"] == "lora"
    assert json.loads(meta["tokens"]) == ["sks"]
    assert meta["prediction_type"] == "epsilon" and meta["dreamtune_version"]

    loaded = load_single_file(out, config=tmp_path / "base", torch_dtype=torch.float16)
    assert loaded.unet.dtype == torch.float16
    original = pipe.unet.state_dict()
    for key, tensor in loaded.unet.state_dict().items():
        assert torch.equal(tensor, original[key].half()), key


def test_unsupported_unet_is_refused_and_nothing_written(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=8, class_embed_type="timestep",
    )
    out = tmp_path / "model.safetensors"
    with pytest.raises(ModelLoadError, match="class_embedding"):
        export_single_file(_pipeline(unet=unet), out)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exported")
    pipe = tiny_pipeline()
    pipe.save_pretrained(folder / "base", safe_serialization=True)
    return export_single_file(pipe, folder / "model.safetensors", metadata={"base_model": "shapes-world"}), folder


def _one_line_error(call, *needles):
    with pytest.raises(DreamtuneError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_bad_paths_get_one_line_errors(tmp_path, exported):
    _one_line_error(lambda: load_single_file(tmp_path / "nope.safetensors"), "nope.safetensors", "no such file")
    _one_line_error(lambda: load_single_file(tmp_path), "is a folder")

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    _one_line_error(lambda: load_single_file(text), "notes.txt", ".safetensors")

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    _one_line_error(lambda: load_single_file(corrupt), "corrupt.safetensors", "not a valid safetensors")

    renamed = tmp_path / "model.bin.data"
    renamed.write_bytes(exported[0].read_bytes())
    _one_line_error(lambda: load_single_file(renamed), "rename it")

    from dreamtune.io import save_safetensors

    lora = tmp_path / "lora.safetensors"
    save_safetensors({"lora_unet_down_blocks_0_attn.lora_down.weight": torch.zeros(2, 2)}, lora)
    _one_line_error(lambda: load_single_file(lora), "lora.safetensors", "LoRA")

    vae_only = tmp_path / "vae_only.safetensors"
    save_safetensors({"model.diffusion_model.out.2.weight": torch.zeros(2)}, vae_only)
    _one_line_error(lambda: load_single_file(vae_only), "no VAE or text encoder")


class _Payload:
    """Unpickling this creates a file: proof of whether a loader executed pickle code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_ckpt_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    _one_line_error(lambda: load_single_file(ckpt), "model.ckpt", ".safetensors")
    assert not marker.exists()


def test_missing_config_offline_names_the_fix(tmp_path, exported, monkeypatch):
    import huggingface_hub.constants

    # An empty cache: diffusers' default SD 1.5 configs are not there, and nothing may be downloaded.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    message = _one_line_error(lambda: load_single_file(exported[0]), "config=", "stable-diffusion-v1-5")
    assert "shapes-world" in message  # the base model recorded at export

    _one_line_error(lambda: load_single_file(exported[0], config=tmp_path), "not a diffusers pipeline folder")


def test_config_of_another_architecture_is_a_clear_error(tmp_path, exported):
    other = _three_block_sd2_style()
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    _one_line_error(lambda: load_single_file(exported[0], config=tmp_path / "other"), "model.safetensors", "config=")


def _real_size_pipeline_on_meta(version: int):
    """SD 1.5's or SD 2.1's real component shapes, on the meta device (no memory, no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sd2 = version == 2
    with torch.device("meta"):
        unet = UNet2DConditionModel(  # the class defaults are SD 1.x's block layout
            cross_attention_dim=1024 if sd2 else 768, attention_head_dim=(5, 10, 20, 20) if sd2 else 8,
            use_linear_projection=sd2,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=1024 if sd2 else 768, intermediate_size=4096 if sd2 else 3072,
            num_attention_heads=16 if sd2 else 12, num_hidden_layers=23 if sd2 else 12,
            hidden_act="gelu" if sd2 else "quick_gelu", projection_dim=512 if sd2 else 768,
        ))
    return unet, vae, text_encoder


@pytest.mark.parametrize("version", [1, 2])
def test_real_sizes_invert_diffusers_converters(version):
    """At SD 1.5 / 2.1 sizes, diffusers' own LDM converters map the exported keys back to every weight."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )

    from dreamtune.single_file import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm

    unet, vae, text_encoder = _real_size_pipeline_on_meta(version)
    text = open_clip_to_ldm(text_encoder) if version == 2 else clip_to_ldm(text_encoder)
    checkpoint = {**unet_to_ldm(unet), **vae_to_ldm(vae), **text}
    # diffusers picks SD 1.5's or SD 2.1's configs from these keys when none is given.
    assert infer_diffusers_model_type(checkpoint) == ("v2" if version == 2 else "v1")

    back = {
        "unet": convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)),
        "vae": convert_ldm_vae_checkpoint(checkpoint, dict(vae.config)),
        "text_encoder": (convert_open_clip_checkpoint(text_encoder, checkpoint) if version == 2
                         else convert_ldm_clip_checkpoint(checkpoint)),
    }
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        converted = {k.removeprefix("text_model."): v for k, v in back[name].items()}
        original = module.state_dict()
        assert converted.keys() == original.keys(), name
        for key, tensor in original.items():
            assert converted[key].shape == tensor.shape, f"{name}.{key}"
