"""LoRA (Hu et al., 2021) as DreamBooth-LoRA: low-rank adapters on the UNet's attention projections.

The base weights stay frozen; peft injects `B @ A` adapters (rank `rank`, scale `alpha / rank`, all
in the config's `[lora]` table) into the UNet layers named by `target_modules`, and into the text
encoder's attention projections when `train_text_encoder` is on. Only the adapters train.

The artifact is `pytorch_lora_weights.safetensors` in diffusers' LoRA layout (`unet.*` and
`text_encoder.*`, for SDXL also `text_encoder_2.*`, keys, with peft's adapter config in the `lora_adapter_metadata` header so a
non-default alpha survives), which `pipe.load_lora_weights(folder)` reads. `dreamtune.kohya`
exports it with kohya/A1111 key names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import safetensors_metadata
from ..config import opt
from ..errors import ConfigError, ModelLoadError
from ..io import save_safetensors
from .base import Components, Method, trainable_parameters

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
#: The header key diffusers reads peft's LoraConfig from (diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY).
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
#: The text encoder's attention projections, as diffusers' DreamBooth-LoRA script adapts them.
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
ADAPTER_NAME = "default"


def _adaptable(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of target modules: the whole name, or a suffix after a dot.
    return name == target or name.endswith("." + target)


def lora_target_names(model: torch.nn.Module) -> list[str]:
    """Short names of the layers of `model` that can take a LoRA adapter (e.g. to_q, to_out.0, proj_in)."""
    names = set()
    for name, module in model.named_modules():
        if _adaptable(module) and name:
            parts = name.split(".")
            names.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    return sorted(names)


def check_target_modules(model: torch.nn.Module, targets: list[str], option: str = "[lora] target_modules") -> None:
    """Raise a ConfigError naming the valid choices when a target matches no Linear/Conv2d layer of `model`.

    A target matches a layer whose dotted path is the target or ends with "." + target, so
    "to_k" adapts every key projection and "attn2.to_k" only the cross-attention ones.
    """
    if not targets:
        raise ConfigError(f"{option} is empty: name the layers to adapt, e.g. ['to_q', 'to_k', 'to_v', 'to_out.0'].")
    modules = list(model.named_modules())
    for target in targets:
        hits = [m for n, m in modules if _matches(n, target)]
        if not any(_adaptable(m) for m in hits):
            what = f"matches only {type(hits[0]).__name__} modules, not Linear/Conv2d layers" if hits else "matches no layer"
            raise ConfigError(
                f"{option}: '{target}' {what} of the {type(model).__name__}. Valid names: "
                f"{', '.join(lora_target_names(model))} (a name may be prefixed to narrow it, e.g. 'attn2.to_k')."
            )


def _adapter_config(config_dict: dict) -> str:
    # peft configs hold sets (target_modules); JSON wants lists.
    return json.dumps(config_dict, indent=2, sort_keys=True, default=lambda v: sorted(v) if isinstance(v, set) else str(v))


class LoRA(Method):
    """Low-rank adapters on the UNet (and optionally the text encoder); the base model stays bit-identical."""

    name = "lora"
    defaults = {**Method.defaults, "learning_rate": 1e-4, "max_train_steps": 500}
    exports = ("single-file", "kohya")

    @dataclass
    class Options:
        """[lora] (flat keys of earlier versions: lora_rank, lora_alpha, ...)."""

        rank: int = opt(4, "LoRA rank.", min=1)
        alpha: float = opt(0.0, "LoRA alpha (0: equal to the rank).", min=0.0)
        target_modules: list = opt(["to_k", "to_q", "to_v", "to_out.0"], "UNet modules that get LoRA adapters.")
        dropout: float = opt(0.0, "LoRA dropout.", min=0.0, max=1.0)

    @property
    def rank(self) -> int:
        return self.options.rank

    @property
    def alpha(self) -> float:
        """LoRA alpha; 0 in the config means "equal to the rank" (scale 1)."""
        return self.options.alpha or float(self.options.rank)

    def lora_config(self, target_modules: list[str]):
        """The peft LoraConfig for one model (Gaussian init of A and zero B, as diffusers' script does)."""
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.options.dropout,
                          init_lora_weights="gaussian", target_modules=list(target_modules))

    def prepare(self, components: Components, concepts: list) -> list[dict]:
        unet = components.unet
        for module in (components.vae, unet, *components.text_encoders):
            module.requires_grad_(False)
        check_target_modules(unet, list(self.options.target_modules))
        unet.add_adapter(self.lora_config(self.options.target_modules), adapter_name=ADAPTER_NAME)
        if self.config.train_text_encoder:
            for encoder in components.text_encoders:
                encoder.add_adapter(self.lora_config(TEXT_ENCODER_TARGET_MODULES), adapter_name=ADAPTER_NAME)
        self.tokens = sorted({c.config.identifier for c in concepts})
        text_params = [p for e in components.text_encoders for p in trainable_parameters(e).values()]
        return self.param_groups(trainable_parameters(unet).values(), text_params)

    def lora_state_dict(self, components: Components) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The adapters in diffusers' LoRA layout, float32, and the header diffusers reads their config from."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        tensors: dict[str, torch.Tensor] = {}
        adapter_meta: dict = {}
        for prefix, model in (("unet", components.unet), *components.named_text_encoders()):
            if ADAPTER_NAME not in (getattr(model, "peft_config", None) or {}):
                continue
            state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME))
            if prefix != "unet" and not hasattr(model, "text_model"):
                # Newer transformers flatten CLIPTextModel; files on the Hub and older loaders (and
                # kohya/A1111 names) spell the text encoder's layers with the "text_model." prefix.
                state = {f"text_model.{k}": v for k, v in state.items()}
            tensors.update({f"{prefix}.{k}": v.detach().float() for k, v in state.items()})
            adapter_meta.update({f"{prefix}.{k}": v for k, v in model.peft_config[ADAPTER_NAME].to_dict().items()})
        return tensors, {"format": "pt", ADAPTER_METADATA_KEY: _adapter_config(adapter_meta)}

    def save_artifact(self, components: Components, folder: Path, meta: dict) -> None:
        tensors, header = self.lora_state_dict(components)
        meta.update({"lora_rank": self.rank, "lora_alpha": self.alpha,
                     "lora_target_modules": list(self.options.target_modules),
                     "text_encoder_lora": any(ADAPTER_NAME in (getattr(e, "peft_config", None) or {})
                                             for e in components.text_encoders)})
        # diffusers' own writer marks the file "format": "pt"; dreamtune's "format" key yields to it.
        header = {**safetensors_metadata(meta), **header}
        save_safetensors(tensors, Path(folder) / LORA_WEIGHTS_FILE, metadata=header)

    @classmethod
    def detect(cls, path: Path):
        """LoRA weights as diffusers' LoRA scripts (`pytorch_lora_weights.safetensors`) or kohya's sd-scripts write them."""
        from ..artifacts import foreign_artifact, safetensors_keys

        file = path / LORA_WEIGHTS_FILE if path.is_dir() else path
        keys = safetensors_keys(file) if file.is_file() else None
        if not keys or not any("lora" in k.lower() for k in keys):
            return None
        kohya = any(k.startswith(("lora_unet_", "lora_te")) for k in keys)
        return foreign_artifact(file, cls.name, layout="kohya" if kohya else "diffusers")

    @classmethod
    def apply_artifact(cls, pipe, folder: Path) -> None:
        """Load the adapters with diffusers' `load_lora_weights`, unfused.

        Unfused, the adapters stay separate from the base weights: the image is exactly the one
        training rendered, several LoRA artifacts can be stacked (all stay active, weight 1) and
        `pipe.unload_lora_weights()` restores the base. Call `pipe.fuse_lora()` for a little speed.
        """
        from ..artifacts import read_artifact

        info = read_artifact(folder)
        weight_file = info.extra.get("weight_file") or LORA_WEIGHTS_FILE
        if not (info.path / weight_file).is_file():
            raise ModelLoadError(f"{info.path}: no {weight_file} in this LoRA artifact.")
        before = {n for names in pipe.get_list_adapters().values() for n in names}
        # diffusers' loader also reads kohya/A1111 key names and converts them.
        pipe.load_lora_weights(str(info.path), weight_name=weight_file)
        loaded = {n for names in pipe.get_list_adapters().values() for n in names}
        if before:
            # diffusers activates only the adapter it loaded last; keep the earlier ones on too.
            pipe.set_adapters(sorted(loaded))
