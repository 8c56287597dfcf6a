"""Resumable checkpoints in safetensors and JSON only (nothing is unpickled when resuming).

checkpoints/checkpoint-<step>/ holds the trained tensors (trainable.safetensors), the optimizer
state (optimizer.safetensors + optimizer.json), the lr scheduler and step (state.json) and the torch
RNG state (rng.safetensors). Each checkpoint is written to a temporary folder and renamed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import DreamtuneError
from .io import atomic_dir, save_safetensors, write_json

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


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
    return path


def load_checkpoint(path: Path, method, components, optimizer, lr_scheduler) -> int:
    """Restore a checkpoint into a prepared run; returns the step it was taken at."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise DreamtuneError(f"{path}: not a dreamtune checkpoint (no state.json). Use --resume latest or a checkpoints/checkpoint-N folder.")
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
