"""Atomic writes: every file dreamtune writes appears whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`.

    The temporary name keeps the file's suffix (PIL and safetensors choose formats by it).
    On an exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); a finished file gets the usual permissions.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text (UTF-8) atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically, indented and with sorted keys."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_image(image, path: str | os.PathLike) -> None:
    """Save a PIL image atomically; the format follows the suffix."""
    with atomic_path(path) as tmp:
        image.save(tmp)


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors atomically (contiguous CPU copies)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    Used for checkpoints and artifacts made of several files: a reader never sees half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


#: Suffixes of single-file model checkpoints.
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin", ".pth")


def looks_local(name: str) -> bool:
    """True when a model name is meant as a local path rather than a hub id ('owner/name')."""
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or name.count("/") > 1 \
        or name.endswith(CHECKPOINT_SUFFIXES) or Path(name).expanduser().exists()


def require_empty(folder: str | os.PathLike, *, overwrite: bool, option: str = "--out") -> Path:
    """The folder as a Path; a DreamtuneError naming `option` when it holds files and `overwrite` is off."""
    from .errors import DreamtuneError

    folder = Path(folder).expanduser()
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise DreamtuneError(f"{option} '{folder}' is not empty: pass --overwrite or choose another folder.")
    return folder
