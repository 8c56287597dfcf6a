"""Stable Diffusion XL: two text encoders, a pooled embedding and size/crop micro-conditioning.

The UNet's cross-attention reads the penultimate hidden states of both encoders side by side (CLIP
ViT-L, 768 wide, then OpenCLIP ViT-bigG, 1280 wide); its added embedding reads the second encoder's
pooled, projected output and six "time ids": the training image's original size, the top-left corner
of the crop taken from it, and the target size (Podell et al., 2023, section 2.2). At inference the
pipeline passes original = target = the requested size and a (0, 0) crop, which asks for uncropped
images of that size.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ModelLoadError
from .base import Family, PromptEmbeds, TextEncoderSlot

SINGLE_FILE_LAYOUT = "sgm"


class StableDiffusionXL(Family):
    """SDXL base models (`StableDiffusionXLPipeline`); the refiner alone is refused."""

    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoders = (TextEncoderSlot("text_encoder", "tokenizer", "clip_l"),
                     TextEncoderSlot("text_encoder_2", "tokenizer_2", "clip_g"))
    export_formats = ("single_file", "kohya")
    kohya_text_prefixes = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}

    @classmethod
    def matches(cls, pipe) -> bool:
        unet = getattr(pipe, "unet", None)
        return getattr(pipe, "text_encoder_2", None) is not None or (
            unet is not None and unet.config.addition_embed_type == "text_time")

    @classmethod
    def matches_single_file(cls, keys: list[str]) -> bool:
        return any(k.startswith("conditioner.embedders.") for k in keys)

    @classmethod
    def check_trainable(cls, pipe, source: str) -> None:
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe.config, "requires_aesthetics_score", False):
            raise ModelLoadError(
                f"{source}: an SDXL refiner (one text encoder, conditioned on an aesthetic score); it only refines "
                "images the base model made and cannot be personalized. Use the SDXL base model."
            )
        super().check_trainable(pipe, source)

    @classmethod
    def check_single_file(cls, path, keys: list[str]) -> None:
        """Refuse a refiner checkpoint (it holds only the OpenCLIP embedder) with the fix."""
        if not any(k.startswith("conditioner.embedders.1.") for k in keys):
            raise ModelLoadError(
                f"{path}: an SDXL refiner checkpoint (one text encoder); it only refines images the base model made "
                "and cannot be personalized. Use the SDXL base checkpoint."
            )

    def single_file_state(self, pipe, text_encoder_layout: str = "auto") -> tuple[dict[str, torch.Tensor], str]:
        """Stability's original SGM layout, which `StableDiffusionXLPipeline.from_single_file`, A1111 and ComfyUI read.

        The UNet and VAE keep SD's names (plus `label_emb.0.*`, the added embedding); the encoders sit
        under `conditioner.embedders.0.transformer.text_model.*` (OpenAI CLIP) and
        `conditioner.embedders.1.model.*` (OpenCLIP, fused q/k/v, transposed `text_projection`).
        """
        from ..single_file import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm

        if text_encoder_layout not in ("auto", SINGLE_FILE_LAYOUT):
            raise ModelLoadError(f"text_encoder_layout={text_encoder_layout!r}: SDXL files have one layout ('auto').")
        added = {"add_embedding.linear_1": ("label_emb.0.0", {}), "add_embedding.linear_2": ("label_emb.0.2", {})}
        state = {**unet_to_ldm(pipe.unet, added), **vae_to_ldm(pipe.vae),
                 **clip_to_ldm(pipe.text_encoder, "conditioner.embedders.0.transformer.text_model."),
                 **open_clip_to_ldm(pipe.text_encoder_2, "conditioner.embedders.1.model.")}
        return state, SINGLE_FILE_LAYOUT

    def encode(self, token_ids: list[torch.Tensor], encoders: list[torch.nn.Module]) -> PromptEmbeds:
        hidden, pooled = [], None
        for ids, encoder in zip(token_ids, encoders):
            out = encoder(ids, output_hidden_states=True)
            # The pooled vector comes from the encoder with a projection (the second); the pipeline
            # takes the first 2-D output it sees, which is that one.
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return PromptEmbeds(torch.cat(hidden, dim=-1), pooled)

    def added_conditions(self, prompt: PromptEmbeds, examples: list, dtype: torch.dtype) -> dict[str, Any]:
        time_ids = torch.tensor([list(e.original_size) + list(e.crop_top_left) + list(e.pixels.shape[-2:])
                                 for e in examples], dtype=dtype, device=prompt.embeds.device)
        return {"text_embeds": prompt.pooled.to(dtype), "time_ids": time_ids}
