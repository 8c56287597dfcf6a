"""Atomic writes: every file dreamtune writes appears whole or not at all.

A write goes to a hidden temporary beside its target (`.NAME.partial.XXXXXXXX`), then is renamed.
A process killed mid-write leaves that temporary behind; `remove_leftovers` clears them at the next
start. A full disk, a read-only folder or a refused permission becomes one EnvironmentFault line
that names the path, and nothing half-written is kept.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DreamtuneError

logger = logging.getLogger(__name__)

PARTIAL = ".partial."
# Temporaries of atomic_path/atomic_dir, and the previous version atomic_dir moves aside while replacing.
LEFTOVER_RE = re.compile(r"^\..+\.partial\.(?:[A-Za-z0-9_]{8}(?:\.[^.]+)?|replaced)$")

_FAULTS = {
    errno.ENOSPC: "no space left on the device. Free some space or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is exceeded. Free some space or choose another folder",
    errno.EROFS: "the file system is read-only. Choose a writable folder",
    errno.EACCES: "permission denied. Fix the folder's permissions or choose another folder",
    errno.EPERM: "operation not permitted. Fix the folder's permissions or choose another folder",
}


class EnvironmentFault(DreamtuneError):
    """The machine refused a write (disk full, read-only folder, permission): not the user's input, but theirs to fix."""


def environment_fault(error: BaseException, path: str | os.PathLike | None = None) -> EnvironmentFault | None:
    """The one-line EnvironmentFault for an OS write error (also as safetensors reports it), else None."""
    code = error.errno if isinstance(error, OSError) else None
    if code is None:
        found = re.search(r"os error (\d+)", str(error))
        code = int(found.group(1)) if found else None
    if code not in _FAULTS:
        return None
    # The caller's path is the file or folder the user knows; a library's own temporary is not.
    where = path if path is not None else getattr(error, "filename", None)
    return EnvironmentFault(f"{_printable(where)}: {_FAULTS[code]} (nothing half-written was kept).")


def _printable(path) -> str:
    return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8") if path is not None else "a file"

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`.

    The temporary name keeps the file's suffix (PIL and safetensors choose formats by it).
    On an exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    with _faults_named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}{PARTIAL}", suffix=suffix or path.suffix, dir=path.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _faults_named(path):
            yield tmp_path
            # mkstemp makes the file private (0600); a finished file gets the usual permissions.
            os.chmod(tmp_path, 0o666 & ~_umask())
            os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _faults_named(path: Path) -> Iterator[None]:
    try:
        yield
    except EnvironmentFault as e:
        # Raised by a write nested inside this one (a file in a checkpoint folder): name this one.
        if e.__cause__ is None:
            raise
        raise environment_fault(e.__cause__, path) from e.__cause__
    except Exception as e:
        fault = environment_fault(e, path)
        if fault is None:
            raise
        raise fault from e


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
    with _faults_named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{PARTIAL}", dir=path.parent))
    try:
        with _faults_named(path):
            yield tmp
            # Libraries that write into the folder (save_pretrained) may leave private modes; a finished
            # folder reads like every other file dreamtune writes.
            _usual_modes(tmp)
            if path.exists():
                old = path.with_name(f".{path.name}{PARTIAL}replaced")
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


def _usual_modes(folder: Path) -> None:
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def remove_leftovers(*folders: str | os.PathLike, only=None) -> list[Path]:
    """Remove the temporaries a killed process left in these folders; returns what was removed.

    A previous version that atomic_dir had moved aside, with nothing in its place, is put back.
    Call it only while holding the folder's lock: another writer's temporaries look the same.
    `only(target_name)`, when given, limits the removal to temporaries of the targets this writer owns.
    """
    removed = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if not LEFTOVER_RE.match(entry.name) or (only is not None and not only(entry.name[1:].split(PARTIAL)[0])):
                continue
            if entry.name.endswith(f"{PARTIAL}replaced"):
                target = entry.with_name(entry.name[1 : -len(f"{PARTIAL}replaced")])
                if not target.exists():
                    os.replace(entry, target)
                    logger.info("%s: put back the previous version that an interrupted write had moved aside", target)
                    continue
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
    if removed:
        logger.info("removed %d half-written file(s) left by an interrupted process: %s", len(removed),
                    ", ".join(str(p) for p in removed[:3]))
    return removed
