"""Trainable parameters and artifact size of every method on an SDXL-shaped model (shapes only).

    python -m benchmarks.sdxl_sizes

The model is built with SDXL base 1.0's shapes (UNet 2.6B, CLIP ViT-L and OpenCLIP ViT-bigG text
encoders, the VAE) on PyTorch's "meta" device: shapes without memory, so this runs in seconds on any
machine. Each method's own `prepare` marks what trains (Custom Diffusion's, which keeps CPU copies
of the base weights, is replaced by its own `trained_projections`); the artifact size is what its
files hold in float32, counted from the tensors (the safetensors headers add a few KB).
"""

from __future__ import annotations

import torch


def sdxl_pipeline():
    """A StableDiffusionXLPipeline with SDXL base 1.0's shapes, on the meta device."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from dreamtune.assets import CLIP_TOKENIZER_DIR

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], latent_channels=4, layers_per_block=2,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            sample_size=1024, scaling_factor=0.13025)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                            num_hidden_layers=12, vocab_size=49408, max_position_embeddings=77,
                                            projection_dim=768, hidden_act="quick_gelu"))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, vocab_size=49408,
            max_position_embeddings=77, projection_dim=1280, hidden_act="gelu"))
    tokenizers = [CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, local_files_only=True) for _ in range(2)]
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizers[0],
                                     tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler)


def numel(params) -> int:
    return sum(p.numel() for p in params)


def main() -> None:
    from benchmarks.method_sizes import RUNS
    from dreamtune.config import ConceptConfig, load_config
    from dreamtune.data.concepts import Concept
    from dreamtune.logs import quiet_libraries
    from dreamtune.methods import Components, get_method
    from dreamtune.methods.custom_diffusion import trained_projections

    quiet_libraries()
    rows = []
    for method, identifier, extra in RUNS:
        pipe = sdxl_pipeline()
        unet_total = numel(pipe.unet.parameters())
        config = load_config(None, method=method, pretrained_model_name_or_path="sdxl-shaped", **extra)
        components = Components.from_pipeline(pipe, "sdxl-shaped")
        width = sum(e.get_input_embeddings().weight.shape[1] for e in components.text_encoders)
        if method == "custom_diffusion":
            layers = [pipe.unet.get_submodule(p) for p in trained_projections(pipe.unet, "crossattn_kv")]
            trainable = numel(m.weight for m in layers) + width
            rank = extra.get("compress_rank")
            stored = sum(rank * sum(m.weight.shape) for m in layers) + width if rank else trainable
        else:
            concept = Concept(ConceptConfig(instance_data_dir=".", identifier=identifier, class_noun="dog"))
            groups = get_method(method)(config).prepare(components, [concept])
            trainable = numel(p for g in groups for p in g["params"])
            stored = trainable
            if method == "dreambooth":  # the whole pipeline folder
                stored = numel(p for m in (pipe.unet, pipe.vae, *components.text_encoders) for p in m.parameters())
        label = method + "".join(f" {k}={v}" for k, v in extra.items())
        rows.append((label, trainable, trainable / unet_total, stored * 4))
    print(f"SDXL-shaped model, UNet {unet_total / 1e6:.1f}M parameters")
    print(f"{'method':45s} {'trainable':>14s} {'of UNet':>9s} {'artifact':>11s}")
    for label, trainable, share, size in rows:
        shown = f"{size / 2**20:9.1f} MB" if size >= 2**20 else f"{size / 2**10:9.1f} KB"
        print(f"{label:45s} {trainable:14,d} {share:9.2%} {shown}")


if __name__ == "__main__":
    main()
