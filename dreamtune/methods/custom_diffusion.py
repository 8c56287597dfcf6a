"""Custom Diffusion (Kumari et al., CVPR 2023): train the cross-attention key/value projections and new tokens.

Only the UNet's cross-attention projections that read the text (`attn2.to_k`, `attn2.to_v`; with
`train_params = "crossattn"` also `to_q` and `to_out`) and the embedding rows of each concept's
modifier token (`<new1>`, ...) train; everything else is frozen. As in the reference code, the
gradient of the start-of-text token's key and value is cut, so the weights learn from the prompt's
words only.

The artifact is what diffusers' own loaders read:

- `pytorch_custom_diffusion_weights.safetensors`: the trained projections in the key layout of
  diffusers' `CustomDiffusionAttnProcessor`, loaded with
  `pipe.unet.load_attn_procs(folder, weight_name="pytorch_custom_diffusion_weights.safetensors", _pipeline=pipe)`.
  In diffusers 0.42.1 `load_attn_procs` only installs the processors when it is given the pipeline
  (`_pipeline=`); without it the call returns having changed nothing. Self-attention layers are
  stored as empty tensors (diffusers' own `save_attn_procs` drops them from safetensors files, and
  its loader then refuses the file because the processor count does not match).
- `<token>.safetensors` per modifier token: `{token: embedding}`, loaded with
  `pipe.load_textual_inversion(folder / "<token>.safetensors", token=token)`.
- With `compress_rank > 0`, instead of the full weights, the top singular directions of each weight
  change W - W0 as a LoRA (`pytorch_lora_weights.safetensors`, peft key names, alpha = rank), loaded
  with `pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors")`; the
  reconstruction error is recorded in `dreamtune.json`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import opt
from ..errors import ConfigError, ModelLoadError
from ..tokens import (
    TrainableTokens,
    add_tokens,
    initializers,
    is_new_token,
    load_token_files,
    save_token_file,
)
from .base import Components, Method

logger = logging.getLogger(__name__)

WEIGHT_NAME = "pytorch_custom_diffusion_weights.safetensors"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# diffusers' processor attribute for each trained projection of the attention module.
PROCESSOR_NAMES = {"to_k": "to_k_custom_diffusion", "to_v": "to_v_custom_diffusion",
                   "to_q": "to_q_custom_diffusion", "to_out.0": "to_out_custom_diffusion.0"}
TRAIN_PARAMS = {"crossattn_kv": ("to_k", "to_v"), "crossattn": ("to_q", "to_k", "to_v", "to_out.0")}


def cross_attention_layers(unet) -> list[str]:
    """Module paths of the UNet's attention layers that attend to the text (diffusers' `attn2`)."""
    from diffusers.models.attention_processor import Attention

    return [name for name, module in unet.named_modules()
            if isinstance(module, Attention) and name.endswith("attn2") and module.is_cross_attention]


def trained_projections(unet, train_params: str) -> list[str]:
    """Module paths of the projections that `train_params` trains (e.g. '...attn2.to_k')."""
    if train_params not in TRAIN_PARAMS:
        raise ConfigError(f"train_params: '{train_params}' is not one of {', '.join(TRAIN_PARAMS)}.")
    paths = [f"{layer}.{proj}" for layer in cross_attention_layers(unet) for proj in TRAIN_PARAMS[train_params]]
    if not paths:
        raise ConfigError("custom_diffusion: the UNet has no cross-attention layers (attn2) to train.")
    for path in paths:
        module = unet.get_submodule(path)
        if not path.endswith("to_out.0") and module.bias is not None:
            raise ConfigError(
                f"custom_diffusion: {path} has a bias, which diffusers' Custom Diffusion format cannot hold; "
                "this base model is not supported."
            )
    return paths


def _detach_start_token(module, args, output):
    # The key/value of the start token get no gradient (the reference implementation does the same):
    # it is the same vector for every prompt and would otherwise pull the weights for all of them.
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of a matrix (up @ down) and the relative Frobenius error they leave."""
    delta = delta.double()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.numel())
    up, down = u[:, :r] * s[:r], vh[:r]
    norm = torch.linalg.matrix_norm(delta)
    error = torch.linalg.matrix_norm(delta - up @ down) / norm if norm > 0 else torch.zeros(())
    return up.float(), down.float(), float(error)


class CustomDiffusion(Method):
    """Cross-attention K/V (or all cross-attention projections) plus modifier-token embeddings."""

    name = "custom_diffusion"
    defaults = {**Method.defaults, "learning_rate": 1e-5, "scale_lr": True, "max_train_steps": 250,
                "train_batch_size": 2, "num_class_images": 200, "augment": "on"}
    new_tokens = True
    # The closed-form merge of several artifacts and the retrieval of real class images are its own.
    commands = ("dreamtune.merge", "dreamtune.data.retrieval")

    @dataclass
    class Options:
        """[custom_diffusion] (the same names were flat keys in earlier versions)."""

        train_params: str = opt("crossattn_kv", "Cross-attention key/value projections ('crossattn_kv') or all cross-attention projections ('crossattn').", choices=tuple(TRAIN_PARAMS))
        compress_rank: int = opt(0, "Keep only the top singular values of each weight delta in the artifact (0: full).", min=0)

    def __init__(self, config):
        super().__init__(config)
        self.projections: list[str] = []
        self.base_weights: dict[str, torch.Tensor] = {}
        self.initializers: dict[str, str] = {}
        #: Trainable modifier-token rows per text-encoder label (SDXL: clip_l and clip_g).
        self.token_rows: dict[str, TrainableTokens] = {}
        self._tokenizer = None
        self._hooks: list = []

    # --- training -------------------------------------------------------------------------
    def prepare(self, components: Components, concepts: list) -> list[dict]:
        unet = components.unet
        if self.options.compress_rank and self.options.train_params != "crossattn_kv":
            raise ConfigError("compress_rank: only with train_params = 'crossattn_kv' (the K/V weight changes).")
        for module in (components.vae, unet, *components.text_encoders):
            module.requires_grad_(False)
        self.projections = trained_projections(unet, self.options.train_params)
        unet_params = []
        for path in self.projections:
            module = unet.get_submodule(path)
            for pname, param in module.named_parameters():
                param.requires_grad_(True)
                unet_params.append(param)
                self.base_weights[f"{path}.{pname}"] = param.detach().float().cpu().clone()
            if path.endswith(("to_k", "to_v")):
                self._hooks.append(module.register_forward_hook(_detach_start_token))

        for c in concepts:
            if not is_new_token(c.config.identifier):
                logger.warning(
                    "custom_diffusion: identifier '%s' is an existing word, so no modifier token is learned; "
                    "Custom Diffusion uses a new token such as identifier = '<new1>'.", c.config.identifier)
        self.initializers = initializers([c for c in concepts if is_new_token(c.config.identifier)])
        self.tokens = list(self.initializers)
        text_params = []
        if self.tokens:
            # The modifier token is a new word in every text encoder (SDXL: both).
            for label, tokenizer, encoder in components.encoder_slots():
                ids = add_tokens(tokenizer, encoder, self.tokens, list(self.initializers.values()))
                self.token_rows[label] = TrainableTokens(encoder, ids)
                text_params.append(self.token_rows[label].weight)
            self._tokenizer = components.tokenizer
        total = sum(p.numel() for p in unet.parameters())
        trained = sum(p.numel() for p in unet_params)
        logger.info("custom_diffusion: training %d UNet parameters (%.2f%% of %d) in %d projections; new tokens: %s",
                    trained, 100 * trained / total, total, len(self.projections), ", ".join(self.tokens) or "none")
        return self.param_groups(unet_params, text_params)

    def frozen_prompt(self, prompt: str) -> bool:
        """True for prompts without a modifier token: no trained tensor reaches their text embedding."""
        if not self.token_rows:
            return True
        ids = set(self._tokenizer(prompt, truncation=True, max_length=self._tokenizer.model_max_length).input_ids)
        return not ids & set(next(iter(self.token_rows.values())).token_ids)

    # --- artifacts ------------------------------------------------------------------------
    def trained_weights(self, components: Components) -> dict[str, torch.Tensor]:
        """The trained projection tensors by UNet parameter name (float32 CPU copies)."""
        unet = components.unet
        return {f"{path}.{pname}": p.detach().float().cpu().clone()
                for path in self.projections for pname, p in unet.get_submodule(path).named_parameters()}

    def token_embeddings(self) -> dict[str, dict[str, torch.Tensor]]:
        """The modifier tokens' trained embeddings per text-encoder label (float32 CPU copies)."""
        out: dict[str, dict[str, torch.Tensor]] = {t: {} for t in self.tokens}
        for label, token_rows in self.token_rows.items():
            rows = token_rows.state()
            for token, token_id in zip(self.tokens, token_rows.token_ids):
                out[token][label] = rows[token_id]
        return out

    def save_artifact(self, components: Components, folder: Path, meta: dict) -> None:
        from ..artifacts import safetensors_metadata
        from ..io import save_safetensors

        folder = Path(folder)
        weights = self.trained_weights(components)
        meta.update({"train_params": self.options.train_params, "initializers": self.initializers,
                     "token_files": {t: f"{t}.safetensors" for t in self.tokens}})
        if self.options.compress_rank:
            state, report = compress(weights, self.base_weights, self.options.compress_rank)
            meta.update({"weight_file": LORA_WEIGHT_NAME, "compression": report})
            logger.info("custom_diffusion: rank-%d weight changes, relative error %.3g (worst layer %.3g)",
                        report["rank"], report["relative_error"], report["max_layer_relative_error"])
            save_safetensors(state, folder / LORA_WEIGHT_NAME, safetensors_metadata({**meta, "format": "pt"}))
        else:
            meta["weight_file"] = WEIGHT_NAME
            save_safetensors(diffusers_state_dict(components.unet, weights), folder / WEIGHT_NAME,
                             safetensors_metadata({**meta, "format": "pt"}))
        save_token_files(self.token_embeddings(), folder)

    @classmethod
    def detect(cls, path: Path):
        """What diffusers' train_custom_diffusion.py writes: the weights file and one `<token>.bin` per modifier
        token (safetensors content despite the name)."""
        from ..artifacts import foreign_artifact

        if not (path.is_dir() and (path / WEIGHT_NAME).is_file()):
            return None
        files = {f.stem: f.name for f in sorted(path.iterdir())
                 if f.suffix in (".bin", ".safetensors") and is_new_token(f.stem)}
        return foreign_artifact(path, cls.name, tokens=list(files), weight_file=WEIGHT_NAME, token_files=files,
                                train_params="crossattn_kv")

    @classmethod
    def apply_artifact(cls, pipe, folder: Path) -> None:
        """Load the tokens with `load_textual_inversion` and the weights with `load_attn_procs` (or LoRA)."""
        from ..artifacts import read_artifact

        info = read_artifact(folder)
        folder = info.path
        full_weights = info.extra.get("weight_file", WEIGHT_NAME) == WEIGHT_NAME and (folder / WEIGHT_NAME).is_file()
        if full_weights:
            from diffusers.models.attention_processor import (
                CustomDiffusionAttnProcessor,
                CustomDiffusionAttnProcessor2_0,
            )

            kinds = (CustomDiffusionAttnProcessor, CustomDiffusionAttnProcessor2_0)
            if any(isinstance(p, kinds) and p.train_kv for p in pipe.unet.attn_processors.values()):
                raise ModelLoadError(
                    f"{folder}: the pipeline already holds Custom Diffusion weights; two such artifacts replace each "
                    "other's weights. Combine them with `dreamtune merge` and load the merged artifact.")
        load_token_files(pipe, token_files(info))
        if full_weights:
            from safetensors.torch import load_file

            # diffusers' own script stores the trained (cross-attention) processors only, and diffusers'
            # load_attn_procs then refuses the file because the processor count does not match the
            # attention layers; every other layer gets an empty entry, as dreamtune's own files hold.
            state = diffusers_state_dict(pipe.unet, weights_from_diffusers(load_file(folder / WEIGHT_NAME)))
            pipe.unet.load_attn_procs(state, _pipeline=pipe)
            use_fused_attention(pipe.unet)
        elif (folder / LORA_WEIGHT_NAME).is_file():
            pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHT_NAME,
                                   adapter_name=f"custom_diffusion_{len(getattr(pipe.unet, 'peft_config', {}) or {})}")
        else:
            raise ModelLoadError(f"{folder}: no {WEIGHT_NAME} or {LORA_WEIGHT_NAME}; the artifact is incomplete.")


def use_fused_attention(unet) -> None:
    """Swap the processors diffusers' `load_attn_procs` installs for their `scaled_dot_product_attention` twins.

    In diffusers 0.42.1 the loader puts `CustomDiffusionAttnProcessor`, which writes attention out as
    matrix products, on every attention layer, self-attention included. Trained layers get
    `CustomDiffusionAttnProcessor2_0` holding the same weights, the others the default
    `AttnProcessor2_0`: the same images to float rounding, sampled about 1.5x as fast (see
    `benchmarks/custom_diffusion_attention.py`).
    """
    from diffusers.models.attention_processor import (
        AttnProcessor2_0,
        CustomDiffusionAttnProcessor,
        CustomDiffusionAttnProcessor2_0,
    )

    processors = {}
    for name, processor in unet.attn_processors.items():
        if isinstance(processor, CustomDiffusionAttnProcessor):
            if processor.train_kv or processor.train_q_out:
                weight = next(processor.parameters())
                fused = CustomDiffusionAttnProcessor2_0(
                    train_kv=processor.train_kv, train_q_out=processor.train_q_out,
                    hidden_size=processor.hidden_size, cross_attention_dim=processor.cross_attention_dim)
                fused.load_state_dict(processor.state_dict())
                processor = fused.to(device=weight.device, dtype=weight.dtype)
            else:
                processor = AttnProcessor2_0()
        processors[name] = processor
    unet.set_attn_processor(processors)


def diffusers_state_dict(unet, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trained projections (UNet parameter names) -> the key layout of diffusers' Custom Diffusion files.

    Every attention processor of the UNet gets an entry: the trained ones their projections, the
    others an empty tensor, so that `load_attn_procs` installs a processor for each layer.
    """
    state: dict[str, torch.Tensor] = {}
    trained_layers = set()
    for name, tensor in weights.items():
        module_path, pname = name.rsplit(".", 1)
        for proj, proc_name in PROCESSOR_NAMES.items():
            if module_path.endswith("." + proj):
                layer = module_path[: -len(proj) - 1]
                state[f"{layer}.processor.{proc_name}.{pname}"] = tensor
                trained_layers.add(layer)
                break
        else:
            raise ValueError(f"not a cross-attention projection: {name}")
    for proc in unet.attn_processors:
        if proc[: -len(".processor")] not in trained_layers:
            state[proc] = torch.zeros(0)
    return state


def weights_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `diffusers_state_dict`: UNet parameter names -> tensors (empty entries dropped)."""
    weights = {}
    for key, tensor in state.items():
        if tensor.numel() == 0:
            continue
        for proj, proc_name in PROCESSOR_NAMES.items():
            marker = f".processor.{proc_name}."
            if marker in key:
                layer, pname = key.split(marker)
                weights[f"{layer}.{proj}.{pname}"] = tensor
                break
    return weights


def compress(weights: dict[str, torch.Tensor], base_weights: dict[str, torch.Tensor],
             rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Weight changes -> rank-`rank` LoRA tensors (diffusers/peft names) and an error report."""
    state, errors, squared_total, squared_error, params = {}, {}, 0.0, 0.0, 0
    for name, weight in weights.items():
        module_path = name.rsplit(".", 1)[0]
        delta = weight.double() - base_weights[name].double()
        up, down, error = low_rank(delta, rank)
        state[f"unet.{module_path}.lora_A.weight"] = down
        state[f"unet.{module_path}.lora_B.weight"] = up
        errors[module_path] = error
        norm2 = float(torch.linalg.matrix_norm(delta) ** 2)
        squared_total += norm2
        squared_error += norm2 * error**2
        params += up.numel() + down.numel()
    total = (squared_error / squared_total) ** 0.5 if squared_total > 0 else 0.0
    report = {"rank": rank, "relative_error": total, "max_layer_relative_error": max(errors.values(), default=0.0),
              "layer_relative_error": errors, "parameters": params}
    return state, report


def save_token_files(embeddings: dict[str, dict[str, torch.Tensor]], folder: Path) -> None:
    """One `<token>.safetensors` per token, in the layout `load_token_files` (diffusers' loader) reads.

    `embeddings` maps each token to its row per text-encoder label. With one encoder the file is
    `{token: row}`; with several (SDXL) `{"clip_l": (1, 768), "clip_g": (1, 1280)}`.
    """
    for token, rows in embeddings.items():
        rows = rows if len(rows) == 1 else {label: row.reshape(1, -1) for label, row in rows.items()}
        save_token_file(Path(folder) / f"{token}.safetensors", token, rows)


def token_files(info) -> dict[str, Path]:
    """Each modifier token's embedding file in an artifact (`<token>.safetensors`, as the metadata lists)."""
    files = info.extra.get("token_files") or {t: f"{t}.safetensors" for t in info.tokens}
    return {t: info.path / files[t] for t in info.tokens}
