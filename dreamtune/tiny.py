"""Tiny, randomly initialised Stable Diffusion components built from configs.

The same real classes as Stable Diffusion (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTokenizer, DDPMScheduler) at a size that trains in seconds on a CPU. Tests and benchmarks use
them, the way diffusers' own tests use `get_dummy_components`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .assets import CLIP_TOKENIZER_DIR


def tiny_clip_text_config(hidden_size: int, **extra):
    """A 2-layer CLIP text config over the full CLIP vocabulary (so the real tokenizer fits it)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=hidden_size,
                          intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=49408, max_position_embeddings=77, projection_dim=32, **extra)


# The tiny UNet's levels, shared by the SD and SDXL tiny pipelines (they differ in conditioning only).
TINY_UNET_LAYOUT = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)


def tiny_components(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """UNet (0.8M), VAE (0.7M), CLIP text encoder (1.6M), tokenizer and scheduler: a 32 px pipeline."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **TINY_UNET_LAYOUT,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_clip_text_config(hidden_size=32))
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, local_files_only=True)
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        clip_sample=False,
        prediction_type=prediction_type,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
    }


def tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A StableDiffusionPipeline of tiny random components."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**tiny_components(seed, prediction_type), requires_safety_checker=False)


def save_tiny_pipeline(path: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Save a tiny pipeline as a diffusers folder (safetensors) and return its path."""
    path = Path(path)
    tiny_pipeline(seed, prediction_type).save_pretrained(path, safe_serialization=True)
    return path


def tiny_sdxl_components(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """A tiny SDXL: two CLIP text encoders (the second with a projection), a `text_time` UNet, a VAE.

    Shaped like diffusers' own SDXL tests shape theirs, except that the second encoder is wider (40
    against 32), as ViT-bigG is wider than ViT-L: diffusers' single-file loader tells the two encoders
    apart by width. Cross-attention width 72 (32 + 40, the two encoders' hidden states side by side),
    pooled width 32 and six 8-wide time ids in the added embedding (6 x 8 + 32 = 80). Samples and
    trains at 32 px.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    components = tiny_components(seed, prediction_type)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **TINY_UNET_LAYOUT,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=72,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config(hidden_size=40, hidden_act="gelu"))
    components.update(
        unet=unet,
        text_encoder_2=text_encoder_2,
        # Two tokenizer objects, as a saved pipeline has: a token added to one is not in the other.
        tokenizer_2=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, local_files_only=True),
        image_encoder=None,
    )
    del components["safety_checker"]
    return components


def tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A StableDiffusionXLPipeline of tiny random components."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**tiny_sdxl_components(seed, prediction_type))


def save_tiny_sdxl_pipeline(path: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Save a tiny SDXL pipeline as a diffusers folder (safetensors) and return its path."""
    path = Path(path)
    tiny_sdxl_pipeline(seed, prediction_type).save_pretrained(path, safe_serialization=True)
    return path
