"""DreamBooth through the one loop: what trains, what stays, resume, reload, prior images, failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreamtune.errors import DreamtuneError, TrainingDiverged
from dreamtune.pipeline import load_base, load_pipeline, sample
from dreamtune.training import train


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_dreambooth_trains_unet_and_keeps_vae_and_text_encoder(make_config, tiny_model_dir):
    base = load_base(str(tiny_model_dir))
    result = train(make_config(), progress=False)
    pipe = result.pipeline
    for name in ("vae", "text_encoder"):
        before, after = _state(getattr(base, name)), _state(getattr(pipe, name))
        assert all(torch.equal(before[k], after[k]) for k in before), f"{name} changed"
    unet_before, unet_after = _state(base.unet), _state(pipe.unet)
    changed = [k for k in unet_before if not torch.equal(unet_before[k], unet_after[k])]
    assert len(changed) > 0.9 * len(unet_before)
    saved = load_file(result.artifact_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[k], unet_after[k]) for k in saved)


def test_train_text_encoder_changes_it(make_config, tiny_model_dir):
    base = load_base(str(tiny_model_dir))
    result = train(make_config(train_text_encoder=True), progress=False)
    before, after = _state(base.text_encoder), _state(result.pipeline.text_encoder)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_artifact_reproduces_the_training_time_image(make_config):
    config = make_config(validation_steps=4, validation_prompts=["a photo of {identifier} {class_noun}", "a photo of a dog on the beach"])
    result = train(config, progress=False)
    grid = np.asarray(Image.open(result.output_dir / "samples" / f"step-{config.max_train_steps:06d}.png"))
    from dreamtune.grid import image_grid

    pipe = load_pipeline(None, result.output_dir)
    prompts = [config.concepts[0].format(p) for p in config.validation_prompts]
    images = sample(pipe, prompts, num_images=config.num_validation_images, seed=config.seed,
                    steps=config.validation_inference_steps, guidance=config.validation_guidance_scale,
                    height=32, width=32)
    again = np.asarray(image_grid(images, prompts, config.num_validation_images, title=f"step {config.max_train_steps}"))
    assert np.array_equal(grid, again)


def test_resume_equals_uninterrupted(make_config, tmp_path, resume_after_kill):
    common = dict(max_train_steps=4, checkpointing_steps=2, lr_scheduler="linear", lr_warmup_steps=1,
                  with_prior_preservation=True, random_flip=True, center_crop=False, train_text_encoder=True)
    full = train(make_config(output_dir=str(tmp_path / "full"), **common), progress=False)
    config = make_config(output_dir=str(tmp_path / "cut"), **common)

    def refuses_to_start_over():
        with pytest.raises(DreamtuneError, match="not empty"):
            train(config, progress=False)

    resumed = resume_after_kill(config, before_resume=refuses_to_start_over)
    for name in ("unet", "text_encoder"):
        a, b = _state(getattr(full.pipeline, name)), _state(getattr(resumed.pipeline, name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert resumed.losses == full.losses[2:]


def test_v_prediction_model_trains(make_config, tiny_vpred_model_dir):
    result = train(make_config(pretrained_model_name_or_path=str(tiny_vpred_model_dir)), progress=False)
    assert all(np.isfinite(result.losses))
    assert result.pipeline.scheduler.config.prediction_type == "v_prediction"


def test_class_images_are_generated_once_and_resume(make_config, tmp_path, monkeypatch):
    from dreamtune.data import priors

    class_dir = tmp_path / "class"
    config = make_config(with_prior_preservation=True, num_class_images=5, sample_batch_size=2,
                         max_train_steps=1, concepts=[{"instance_data_dir": make_config().concepts[0].instance_data_dir,
                                                       "class_noun": "dog", "class_data_dir": str(class_dir)}])
    train(config, progress=False)
    files = sorted(class_dir.glob("*.png"))
    assert [f.name for f in files] == [f"{i:05d}.png" for i in range(5)]
    first = {f.name: f.read_bytes() for f in files}
    # An interrupted generation: two images missing. Only those are made again, identical to before.
    (class_dir / "00001.png").unlink()
    (class_dir / "00004.png").unlink()
    calls = []
    real = priors.generate_class_images

    def spy(pipe, prompt, folder, count, **kw):
        calls.append(len([i for i in range(count) if not (folder / f"{i:05d}.png").exists()]))
        return real(pipe, prompt, folder, count, **kw)

    monkeypatch.setattr("dreamtune.training.generate_class_images", spy)
    train(config, overwrite=True, progress=False)
    assert calls == [2]
    assert {f.name: f.read_bytes() for f in sorted(class_dir.glob("*.png"))} == first


def test_prior_preservation_loss_is_weighted(make_config, tmp_path):
    a = train(make_config(output_dir=str(tmp_path / "a"), with_prior_preservation=True, prior_loss_weight=0.0,
                          max_train_steps=1), progress=False)
    b = train(make_config(output_dir=str(tmp_path / "b"), with_prior_preservation=True, prior_loss_weight=1.0,
                          max_train_steps=1), progress=False)
    import csv

    rows_a = list(csv.DictReader(open(a.output_dir / "logs" / "metrics.csv")))
    rows_b = list(csv.DictReader(open(b.output_dir / "logs" / "metrics.csv")))
    assert float(rows_a[0]["loss"]) == pytest.approx(float(rows_a[0]["instance_loss"]), rel=1e-5)
    assert float(rows_b[0]["loss"]) == pytest.approx(float(rows_b[0]["instance_loss"]) + float(rows_b[0]["prior_loss"]), rel=1e-5)


def test_nan_loss_stops_with_message_and_keeps_checkpoint(make_config, monkeypatch):
    import dreamtune.training as training

    real = training.diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] > 2 else out

    monkeypatch.setattr(training, "diffusion_loss", poisoned)
    config = make_config(max_train_steps=4, checkpointing_steps=2)
    with pytest.raises(TrainingDiverged, match="checkpoint-2"):
        train(config, progress=False)
    assert (config_dir := __import__("pathlib").Path(config.output_dir) / "checkpoints" / "checkpoint-2").is_dir()
    assert (config_dir / "trainable.safetensors").is_file()


def test_run_folder_contents(make_config):
    config = make_config(checkpointing_steps=2, checkpoints_total_limit=1, max_train_steps=6, validation_steps=3)
    result = train(config, progress=False)
    out = result.output_dir
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000003.png", "step-000006.png"]
    assert (out / "logs" / "loss.png").is_file()
    assert len((out / "logs" / "metrics.csv").read_text().splitlines()) == 7
    from dreamtune.config import load_config

    again = load_config(out / "config.toml")
    assert again == config
    from dreamtune.artifacts import read_artifact

    info = read_artifact(out)
    assert (info.method, info.base_model, info.tokens) == ("dreambooth", config.pretrained_model_name_or_path, ["sks"])
    assert info.version


def _signal_after_step(monkeypatch, step: int, *signals):
    """Send `signals` to this process once step `step` is logged, as Ctrl-C or the UI's Stop would."""
    import os

    import dreamtune.training as training

    real_log_step = training.log_step

    def log_then_signal(run, global_step, *args, **kwargs):
        real_log_step(run, global_step, *args, **kwargs)
        if global_step == step:
            for sig in signals:
                os.kill(os.getpid(), sig)

    monkeypatch.setattr(training, "log_step", log_then_signal)
    return real_log_step


def test_stop_writes_a_checkpoint_and_resume_ends_as_an_uninterrupted_run(make_config, tmp_path, monkeypatch):
    """Ctrl-C during training: the step ends (its grid too), a checkpoint is written, resume finishes the same."""
    import signal

    from dreamtune.errors import TrainingStopped

    options = dict(max_train_steps=6, checkpointing_steps=0, validation_steps=2)
    config = make_config(output_dir=str(tmp_path / "stopped"), **options)
    real_log_step = _signal_after_step(monkeypatch, 2, signal.SIGINT)
    with pytest.raises(TrainingStopped, match="--resume latest") as stopped:
        train(config, progress=False)
    assert "stopped at step 2 of 6" in str(stopped.value)
    assert [p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.setattr("dreamtune.training.log_step", real_log_step)

    train(config, resume="latest", progress=False)
    train(make_config(output_dir=str(tmp_path / "straight"), **options), progress=False)
    runs = [tmp_path / run for run in ("stopped", "straight")]
    weights = [load_file(run / "artifact" / "unet" / "diffusion_pytorch_model.safetensors") for run in runs]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    grids = [sorted(p.name for p in (run / "samples").glob("step-*.png")) for run in runs]
    assert grids[0] == grids[1] and "step-000002.png" in grids[0]


def test_a_second_signal_stops_at_once_without_a_checkpoint(make_config, tmp_path, monkeypatch):
    import signal

    from dreamtune.errors import TrainingStopped

    config = make_config(output_dir=str(tmp_path / "run"), max_train_steps=4, checkpointing_steps=0)
    _signal_after_step(monkeypatch, 1, signal.SIGTERM, signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as stopped:
        train(config, progress=False)
    assert not isinstance(stopped.value, TrainingStopped)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
