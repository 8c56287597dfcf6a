"""The Method protocol: which parameters train, how their state is saved, how it goes back into a pipeline.

A method sees the base model's components and the concepts, marks what trains and returns the
optimizer's parameter groups; the one training loop (dreamtune.training) does the rest. Each method
lives in its own module and is registered in `dreamtune.methods.METHODS`; the class attributes below
are what the rest of dreamtune (config, CLI, bench, export, pipeline) asks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..config import TrainConfig


@dataclass
class Components:
    """The parts of a Stable Diffusion pipeline that training touches."""

    pipe: Any
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    noise_scheduler: Any
    base_model: str

    @classmethod
    def from_pipeline(cls, pipe, base_model: str) -> Components:
        from diffusers import DDPMScheduler

        missing = [n for n in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, n, None) is None]
        if missing or getattr(pipe, "text_encoder_2", None) is not None:
            raise NotImplementedError(
                f"{base_model}: {type(pipe).__name__} is not a Stable Diffusion 1.x/2.x pipeline; training supports those for now."
            )
        # Training noise follows the base's own schedule and prediction type, in DDPM form.
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        return cls(pipe, pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, noise_scheduler, base_model)

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
        return any(p.requires_grad for p in components.text_encoder.parameters())

    def frozen_prompt(self, prompt: str) -> bool:
        """True when nothing that trains affects this prompt's text embedding, so it can be cached.

        Asked only when the text encoder takes part in training: a method that trains new token
        rows alone answers True for prompts without those tokens (e.g. the class prompts).
        """
        return False

    def trainable_state(self, components: Components) -> dict[str, torch.Tensor]:
        """The trained tensors, for checkpoints (unet.* and text_encoder.* names)."""
        state = {f"unet.{n}": p.detach() for n, p in trainable_parameters(components.unet).items()}
        state.update({f"text_encoder.{n}": p.detach() for n, p in trainable_parameters(components.text_encoder).items()})
        return state

    @torch.no_grad()
    def load_trainable_state(self, components: Components, state: dict[str, torch.Tensor]) -> None:
        """Put checkpointed tensors back (the inverse of `trainable_state`)."""
        params = {f"unet.{n}": p for n, p in components.unet.named_parameters()}
        params.update({f"text_encoder.{n}": p for n, p in components.text_encoder.named_parameters()})
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
