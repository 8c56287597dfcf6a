"""kill -9 at random moments (checkpoint and artifact writes included), then `--resume latest` until the
run finishes: the final weights are those of an uninterrupted run and nothing half-written is left."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

WEIGHTS = os.path.join("artifact", "unet", "diffusion_pytorch_model.safetensors")


def _command(model, subject, out):
    return [sys.executable, "-m", "dreamtune.cli", "train", "--pretrained-model-name-or-path", str(model),
            "--instance-data-dir", str(subject), "--class-noun", "dog", "--output-dir", str(out),
            "--resolution", "32", "--max-train-steps", "8", "--train-batch-size", "2", "--learning-rate", "1e-3",
            "--checkpointing-steps", "1", "--validation-steps", "4", "--seed", "3", "--no-progress",
            "--set", "num_validation_images=1", "--set", "validation_inference_steps=2"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(6))
def test_kill_anywhere_then_resume_gives_the_uninterrupted_weights(trial, tiny_model_dir, subject_dir, tmp_path):
    started = time.monotonic()
    subprocess.run(_command(tiny_model_dir, subject_dir, tmp_path / "full"), env=_env(), check=True,
                   capture_output=True)
    duration = time.monotonic() - started
    expected = load_file(tmp_path / "full" / WEIGHTS)

    rng = random.Random(trial)
    out = tmp_path / "cut"
    kills = 0
    while not (out / WEIGHTS).is_file():
        assert kills < 20, "the run never finished"
        # --overwrite with --resume: start over only when nothing can be resumed (killed before checkpoint-1).
        process = subprocess.Popen(_command(tiny_model_dir, subject_dir, out) + ["--resume", "latest", "--overwrite"],
                                   env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            process.wait(timeout=rng.uniform(0.2, 0.9) * duration)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            kills += 1
            continue
        assert process.returncode == 0, process.stderr.read().decode()
    actual = load_file(out / WEIGHTS)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    # A last start tidies what the final kill may have left, and changes nothing.
    subprocess.run(_command(tiny_model_dir, subject_dir, out) + ["--resume", "latest"], env=_env(), check=True,
                   capture_output=True)
    left = [str(p) for p in out.rglob("*") if ".partial." in p.name or p.name == ".dreamtune.lock"]
    assert left == [] and kills >= 1
