"""The Family protocol: what differs between model families, behind one interface the loop and methods use.

A family knows its pipeline's parts and how to drive them: which text encoders there are and how their
outputs become the UNet's conditioning (`encode`), which added conditions the UNet takes
(`added_conditions`, e.g. SDXL's pooled embedding and time ids), how a base model is recognised and
loaded, and which export layouts apply. It knows nothing about the personalization methods; methods
see only the list of text encoders, each with a tokenizer and a short label.

Each family lives in its own module and is registered in `dreamtune.families.FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import ModelLoadError


@dataclass(frozen=True)
class TextEncoderSlot:
    """Where one text encoder lives in a pipeline, and the label its embeddings carry in shared files."""

    encoder: str  # pipeline attribute, e.g. "text_encoder_2"
    tokenizer: str  # pipeline attribute, e.g. "tokenizer_2"
    label: str  # key of this encoder's rows in multi-encoder embedding files (A1111/ComfyUI: clip_l, clip_g)


@dataclass
class PromptEmbeds:
    """A batch of encoded prompts: the cross-attention input and, for families that use one, a pooled vector."""

    embeds: torch.Tensor  # batch x tokens x width
    pooled: torch.Tensor | None = None  # batch x width

    def __getitem__(self, index) -> PromptEmbeds:
        return PromptEmbeds(self.embeds[index], None if self.pooled is None else self.pooled[index])

    def to(self, *args, **kwargs) -> PromptEmbeds:
        """Both tensors moved or cast like `Tensor.to`."""
        return PromptEmbeds(self.embeds.to(*args, **kwargs), None if self.pooled is None else self.pooled.to(*args, **kwargs))

    @staticmethod
    def stack(rows: list[PromptEmbeds]) -> PromptEmbeds:
        """One batch from single-prompt rows (each without a batch dimension)."""
        pooled = None if rows[0].pooled is None else torch.stack([r.pooled for r in rows])
        return PromptEmbeds(torch.stack([r.embeds for r in rows]), pooled)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's length, exactly as diffusers' pipelines tokenize prompts."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


class Family:
    """Base class of the model families. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str] = ""
    #: Human name used in messages.
    title: ClassVar[str] = ""
    #: The diffusers pipeline class of this family's text-to-image base models.
    pipeline_class: ClassVar[str] = ""
    text_encoders: ClassVar[tuple[TextEncoderSlot, ...]] = ()
    #: Export formats (`dreamtune export --format`) that apply to this family.
    export_formats: ClassVar[tuple[str, ...]] = ()
    #: kohya LoRA key prefix of each text encoder (by pipeline attribute).
    kohya_text_prefixes: ClassVar[dict[str, str]] = {}

    # --- recognising and loading ---------------------------------------------------------------
    @classmethod
    def matches(cls, pipe) -> bool:
        """True when `pipe` is a model of this family (checked on the loaded pipeline, not on a flag)."""
        raise NotImplementedError

    @classmethod
    def matches_single_file(cls, keys: list[str]) -> bool:
        """True when a single-file checkpoint with these tensor names is of this family."""
        raise NotImplementedError

    @classmethod
    def check_trainable(cls, pipe, source: str) -> None:
        """Raise a ModelLoadError naming `source` when the model cannot serve as a text-to-image base."""
        unet = getattr(pipe, "unet", None)
        if unet is not None and unet.config.in_channels != unet.config.out_channels:
            raise ModelLoadError(
                f"{source}: an inpainting model (its UNet takes {unet.config.in_channels} input channels: latents, "
                "mask and masked image); dreamtune trains text-to-image base models. Use the base model it was made from."
            )

    @classmethod
    def check_single_file(cls, path, keys: list[str]) -> None:
        """Raise a ModelLoadError when a single file of this family holds a model that cannot be trained."""

    # --- export layouts ------------------------------------------------------------------------
    def single_file_state(self, pipe, text_encoder_layout: str = "auto") -> tuple[dict[str, torch.Tensor], str]:
        """The pipeline's weights in the family's original single-file layout, and the layout's name."""
        raise NotImplementedError(f"{self.title}: no single-file export.")

    # --- conditioning ----------------------------------------------------------------------------
    def encode(self, token_ids: list[torch.Tensor], encoders: list[torch.nn.Module]) -> PromptEmbeds:
        """Token ids (one tensor per text encoder) -> the UNet's text conditioning, as the pipeline computes it."""
        raise NotImplementedError

    def added_conditions(self, prompt: PromptEmbeds, examples: list, dtype: torch.dtype) -> dict[str, Any] | None:
        """The UNet's `added_cond_kwargs` for a batch (None when the UNet takes none).

        Each example carries `original_size`, `crop_top_left` and its pixels' size, for families whose
        UNet is conditioned on them.
        """
        return None
