"""Training speed, trainable fraction and artifact size of every method, relative to DreamBooth.

    python benchmarks/method_steps.py                      # tiny and mid models, 32 px, CPU
    python benchmarks/method_steps.py --models tiny --steps 30 --rounds 3
    python benchmarks/method_steps.py --models sd15 --resolution 512 --batch 2   # on a GPU

Every method registered in dreamtune.methods that this version has is trained with `dreamtune.train`
on the same images, batch (instance + class half, prior preservation on) and steps; a step's time is
the median of the loop's own per-step timings (logs/metrics.csv) after two warm-up steps, and the
median over `--rounds` runs taken in alternating order (the machines are shared and noisy). Custom
Diffusion is timed with its rescale augmentation off, like the others, so that only the method
differs; the row "custom_diffusion+augment" is its default, where latents cannot be cached.

Printed per model: seconds per step, steps per second, step time relative to DreamBooth, trainable
parameters (as a share of the UNet's), and the artifact's size on disk.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dreamtune.world.subjects import write_subject_images

# method -> (identifier, extra config); CD and TI learn a new token, the others use a rare word.
VARIANTS = {
    "dreambooth": ("sks", {}),
    "custom_diffusion": ("<new1>", {"augment": "off"}),
    "custom_diffusion+augment": ("<new1>", {"augment": "on"}),
    "textual_inversion": ("<new1>", {}),
    "lora": ("sks", {}),
}


def mid_pipeline():
    """A 17.7M-parameter UNet (64,128,256 channels, 2 layers) with a 256-wide text encoder, random weights."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreamtune.tiny import tiny_components

    parts = tiny_components()
    torch.manual_seed(0)
    parts["unet"] = UNet2DConditionModel(
        block_out_channels=(64, 128, 256), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=256, attention_head_dim=8, norm_num_groups=16)
    parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=256, intermediate_size=1024,
        num_attention_heads=4, num_hidden_layers=4, vocab_size=49408, max_position_embeddings=77, projection_dim=256))
    return StableDiffusionPipeline(**parts, requires_safety_checker=False)


def sd15_pipeline():
    """Stable Diffusion 1.5's UNet, VAE and text-encoder shapes, randomly initialised (no download)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dreamtune.assets import CLIP_TOKENIZER_DIR

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], latent_channels=4, layers_per_block=2,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12, vocab_size=49408, max_position_embeddings=77,
                                        projection_dim=768, hidden_act="quick_gelu"))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              clip_sample=False)
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, scheduler=scheduler,
                                   tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, local_files_only=True),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def available_variants(names: list[str] | None) -> list[str]:
    """The variants whose method this version of dreamtune has."""
    from dreamtune.errors import ConfigError
    from dreamtune.methods import get_method

    chosen = []
    for variant in names or list(VARIANTS):
        try:
            get_method(variant.split("+")[0])
        except ConfigError:
            continue
        chosen.append(variant)
    return chosen


def make_config(variant: str, model_dir: Path, work: Path, out: Path, args, steps: int):
    from dreamtune.config import load_config

    identifier, extra = VARIANTS[variant]
    return load_config(
        None, method=variant.split("+")[0], pretrained_model_name_or_path=str(model_dir), output_dir=str(out),
        resolution=args.resolution, max_train_steps=steps, train_batch_size=args.batch, with_prior_preservation=True,
        num_class_images=4, class_generation_steps=1, validation_steps=0, checkpointing_steps=0,
        num_validation_images=1, validation_inference_steps=1, validation_prompts=["a photo of {identifier} dog"],
        concepts=[{"instance_data_dir": str(work / "subject"), "class_noun": "dog", "identifier": identifier,
                   "class_data_dir": str(work / "class")}], **extra)


def trainable_share(variant: str, model_dir: Path, work: Path, args) -> tuple[int, int]:
    """(trainable parameters, UNet parameters) as the method's prepare() sets them up."""
    from dreamtune.data.concepts import load_concept
    from dreamtune.methods import Components, get_method
    from dreamtune.pipeline import load_base

    config = make_config(variant, model_dir, work, work / "unused", args, 1)
    pipe = load_base(str(model_dir))
    method = get_method(config.method)(config)
    groups = method.prepare(Components.from_pipeline(pipe, str(model_dir)), [load_concept(config.concepts[0])])
    trained = sum(p.numel() for g in groups for p in g["params"])
    return trained, sum(p.numel() for p in pipe.unet.parameters())


def step_seconds(out: Path, warmup: int = 2) -> float:
    with open(out / "logs" / "metrics.csv") as f:
        times = [float(row["step_time"]) for row in csv.DictReader(f)]
    return statistics.median(times[warmup:])


def artifact_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def bench(name: str, pipe, args) -> dict:
    from dreamtune.training import train

    variants = available_variants(args.methods)
    results: dict[str, dict] = {v: {"times": []} for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        pipe.save_pretrained(model_dir, safe_serialization=True)
        write_subject_images("striped_star", work / "subject", resolution=args.resolution)
        for variant in variants:
            trained, unet_params = trainable_share(variant, model_dir, work, args)
            results[variant].update(trainable=trained, unet_params=unet_params)
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for variant in order:
                out = work / "runs" / variant
                start = time.perf_counter()
                result = train(make_config(variant, model_dir, work, out, args, args.steps + 2), overwrite=True,
                               progress=False)
                results[variant]["times"].append(step_seconds(out))
                results[variant]["run_seconds"] = time.perf_counter() - start
                results[variant]["artifact_bytes"] = artifact_bytes(result.artifact_dir)
    reference = statistics.median(results["dreambooth"]["times"]) if "dreambooth" in results else None
    print(f"\n{name}: UNet {next(iter(results.values()))['unet_params'] / 1e6:.2f}M parameters, {args.resolution} px, "
          f"batch {args.batch}+{args.batch} (instance+class), {args.steps} timed steps x {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"  {'method':<26}{'s/step':>9}{'steps/s':>9}{'vs DB':>8}{'trainable':>12}{'of UNet':>9}{'artifact':>11}")
    for variant, r in results.items():
        seconds = statistics.median(r["times"])
        r.update(seconds=seconds, steps_per_second=1 / seconds,
                 relative_to_dreambooth=seconds / reference if reference else None)
        ratio = f"{seconds / reference:.2f}x" if reference else "-"
        print(f"  {variant:<26}{seconds:>9.3f}{1 / seconds:>9.2f}{ratio:>8}{r['trainable']:>12,}"
              f"{100 * r['trainable'] / r['unet_params']:>8.2f}%{r['artifact_bytes'] / 1e6:>9.2f}MB")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,mid", help="comma list of tiny, mid, sd15 (default tiny,mid)")
    parser.add_argument("--methods", default=None, help=f"comma list of {', '.join(VARIANTS)} (default: all present)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (default 20)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per method, alternating order (default 2)")
    parser.add_argument("--batch", type=int, default=4, help="instance images per step (default 4, plus 4 class)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    args.methods = args.methods.split(",") if args.methods else None
    if args.threads:
        torch.set_num_threads(args.threads)
    from dreamtune.logs import quiet_libraries

    quiet_libraries()
    from dreamtune.tiny import tiny_pipeline

    builders = {"tiny": tiny_pipeline, "mid": mid_pipeline, "sd15": sd15_pipeline}
    report = {}
    with tempfile.TemporaryDirectory(prefix="dreamtune-bench-") as cache:
        os.environ.setdefault("DREAMTUNE_CACHE", cache)  # nothing lands in the user's cache
        for name in args.models.split(","):
            report[name] = bench(name, builders[name](), args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
