"""Stable Diffusion 1.x / 2.x: one CLIP text encoder whose last hidden state conditions the UNet."""

from __future__ import annotations

import torch

from .base import Family, PromptEmbeds, TextEncoderSlot


class StableDiffusion(Family):
    """SD 1.x (OpenAI CLIP ViT-L) and SD 2.x (OpenCLIP ViT-H); no added conditions."""

    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipeline_class = "StableDiffusionPipeline"
    text_encoders = (TextEncoderSlot("text_encoder", "tokenizer", "clip"),)
    export_formats = ("single_file", "kohya")
    kohya_text_prefixes = {"text_encoder": "lora_te_"}

    @classmethod
    def matches(cls, pipe) -> bool:
        unet = getattr(pipe, "unet", None)
        return (getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "text_encoder_2", None) is None
                and unet is not None and unet.config.addition_embed_type != "text_time")

    @classmethod
    def matches_single_file(cls, keys: list[str]) -> bool:
        return any(k.startswith("cond_stage_model.") for k in keys) and not any(k.startswith("conditioner.") for k in keys)

    def single_file_state(self, pipe, text_encoder_layout: str = "auto") -> tuple[dict[str, torch.Tensor], str]:
        """The original CompVis layout (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`)."""
        from ..single_file import pipeline_to_ldm, resolve_text_encoder_layout

        layout = resolve_text_encoder_layout(pipe, text_encoder_layout)
        return pipeline_to_ldm(pipe, layout), layout

    def encode(self, token_ids: list[torch.Tensor], encoders: list[torch.nn.Module]) -> PromptEmbeds:
        # The last hidden state (after the final layer norm), as StableDiffusionPipeline.encode_prompt uses it.
        return PromptEmbeds(encoders[0](token_ids[0])[0])
