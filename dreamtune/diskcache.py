"""Latents and prompt embeddings kept on disk, for datasets whose encodings do not fit in memory.

Each entry is one safetensors file named by a hash of everything it was computed from. Latents: the
exact pixels the VAE encodes (the image after its bucket's resize and crop), the image's original size
and crop corner (SDXL's micro-conditioning inputs, also stored in the entry), and the VAE's weights
and dtype. Prompt embeddings: the token ids of every tokenizer and the text encoders' weights and
dtypes (an SDXL entry holds both encoders' hidden states side by side and the pooled embedding). A
changed image, another bucket or crop, another base model or VAE gives another name, so a stale entry
is never read; the same inputs in a later or resumed run find theirs. Files are written atomically,
so a killed run leaves no half entry, and runs may share the folder (one name always holds the same
tensors, whoever wrote it).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch

from .io import LEFTOVER_RE, save_safetensors

logger = logging.getLogger(__name__)

#: Bumped when what an entry holds or how its name is computed changes, so old entries are not read.
FORMAT = "dreamtune-encoded-1"
#: A temporary older than this is a killed writer's, not one still being written by a running run.
STALE_TEMPORARY_S = 6 * 3600


def default_cache_dir() -> Path:
    """Where on-disk encodings go unless `cache_dir` says otherwise: $DREAMTUNE_CACHE/encoded."""
    from .data.priors import cache_dir

    return cache_dir() / "encoded"


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's raw bytes (any dtype, bfloat16 included), from a contiguous CPU copy."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def fingerprint(*modules: torch.nn.Module) -> str:
    """A hash of the modules' weights: every tensor's name, dtype, shape and bytes.

    Reading every byte costs about a second per GB, once per run; a cheaper sample of each
    tensor could miss a model that differs from another only where the sample does not look.
    """
    digest = hashlib.sha256()
    for module in modules:
        digest.update(type(module).__name__.encode())
        for name, tensor in module.state_dict().items():
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


class DiskCache:
    """Entries of one kind ('latents', 'text') for one model identity, under `folder/kind/`."""

    def __init__(self, folder: str | Path, kind: str, identity: str):
        self.folder = Path(folder).expanduser() / kind
        self.kind = kind
        self.identity = identity
        #: Entries this process computed and wrote (the rest were found on disk).
        self.written = 0
        self._remove_stale_temporaries()

    def key(self, *parts: bytes | str) -> str:
        """The entry name for these inputs (with the format and the model identity)."""
        digest = hashlib.sha256()
        for part in (FORMAT, self.kind, self.identity, *parts):
            data = part.encode() if isinstance(part, str) else part
            # Length-prefixed, so that no two different part lists hash the same bytes.
            digest.update(len(data).to_bytes(8, "little") + data)
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        # Two-character subfolders keep each folder small for datasets of many thousand images.
        return self.folder / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str, device=None) -> dict[str, torch.Tensor]:
        """The tensors of an entry (on `device`)."""
        from safetensors.torch import load_file

        return load_file(str(self.path(key)), device=str(device or "cpu"))

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write an entry atomically."""
        save_safetensors(tensors, self.path(key), metadata={"format": FORMAT, "kind": self.kind})
        self.written += 1

    def _remove_stale_temporaries(self) -> None:
        """Remove temporaries that killed writers left long ago; a running run's fresh ones are kept."""
        if not self.folder.is_dir():
            return
        cutoff = time.time() - STALE_TEMPORARY_S
        for sub in self.folder.iterdir():
            for entry in sub.iterdir() if sub.is_dir() else ():
                try:
                    if LEFTOVER_RE.match(entry.name) and entry.stat().st_mtime < cutoff:
                        entry.unlink()
                except OSError:  # another run removed it first
                    pass
