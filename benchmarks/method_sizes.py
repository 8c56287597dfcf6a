"""Trainable parameters and artifact size of every method on a full-size SD1.5-shaped model.

    python benchmarks/method_sizes.py

The model is randomly initialised from SD1.5's shapes (UNet 860M, CLIP ViT-L/14-shaped text
encoder): sizes depend on shapes only, so no download is needed. Each method's own `prepare` marks
what trains and its own `save_artifact` writes the artifact, whose size on disk is reported; the
DreamBooth pipeline's size is computed from its tensors (float32) instead of writing 4 GB.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

#: (method, identifier, options) of each measured configuration, each method with its own defaults.
RUNS = (
    ("dreambooth", "sks", {}),
    ("dreambooth", "sks", {"train_text_encoder": True}),
    ("custom_diffusion", "<new1>", {}),
    ("custom_diffusion", "<new1>", {"compress_rank": 64}),
    ("textual_inversion", "<new1>", {}),
    ("lora", "sks", {}),
    ("lora", "sks", {"train_text_encoder": True}),
)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    from benchmarks.train_step import sd15_pipeline
    from dreamtune.config import ConceptConfig, load_config
    from dreamtune.data.concepts import Concept
    from dreamtune.logs import quiet_libraries
    from dreamtune.methods import Components, get_method

    quiet_libraries()
    rows = []
    for method, identifier, extra in RUNS:
        torch.manual_seed(0)
        pipe = sd15_pipeline()
        unet_total = sum(p.numel() for p in pipe.unet.parameters())
        config = load_config(None, method=method, pretrained_model_name_or_path="sd15-shaped", **extra)
        concept = Concept(ConceptConfig(instance_data_dir=".", identifier=identifier, class_noun="dog"))
        components = Components.from_pipeline(pipe, "sd15-shaped")
        m = get_method(method)(config)
        groups = m.prepare(components, [concept])
        trainable = sum(p.numel() for g in groups for p in g["params"])
        if method == "dreambooth":
            size = sum(p.numel() * 4 for mod in (pipe.unet, pipe.vae, pipe.text_encoder) for p in mod.parameters())
        else:
            with tempfile.TemporaryDirectory() as tmp:
                m.save_artifact(components, Path(tmp), {"method": method})
                size = folder_size(Path(tmp))
        label = method + "".join(f" {k}={v}" for k, v in extra.items())
        rows.append((label, trainable, trainable / unet_total, size))
        del pipe, components, m
    print(f"SD1.5-shaped model, UNet {unet_total / 1e6:.1f}M parameters")
    print(f"{'method':45s} {'trainable':>14s} {'of UNet':>9s} {'artifact':>11s}")
    for label, trainable, share, size in rows:
        print(f"{label:45s} {trainable:14,d} {share:9.2%} {size / 2**20:9.1f} MB")


if __name__ == "__main__":
    main()
