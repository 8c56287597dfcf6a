"""Base models and artifacts -> a diffusers pipeline; sampling with per-image seeds."""

from __future__ import annotations

import contextlib
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
    kwargs = {"torch_dtype": torch_dtype}
    index = path / "model_index.json"
    if not index.is_file() or "safety_checker" in index.read_text(encoding="utf-8"):
        # Only SD 1.x/2.x pipelines have a safety checker; other classes would warn about the arguments.
        kwargs.update(safety_checker=None, requires_safety_checker=False)
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


def load_vae(name_or_path: str, torch_dtype: torch.dtype | None = None):
    """An AutoencoderKL from a folder (its own, or a pipeline's `vae/`) or a hub id, to replace a base model's VAE.

    For example `madebyollin/sdxl-vae-fp16-fix`, SDXL's VAE retrained not to overflow in fp16.
    """
    from diffusers import AutoencoderKL

    path = Path(name_or_path).expanduser()
    subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
    if path.is_dir() and subfolder is None and not (path / "config.json").is_file():
        raise ModelLoadError(f"vae_path '{path}': not a VAE folder (no config.json, no vae/config.json).")
    if not path.exists() and looks_local(name_or_path):
        raise ModelLoadError(f"vae_path '{name_or_path}': no such folder. Give a VAE folder or a hub id.")
    offline = path.is_dir() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        return AutoencoderKL.from_pretrained(str(path) if path.is_dir() else name_or_path, subfolder=subfolder,
                                             torch_dtype=torch_dtype, local_files_only=offline)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"vae_path '{name_or_path}': cannot load a VAE ({first_line(e)}).") from None


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
        first = given[0][1]
        if base is not None and not _same_model(base, first.path) and not (first.base_model and _same_model(base, first.base_model)):
            raise ModelLoadError(
                f"{first.path}: a {first.method} artifact is a whole model that replaces the base, so --base "
                f"'{base}' would be ignored. Drop --base to sample the trained model, or train on '{base}'."
            )
        pipe = load_base(str(first.path), torch_dtype=torch_dtype)
        base = str(first.path)
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
        try:
            with _library_failure_muted():
                get_method(info.method).apply_artifact(pipe, artifact if Path(artifact).expanduser().is_file() else info.path)
        except (RuntimeError, ValueError, KeyError, IndexError) as e:
            first_line = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            why = "its tensor shapes differ from the model's" if "size mismatch" in str(e) else first_line[:200]
            trained_on = f"'{info.base_model}'" if info.base_model else "another model"
            fix = f"Use --base '{info.base_model}' or" if info.base_model else "Use"
            raise ModelLoadError(
                f"{info.path}: this {info.method} artifact was trained on {trained_on} and does not fit the base "
                f"model '{base}' ({why}). {fix} an artifact trained on '{base}'."
            ) from None
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def _library_failure_muted():
    """While an artifact is applied, hold back diffusers' error log and the warnings it raises: when the
    artifact does not fit, the user gets one line instead of a page of tensor shapes; when it fits, the
    warnings are given back."""
    import warnings

    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        diffusers_logging.set_verbosity(level)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _same_model(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Two model references name the same model (paths compared by where they point)."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return str(a) == str(b)


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
    images = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="sampling", disable=not progress, leave=False):
        images.extend(render_jobs(pipe, jobs[start : start + batch_size], seed=seed, steps=steps, guidance=guidance,
                                  negative_prompt=negative_prompt, height=height, width=width))
    return images


@torch.no_grad()
def render_jobs(pipe, jobs: list[tuple[str, int]], *, seed: int, steps: int, guidance: float,
                negative_prompt: str | None = None, height: int | None = None, width: int | None = None) -> list:
    """Render one batch of (prompt, image index) jobs; image i uses seed `seed + i`."""
    device = getattr(pipe, "_execution_device", None) or pipe.device
    gen_device = "cpu" if torch.device(device).type == "mps" else device
    generators = [torch.Generator(gen_device).manual_seed(seed + i) for _, i in jobs]
    out = pipe(
        [p for p, _ in jobs],
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generators,
        negative_prompt=[negative_prompt] * len(jobs) if negative_prompt else None,
        height=height,
        width=width,
    )
    return out.images
