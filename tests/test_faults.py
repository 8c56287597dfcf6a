"""Fault injection: a full disk, a read-only folder, leftovers of a killed process, a killed sample,
checks made before any model loads. Each fault ends in one line, and nothing half-written stays."""

from __future__ import annotations

import errno
import logging
import os
import stat

import pytest

import dreamtune.training as training
from dreamtune.checkpoints import checkpoint_problem
from dreamtune.errors import ConfigError, DreamtuneError
from dreamtune.io import EnvironmentFault, environment_fault, write_text
from dreamtune.render import sample_to_folder
from dreamtune.training import train


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if anything loads a model: the check under test must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the check")

    monkeypatch.setattr(training, "load_base", refuse)
    return refuse


def test_options_are_checked_before_the_model_loads(make_config, no_model_loads, monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match=r"^resolution = 33: this model needs a multiple of 8 pixels; use 32 or 40\.$"):
        train(make_config(resolution=33), progress=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="output_dir .*afile' is a file, not a folder"):
        train(make_config(output_dir=str(tmp_path / "afile")), progress=False)
    with pytest.raises(ConfigError, match="output_dir: '.*run-\\\\xff' is not valid UTF-8"):
        train(make_config(output_dir=str(tmp_path / "run-\udcff")), progress=False)
    import dreamtune.preflight as preflight

    monkeypatch.setattr(preflight, "_read_only", lambda path: True)
    with pytest.raises(ConfigError, match="output_dir .* is on a read-only file system"):
        train(make_config(), progress=False)


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(make_config, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def fill_the_disk(tensors, filename, metadata=None):
        if "checkpoint-4" in filename and "optimizer" in filename:
            with open(filename, "wb") as f:
                f.write(b"\0" * 100)
            # What safetensors raises when the write fails: its own error with the OS error in its text.
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fill_the_disk)
    config = make_config(max_train_steps=6, checkpointing_steps=2)
    with pytest.raises(EnvironmentFault, match=r"checkpoints/checkpoint-4: no space left on the device\. .*nothing half-written"):
        train(config, progress=False)
    checkpoints = os.path.join(config.output_dir, "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["checkpoint-2"]
    assert checkpoint_problem(os.path.join(checkpoints, "checkpoint-2")) is None


def test_environment_faults_name_the_path():
    assert "read-only" in str(environment_fault(OSError(errno.EROFS, "Read-only file system", "/x/y")))
    assert str(environment_fault(PermissionError(errno.EACCES, "denied", "/x/y"))).startswith("/x/y: permission denied")
    assert environment_fault(FileNotFoundError(errno.ENOENT, "no")) is None


def test_leftovers_of_a_killed_run_are_removed_at_the_next_start(interrupted_run, tmp_path):
    config = interrupted_run(max_train_steps=4, checkpointing_steps=2)
    out = tmp_path / "run"
    leftovers = [out / ".artifact.partial.abcd1234", out / "checkpoints" / ".checkpoint-4.partial.x1y2z3w4",
                 out / "logs" / ".loss.partial.abcdefgh.png", out / ".config.partial.qwertyui.toml"]
    for path in leftovers:
        path.mkdir() if "artifact" in path.name or "checkpoint" in path.name else path.write_bytes(b"half")
    train(config, resume="latest", progress=False)
    assert not any(p.exists() for p in leftovers)
    # An artifact moved aside by a replacement that was killed before the new one moved in is put back.
    os.replace(out / "artifact", out / ".artifact.partial.replaced")
    result = train(config, resume="latest", progress=False)
    assert result.already_finished and (out / "artifact" / "dreamtune.json").is_file()


def test_files_have_one_mode_and_validation_steps_zero_renders_nothing(make_config):
    result = train(make_config(max_train_steps=2, checkpointing_steps=1, validation_steps=0), progress=False)
    assert not (result.output_dir / "samples").exists()
    expected = 0o666 & ~_umask()
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in result.output_dir.rglob("*") if p.is_file()}
    assert {oct(m) for m in modes.values()} == {oct(expected)}, {str(p): oct(m) for p, m in modes.items() if m != expected}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _Pipe:
    """Counts what it is asked to render; each image's colour comes from its seed alone."""

    def __init__(self):
        self.calls = []
        self.device = "cpu"

    def __call__(self, prompts, generator, **kwargs):
        from PIL import Image

        self.calls.append(len(prompts))
        images = [Image.new("RGB", (8, 8), tuple(int(g.initial_seed()) * 40 % 255 for _ in range(3))) for g in generator]
        return type("Out", (), {"images": images})()


def _request(**changes):
    request = {"prompts": ["a", "b"], "n": 3, "seed": 0, "steps": 2, "guidance": 1.0, "negative_prompt": None,
               "height": None, "width": None, "base": "m", "weights": [], "dtype": "fp32"}
    return {**request, **changes}


def test_a_killed_sample_finishes_only_what_is_missing(tmp_path):
    out = tmp_path / "out"
    pipe = _Pipe()
    paths, rendered = sample_to_folder(_request(), out, lambda: pipe, batch_size=2, progress=False)
    assert rendered == 6 and pipe.calls == [2, 2, 2]
    first = {p.name: p.read_bytes() for p in paths}
    # Killed while writing the last batch: one image missing, one half-written temporary.
    paths[-1].unlink()
    (out / ".prompt01-02.partial.abcd1234.png").write_bytes(b"half")
    again = _Pipe()
    paths, rendered = sample_to_folder(_request(), out, lambda: again, batch_size=2, progress=False)
    assert rendered == 1 and again.calls == [2]
    assert {p.name: p.read_bytes() for p in paths} == first
    assert sorted(os.listdir(out)) == sorted([*first, "grid.png", ".dreamtune-sample.json"])
    with pytest.raises(DreamtuneError, match="holds the images of another request \\(different seed\\)"):
        sample_to_folder(_request(seed=1), out, lambda: again, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(DreamtuneError, match="is not empty"):
        sample_to_folder(_request(), tmp_path / "mine", lambda: again, progress=False)
    _, rendered = sample_to_folder(_request(seed=1), out, lambda: _Pipe(), overwrite=True, progress=False)
    assert rendered == 6


def test_user_class_folder_holds_only_images(make_config, tmp_path):
    class_dir = tmp_path / "class"
    config = make_config(with_prior_preservation=True, max_train_steps=1, num_class_images=2,
                         concepts=[{"instance_data_dir": make_config().concepts[0].instance_data_dir,
                                    "class_noun": "dog", "class_data_dir": str(class_dir)}])
    train(config, progress=False)
    assert sorted(os.listdir(class_dir)) == ["00000.png", "00001.png"]


def test_atomic_write_fault_leaves_nothing(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(EnvironmentFault, match="notes.txt: no space left"):
        write_text(tmp_path / "notes.txt", "hello")
    assert os.listdir(tmp_path) == []


def test_short_disk_is_a_warning(tmp_path, caplog):
    from dreamtune.preflight import warn_if_disk_is_short

    with caplog.at_level(logging.WARNING):
        assert warn_if_disk_is_short(tmp_path / "run", 10**18)
    assert "GB free, but a checkpoint needs about 1000000000.00 GB" in caplog.text
    assert not warn_if_disk_is_short(tmp_path / "run", 1)


def test_a_second_class_image_generator_waits_for_the_first(tmp_path, caplog):
    from dreamtune.runfolder import FolderLock
    from dreamtune.runfolder import logger as lock_logger

    first = FolderLock(tmp_path / "class.lock", "class images folder 'x'").acquire()

    class ReleaseWhenWaiting(logging.Handler):
        def emit(self, record):
            if "waiting for it to finish" in record.getMessage():
                first.release()

    handler = ReleaseWhenWaiting()
    lock_logger.addHandler(handler)
    try:
        second = FolderLock(tmp_path / "class.lock", "class images folder 'x'").acquire(wait=True)
    finally:
        lock_logger.removeHandler(handler)
    assert second._fd is not None and (tmp_path / "class.lock").is_file()
    second.release()
    assert not (tmp_path / "class.lock").exists()
