"""Time per step of dreamtune's training loop against a bare forward+backward+optimizer step.

    python benchmarks/train_step.py                 # tiny model, then an SD1.5-shaped UNet at 256 px
    python benchmarks/train_step.py --model tiny --steps 40
    python benchmarks/train_step.py --model sd15 --resolution 512 --device cuda

Three figures per model, measured in one run and reported as ratios (the machines are noisy):
- loop: `dreamtune.train` (DreamBooth with prior preservation, latents and prompts cached): the
  median wall time between consecutive steps in its own metrics log (everything between two steps,
  logging included; loading, caching and the final artifact are outside the steps);
- bare: the same UNet, batch and optimizer in a plain loop on precomputed latents and embeddings;
- uncached: the loop with latent and text-embedding caching off (images and prompts re-encoded
  every step).
Full-size models are randomly initialised from SD1.5's configs: no download is needed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dreamtune.world.subjects import write_subject_images


def sd15_pipeline(text_layers: int = 12):
    """A randomly initialised pipeline with SD1.5's UNet and VAE shapes and a CLIP ViT-L/14-shaped text encoder."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dreamtune.assets import CLIP_TOKENIZER_DIR

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], latent_channels=4, layers_per_block=2,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=text_layers, vocab_size=49408, max_position_embeddings=77,
                                        projection_dim=768, hidden_act="quick_gelu"))
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, local_files_only=True)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              steps_offset=1, clip_sample=False)
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def loop_seconds(model_dir: Path, work: Path, resolution: int, batch: int, steps: int, cached: bool,
                 mixed_precision: str) -> float:
    """Median wall time between consecutive steps of `dreamtune.train`, from its own metrics log."""
    import csv
    import statistics

    from dreamtune.config import load_config
    from dreamtune.training import train

    config = load_config(
        None, pretrained_model_name_or_path=str(model_dir), output_dir=str(work / "run"), resolution=resolution,
        max_train_steps=steps + 2, train_batch_size=batch, with_prior_preservation=True, num_class_images=4,
        class_generation_steps=1, validation_steps=0, checkpointing_steps=0, num_validation_images=1,
        validation_inference_steps=1, validation_prompts=["a photo of sks dog"], cache_latents=cached,
        cache_text_embeddings=cached, mixed_precision=mixed_precision,
        concepts=[{"instance_data_dir": str(work / "subject"), "class_noun": "dog",
                   "class_data_dir": str(work / "class")}],
    )
    result = train(config, overwrite=True, progress=False)
    with open(result.output_dir / "logs" / "metrics.csv", newline="") as f:
        wall = [float(r["wall_time"]) for r in csv.DictReader(f)]
    return statistics.median(b - a for a, b in zip(wall[1:], wall[2:]))


def bare_seconds(pipe, resolution: int, batch: int, steps: int, device: str, mixed_precision: str) -> float:
    """The same UNet step with nothing around it: precomputed latents and embeddings."""
    unet = pipe.unet.to(device).train()
    scheduler = pipe.scheduler
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    n = 2 * batch  # instance half + class half
    latents = torch.randn(n, 4, resolution // scale, resolution // scale, device=device)
    embeds = torch.randn(n, 77, unet.config.cross_attention_dim, device=device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)

    def step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (n,), device=device)
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            pred = unet(scheduler.add_noise(latents, noise, t), t, embeds).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    import statistics

    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, pipe, resolution: int, batch: int, steps: int, device: str, mixed_precision: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        pipe.save_pretrained(model_dir, safe_serialization=True)
        write_subject_images("striped_star", work / "subject", resolution=resolution)
        bare = bare_seconds(pipe, resolution, batch, steps, device, mixed_precision)
        loop = loop_seconds(model_dir, work, resolution, batch, steps, True, mixed_precision)
        uncached = loop_seconds(model_dir, work, resolution, batch, steps, False, mixed_precision)
        bare2 = bare_seconds(pipe, resolution, batch, steps, device, mixed_precision)
    bare = min(bare, bare2)
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    print(f"{name}: UNet {params:.1f}M params, {resolution}px, batch {batch}+{batch} (instance+class), {steps} steps, {device}")
    print(f"  bare step      {bare * 1000:8.1f} ms   1.00x")
    print(f"  dreamtune loop {loop * 1000:8.1f} ms   {loop / bare:.2f}x  (target <= 1.10x)")
    print(f"  loop, no cache {uncached * 1000:8.1f} ms   {uncached / bare:.2f}x  (cache speed-up {uncached / loop:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "sd15", "all"), default="all")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default: 30 tiny, 3 sd15 on CPU)")
    parser.add_argument("--resolution", type=int, default=0, help="default: 32 tiny, 256 sd15 on CPU, 512 on CUDA")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    args = parser.parse_args()
    import os

    os.environ.setdefault("DREAMTUNE_CACHE", tempfile.mkdtemp(prefix="dreamtune-bench-"))
    from dreamtune.logs import quiet_libraries

    quiet_libraries()
    if args.model in ("tiny", "all"):
        from dreamtune.tiny import tiny_pipeline

        bench("tiny", tiny_pipeline(), args.resolution or 32, args.batch, args.steps or 30, args.device,
              args.mixed_precision)
    if args.model in ("sd15", "all"):
        gpu = args.device == "cuda"
        bench("sd15-shaped", sd15_pipeline(), args.resolution or (512 if gpu else 256), args.batch,
              args.steps or (20 if gpu else 3), args.device, args.mixed_precision)


if __name__ == "__main__":
    main()
