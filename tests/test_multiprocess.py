"""Two CPU processes (gloo) train like one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("_ddp_script.py")


def _run(args, env_extra, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", **env_extra}
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("mode", ["square", "bucketed"])
def test_two_processes_match_one(tiny_model_dir, subject_dir, varied_subject_dir, tmp_path, mode):
    subject_dir = varied_subject_dir if mode == "bucketed" else subject_dir
    two = tmp_path / "two"
    one = tmp_path / "one"
    two.mkdir()
    one.mkdir()
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
          str(tiny_model_dir), str(subject_dir), str(two / "run"), "1", mode], {}, tmp_path)
    _run([sys.executable, str(SCRIPT), str(tiny_model_dir), str(subject_dir), str(one / "run"), "2", mode], {}, tmp_path)
    rank0, rank1 = load_file(two / "rank0.safetensors"), load_file(two / "rank1.safetensors")
    single = load_file(one / "rank0.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    # Same examples, noise and timesteps; only the order of floating-point sums differs (a large Adam
    # epsilon keeps Adam's normalisation from stretching that where a gradient is near zero).
    base = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    moved = max((single[k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-3
    for k in rank0:
        torch.testing.assert_close(rank0[k], single[k], rtol=0, atol=1e-6)
    # Class images were shared out between the two processes: all three exist once.
    assert (two / "run" / "artifact" / "dreamtune.json").is_file()
