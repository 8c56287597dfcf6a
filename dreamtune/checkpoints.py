"""Resumable checkpoints in safetensors and JSON only (nothing is unpickled when resuming).

checkpoints/checkpoint-<step>/ holds the trained tensors (trainable.safetensors), the optimizer
state (optimizer.safetensors + optimizer.json), the lr scheduler and step (state.json) and the torch
RNG state (rng.safetensors). Each checkpoint is written to a temporary folder and renamed, with a
record of every file's size and SHA-256 (manifest.json): a checkpoint damaged later (a truncated copy,
a disk fault) is named and `--resume latest` falls back to the newest one that verifies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import DreamtuneError
from .io import atomic_dir, save_safetensors, write_json

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest finished checkpoint of a run, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: Path, limit: int) -> None:
    """Delete the oldest checkpoints beyond `limit` (0 keeps all)."""
    if limit <= 0:
        return
    for path in list_checkpoints(output_dir)[:-limit]:
        shutil.rmtree(path, ignore_errors=True)


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {}
    for pid, values in state_dict["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value
            else:
                plain.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "plain_state": plain}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in meta["plain_state"].items():
        state.setdefault(int(pid), {}).update(values)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def save_checkpoint(output_dir: Path, step: int, method, components, optimizer, lr_scheduler) -> Path:
    """Write checkpoint-<step> atomically and return its path."""
    path = Path(output_dir) / "checkpoints" / f"checkpoint-{step}"
    with atomic_dir(path) as tmp:
        save_safetensors(dict(method.trainable_state(components)), tmp / "trainable.safetensors")
        tensors, meta = _split_optimizer_state(optimizer.state_dict())
        save_safetensors(tensors, tmp / "optimizer.safetensors")
        write_json(tmp / "optimizer.json", meta)
        save_safetensors({"torch_cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
        scheduler_state = {k: v for k, v in lr_scheduler.state_dict().items() if k != "lr_lambdas"}
        write_json(tmp / "state.json", {"step": step, "method": method.name, "lr_scheduler": scheduler_state,
                                        "tokens": method.tokens})
        write_json(tmp / MANIFEST, {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
                                    for p in sorted(tmp.iterdir())})
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted (a missing, truncated or altered file), or None when it verifies.

    Checkpoints written before the manifest existed are checked by opening each safetensors header.
    """
    path = Path(path)
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            record = json.loads(manifest.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            return f"{MANIFEST} is unreadable"
        for name, expected in record.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            size = file.stat().st_size
            if size != expected["size"]:
                return f"{name} is {size} bytes, {expected['size']} were written"
            if _sha256(file) != expected["sha256"]:
                return f"{name} does not match its recorded checksum"
        return None
    from safetensors import safe_open

    for name in ("state.json", "optimizer.json", "trainable.safetensors", "optimizer.safetensors", "rng.safetensors"):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        try:
            if name.endswith(".json"):
                json.loads(file.read_text(encoding="utf-8"))
            else:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        f.get_slice(key)
        except Exception as e:  # safetensors raises its own error type for any damage
            return f"{name} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def newest_good_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint of a run that verifies; damaged ones are named in a warning and skipped."""
    for path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("%s is damaged (%s); trying the checkpoint before it", path, problem)
    return None


def load_checkpoint(path: Path, method, components, optimizer, lr_scheduler) -> int:
    """Restore a checkpoint into a prepared run; returns the step it was taken at."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise DreamtuneError(f"{path}: not a dreamtune checkpoint (no state.json). Use --resume latest or a checkpoints/checkpoint-N folder.")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise DreamtuneError(f"{path}: the checkpoint is damaged ({problem}). Resume from an earlier checkpoint, or "
                             "use --resume latest to pick the newest one that is whole.")
    state = json.loads((path / "state.json").read_text())
    if state.get("method") != method.name:
        raise DreamtuneError(f"{path}: a checkpoint of method '{state.get('method')}', but this run is '{method.name}'.")
    method.load_trainable_state(components, load_file(path / "trainable.safetensors"))
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_join_optimizer_state(load_file(path / "optimizer.safetensors"), meta))
    scheduler_state = dict(state["lr_scheduler"])
    scheduler_state["lr_lambdas"] = [None] * len(optimizer.param_groups)
    lr_scheduler.load_state_dict(scheduler_state)
    torch.set_rng_state(load_file(path / "rng.safetensors")["torch_cpu"])
    return int(state["step"])


def optimizer_settings(optimizer) -> list[dict]:
    """Each parameter group's settings (lr, betas, weight decay...) as the current config made them."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def apply_optimizer_settings(optimizer, lr_scheduler, settings: list[dict]) -> None:
    """Put a changed config's optimizer settings back after a checkpoint restored the old ones.

    Used by --resume-with-changes: the checkpoint's moments are kept, while the learning rate (the
    schedule's base value too) and the other settings become the new config's from this step on.
    """
    for group, fresh in zip(optimizer.param_groups, settings):
        group.update(fresh)
    lr_scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    step = lr_scheduler.last_epoch
    for group, base, factor in zip(optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas):
        group["lr"] = base * factor(step)
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
