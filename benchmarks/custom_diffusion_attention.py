"""Sampling speed of a loaded Custom Diffusion model: diffusers' processors against dreamtune's swap.

    python -m benchmarks.custom_diffusion_attention                 # the shipped shapes-world model, CPU
    python -m benchmarks.custom_diffusion_attention --rounds 5 --images 64

diffusers' `load_attn_procs` puts `CustomDiffusionAttnProcessor` (attention written out as matrix
products) on every attention layer; `dreamtune.load_pipeline` then swaps in the
`scaled_dot_product_attention` twins holding the same weights (`use_fused_attention`). A short Custom
Diffusion run on a shipped subject gives the artifact; both pipelines sample the same prompts and seeds
in alternating rounds (the machines are noisy) and the median of each is reported, with their ratio
and the largest pixel difference between the two pipelines' images.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    from dreamtune.pipeline import load_pipeline, sample
    from dreamtune.training import train
    from dreamtune.world import MODEL_DIR
    from dreamtune.world.demo import DEFAULT_GUIDANCE, SAMPLING_STEPS, train_config
    from dreamtune.world.subjects import get_subject, write_subject_images

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(MODEL_DIR), help="Shapes-world pipeline folder.")
    parser.add_argument("--images", type=int, default=32, help="Images per round.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    subject = get_subject("striped_star")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_subject_images(subject, tmp / "subject")
        config = train_config(subject, "custom_diffusion", tmp / "subject", tmp / "class", tmp / "run", steps=20,
                              seed=0, with_prior_preservation=False, base_model=Path(args.model))
        run = train(config, progress=False)
        fused = load_pipeline(args.model, run.output_dir)
        with mock.patch("dreamtune.methods.custom_diffusion.use_fused_attention", lambda unet: None):
            plain = load_pipeline(args.model, run.output_dir)
        prompt = ["a photo of a <new1> star on a green background"]
        times: dict[str, list[float]] = {"diffusers": [], "swapped": []}
        images = {}
        for round_ in range(args.rounds):
            order = (("diffusers", plain), ("swapped", fused))
            for name, pipe in order if round_ % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                images[name] = sample(pipe, prompt, num_images=args.images, steps=SAMPLING_STEPS,
                                      guidance=DEFAULT_GUIDANCE, batch_size=args.images, height=32, width=32)
                times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    diff = max(int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())
               for a, b in zip(images["diffusers"], images["swapped"]))
    print(f"{args.images} images, {SAMPLING_STEPS} steps, {args.rounds} rounds, {torch.get_num_threads()} threads")
    for name, value in median.items():
        print(f"  {name:<10} {value:6.2f} s  ({args.images / value:.1f} images/s)")
    print(f"  speed-up   {median['diffusers'] / median['swapped']:.2f}x; largest pixel difference {diff}/255")


if __name__ == "__main__":
    main()
