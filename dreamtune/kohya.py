"""LoRA weights with kohya-ss / A1111 key names, for AUTOMATIC1111, ComfyUI and kohya's tools.

A diffusers LoRA key such as
`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight` becomes
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight` (and
`.lora_up.weight`, `.alpha`); text-encoder layers become `lora_te_text_model_encoder_layers_...`,
or for SDXL's two encoders `lora_te1_...` and `lora_te2_...` (each family names its prefixes).
Each layer's `.alpha` carries the scale (kohya applies `alpha / rank`), taken from the adapter
config in the file's header; a file without one is taken at scale 1 (alpha = rank), as diffusers
reads it. diffusers' own `load_lora_weights` reads the exported file back.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from .artifacts import METADATA_FILE, safetensors_metadata
from .errors import DreamtuneError, ModelLoadError
from .io import save_safetensors

# (component, layer path, which matrix) from diffusers' layout and from peft's.
_DIFFUSERS_KEY = re.compile(
    r"^(unet|text_encoder|text_encoder_2)\.(.+?)\.(lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up|lora_A|lora_B)\.weight$"
)


def kohya_prefixes(state_dict_keys, family: str = "") -> dict[str, str]:
    """kohya's key prefix per component, from the model family (read from the keys when not given)."""
    from .families import get_family

    if not family:
        family = "sdxl" if any(k.startswith("text_encoder_2.") for k in state_dict_keys) else "sd"
    return {"unet": "lora_unet_", **get_family(family).kohya_text_prefixes}


def _find_lora_file(path: Path) -> Path:
    from .methods.lora import LORA_WEIGHTS_FILE

    if path.is_file():
        return path
    for folder in (path, path / "artifact"):
        if (folder / LORA_WEIGHTS_FILE).is_file():
            return folder / LORA_WEIGHTS_FILE
    if not path.exists():
        raise ModelLoadError(f"{path}: no such LoRA artifact, run folder or file.")
    raise ModelLoadError(f"{path}: no {LORA_WEIGHTS_FILE} here; give a LoRA run, its artifact folder or the file.")


def _read_header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _alpha_for(layer: str, rank: int, config: dict | None) -> float:
    """kohya's alpha for one layer: the alpha that gives peft's scale through kohya's `alpha / rank`."""
    if not config:
        return float(rank)
    if config.get("use_dora"):
        raise DreamtuneError("kohya export: DoRA adapters have no kohya LoRA equivalent.")
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        # peft matches a pattern against the end of the layer's dotted path.
        if re.match(rf"(.*\.)?({pattern})$", layer):
            alpha = float(value)
            break
    if config.get("use_rslora"):
        # rsLoRA scales by alpha / sqrt(rank); kohya always divides by rank.
        return alpha * math.sqrt(rank)
    return alpha


def _component_configs(header: dict[str, str]) -> dict[str, dict]:
    raw = header.get("lora_adapter_metadata")
    if not raw:
        return {}
    flat = json.loads(raw)
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, option = key.partition(".")
        configs.setdefault(component, {})[option] = value
    return configs


def to_kohya(state_dict: dict[str, torch.Tensor], header: dict[str, str] | None = None,
             family: str = "") -> dict[str, torch.Tensor]:
    """Rename a diffusers-layout LoRA state dict to kohya keys, adding each layer's `.alpha`.

    `header` is the file's safetensors metadata; its `lora_adapter_metadata` (peft's LoraConfig per
    component) gives the alphas. `family` ("sd", "sdxl"; read from the keys when empty) chooses the
    text encoders' prefixes. Keys of another layout raise a DreamtuneError naming one of them.
    """
    configs = _component_configs(header or {})
    prefixes = kohya_prefixes(state_dict, family or (header or {}).get("family", ""))
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        match = _DIFFUSERS_KEY.match(key)
        if not match:
            raise DreamtuneError(f"kohya export: unexpected key '{key}'; expected diffusers LoRA keys (unet.*/text_encoder.*/text_encoder_2.*).")
        component, layer, which = match.groups()
        if component != "unet" and not layer.startswith("text_model."):
            layer = f"text_model.{layer}"
        name = prefixes[component] + layer.replace(".", "_")
        is_down = which.endswith(("down", "lora_A"))
        out[f"{name}.lora_down.weight" if is_down else f"{name}.lora_up.weight"] = tensor
        if is_down:
            # The config's layer names have no "text_model." when the text encoder is flattened.
            config_layer = layer.removeprefix("text_model.") if component != "unet" else layer
            alpha = _alpha_for(config_layer, tensor.shape[0], configs.get(component))
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def export_kohya(artifact_dir: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Write a LoRA artifact (run folder, artifact folder or its .safetensors) as one kohya/A1111 file.

    The file keeps dreamtune's metadata (base model, tokens) and kohya's `ss_network_*` fields in its
    header. Load it in diffusers with `pipe.load_lora_weights(folder, weight_name=name)`, or drop it
    into A1111's or ComfyUI's LoRA folder. Returns the path written.
    """
    from safetensors.torch import load_file

    source = _find_lora_file(Path(artifact_dir).expanduser())
    out_file = Path(out_file).expanduser()
    if out_file.suffix != ".safetensors":
        raise DreamtuneError(f"{out_file}: a kohya LoRA file is .safetensors; end the name with .safetensors.")
    header = _read_header(source)
    tensors = to_kohya(load_file(str(source)), header)
    ranks = sorted({t.shape[0] for k, t in tensors.items() if k.endswith(".lora_down.weight")})
    alphas = sorted({float(t) for k, t in tensors.items() if k.endswith(".alpha")})
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "dynamic",
            "ss_network_alpha": str(alphas[0]) if len(alphas) == 1 else "dynamic"}
    info_file = source.parent / METADATA_FILE
    if info_file.is_file():
        meta.update(safetensors_metadata(json.loads(info_file.read_text(encoding="utf-8"))))
    meta["format"] = "pt"
    save_safetensors(tensors, out_file, metadata=meta)
    return out_file
