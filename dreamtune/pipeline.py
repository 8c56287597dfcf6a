"""Base models and artifacts -> a diffusers pipeline; sampling with per-image seeds."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .errors import ModelLoadError, first_line
from .io import CHECKPOINT_SUFFIXES, looks_local

logger = logging.getLogger(__name__)

def load_base(name_or_path: str, *, torch_dtype: torch.dtype | None = None, revision: str = "",
              variant: str = "", single_file_config: str = "", local_files_only: bool | None = None):
    """Load a base text-to-image pipeline from a diffusers folder, a hub id or a single checkpoint file.

    The pipeline class comes from the model's own `model_index.json` (SD 1.x/2.x load as
    StableDiffusionPipeline; other families load as their own class). A missing path, a folder that
    is not a diffusers model, or a hub id that cannot be reached gives a ModelLoadError.
    """
    from diffusers import DiffusionPipeline

    if not name_or_path:
        raise ModelLoadError("pretrained_model_name_or_path is not set: give a diffusers folder, a hub id or a .safetensors file (--pretrained-model-name-or-path).")
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise ModelLoadError(f"{path}: not a model checkpoint (expected a diffusers folder or a .safetensors file).")
        from .single_file import load_single_file

        return load_single_file(path, config=single_file_config or None, torch_dtype=torch_dtype)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            hint = " It holds a dreamtune run; pass its artifact to `load_pipeline` or `--weights`." if (path / "artifact").is_dir() else ""
            raise ModelLoadError(f"{path}: not a diffusers model folder (no model_index.json).{hint}")
        local_files_only = True
    elif looks_local(name_or_path):
        raise ModelLoadError(f"{name_or_path}: no such file or folder. Give a diffusers folder, a .safetensors file or a hub id.")
    kwargs = {"torch_dtype": torch_dtype, "safety_checker": None, "requires_safety_checker": False}
    if revision:
        kwargs["revision"] = revision
    if variant:
        kwargs["variant"] = variant
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if path.is_dir() else name_or_path,
                                                 local_files_only=local_files_only, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"{name_or_path}: cannot load the model ({first_line(e)}). Check the hub id or download it and pass the local folder."
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(base: str | None, *artifacts: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None):
    """A diffusers pipeline with dreamtune artifacts applied, in order.

    `base` is a hub id, folder or single file; it may be None when the first artifact is a full
    pipeline (DreamBooth) or records its base model. Each artifact may be a run folder or its
    `artifact/` folder.
    """
    from .artifacts import read_artifact
    from .methods import get_method

    given = list(zip(artifacts, (read_artifact(a) for a in artifacts)))
    if given and given[0][1].is_full_pipeline:
        pipe = load_base(str(given[0][1].path), torch_dtype=torch_dtype)
        given = given[1:]
    else:
        if base is None:
            if not given:
                raise ModelLoadError("load_pipeline needs a base model or an artifact.")
            base = given[0][1].base_model
            if not base:
                raise ModelLoadError(f"{given[0][0]}: the artifact does not say which base model it was trained on; "
                                     "pass it with --base.")
        pipe = load_base(base, torch_dtype=torch_dtype)
    for artifact, info in given:
        if info.is_full_pipeline:
            raise ModelLoadError(f"{info.path}: a full-model artifact can only come first (it replaces the base model).")
        # The artifact folder, or the file itself when the artifact is one file (a kohya LoRA, an embedding).
        get_method(info.method).apply_artifact(pipe, artifact if Path(artifact).expanduser().is_file() else info.path)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(pipe, prompts: str | list[str], num_images: int = 4, seed: int = 0, steps: int = 30,
           guidance: float = 7.5, batch_size: int = 8, negative_prompt: str | None = None,
           height: int | None = None, width: int | None = None, progress: bool = False) -> list:
    """Render `num_images` images per prompt; image i of every prompt uses seed `seed + i`.

    Each image has its own generator, so an image does not depend on the batch it was rendered in.
    Returns PIL images, prompt-major (all images of the first prompt first).
    """
    from tqdm.auto import tqdm

    if isinstance(prompts, str):
        prompts = [prompts]
    jobs = [(p, i) for p in prompts for i in range(num_images)]
    device = getattr(pipe, "_execution_device", None) or pipe.device
    gen_device = "cpu" if torch.device(device).type == "mps" else device
    images = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="sampling", disable=not progress, leave=False):
        chunk = jobs[start : start + batch_size]
        generators = [torch.Generator(gen_device).manual_seed(seed + i) for _, i in chunk]
        out = pipe(
            [p for p, _ in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
            height=height,
            width=width,
        )
        images.extend(out.images)
    return images
