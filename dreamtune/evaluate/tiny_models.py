"""Tiny, randomly initialised DINO (ViT) and CLIP models for tests and dry runs of the evaluation.

Built from configs and saved with `save_pretrained`, so they load through the same
`from_pretrained` path as the real `facebook/dino-vits16` and `openai/clip-vit-base-patch32`.
Their scores exercise the arithmetic only: they mean nothing about image quality.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..assets import CLIP_TOKENIZER_DIR


def save_tiny_dino(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Save a 2-layer ViT (hidden size 32, patch 8) as a DINO stand-in; returns the folder."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, num_channels=3)
    path = Path(path)
    ViTModel(config, add_pooling_layer=False).save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_clip(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Save a 2-layer CLIP (text and vision hidden size 32, projection 16) with the CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": 49406,
                     "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"image_size": image_size, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
        projection_dim=16,
    )
    path = Path(path)
    CLIPModel(config).save_pretrained(path, safe_serialization=True)
    CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, local_files_only=True).save_pretrained(path)
    return path
