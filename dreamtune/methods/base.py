"""The Method protocol: which parameters train, how their state is saved, how it goes back into a pipeline.

A method sees the base model's components and the concepts, marks what trains and returns the
optimizer's parameter groups; the one training loop (dreamtune.training) does the rest. Each method
lives in its own module and is registered in `dreamtune.methods.METHODS`; the class attributes below
are what the rest of dreamtune (config, CLI, bench, export, pipeline) asks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..config import TrainConfig
from ..errors import ModelLoadError


@dataclass
class Components:
    """The parts of a pipeline that training touches, and the model family that knows how to drive them.

    `text_encoders` and `tokenizers` are parallel lists in the family's order (one for SD 1.x/2.x,
    two for SDXL); `text_encoder_names` are their pipeline attributes, which also prefix their
    tensors in checkpoints and LoRA files. `text_encoder` and `tokenizer` are the first of each.
    """

    pipe: Any
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any
    base_model: str
    family: Any = None
    text_encoder_names: list = field(default_factory=lambda: ["text_encoder"])

    @classmethod
    def from_pipeline(cls, pipe, base_model: str) -> Components:
        from diffusers import DDPMScheduler

        from ..families import family_of

        family = family_of(pipe, base_model)
        slots = family.text_encoders
        missing = [n for n in ("unet", "vae", "scheduler", *(s.encoder for s in slots), *(s.tokenizer for s in slots))
                   if getattr(pipe, n, None) is None]
        if missing:
            raise ModelLoadError(f"{base_model}: the {family.title} pipeline has no {', '.join(missing)}; it cannot be trained.")
        # Training noise follows the base's own schedule and prediction type, in DDPM form.
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        return cls(pipe, pipe.unet, pipe.vae, [getattr(pipe, s.encoder) for s in slots],
                   [getattr(pipe, s.tokenizer) for s in slots], noise_scheduler, base_model, family,
                   [s.encoder for s in slots])

    @property
    def text_encoder(self) -> torch.nn.Module:
        """The first text encoder (the only one for SD 1.x/2.x)."""
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        """The first tokenizer (the only one for SD 1.x/2.x)."""
        return self.tokenizers[0]

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self.tokenizers[0] = value

    def named_text_encoders(self) -> list[tuple[str, torch.nn.Module]]:
        """(pipeline attribute, module) of each text encoder."""
        return list(zip(self.text_encoder_names, self.text_encoders))

    def encoder_slots(self) -> list[tuple[str, Any, torch.nn.Module]]:
        """(label, tokenizer, text encoder) of each text encoder; labels name them in shared files (clip_l, clip_g)."""
        return [(s.label, tok, enc) for s, tok, enc in zip(self.family.text_encoders, self.tokenizers, self.text_encoders)]

    @property
    def latent_scale(self) -> int:
        """Pixels per latent pixel (8 for Stable Diffusion)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def trainable_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The named parameters of a module that require gradients."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


class Method:
    """Base class of the personalization methods. Subclasses set `name` and override what differs."""

    name: ClassVar[str] = ""
    #: The method's own options: a dataclass of `dreamtune.config.opt` fields, read from the config's
    #: `[<name>]` table (the flat keys `<option>` and `<name>_<option>` are accepted too); None: none.
    Options: ClassVar[type | None] = None
    #: True when each concept's identifier is a new token such as <new1> whose embedding trains.
    new_tokens: ClassVar[bool] = False
    #: True when the artifact is a full diffusers pipeline that replaces the base model, rather than
    #: weights applied to one.
    full_pipeline_artifact: ClassVar[bool] = False
    #: The `dreamtune export --format` values its artifacts support.
    exports: ClassVar[tuple[str, ...]] = ()
    #: Modules that add the method's own subcommands through `register(subparsers)`.
    commands: ClassVar[tuple[str, ...]] = ()
    #: The values of the options the schema leaves to the method (`config.method_default_options()`).
    #: A subclass overrides some with `defaults = {**Method.defaults, ...}`.
    defaults: ClassVar[dict[str, Any]] = {
        "learning_rate": 5e-6, "scale_lr": False, "max_train_steps": 400, "train_batch_size": 1,
        "num_class_images": 100, "augment": "off",
    }

    def __init__(self, config: TrainConfig):
        self.config = config
        self.tokens: list[str] = []

    @property
    def options(self) -> Any:
        """The run's values of the method's own options (an instance of `Options`)."""
        return self.config.method_options

    # --- training -------------------------------------------------------------------------
    def prepare(self, components: Components, concepts: list) -> list[dict]:
        """Freeze what does not train, add what is new (tokens, adapters) and return parameter groups."""
        raise NotImplementedError

    def trains_text_encoder(self, components: Components) -> bool:
        """True when any text-encoder parameter trains (then prompts cannot be cached)."""
        return any(p.requires_grad for te in components.text_encoders for p in te.parameters())

    def frozen_prompt(self, prompt: str) -> bool:
        """True when nothing that trains affects this prompt's text embedding, so it can be cached.

        Asked only when the text encoder takes part in training: a method that trains new token
        rows alone answers True for prompts without those tokens (e.g. the class prompts).
        """
        return False

    def trainable_state(self, components: Components) -> dict[str, torch.Tensor]:
        """The trained tensors, for checkpoints (unet.*, text_encoder.* and text_encoder_2.* names)."""
        state = {f"unet.{n}": p.detach() for n, p in trainable_parameters(components.unet).items()}
        for prefix, encoder in components.named_text_encoders():
            state.update({f"{prefix}.{n}": p.detach() for n, p in trainable_parameters(encoder).items()})
        return state

    @torch.no_grad()
    def load_trainable_state(self, components: Components, state: dict[str, torch.Tensor]) -> None:
        """Put checkpointed tensors back (the inverse of `trainable_state`)."""
        params = {f"unet.{n}": p for n, p in components.unet.named_parameters()}
        for prefix, encoder in components.named_text_encoders():
            params.update({f"{prefix}.{n}": p for n, p in encoder.named_parameters()})
        for name, value in state.items():
            params[name].copy_(value)

    def after_step(self, components: Components) -> None:
        """Called after each optimizer step (e.g. to restore embedding rows that must not change)."""

    # --- artifacts ------------------------------------------------------------------------
    def save_artifact(self, components: Components, folder: Path, meta: dict) -> None:
        """Write the artifact's files into `folder` (dreamtune.json is written by the caller)."""
        raise NotImplementedError

    @classmethod
    def apply_artifact(cls, pipe, folder: Path) -> None:
        """Load an artifact (folder, or a file `detect` knows) into a pipeline in place, with diffusers' own loaders."""
        raise NotImplementedError

    @classmethod
    def detect(cls, path: Path):
        """The ArtifactInfo of weights another tool wrote in this method's kind (no dreamtune.json), else None.

        Recognised by content, so a user can sample, evaluate and merge what they trained elsewhere;
        see `dreamtune.artifacts.foreign_artifact`.
        """
        return None

    @staticmethod
    def param_groups(main_params, text_params=()) -> list[dict]:
        """The non-empty parameter groups: the method's main parameters, then the text encoder's.

        The optimizer gives the second group `text_encoder_lr` when one is set (see
        `dreamtune.training.make_optimizer`, the one place learning rates are decided).
        """
        groups = [{"params": list(main_params)}, {"params": list(text_params), "text_encoder": True}]
        return [g for g in groups if g["params"]]
