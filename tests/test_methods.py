"""The method registry: a method is one module and one registry line, and everything else asks it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dreamtune.cli import main
from dreamtune.config import load_config, opt
from dreamtune.errors import ConfigError
from dreamtune.methods import METHODS, Components, Method


class NormOnly(Method):
    """A toy method: trains the UNet's output normalisation alone, scaled by its own option."""

    name = "norm_only"
    defaults = {**Method.defaults, "learning_rate": 1e-2, "max_train_steps": 2}
    commands = (__name__,)

    @dataclass
    class Options:
        """[norm_only]"""

        start_scale: float = opt(1.0, "Multiply the normalisation's weight by this before training.", min=0.0)

    def prepare(self, components: Components, concepts: list) -> list[dict]:
        for module in (components.vae, components.unet, components.text_encoder):
            module.requires_grad_(False)
        norm = components.unet.conv_norm_out
        with torch.no_grad():
            norm.weight.mul_(self.options.start_scale)
        norm.requires_grad_(True)
        self.tokens = [c.config.identifier for c in concepts]
        return self.param_groups(norm.parameters())

    def save_artifact(self, components: Components, folder: Path, meta: dict) -> None:
        from dreamtune.io import save_safetensors

        save_safetensors({k: v.detach().float() for k, v in components.unet.conv_norm_out.state_dict().items()},
                         Path(folder) / "norm.safetensors")

    @classmethod
    def apply_artifact(cls, pipe, folder: Path) -> None:
        from safetensors.torch import load_file

        pipe.unet.conv_norm_out.load_state_dict(load_file(Path(folder) / "norm.safetensors"))


def register(subparsers) -> None:
    """The toy method's own subcommand, added to the CLI by the registry."""
    p = subparsers.add_parser("norm-hello")
    p.set_defaults(func=lambda args: print("hello from norm_only") or 0)


@pytest.fixture
def norm_only(monkeypatch):
    # One registry line, undone after the test.
    monkeypatch.setitem(METHODS, NormOnly.name, NormOnly)
    return NormOnly


def test_a_registered_method_trains_through_the_cli(norm_only, tiny_model_dir, subject_dir, tmp_path, capsys):
    from dreamtune.pipeline import load_base, load_pipeline

    run = tmp_path / "run"
    code = main(["train", "--method", "norm_only", "--pretrained-model-name-or-path", str(tiny_model_dir),
                 "--instance-data-dir", str(subject_dir), "--class-noun", "dog", "--output-dir", str(run),
                 "--resolution", "32", "--validation-steps", "0", "--checkpointing-steps", "0", "--no-progress",
                 "--set", "norm_only.start_scale=0.5", "--set", "validation_inference_steps=2",
                 "--set", "num_validation_images=1"])
    assert code == 0, capsys.readouterr().err
    # Its defaults and its own table resolve like a built-in method's, and are written to the run folder.
    config = load_config(run / "config.toml")
    assert config.learning_rate == 1e-2 and config.max_train_steps == 2
    assert config.method_options == NormOnly.Options(start_scale=0.5)
    assert "[norm_only]" in (run / "config.toml").read_text()
    # Only the normalisation changed; its artifact loads back through the registry.
    base = load_base(str(tiny_model_dir))
    trained = load_pipeline(None, run)
    changed = {n for n, p in trained.unet.state_dict().items() if not torch.equal(p, base.unet.state_dict()[n])}
    assert changed == {"conv_norm_out.weight", "conv_norm_out.bias"}
    # Its extra command is on the CLI.
    assert main(["norm-hello"]) == 0 and "hello from norm_only" in capsys.readouterr().out


def test_method_tables_and_flat_keys(norm_only, tmp_path):
    path = tmp_path / "c.toml"
    # Old flat keys still land in the method's options; the table wins over a flat key.
    path.write_text("method = 'lora'\nlora_rank = 8\nlora_alpha = 2.0\n[lora]\nalpha = 4.0\n")
    config = load_config(path)
    assert (config.method_options.rank, config.method_options.alpha) == (8, 4.0)
    # Another method's table in the same file is checked but not used.
    path.write_text("method = 'dreambooth'\n[lora]\nrank = 8\n[norm_only]\nstart_scale = 2.0\n")
    assert load_config(path).method_options is None
    path.write_text("method = 'lora'\n[lora]\nrnak = 8\n")
    with pytest.raises(ConfigError, match=r"\[lora\].*unknown lora option 'rnak'.*'rank'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"\[norm_only\].*start_scale.*>= 0"):
        load_config(None, method="norm_only", overrides=["norm_only.start_scale=-1"])
    with pytest.raises(ConfigError, match="unknown method 'nope'.*norm_only"):
        load_config(None, method="nope")
