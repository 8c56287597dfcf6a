"""The run folder as a state machine: a finished run is never replaced, a resume is the run asked for,
one writer at a time, damaged checkpoints are named and skipped."""

from __future__ import annotations

import csv
import logging
import os

import pytest
import torch

from dreamtune.cli import main
from dreamtune.errors import DreamtuneError
from dreamtune.runfolder import (
    EMPTY,
    FINISHED,
    IN_PROGRESS,
    LOCK_FILE,
    check_resume_config,
    run_lock,
    run_state,
)
from dreamtune.training import train


def _unet(result):
    return {k: v.detach().clone() for k, v in result.pipeline.unet.state_dict().items()}


def test_states_and_a_finished_run_is_never_replaced(make_config, capsys):
    config = make_config()
    out = config.output_dir
    assert run_state(out) == EMPTY
    # A lock file left by a killed process is not held by anyone: the run takes it over, then removes it.
    os.makedirs(out)
    with open(os.path.join(out, LOCK_FILE), "w") as f:
        f.write("pid 999999 on elsewhere")
    assert run_state(out) == EMPTY
    train(config, progress=False)
    assert run_state(out) == FINISHED and not os.path.exists(os.path.join(out, LOCK_FILE))
    weights = (os.path.join(out, "artifact", "unet", "diffusion_pytorch_model.safetensors"))
    before = (os.stat(weights).st_mtime_ns, open(weights, "rb").read())
    other = make_config(learning_rate=5e-2, seed=9)
    result = train(other, resume="latest", progress=False)
    assert result.already_finished and result.pipeline is None
    assert (os.stat(weights).st_mtime_ns, open(weights, "rb").read()) == before
    code = main(["train", "--pretrained-model-name-or-path", config.pretrained_model_name_or_path,
                 "--output-dir", out, "--resume", "latest", "--no-progress"])
    assert code == 0 and "already finished" in capsys.readouterr().out
    # An explicit checkpoint would replace the artifact: only with --overwrite.
    with pytest.raises(DreamtuneError, match="finished run.*--overwrite"):
        train(config, resume=os.path.join(out, "checkpoints", "checkpoint-2"), progress=False)


def test_resume_without_a_checkpoint_refuses_unless_told_to_start_over(make_config, tmp_path):
    config = make_config(output_dir=str(tmp_path / "new"))
    with pytest.raises(DreamtuneError, match="is empty, there is no run to resume"):
        train(config, resume="latest", progress=False)
    # A run killed before its first checkpoint: config.toml and logs, nothing to resume from.
    (tmp_path / "new" / "logs").mkdir(parents=True)
    (tmp_path / "new" / "config.toml").write_text("seed = 0\n")
    assert run_state(tmp_path / "new") == IN_PROGRESS
    with pytest.raises(DreamtuneError, match="no checkpoint to resume from.*--overwrite"):
        train(config, resume="latest", progress=False)
    result = train(config, resume="latest", overwrite=True, progress=False)
    assert not result.already_finished and (tmp_path / "new" / "artifact").is_dir()


def test_resume_refuses_a_changed_config_and_applies_it_when_accepted(make_config, interrupted_run):
    common = dict(max_train_steps=4, checkpointing_steps=2, learning_rate=1e-3)
    config = interrupted_run(**common)
    changed = make_config(**{**common, "learning_rate": 5e-2, "seed": 99, "validation_steps": 1})
    with pytest.raises(DreamtuneError, match=r"seed 0 -> 99, learning_rate 0\.001 -> 0\.05\. .*--resume-with-changes"):
        train(changed, resume="latest", progress=False)
    # Options that leave the weights alone may change freely.
    free = make_config(**{**common, "logging_steps": 2, "validation_steps": 3, "checkpoints_total_limit": 1})
    assert check_resume_config(config.output_dir, free, step=2, accept_changes=False) == []

    changed = make_config(**{**common, "learning_rate": 5e-2})
    train(changed, resume="latest", resume_with_changes=True, progress=False)
    with open(os.path.join(config.output_dir, "logs", "metrics.csv"), newline="") as f:
        rates = [float(r["lr"]) for r in csv.DictReader(f)]
    assert rates == [1e-3, 1e-3, 5e-2, 5e-2]
    text = open(os.path.join(config.output_dir, "config.toml")).read()
    assert "# resumed at step 2 with changes (before -> after): learning_rate = 0.001 -> 0.05" in text
    assert "\nlearning_rate = 0.05\n" in text


def test_one_writer_per_run_folder(make_config, tmp_path):
    config = make_config()
    with run_lock(tmp_path / "run"):
        with pytest.raises(DreamtuneError, match="output_dir .* is in use by another dreamtune process \\(pid"):
            train(config, progress=False)
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_damaged_checkpoint_is_named_and_the_previous_one_used(make_config, interrupted_run, tmp_path, caplog):
    common = dict(max_train_steps=3, checkpointing_steps=1)
    full = train(make_config(output_dir=str(tmp_path / "full"), **common), progress=False)
    config = interrupted_run(at_step=2, **common)
    damaged = tmp_path / "run" / "checkpoints" / "checkpoint-2" / "optimizer.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(DreamtuneError, match="checkpoint-2: the checkpoint is damaged \\(optimizer.safetensors is 100 bytes"):
        train(config, resume=str(damaged.parent), progress=False)
    with caplog.at_level(logging.WARNING):
        resumed = train(config, resume="latest", progress=False)
    assert "checkpoint-2 is damaged" in caplog.text
    a, b = _unet(full), _unet(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_method_options_are_compared_by_name(make_config):
    from dreamtune.runfolder import config_changes

    lora = make_config(method="lora")
    assert config_changes(lora, make_config(method="lora", lora={"rank": 8})) == [("lora.rank", 4, 8)]
    assert [name for name, _, _ in config_changes(lora, make_config())][:1] == ["method"]
