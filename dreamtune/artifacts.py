"""Artifacts: what a run produces, with metadata (base model, method, tokens, dreamtune version).

Every artifact is a folder with a `dreamtune.json` beside the method's files, which are in the
formats diffusers' own loaders read (a pipeline folder, attention-processor weights, textual
inversion embeddings, LoRA weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import ModelLoadError
from .io import write_json

METADATA_FILE = "dreamtune.json"


@dataclass
class ArtifactInfo:
    """What `dreamtune.json` says about an artifact folder."""

    path: Path
    method: str
    base_model: str
    tokens: list[str] = field(default_factory=list)
    version: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def is_full_pipeline(self) -> bool:
        """True when the artifact is a whole diffusers pipeline (it replaces the base model)."""
        from .methods import get_method

        return get_method(self.method).full_pipeline_artifact


def metadata(method: str, base_model: str, tokens: list[str] | None = None, **extra) -> dict:
    """The metadata dict written beside an artifact and into exported files."""
    return {"format": "dreamtune-artifact", "method": method, "base_model": base_model,
            "tokens": list(tokens or []), "dreamtune_version": __version__, **extra}


def write_metadata(folder: Path, meta: dict) -> None:
    """Write `dreamtune.json` into an artifact folder."""
    write_json(Path(folder) / METADATA_FILE, meta)


def read_artifact(path: str | Path) -> ArtifactInfo:
    """Read an artifact's metadata; a run folder is resolved to its artifact.

    A folder or file without `dreamtune.json` is recognised by its content when a registered method
    knows the layout (`Method.detect`): what diffusers' training scripts write (a pipeline folder,
    Custom Diffusion weights and token files, `learned_embeds.safetensors`, LoRA weights) and kohya
    LoRA files.
    """
    path = Path(path).expanduser()
    for folder in (path, path / "artifact"):
        if (folder / METADATA_FILE).is_file():
            return _read_metadata(folder)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such run or artifact folder.")
    from .methods import get_method, method_names

    for name in method_names():
        info = get_method(name).detect(path)
        if info is not None:
            return info
    raise ModelLoadError(
        f"{path}: not a dreamtune run or artifact (no {METADATA_FILE}), nor weights in a layout dreamtune knows "
        "(diffusers' training scripts, kohya LoRA). A run that has not finished has checkpoints only: resume it "
        "with `dreamtune train --resume latest`."
    )


def find_artifact(path: str | Path) -> Path:
    """Resolve a run folder or artifact (folder or file) to the artifact's folder."""
    return read_artifact(path).path


def _read_metadata(folder: Path) -> ArtifactInfo:
    try:
        meta = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{folder / METADATA_FILE}: not valid JSON ({e}).") from None
    known = {"format", "method", "base_model", "tokens", "dreamtune_version"}
    return ArtifactInfo(folder, meta.get("method", ""), meta.get("base_model", ""), meta.get("tokens", []),
                        meta.get("dreamtune_version", ""), {k: v for k, v in meta.items() if k not in known})


def foreign_artifact(path: Path, method: str, *, tokens: list[str] | tuple = (), base_model: str | None = None,
                     **extra) -> ArtifactInfo:
    """The ArtifactInfo of weights another tool wrote (no dreamtune.json), for `Method.detect`.

    For a file, the artifact folder is its folder and `extra["weight_file"]` its name. The base
    model and the concepts come from the model card diffusers' scripts write beside their weights
    (README.md: `base_model:`, `instance_prompt:`) when there is one.
    """
    folder = path if path.is_dir() else path.parent
    if path.is_file():
        extra.setdefault("weight_file", path.name)
    card = model_card(folder)
    prompt = card.get("instance_prompt", "")
    concepts = []
    for token in tokens:
        after = prompt.split(token, 1)[1].split() if token in prompt else []
        concepts.append({"identifier": token, "class_noun": after[0] if after else "",
                         **({"instance_prompt": prompt} if token in prompt else {})})
    extra.setdefault("concepts", concepts)
    return ArtifactInfo(folder, method, card.get("base_model", "") if base_model is None else base_model,
                        list(tokens), "", {"source": "foreign", **extra})


def model_card(folder: Path) -> dict[str, str]:
    """The plain `key: value` lines of a README.md's front matter (as diffusers' training scripts write it)."""
    card = Path(folder) / "README.md"
    if not card.is_file():
        return {}
    parts = card.read_text(encoding="utf-8", errors="replace").strip().split("---")
    if len(parts) < 3:
        return {}
    fields = {}
    for line in parts[1].splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip() and not line.startswith((" ", "-")):
            fields[key.strip()] = value.strip().strip("'\"")
    return fields


def safetensors_keys(path: Path) -> list[str] | None:
    """The tensor names of a safetensors file (whatever its suffix), or None when it is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError):
        return None


def safetensors_metadata(meta: dict) -> dict[str, str]:
    """Metadata flattened to the str -> str mapping a safetensors header holds."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
