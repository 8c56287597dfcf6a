"""Bad input gives one clear message that names the file or option; images load safely."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dreamtune.cli import main
from dreamtune.config import load_config
from dreamtune.data.images import load_image, load_images
from dreamtune.errors import ConfigError, ImageError, ModelLoadError


def test_config_rejects_unknown_wrong_type_and_range(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("learning_rat = 1e-5\n")
    with pytest.raises(ConfigError, match="unknown option 'learning_rat'.*learning_rate"):
        load_config(path)
    path.write_text("max_train_steps = 'many'\n")
    with pytest.raises(ConfigError, match="max_train_steps.*expects int"):
        load_config(path)
    path.write_text("prior_loss_weight = -1\n")
    with pytest.raises(ConfigError, match="prior_loss_weight.*>= 0"):
        load_config(path)
    path.write_text("mixed_precision = 'fp8'\n")
    with pytest.raises(ConfigError, match="mixed_precision.*one of no, fp16, bf16"):
        load_config(path)
    path.write_text("[[concepts]]\nclass_nown = 'dog'\n")
    with pytest.raises(ConfigError, match="concepts\\[0\\].*class_nown"):
        load_config(path)
    path.write_text("not toml ===\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_overrides_and_method_defaults(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("method = 'custom_diffusion'\nlearning_rate = 2e-5\n[[concepts]]\nclass_noun = 'cat'\n")
    config = load_config(path, overrides=["max_train_steps=7", "concepts.0.identifier=<new1>", "random_flip=true"])
    assert config.max_train_steps == 7 and config.learning_rate == 2e-5 and config.random_flip is True
    assert config.scale_lr is True  # the method's default, not set by the user
    assert config.concepts[0].identifier == "<new1>" and config.concepts[0].class_noun == "cat"
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, overrides=["max_train_steps"])


@pytest.mark.parametrize("method", ["dreambooth", "custom_diffusion", "textual_inversion", "lora"])
def test_python_and_loaded_configs_resolve_alike(method, tmp_path):
    from dreamtune.config import TrainConfig, config_to_toml
    from dreamtune.methods import get_method
    from dreamtune.training import learning_rates

    built, loaded = TrainConfig(method=method), load_config(None, method=method)
    assert built == loaded
    defaults = get_method(method).defaults
    assert built.learning_rate == defaults["learning_rate"] and built.max_train_steps == defaults["max_train_steps"]
    # The written config reads back as the same config; an explicit value beats the method's default.
    path = tmp_path / "config.toml"
    path.write_text(config_to_toml(built))
    assert load_config(path) == built
    assert TrainConfig(method=method, learning_rate=3e-3).learning_rate == 3e-3
    assert learning_rates(built, 2) == (
        (built.learning_rate * built.train_batch_size * 2,) * 2 if built.scale_lr else (built.learning_rate,) * 2)


def _write(path, image: Image.Image):
    image.save(path)
    return path


def test_images_in_any_mode_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert load_image(_write(tmp_path / "a.png", rgba)).getpixel((0, 0)) == (255, 255, 255)
    gray16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert load_image(_write(tmp_path / "b.png", gray16)).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    assert load_image(_write(tmp_path / "c.jpg", cmyk)).getpixel((0, 0))[0] > 200
    assert load_image(_write(tmp_path / "d.png", Image.new("P", (8, 8)))).mode == "RGB"


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (20, 10), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (10, 20)


def test_bad_files_name_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png.*empty"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(ImageError, match="text.jpg.*not a readable image"):
        load_image(tmp_path / "text.jpg")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    kept = load_images([tmp_path / "cut.png", tmp_path / "full.png"], skip_bad_images=True)
    assert [p.name for p, _ in kept] == ["full.png"]


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    import dreamtune.data.images as images

    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 5000)
    with pytest.raises(ImageError, match="big.png.*pixel limit"):
        load_image(tmp_path / "big.png")


def test_base_model_errors(tmp_path):
    from dreamtune.pipeline import load_base

    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_base(str(tmp_path / "nope"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        load_base(str(tmp_path / "folder"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="not a model checkpoint"):
        load_base(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_base("nobody/no-such-model")


def _cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_cli_errors_are_one_line(capsys, tmp_path, tiny_model_dir, subject_dir):
    code, err = _cli(capsys, "train", "--pretrained-model-name-or-path", str(tiny_model_dir),
                     "--instance-data-dir", str(tmp_path / "none"), "--class-noun", "dog",
                     "--output-dir", str(tmp_path / "run"), "--resolution", "32")
    assert code == 2 and "does not exist" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    (tmp_path / "emptydir").mkdir()
    code, err = _cli(capsys, "train", "--pretrained-model-name-or-path", str(tiny_model_dir),
                     "--instance-data-dir", str(tmp_path / "emptydir"), "--class-noun", "dog",
                     "--output-dir", str(tmp_path / "run"))
    assert code == 2 and "no images" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thing.txt").write_text("mine")
    code, err = _cli(capsys, "train", "--pretrained-model-name-or-path", str(tiny_model_dir),
                     "--instance-data-dir", str(subject_dir), "--class-noun", "dog", "--output-dir", str(tmp_path / "busy"))
    assert code == 2 and "not empty" in err and "--resume latest" in err
    code, err = _cli(capsys, "train", "--set", "resolution=big")
    assert code == 2 and "resolution" in err
    code, err = _cli(capsys, "sample", "--weights", str(tmp_path / "nothing"), "--prompt", "x", "--out", str(tmp_path / "o"))
    assert code == 2 and "no such run" in err


def test_tokens_lists_single_rare_tokens_and_warns_on_common(capsys, tiny_model_dir):
    from dreamtune.pipeline import load_base
    from dreamtune.tokens import check_identifier, rare_tokens

    tokenizer = load_base(str(tiny_model_dir)).tokenizer
    found = rare_tokens(tokenizer, 10)
    assert len(found) == 10
    for word, idx in found:
        assert tokenizer(word, add_special_tokens=False).input_ids == [idx]
    assert check_identifier(tokenizer, "dog") and "common" in check_identifier(tokenizer, "dog")[0]
    assert check_identifier(tokenizer, found[0][0]) == []
    assert main(["tokens", "--base", str(tiny_model_dir), "-n", "5"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 6
