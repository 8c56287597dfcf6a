"""Checks made before any model is loaded or any step is trained, so a mistake costs seconds, not a run.

Each failure is one ConfigError line naming the option and the fix: a resolution the model cannot
render, a count below one, an output path that cannot be written, a path that is not valid UTF-8.
Too little free disk for a checkpoint is a warning (the estimate is rough; the run may still fit).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

from .errors import ConfigError

logger = logging.getLogger(__name__)

# The pipelines of SD 1.x/2.x refuse sizes that are not a multiple of 8, whatever the model.
PIPELINE_MULTIPLE = 8


def check_text(value: str, what: str) -> None:
    """Refuse a path or prompt that is not valid UTF-8 (it could not be written into config.toml or logs)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise ConfigError(f"{what}: '{shown}' is not valid UTF-8; rename it (or the folder above it) to a UTF-8 name.") from None


def check_writable_folder(path: str | os.PathLike, what: str) -> None:
    """Refuse a folder that is a file, or whose nearest existing parent cannot be written."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} '{path}' is a file, not a folder. Choose a folder path.")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} '{path}': '{existing}' is a file, so the folder cannot be made there.")
    if _read_only(existing):
        raise ConfigError(f"{what} '{path}': '{existing}' is on a read-only file system. Choose a writable folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} '{path}': no permission to write in '{existing}'. Fix its permissions or choose another folder.")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):  # pragma: no cover - Windows has no statvfs
        return False


def resolution_multiple(vae_config: dict, unet_config: dict) -> int:
    """The pixel multiple a model renders without padding: VAE downsampling x UNet downsampling, and 8."""
    vae_factor = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
    unet_factor = 2 ** (len(unet_config.get("down_block_types", [0] * 4)) - 1)
    return math.lcm(PIPELINE_MULTIPLE, vae_factor * unet_factor)


def _folder_model_multiple(base: str) -> int | None:
    folder = Path(base).expanduser()
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return resolution_multiple(vae, unet)


def check_resolution(resolution: int, multiple: int, what: str = "resolution") -> None:
    """Refuse a size that is not a positive multiple of `multiple`, suggesting the nearest ones."""
    if resolution >= multiple and resolution % multiple == 0:
        return
    low = max(multiple, resolution // multiple * multiple)
    given = f"{what} {resolution}" if what.startswith("-") else f"{what} = {resolution}"
    raise ConfigError(f"{given}: this model needs a multiple of {multiple} pixels; use {low} or {low + multiple}.")


def check_train_config(config) -> None:
    """Everything about a TrainConfig that can be checked before the base model is loaded."""
    check_text(config.output_dir, "output_dir")
    check_text(config.pretrained_model_name_or_path, "pretrained_model_name_or_path")
    for i, concept in enumerate(config.concepts):
        check_text(concept.instance_data_dir, f"concepts[{i}].instance_data_dir")
        check_text(concept.class_data_dir, f"concepts[{i}].class_data_dir")
    check_writable_folder(config.output_dir, "output_dir")
    if config.cache_to_disk and config.cache_dir:
        check_text(config.cache_dir, "cache_dir")
        check_writable_folder(config.cache_dir, "cache_dir")
    multiple = _folder_model_multiple(config.pretrained_model_name_or_path) or PIPELINE_MULTIPLE
    check_resolution(config.resolution, multiple)


def check_loaded_model(config, components) -> None:
    """The resolution check again with the loaded model's own configs (a hub id or single file has no folder to read)."""
    check_resolution(config.resolution, resolution_multiple(dict(components.vae.config), dict(components.unet.config)))


def checkpoint_bytes(trainable_params, optimizer_slots: int = 2) -> int:
    """About how many bytes one checkpoint takes: the trained tensors and AdamW's two moments of each."""
    return sum(p.numel() * p.element_size() for p in trainable_params) * (1 + optimizer_slots)


def warn_if_disk_is_short(output_dir: str | os.PathLike, needed: int, what: str = "a checkpoint") -> bool:
    """Warn when the output folder's disk has less free space than `needed` bytes; True when it warned."""
    folder = Path(output_dir).expanduser()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return False
    if free >= needed:
        return False
    logger.warning("output_dir '%s': %.2f GB free, but %s needs about %.2f GB; free some space, choose another "
                   "--output-dir, or save fewer checkpoints (checkpointing_steps, checkpoints_total_limit).",
                   output_dir, free / 1e9, what, needed / 1e9)
    return True


def check_sample_request(*, num_images: int, steps: int, height: int | None, width: int | None, out: str,
                         prompts: list[str]) -> None:
    """Refuse a `dreamtune sample` request that could only fail after the model is loaded."""
    if num_images < 1:
        raise ConfigError(f"-n {num_images}: images per prompt must be at least 1.")
    if steps < 1:
        raise ConfigError(f"--steps {steps}: sampling steps must be at least 1.")
    for flag, size in (("--height", height), ("--width", width)):
        if size is not None:
            check_resolution(size, PIPELINE_MULTIPLE, flag)
    for prompt in prompts:
        check_text(prompt, "--prompt")
    check_text(out, "--out")
    check_writable_folder(out, "--out")
