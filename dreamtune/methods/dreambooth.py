"""DreamBooth (Ruiz et al., CVPR 2023): fine-tune the whole UNet (and optionally the text encoders)."""

from __future__ import annotations

from pathlib import Path

from .base import Components, Method


class DreamBooth(Method):
    """Full UNet fine-tuning on "a [V] [class]"; the artifact is a complete diffusers pipeline."""

    name = "dreambooth"
    full_pipeline_artifact = True
    exports = ("single-file",)

    def prepare(self, components: Components, concepts: list) -> list[dict]:
        components.vae.requires_grad_(False)
        components.unet.requires_grad_(True)
        for encoder in components.text_encoders:
            encoder.requires_grad_(self.config.train_text_encoder)
        self.tokens = sorted({c.config.identifier for c in concepts})
        text_params = [p for e in components.text_encoders for p in e.parameters()] if self.config.train_text_encoder else ()
        return self.param_groups(components.unet.parameters(), text_params)

    def save_artifact(self, components: Components, folder: Path, meta: dict) -> None:
        import torch

        pipe = components.pipe
        # Weights are saved in float32 as trained, whatever dtype the frozen parts ran in.
        casts = [m for m in (components.unet, *components.text_encoders) if any(p.dtype != torch.float32 for p in m.parameters())]
        dtypes = [next(m.parameters()).dtype for m in casts]
        for module in casts:
            module.to(torch.float32)
        try:
            pipe.save_pretrained(folder, safe_serialization=True)
        finally:
            for module, dtype in zip(casts, dtypes):
                module.to(dtype)

    @classmethod
    def detect(cls, path: Path):
        """A diffusers pipeline folder (what diffusers' train_dreambooth.py saves): it is its own base model."""
        from ..artifacts import foreign_artifact

        if path.is_dir() and (path / "model_index.json").is_file():
            return foreign_artifact(path, cls.name, base_model=str(path))
        return None

    @classmethod
    def apply_artifact(cls, pipe, folder: Path) -> None:
        raise NotImplementedError("a DreamBooth artifact is a full pipeline: load it as the base model")
