"""Single-file checkpoints: the original Stable Diffusion (LDM) layout that A1111 and ComfyUI load.

`export_single_file` writes a diffusers StableDiffusionPipeline's UNet, VAE and text encoder into one
.safetensors file with the keys of the original CompVis code (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.*`). The key mapping is computed from the components'
configs, so it serves any UNet made of the Stable Diffusion block types, not only SD 1.5's shape.
It is the inverse of diffusers' single-file loader; `load_single_file` reads files back through that
loader (`StableDiffusionPipeline.from_single_file`).

Supported layouts:
- UNet: down blocks `DownBlock2D` / `CrossAttnDownBlock2D`, up blocks `UpBlock2D` / `CrossAttnUpBlock2D`,
  a `UNetMidBlock2DCrossAttn` middle block, any number of blocks, one integer `layers_per_block`, any
  transformer depth, convolutional (SD 1.x) or linear (SD 2.x) attention projections. No class or
  added embeddings (SDXL, upscaler): those raise a ModelLoadError.
- Text encoder: OpenAI CLIP (SD 1.x, `cond_stage_model.transformer.text_model.*`) or OpenCLIP
  (SD 2.x, `cond_stage_model.model.*` with fused q/k/v), chosen from the text encoder's activation.
- VAE: AutoencoderKL of any depth; the middle attention is written as 1x1 convolutions, as in LDM.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import ModelLoadError, first_line
from .io import looks_local, save_safetensors

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
TEXT_ENCODER_LAYOUTS = ("auto", "clip", "open_clip")
SINGLE_FILE_FORMAT = "ldm-single-file"

# The values the original LDM code hard-codes; a model that differs still loads through diffusers with its
# config folder, but A1111 and ComfyUI would rebuild it wrongly, so the export says so.
LDM_NORM_GROUPS = 32
LDM_VAE_SCALING_FACTOR = 0.18215

# diffusers ResnetBlock2D names -> LDM ResBlock names (UNet only; the VAE keeps diffusers' names).
_UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER_NAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


# ---------------------------------------------------------------------------------------------------------
# Key mapping, diffusers -> LDM
# ---------------------------------------------------------------------------------------------------------

def _rename_modules(state_dict: Mapping[str, torch.Tensor], modules: dict[str, tuple[str, dict[str, str]]],
                    what: str) -> dict[str, torch.Tensor]:
    """Rename every key by the module it belongs to; a key under no listed module is an unsupported part.

    `modules` maps a diffusers module path to (its LDM path, renames of the module's own children).
    """
    out = {}
    unmapped = []
    for key, tensor in state_dict.items():
        module, _, leaf = key.rpartition(".")
        # Walk up from the parameter's module to the first listed ancestor.
        parts = module.split(".")
        for cut in range(len(parts), 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in modules:
                ldm_prefix, child_names = modules[prefix]
                rest = ".".join(parts[cut:])
                for old, new in child_names.items():
                    if rest == old or rest.startswith(old + "."):
                        rest = new + rest[len(old):]
                        break
                out[".".join(p for p in (ldm_prefix, rest, leaf) if p)] = tensor
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ModelLoadError(
            f"the {what} has parts the original Stable Diffusion layout cannot hold ({', '.join(unmapped[:3])}"
            f"{', ...' if len(unmapped) > 3 else ''}); export it as a diffusers folder instead."
        )
    return out


def _layers_per_block(config: Mapping[str, Any], what: str) -> int:
    layers = config["layers_per_block"]
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise ModelLoadError(
                f"the {what} has a different layers_per_block per block ({list(layers)}), which diffusers' "
                "single-file loader cannot read back; export it as a diffusers folder instead."
            )
        layers = layers[0]
    return int(layers)


def unet_key_map(config: Mapping[str, Any]) -> dict[str, tuple[str, dict[str, str]]]:
    """The module paths of a UNet2DConditionModel (diffusers) and their LDM `UNetModel` equivalents.

    Computed from the config: the number of down/up blocks, `layers_per_block` and which blocks carry
    cross-attention. LDM numbers its blocks flat: `input_blocks.0` is conv_in, then each down block adds
    `layers_per_block` (resnet[, attention]) entries and, except the last, one downsampler entry; each up
    block adds `layers_per_block + 1` entries, its upsampler riding in the last one; the middle block is
    resnet, attention, resnet.
    """
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    layers = _layers_per_block(config, "UNet")
    for block_type in down_types + up_types:
        if block_type not in ("DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"):
            raise ModelLoadError(
                f"the UNet has a {block_type} block, which the original Stable Diffusion layout does not have; "
                "export it as a diffusers folder instead."
            )
    mid_type = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise ModelLoadError(
            f"the UNet's middle block is {mid_type}; the original Stable Diffusion layout needs "
            "UNetMidBlock2DCrossAttn. Export it as a diffusers folder instead."
        )

    resnet, plain = _UNET_RESNET_NAMES, {}
    modules: dict[str, tuple[str, dict[str, str]]] = {
        "conv_in": ("input_blocks.0.0", plain),
        "time_embedding.linear_1": ("time_embed.0", plain),
        "time_embedding.linear_2": ("time_embed.2", plain),
        "conv_norm_out": ("out.0", plain),
        "conv_out": ("out.2", plain),
        "mid_block.resnets.0": ("middle_block.0", resnet),
        "mid_block.attentions.0": ("middle_block.1", plain),
        "mid_block.resnets.1": ("middle_block.2", resnet),
    }
    index = 1
    for block, block_type in enumerate(down_types):
        for layer in range(layers):
            modules[f"down_blocks.{block}.resnets.{layer}"] = (f"input_blocks.{index}.0", resnet)
            if block_type.startswith("CrossAttn"):
                modules[f"down_blocks.{block}.attentions.{layer}"] = (f"input_blocks.{index}.1", plain)
            index += 1
        if block < len(down_types) - 1:
            modules[f"down_blocks.{block}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", plain)
            index += 1

    index = 0
    for block, block_type in enumerate(up_types):
        attention = block_type.startswith("CrossAttn")
        for layer in range(layers + 1):
            modules[f"up_blocks.{block}.resnets.{layer}"] = (f"output_blocks.{index}.0", resnet)
            if attention:
                modules[f"up_blocks.{block}.attentions.{layer}"] = (f"output_blocks.{index}.1", plain)
            index += 1
        if block < len(up_types) - 1:
            # The upsampler sits after the last resnet (and its attention, when there is one).
            slot = 2 if attention else 1
            modules[f"up_blocks.{block}.upsamplers.0.conv"] = (f"output_blocks.{index - 1}.{slot}.conv", plain)
    return modules


def vae_key_map(config: Mapping[str, Any]) -> dict[str, tuple[str, dict[str, str]]]:
    """The module paths of an AutoencoderKL (diffusers) and their LDM equivalents, from its config.

    LDM numbers the decoder's up blocks from the lowest resolution's opposite end (`up.0` is the last to
    run), so diffusers' `up_blocks.i` is `up.{n - 1 - i}`.
    """
    blocks = len(config["down_block_types"])
    if len(config["up_block_types"]) != blocks:
        raise ModelLoadError("the VAE's encoder and decoder have different depths; the LDM layout needs equal ones.")
    encoder_layers = _layers_per_block(config, "VAE")
    renames = _VAE_RESNET_NAMES
    modules: dict[str, tuple[str, dict[str, str]]] = {}
    for name in ("quant_conv", "post_quant_conv"):
        modules[name] = (name, {})
    for part in ("encoder", "decoder"):
        modules[f"{part}.conv_in"] = (f"{part}.conv_in", {})
        modules[f"{part}.conv_out"] = (f"{part}.conv_out", {})
        modules[f"{part}.conv_norm_out"] = (f"{part}.norm_out", {})
        modules[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", renames)
        modules[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", renames)
        modules[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION_NAMES)
    for block in range(blocks):
        for layer in range(encoder_layers):
            modules[f"encoder.down_blocks.{block}.resnets.{layer}"] = (f"encoder.down.{block}.block.{layer}", renames)
        modules[f"encoder.down_blocks.{block}.downsamplers.0.conv"] = (f"encoder.down.{block}.downsample.conv", {})
        ldm_block = blocks - 1 - block
        for layer in range(encoder_layers + 1):
            modules[f"decoder.up_blocks.{block}.resnets.{layer}"] = (f"decoder.up.{ldm_block}.block.{layer}", renames)
        modules[f"decoder.up_blocks.{block}.upsamplers.0.conv"] = (f"decoder.up.{ldm_block}.upsample.conv", {})
    return modules


def unet_to_ldm(unet, extra_modules: dict[str, tuple[str, dict[str, str]]] | None = None) -> dict[str, torch.Tensor]:
    """A UNet2DConditionModel's weights under `model.diffusion_model.*` keys.

    `extra_modules` maps modules beyond SD's (a family's added embeddings) to their LDM names.
    """
    mapped = _rename_modules(unet.state_dict(), {**unet_key_map(unet.config), **(extra_modules or {})}, "UNet")
    return {UNET_PREFIX + key: tensor for key, tensor in mapped.items()}


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """An AutoencoderKL's weights under `first_stage_model.*` keys (middle attention as 1x1 convolutions)."""
    mapped = _rename_modules(vae.state_dict(), vae_key_map(vae.config), "VAE")
    out = {}
    for key, tensor in mapped.items():
        # LDM's AttnBlock uses Conv2d(C, C, 1) for q, k, v and proj_out; diffusers uses Linear.
        if ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[VAE_PREFIX + key] = tensor
    return out


def _text_encoder_state(text_encoder) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 dropped the `text_model.` level of CLIPTextModel; older versions keep it.
    return {key.removeprefix("text_model."): value for key, value in text_encoder.state_dict().items()}


def clip_to_ldm(text_encoder, prefix: str = CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """An OpenAI-style CLIPTextModel's weights under `prefix` (SD 1.x: `cond_stage_model.transformer.text_model.`)."""
    state = _text_encoder_state(text_encoder)
    unexpected = [key for key in state if not key.startswith(("embeddings.", "encoder.", "final_layer_norm."))]
    if unexpected:
        raise ModelLoadError(
            f"the text encoder has weights outside CLIP's text model ({', '.join(unexpected[:3])}); "
            "SD 1.x single files hold a plain CLIPTextModel."
        )
    return {prefix + key: value for key, value in state.items()}


def open_clip_to_ldm(text_encoder, prefix: str = OPEN_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's weights in OpenCLIP's layout under `prefix` (SD 2.x: `cond_stage_model.model.`).

    OpenCLIP fuses q, k and v into one `in_proj` per layer. diffusers' SD 2.x text encoder keeps only the
    layers Stable Diffusion 2 reads (the penultimate output), so the file holds those: the unused last layer
    and `text_projection` of the original OpenCLIP model are absent, as SD 2.x sampling never reads them.
    A CLIPTextModelWithProjection (SDXL's second encoder) also has its `text_projection`, which OpenCLIP
    stores transposed (it multiplies from the right).
    """
    state = _text_encoder_state(text_encoder)
    out: dict[str, torch.Tensor] = {}
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    layer_key = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "embeddings.position_ids":  # a constant buffer some transformers versions save
            continue
        if key in fixed:
            out[fixed[key]] = value
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
            continue
        match = layer_key.match(key)
        if match is None:
            raise ModelLoadError(
                f"the text encoder has a weight OpenCLIP's layout cannot hold ({key}); "
                "export with text_encoder_layout='clip' or as a diffusers folder."
            )
        layer, module, kind = int(match[1]), match[2], match[3]
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            fused.setdefault((layer, kind), {})[module[-6]] = value
        elif module in _OPEN_CLIP_LAYER_NAMES:
            out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER_NAMES[module]}.{kind}"] = value
        else:
            raise ModelLoadError(f"the text encoder has a weight OpenCLIP's layout cannot hold ({key}).")
    for (layer, kind), parts in fused.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {prefix + key: value for key, value in out.items()}


def detect_text_encoder_layout(text_encoder) -> str:
    """'open_clip' for an SD 2.x-style text encoder (exact GELU, as OpenCLIP's ViT-H), else 'clip'.

    OpenAI's CLIP text models use quick_gelu; diffusers' SD 2.x text encoders (converted from OpenCLIP)
    use gelu. The activation is the one config field that tells the two families apart at any size.
    """
    return "open_clip" if getattr(text_encoder.config, "hidden_act", "quick_gelu") == "gelu" else "clip"


def resolve_text_encoder_layout(pipeline, layout: str = "auto") -> str:
    """'clip' or 'open_clip': `layout` itself, or for 'auto' the one the pipeline's text encoder has."""
    if layout not in TEXT_ENCODER_LAYOUTS:
        raise ModelLoadError(f"text_encoder_layout={layout!r} is not one of {', '.join(TEXT_ENCODER_LAYOUTS)}.")
    return detect_text_encoder_layout(pipeline.text_encoder) if layout == "auto" else layout


def pipeline_to_ldm(pipeline, text_encoder_layout: str = "auto") -> dict[str, torch.Tensor]:
    """The UNet, VAE and text encoder of a StableDiffusionPipeline as one LDM-layout state dict."""
    layout = resolve_text_encoder_layout(pipeline, text_encoder_layout)
    text = open_clip_to_ldm if layout == "open_clip" else clip_to_ldm
    return {**unet_to_ldm(pipeline.unet), **vae_to_ldm(pipeline.vae), **text(pipeline.text_encoder)}


# ---------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------

def _ldm_tool_caveats(pipeline) -> list[str]:
    """Reasons A1111 and ComfyUI, which rebuild the model from SD's fixed settings, would misread this one."""
    notes = []
    for name in ("unet", "vae"):
        groups = getattr(getattr(pipeline, name).config, "norm_num_groups", LDM_NORM_GROUPS)
        if groups != LDM_NORM_GROUPS:
            notes.append(f"{name} uses {groups} norm groups (LDM code assumes {LDM_NORM_GROUPS})")
    scaling = getattr(pipeline.vae.config, "scaling_factor", LDM_VAE_SCALING_FACTOR)
    if scaling != LDM_VAE_SCALING_FACTOR:
        notes.append(f"VAE scaling factor {scaling} (SD uses {LDM_VAE_SCALING_FACTOR})")
    unet = pipeline.unet.config
    if not unet.get("flip_sin_to_cos", True) or unet.get("freq_shift", 0) != 0:
        notes.append("timestep embedding differs from LDM's (flip_sin_to_cos=True, freq_shift=0)")
    return notes


def _metadata(pipeline, layout: str, extra: Mapping[str, Any] | None) -> dict[str, str]:
    scheduler = getattr(pipeline, "scheduler", None)
    prediction = getattr(getattr(scheduler, "config", None), "prediction_type", None) if scheduler else None
    meta: dict[str, Any] = {
        "dreamtune_version": __version__,
        "text_encoder_layout": layout,
        "vae_scaling_factor": str(pipeline.vae.config.scaling_factor),
    }
    if prediction:
        meta["prediction_type"] = prediction
    meta.update(extra or {})
    # The file's own format wins over a caller's artifact metadata that names another one.
    meta["format"] = SINGLE_FILE_FORMAT
    return {str(k): v if isinstance(v, str) else json.dumps(v, default=str) for k, v in meta.items()}


def _load_pipeline_folder(path: Path):
    from .pipeline import load_base

    if not path.is_dir() or not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"{path}: not a diffusers pipeline folder (no model_index.json); pass a StableDiffusionPipeline "
            "or the folder `save_pretrained` wrote."
        )
    try:
        return load_base(str(path))
    except ModelLoadError:
        raise
    except Exception as e:  # diffusers raises many types for a broken folder
        raise ModelLoadError(f"{path}: cannot be loaded as a diffusers pipeline ({first_line(e)}).") from None


def export_single_file(pipeline_or_dir, out_path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                       metadata: Mapping[str, Any] | None = None, text_encoder_layout: str = "auto") -> Path:
    """Write a StableDiffusion(XL)Pipeline as one .safetensors file in its family's original layout.

    SD 1.x/2.x: CompVis' LDM layout; SDXL: Stability's SGM layout (both encoders under `conditioner.`).

    `pipeline_or_dir` is a pipeline or a diffusers pipeline folder. `dtype` (e.g. torch.float16) casts
    floating-point weights; by default they keep their dtype. `metadata` (values stored as strings,
    non-strings as JSON) goes into the safetensors header beside `format`, `dreamtune_version`,
    `text_encoder_layout`, `prediction_type` and `vae_scaling_factor`. `text_encoder_layout` is 'auto'
    (OpenCLIP for a gelu text encoder, i.e. SD 2.x, else OpenAI CLIP), 'clip' or 'open_clip'.

    A1111 and ComfyUI rebuild the model from SD's standard sizes, so only SD-shaped models run there;
    other sizes (such as the tiny models) load back with `load_single_file(path, config=<diffusers folder>)`.
    They also do not read `prediction_type`: a v-prediction SD 1.x model needs its setting chosen there.
    The file is written atomically; an unsupported model raises ModelLoadError and writes nothing.
    """
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ModelLoadError(f"{out_path}: a single-file checkpoint is written as .safetensors; use that suffix.")
    if isinstance(pipeline_or_dir, (str, os.PathLike)):
        pipeline = _load_pipeline_folder(Path(pipeline_or_dir))
    else:
        pipeline = pipeline_or_dir
    for name in ("unet", "vae", "text_encoder"):
        if getattr(pipeline, name, None) is None:
            raise ModelLoadError(f"the pipeline has no {name}; a single-file checkpoint needs unet, vae and text_encoder.")

    from .families import family_of

    tensors, layout = family_of(pipeline).single_file_state(pipeline, text_encoder_layout)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    caveats = _ldm_tool_caveats(pipeline)
    if caveats:
        logger.warning("%s: loads with diffusers (config=<its diffusers folder>) but not as-is in A1111/ComfyUI: %s.",
                       out_path, "; ".join(caveats))
    save_safetensors(tensors, out_path, metadata=_metadata(pipeline, layout, metadata))
    return out_path


# ---------------------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------------------

_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


def _first_sentence(error: BaseException) -> str:
    # diffusers appends advice about its own loading flags, which does not apply here.
    return first_line(error).split(". ")[0].replace("Cannot load  because ", "")


def _looks_like_safetensors(path: Path) -> bool:
    # A safetensors file starts with an 8-byte header length, then the JSON header.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


class _ShapeView(Mapping):
    """A read-only view of a safetensors file's tensors as empty meta tensors: shapes without reading data.

    diffusers' checkpoint-type detection only looks at key names and shapes.
    """

    def __init__(self, handle):
        self._handle = handle
        self._keys = list(handle.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return torch.empty(self._handle.get_slice(key).get_shape(), device="meta")

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def inspect_single_file(path: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """The tensor names and header metadata of a single-file checkpoint, after checking it is one.

    Raises ModelLoadError (one line naming the file and the fix) for a missing file, a pickle-based
    checkpoint, a file that is not safetensors, or safetensors that hold no Stable Diffusion model.
    """
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file. Pass the path of a .safetensors Stable Diffusion checkpoint.")
    if path.is_dir():
        hint = " (it is a diffusers folder: load it with StableDiffusionPipeline.from_pretrained)" if (
            path / "model_index.json").is_file() else ""
        raise ModelLoadError(f"{path}: is a folder, not a single-file checkpoint{hint}.")
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{path}: pickle-based checkpoints ({path.suffix}) can run code when opened and are not loaded; "
            "convert it to .safetensors in a sandbox you trust, or get the .safetensors version of the model."
        )
    if path.suffix.lower() != ".safetensors":
        if _looks_like_safetensors(path):
            raise ModelLoadError(f"{path}: holds safetensors data; rename it to end in .safetensors and load it again.")
        raise ModelLoadError(f"{path}: not a checkpoint file; expected a .safetensors Stable Diffusion checkpoint.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            metadata = dict(handle.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ModelLoadError(f"{path}: not a valid safetensors file ({first_line(e)}); re-download or re-export it.") \
            from None
    _check_is_sd_checkpoint(path, keys)
    return keys, metadata


def _check_is_sd_checkpoint(path: Path, keys: list[str]) -> None:
    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if not has(UNET_PREFIX):
        if has("lora_unet_") or has("lora_te") or any(".lora_" in key or "lora_A" in key for key in keys):
            kind = "LoRA weights"
        elif has("encoder.") and has("decoder."):
            kind = "a VAE alone"
        elif has("down_blocks.") or has("transformer_blocks."):
            kind = "diffusers-format model weights"
        elif any(key in ("emb_params", "string_to_param", "clip_l") for key in keys) or len(keys) <= 2:
            kind = "a textual-inversion embedding"
        else:
            kind = "not a Stable Diffusion model"
        raise ModelLoadError(
            f"{path}: {kind}, not a Stable Diffusion checkpoint (no {UNET_PREFIX}* weights); "
            "load a full model checkpoint, or apply this file to one."
        )
    text_prefix = "conditioner.embedders." if has("conditioner.") else "cond_stage_model."
    missing = [what for prefix, what in ((VAE_PREFIX, "VAE"), (text_prefix, "text encoder")) if not has(prefix)]
    if missing:
        raise ModelLoadError(
            f"{path}: has no {' or '.join(missing)} weights; a single-file checkpoint must hold unet, vae and "
            "text encoder. Re-export it from the full pipeline."
        )


_CONFIG_PATTERNS = ["**/*.json", "*.json", "*.txt", "**/*.txt", "**/*.model"]


def _resolve_config(path: Path, config: str | os.PathLike | None, metadata: dict[str, str],
                    local_files_only: bool) -> str:
    """A local diffusers folder holding the component configs, found without diffusers' silent download.

    diffusers retries a config missing from the cache with downloads on even under local_files_only=True,
    which offline means a long wait and a network error; this resolves it first and explains instead.
    """
    from huggingface_hub import snapshot_download

    if config is not None and Path(config).expanduser().is_dir():
        folder = Path(config).expanduser()
        if not (folder / "model_index.json").is_file() or not (folder / "unet" / "config.json").is_file():
            raise ModelLoadError(
                f"{folder}: not a diffusers pipeline folder (needs model_index.json and unet/config.json); pass the "
                "folder of the base model the checkpoint was made from."
            )
        return str(folder)

    if config is None:
        from diffusers.loaders.single_file_utils import fetch_diffusers_config
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            repo = fetch_diffusers_config(_ShapeView(handle))["pretrained_model_name_or_path"]
        origin = f"{repo} (the configs diffusers picks for this checkpoint)"
    else:
        repo = str(config)
        if looks_local(repo):
            raise ModelLoadError(f"config={repo}: no such folder; pass a diffusers pipeline folder or a hub id.")
        origin = f"config={repo}"

    try:
        return snapshot_download(repo, allow_patterns=_CONFIG_PATTERNS, local_files_only=local_files_only)
    except Exception as e:  # offline misses and network errors come as several types
        base = metadata.get("base_model", "")
        hint = f" (it was exported from {base})" if base else ""
        if local_files_only:
            raise ModelLoadError(
                f"{path}: needs component configs, and {origin} is not in the local Hugging Face cache; "
                f"pass config=<a diffusers folder of the same architecture>{hint}, or local_files_only=False "
                "to download them."
            ) from None
        raise ModelLoadError(
            f"{path}: cannot get component configs {repo} ({first_line(e)}); pass config=<a diffusers folder of "
            f"the same architecture>{hint}."
        ) from None


def load_single_file(path: str | os.PathLike, *, config: str | os.PathLike | None = None,
                     torch_dtype: torch.dtype | None = None, local_files_only: bool = True,
                     pipeline_class: str | None = None):
    """Load a single-file (LDM/SGM-layout) checkpoint as its family's pipeline (StableDiffusion(XL)Pipeline).

    The family is read from the file's tensor names (SDXL's `conditioner.embedders.*`, SD's
    `cond_stage_model.*`) unless `pipeline_class` names the diffusers class. The weights go through
    diffusers' own loader, `<pipeline class>.from_single_file`. `config` is a diffusers pipeline folder
    or hub id that gives the component configs, tokenizers and scheduler; it is required for
    non-standard sizes (tiny models). Without it diffusers picks the standard configs from the key
    shapes, which must be in the local Hugging Face cache when `local_files_only` (the default; nothing
    is downloaded then). Only .safetensors files are read: pickle-based .ckpt files can execute code
    when opened, so they are refused with a one-line ModelLoadError, as are missing files, files that
    are not Stable Diffusion checkpoints, and SDXL refiner checkpoints.
    """
    import diffusers

    from .families import family_of_single_file

    path = Path(path).expanduser()
    keys, metadata = inspect_single_file(path)
    family = family_of_single_file(path, keys)
    if family is not None:
        family.check_single_file(path, keys)
    pipeline_class = pipeline_class or (family.pipeline_class if family else "StableDiffusionPipeline")
    config_dir = _resolve_config(path, config, metadata, local_files_only)
    extra = {"safety_checker": None, "feature_extractor": None} if pipeline_class == "StableDiffusionPipeline" else {}
    try:
        pipeline = getattr(diffusers, pipeline_class).from_single_file(
            str(path), config=config_dir, torch_dtype=torch_dtype, local_files_only=True, **extra,
        )
    except ModelLoadError:
        raise
    except Exception as e:  # shape mismatches, missing components: diffusers' types vary
        raise ModelLoadError(
            f"{path}: its weights do not fit the configs in {config_dir} ({_first_sentence(e)}); pass config= the "
            "diffusers folder of the model it was made from."
        ) from None
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipeline, name, None)
        if module is None:
            continue
        left = [n for n, p in module.named_parameters() if p.device.type == "meta"]
        if left:
            raise ModelLoadError(
                f"{path}: has no weights for the {name}'s {left[0]} (and {len(left) - 1} more) under {config_dir}'s "
                "configs; pass config= the diffusers folder of the model it was made from."
            )
    return pipeline
