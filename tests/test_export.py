"""Exports load in diffusers' own loaders and give the same images."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors import safe_open

from dreamtune.cli import main
from dreamtune.pipeline import load_pipeline, sample
from dreamtune.single_file import load_single_file
from dreamtune.training import train


def test_dreambooth_single_file_export_loads_with_from_single_file(make_config, tmp_path, capsys):
    result = train(make_config(), progress=False)
    out = tmp_path / "model.safetensors"
    assert main(["export", str(result.output_dir), "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["method"] == "dreambooth" and "sks" in meta["tokens"]
    assert main(["export", str(result.output_dir), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    # The tiny model's sizes are not standard SD, so diffusers needs its config folder.
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(result.artifact_dir), safety_checker=None)
    ours = load_pipeline(None, result.output_dir)
    a = sample(ours, "a photo of sks dog", num_images=1, steps=3)
    b = sample(loaded, "a photo of sks dog", num_images=1, steps=3)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    again = load_single_file(out, config=str(result.artifact_dir))
    c = sample(again, "a photo of sks dog", num_images=1, steps=3)
    assert np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


def test_export_refuses_other_suffix(make_config, tmp_path, capsys):
    result = train(make_config(max_train_steps=1), progress=False)
    assert main(["export", str(result.output_dir), "--out", str(tmp_path / "model.ckpt")]) == 2
    assert ".safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["run"])
def test_sample_cli_writes_images_and_grid(make_config, tmp_path, what):
    result = train(make_config(max_train_steps=1), progress=False)
    out = tmp_path / "samples"
    assert main(["sample", "--weights", str(result.output_dir), "--prompt", "a photo of sks dog",
                 "--prompt", "a dog", "-n", "2", "--steps", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["grid.png", "prompt00-00.png", "prompt00-01.png",
                                                     "prompt01-00.png", "prompt01-01.png"]
