"""Tiny, randomly initialised Stable Diffusion components built from configs.

The same real classes as Stable Diffusion (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTokenizer, DDPMScheduler) at a size that trains in seconds on a CPU. Tests and benchmarks use
them, the way diffusers' own tests use `get_dummy_components`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .assets import CLIP_TOKENIZER_DIR


def tiny_components(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """UNet (0.8M), VAE (0.7M), CLIP text encoder (1.6M), tokenizer and scheduler: a 32 px pipeline."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
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
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=49408,
            max_position_embeddings=77,
            projection_dim=32,
        )
    )
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
