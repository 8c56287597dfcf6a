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


def find_artifact(path: str | Path) -> Path:
    """Resolve a run folder or artifact folder to the artifact folder."""
    path = Path(path).expanduser()
    if (path / METADATA_FILE).is_file():
        return path
    if (path / "artifact" / METADATA_FILE).is_file():
        return path / "artifact"
    if not path.exists():
        raise ModelLoadError(f"{path}: no such run or artifact folder.")
    raise ModelLoadError(
        f"{path}: not a dreamtune run or artifact (no {METADATA_FILE}). A run that has not finished has "
        "checkpoints only: resume it with `dreamtune train --resume latest`."
    )


def read_artifact(path: str | Path) -> ArtifactInfo:
    """Read an artifact's metadata; a run folder is resolved to its artifact."""
    folder = find_artifact(path)
    try:
        meta = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{folder / METADATA_FILE}: not valid JSON ({e}).") from None
    known = {"format", "method", "base_model", "tokens", "dreamtune_version"}
    return ArtifactInfo(folder, meta.get("method", ""), meta.get("base_model", ""), meta.get("tokens", []),
                        meta.get("dreamtune_version", ""), {k: v for k, v in meta.items() if k not in known})


def safetensors_metadata(meta: dict) -> dict[str, str]:
    """Metadata flattened to the str -> str mapping a safetensors header holds."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
