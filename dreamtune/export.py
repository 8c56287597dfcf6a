"""Exports for other tools: one .safetensors in the original SD layout (A1111, ComfyUI), kohya LoRA keys."""

from __future__ import annotations

from pathlib import Path

from .artifacts import ArtifactInfo, safetensors_metadata
from .errors import DreamtuneError
from .methods import get_method, method_names

#: `dreamtune export --format` values; a method lists those its artifacts support in `Method.exports`.
FORMATS = ("single-file", "kohya")


def export(info: ArtifactInfo, fmt: str, out: Path, *, base: str | None = None, half: bool = False,
           overwrite: bool = False) -> Path:
    """Export an artifact as `fmt` ("single-file" or "kohya") to the file `out`.

    single-file: a DreamBooth pipeline, or a base model with a LoRA fused in, as one checkpoint
    that `StableDiffusionPipeline.from_single_file`, A1111 and ComfyUI load. kohya: a LoRA artifact
    with kohya/A1111 key names.
    """
    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise DreamtuneError(f"--out '{out}': exports are .safetensors files; end the name with .safetensors.")
    if out.exists() and not overwrite:
        raise DreamtuneError(f"--out '{out}' exists: pass --overwrite or choose another name.")
    meta = safetensors_metadata({"method": info.method, "base_model": info.base_model, "tokens": info.tokens,
                                 "dreamtune_version": info.version})
    if fmt not in FORMATS:
        raise DreamtuneError(f"--format {fmt!r}: one of {', '.join(FORMATS)}.")
    supported = [m for m in method_names() if fmt in get_method(m).exports]
    if fmt not in get_method(info.method).exports:
        raise DreamtuneError(
            f"{info.path}: {fmt} export is for {', '.join(supported)} artifacts; this one is {info.method}, which "
            "loads in diffusers as it is (see the README), and A1111 reads token embeddings as they are."
        )
    if fmt == "kohya":
        from .kohya import export_kohya

        return export_kohya(info.path, out)
    import torch

    from .pipeline import load_pipeline
    from .single_file import export_single_file

    pipe = load_pipeline(None if info.is_full_pipeline else (base or info.base_model), info.path)
    if pipe.get_list_adapters():
        # Adapters (LoRA) are folded into the weights: a single file holds plain weights only.
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return export_single_file(pipe, out, dtype=torch.float16 if half else None, metadata=meta)
