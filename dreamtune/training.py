"""The one training loop, for every method.

Each optimizer step does, in order: take the step's examples (instance half, class half), encode
them to latents and text embeddings (from the caches when nothing random changes them), add noise
at random timesteps, predict it with the UNet, take the masked MSE of each half and add them with
the prior weight, backpropagate, clip, step. Around that: checkpoints, validation grids and logs.

Randomness is keyed by (seed, example index), not drawn from a running generator, so a resumed run,
a run on several processes and an uninterrupted one train on the same noise and the same examples.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoints import (
    apply_optimizer_settings,
    latest_checkpoint,
    load_checkpoint,
    optimizer_settings,
    prune_checkpoints,
    save_checkpoint,
)
from .config import TrainConfig, config_to_toml
from .data.concepts import load_concept
from .data.dataset import (
    Example,
    TrainData,
    class_image_counts,
    keyed_generator,
    make_buckets,
    nearest_bucket,
)
from .data.priors import default_class_dir, generate_class_images, has_captions, load_class_images
from .diskcache import DiskCache, default_cache_dir, fingerprint, tensor_bytes
from .errors import ConfigError, TrainingDiverged, TrainingStopped
from .families import PromptEmbeds, tokenize
from .io import write_text
from .logs import MetricsLog
from .methods import Components, Method, get_method
from .pipeline import load_base, load_vae
from .preflight import check_loaded_model, check_train_config, checkpoint_bytes, warn_if_disk_is_short
from .runfolder import (
    RunPlan,
    check_resume_config,
    clear_run,
    config_toml_with_history,
    plan_run,
    remove_run_leftovers,
    run_lock,
)
from .tokens import check_identifier

logger = logging.getLogger(__name__)

RUN_ENTRIES = frozenset({"config.toml", "checkpoints", "samples", "logs", "artifact", "eval"})


@dataclass
class RunResult:
    """What `train` returns: where things are and how the loss went."""

    output_dir: Path
    artifact_dir: Path
    #: The loss of each step this process ran (a resumed run: the steps after the checkpoint).
    losses: list[float] = field(default_factory=list)
    #: The trained pipeline, still in memory.
    pipeline: object = field(default=None, repr=False)
    #: True when `--resume latest` found the run already finished and changed nothing.
    already_finished: bool = False


def weight_dtype_of(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def set_attention(unet, kind: str) -> None:
    """Choose the attention kernel: PyTorch SDPA (diffusers' default), xformers, or the plain one."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if kind == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except (ModuleNotFoundError, ValueError) as e:
            raise ConfigError(f"attention = 'xformers': {e}. Install xformers or use attention = 'sdpa'.") from None
    else:
        unet.set_attn_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())


def learning_rates(config: TrainConfig, num_processes: int) -> tuple[float, float]:
    """The learning rates of the method's main parameters and of the text encoder's, scaled.

    The one place a learning rate is decided: `learning_rate` (the method's default unless set),
    `text_encoder_lr` for text-encoder groups when set, both multiplied by batch size x accumulation
    x processes when `scale_lr` is on.
    """
    scale = config.train_batch_size * config.gradient_accumulation_steps * num_processes if config.scale_lr else 1.0
    return config.learning_rate * scale, (config.text_encoder_lr or config.learning_rate) * scale


def make_optimizer(param_groups: list[dict], config: TrainConfig, num_processes: int) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW) over the method's parameter groups, at `learning_rates`."""
    main_lr, text_lr = learning_rates(config, num_processes)
    param_groups = [{"params": g["params"], "lr": text_lr if g.get("text_encoder") else main_lr} for g in param_groups]
    kwargs = dict(betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
                  eps=config.adam_epsilon)
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("use_8bit_adam needs bitsandbytes: `pip install bitsandbytes` (CUDA), or turn the option off.") from None
        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    # The multi-tensor implementation is torch's default on CUDA only; on the CPU it is also faster
    # than one kernel per parameter (many small tensors in a UNet).
    return torch.optim.AdamW(param_groups, foreach=True, **kwargs)


class Encoder:
    """Turns examples into latents and prompts into embeddings, from caches when they are valid.

    The caches live in memory, or with `disk_cache` (a folder) on disk: then memory holds only each
    entry's name (see `dreamtune.diskcache`), and entries a previous run wrote are read, not recomputed.
    """

    def __init__(self, components: Components, data: TrainData, *, cache_latents: bool, cache_text: bool,
                 device, dtype, frozen_prompt=None, disk_cache: str | Path | None = None):
        self.c = components
        self.device, self.dtype = device, dtype
        self.scaling = components.vae.config.scaling_factor
        # Source key -> (mean, std) in memory, or the name of its entry on disk.
        self.latent_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor] | str] = {}
        # Prompt -> embeddings in memory, or the name of its entry on disk.
        self.text_cache: dict[str, PromptEmbeds | str] = {}
        self.cache_latents = cache_latents and data.deterministic
        cache_prompts = cache_text or frozen_prompt is not None
        self.latent_disk = self.text_disk = None
        if disk_cache is not None and self.cache_latents:
            self.latent_disk = DiskCache(disk_cache, "latents", fingerprint(components.vae))
        if disk_cache is not None and cache_prompts:
            self.text_disk = DiskCache(disk_cache, "text", components.family.name + fingerprint(*components.text_encoders))
        if self.cache_latents:
            for example in data.all_fixed_examples():
                self._cache_latents(example)
        if cache_prompts:
            # With new token rows training, prompts without those tokens still have fixed embeddings.
            prompts = [p for p in data.all_prompts() if cache_text or frozen_prompt(p)]
            names = {}
            if self.text_disk is not None:
                names = {p: self._text_entry(p) for p in prompts}
                self.text_cache.update({p: name for p, name in names.items() if name in self.text_disk})
                prompts = [p for p in prompts if p not in self.text_cache]
            for start in range(0, len(prompts), 32):
                chunk = prompts[start : start + 32]
                with torch.no_grad():
                    embeds = self.text(chunk)
                for i, p in enumerate(chunk):
                    self.text_cache[p] = self._store_text(names[p], embeds[i]) if names else embeds[i]

    @torch.no_grad()
    def _distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.c.vae.encode(pixels.to(self.device, self.c.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def _cache_latents(self, e: Example) -> None:
        """Encode one example alone (so a batch of cached ones matches) into the cache, or find it on disk."""
        if self.latent_disk is None:
            self.latent_cache[e.source] = self._distribution(e.pixels[None])
            return
        # What SDXL's micro-conditioning reads: original size, crop corner, target size (all height first).
        time_ids = torch.tensor([*e.original_size, *e.crop_top_left, *e.pixels.shape[-2:]], dtype=torch.int64)
        name = self.latent_disk.key(str(tuple(e.pixels.shape)), tensor_bytes(e.pixels), tensor_bytes(time_ids))
        if name not in self.latent_disk:
            mean, std = self._distribution(e.pixels[None])
            self.latent_disk.save(name, {"mean": mean, "std": std, "time_ids": time_ids})
        self.latent_cache[e.source] = name

    def _cached_latents(self, source: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.latent_cache[source]
        if isinstance(entry, str):
            tensors = self.latent_disk.load(entry, self.device)
            return tensors["mean"], tensors["std"]
        return entry

    def _text_entry(self, prompt: str) -> str:
        """The disk entry name of a prompt: its token ids under every tokenizer."""
        return self.text_disk.key(*[tensor_bytes(tokenize(tok, [prompt])) for tok in self.c.tokenizers])

    def _store_text(self, name: str, embeds: PromptEmbeds) -> str:
        tensors = {"embeds": embeds.embeds} | ({} if embeds.pooled is None else {"pooled": embeds.pooled})
        self.text_disk.save(name, tensors)
        return name

    def _cached_text(self, prompt: str) -> PromptEmbeds:
        entry = self.text_cache[prompt]
        if isinstance(entry, str):
            tensors = self.text_disk.load(entry, self.device)
            return PromptEmbeds(tensors["embeds"], tensors.get("pooled"))
        return entry

    def latents(self, examples: list[Example], gens: list[torch.Generator]) -> torch.Tensor:
        """Sampled VAE latents, scaled; the sampling noise comes from each example's generator."""
        if self.cache_latents:
            # Class images cropped to a bucket first met now; encoded alone, as the cached ones were.
            for e in examples:
                if e.source not in self.latent_cache:
                    self._cache_latents(e)
            cached = [self._cached_latents(e.source) for e in examples]
            mean, std = torch.cat([m for m, _ in cached]), torch.cat([s for _, s in cached])
        else:
            mean, std = self._distribution(torch.stack([e.pixels for e in examples]))
        eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens]).to(mean.device)
        return (mean + std * eps) * self.scaling

    def text(self, prompts: list[str], *, text_encoders=None) -> PromptEmbeds:
        """Prompt embeddings as the family computes them, from the cache when the text encoders are frozen."""
        cached = [p in self.text_cache for p in prompts]
        if all(cached):
            return PromptEmbeds.stack([self._cached_text(p) for p in prompts])
        fresh_prompts = [p for p, c in zip(prompts, cached) if not c]
        ids = [tokenize(tok, fresh_prompts).to(self.device) for tok in self.c.tokenizers]
        fresh = self.c.family.encode(ids, list(text_encoders or self.c.text_encoders))
        if not any(cached):
            return fresh
        rows = iter(range(len(fresh_prompts)))
        return PromptEmbeds.stack([self._cached_text(p).to(fresh.embeds.dtype) if c else fresh[next(rows)]
                                   for p, c in zip(prompts, cached)])


def diffusion_loss(unet, scheduler, latents, embeds, masks, gens, *, snr_gamma: float,
                   added_conditions: dict | None = None) -> torch.Tensor:
    """Per-example masked MSE between the UNet's prediction and the scheduler's target.

    `added_conditions` is the UNet's `added_cond_kwargs` for families that take them (SDXL).
    """
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(latents)
    t = torch.stack([torch.randint(0, scheduler.config.num_train_timesteps, (), generator=g) for g in gens])
    t = t.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    pred = unet(noisy.to(unet.dtype if hasattr(unet, "dtype") else latents.dtype), t, embeds,
                added_cond_kwargs=added_conditions).sample.float()
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    elif kind == "sample":
        target = latents
    else:
        target = noise
    error = F.mse_loss(pred, target.float(), reduction="none")
    mask = masks.expand_as(error)
    per_example = (error * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp(min=1.0)
    if snr_gamma > 0:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, t)
        weight = torch.minimum(snr, torch.full_like(snr, snr_gamma))
        per_example = per_example * (weight / (snr + 1) if kind == "v_prediction" else weight / snr)
    return per_example


def default_validation_prompts(concepts) -> list[str]:
    prompts = []
    for c in concepts:
        prompts += [c.config.prompt, c.config.class_prompt_text]
    return prompts


@dataclass
class Run:
    """What `setup` builds for the step loop: the prepared models, data, optimizer and where to write."""

    config: TrainConfig
    accelerator: Any
    output_dir: Path
    pipe: Any
    components: Components
    concepts: list
    method: Method
    data: TrainData
    encoder: Encoder
    #: The UNet and text encoders as the accelerator wrapped them (DDP on several processes).
    unet: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    trainable: list[torch.nn.Parameter]
    train_text: bool
    weight_dtype: torch.dtype
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    start_step: int
    validation_prompts: list[str]
    trackers: list[str] | None
    log: MetricsLog | None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def train(config: TrainConfig, *, overwrite: bool = False, resume: str | None = None,
          progress: bool = True, resume_with_changes: bool = False) -> RunResult:
    """Train one run as `config` says and write its run folder; returns where the artifact is.

    `resume` is "latest" or a checkpoint folder: training continues from there and ends with the
    same weights as an uninterrupted run. A resume whose config changes the result is refused unless
    `resume_with_changes`; `--resume latest` on a finished run changes nothing. One process at a time
    may write a run folder (an OS lock). Runs unchanged under `accelerate launch` and `torchrun`.
    Ctrl-C (or SIGTERM) during the steps ends the current step, writes a checkpoint and raises
    TrainingStopped; a second one stops at once.
    """
    output_dir = Path(config.output_dir).expanduser()
    check_train_config(config)
    # Launchers (torchrun, accelerate launch) set RANK; accelerate's own state is not made yet here, and
    # making it early would fix its settings before the Accelerator in setup chooses them.
    with run_lock(output_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext():
        run = setup(config, overwrite=overwrite, resume=resume, progress=progress,
                    resume_with_changes=resume_with_changes)
        if run is None:
            return RunResult(output_dir, output_dir / "artifact", already_finished=True)
        return finish(run, step_loop(run, progress=progress))


def step_loop(run: Run, *, progress: bool) -> list[float]:
    """The optimizer steps from the run's start to max_train_steps; returns each step's loss."""
    from tqdm.auto import tqdm

    config = run.config
    accelerator, optimizer, lr_scheduler = run.accelerator, run.optimizer, run.lr_scheduler
    losses: list[float] = []
    bar = tqdm(range(run.start_step, config.max_train_steps), initial=run.start_step, total=config.max_train_steps,
               desc=config.method, disable=not (progress and run.main))
    loop_start = time.perf_counter()
    with StopRequest() as stop:
        for step in bar:
            t0 = time.perf_counter()
            step_loss = forward_backward(run, step)
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(run.trainable, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            run.method.after_step(run.components)
            global_step = step + 1
            losses.append(step_loss[0].item())
            if run.main and (global_step % config.logging_steps == 0 or global_step == config.max_train_steps):
                log_step(run, global_step, step_loss, step_time=time.perf_counter() - t0,
                         wall_time=time.perf_counter() - loop_start)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            checkpointed = _every(config.checkpointing_steps, global_step, config.max_train_steps)
            if checkpointed:
                write_checkpoint(run, global_step)
            if _every(config.validation_steps, global_step, config.max_train_steps):
                if run.main:
                    run_validation(run.components, run.validation_prompts, config, run.output_dir, global_step,
                                   accelerator)
                accelerator.wait_for_everyone()
            # Checked once the step's own checkpoint and grid are written, so a resumed run repeats nothing.
            if global_step < config.max_train_steps and stop.requested_anywhere(accelerator):
                bar.close()
                stop_at(run, global_step, checkpointed=checkpointed)
    bar.close()
    return losses


def write_checkpoint(run: Run, step: int) -> None:
    """Save checkpoint-`step` (main process) and prune old ones to checkpoints_total_limit."""
    if run.main:
        save_checkpoint(run.output_dir, step, run.method, run.components, run.optimizer, run.lr_scheduler)
        prune_checkpoints(run.output_dir, run.config.checkpoints_total_limit)
    run.accelerator.wait_for_everyone()


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM during the step loop: finish the step, write a checkpoint, then stop.

    A second signal stops at once, as Ctrl-C usually does. Handlers can only be set from the main
    thread; elsewhere (a notebook's worker, a UI thread) signals keep their usual meaning.
    """

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stopping: the current step ends and a checkpoint is written (a second Ctrl-C stops at once)")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested_anywhere(self, accelerator) -> bool:
        """Whether any process was asked to stop: a signal may reach one process only, and all stop together."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def stop_at(run: Run, step: int, *, checkpointed: bool) -> None:
    """Write checkpoint-`step` (unless this step already did) and raise TrainingStopped naming it."""
    if not checkpointed:
        write_checkpoint(run, step)
    checkpoint = run.output_dir / "checkpoints" / f"checkpoint-{step}"
    raise TrainingStopped(f"stopped at step {step} of {run.config.max_train_steps}; checkpoint {checkpoint}. "
                          "Continue with `dreamtune train ... --resume latest`.")


def _every(interval: int, step: int, last: int) -> bool:
    """True at every `interval`-th step before the last (0: never); the last step has its own saving."""
    return bool(interval) and step % interval == 0 and step < last


def forward_backward(run: Run, step: int) -> torch.Tensor:
    """One optimizer step's losses (total, instance, prior), backpropagated and averaged over processes.

    The step's examples are keyed by their index in the whole run: micro-batch m of process r takes
    the `train_batch_size` indices that follow all earlier micro-batches of all processes, and the
    class half takes the same indices from the class images, cropped to the instance half's size
    (its bucket, when bucketing).
    """
    config, accelerator = run.config, run.accelerator
    batch, accum, world = config.train_batch_size, config.gradient_accumulation_steps, accelerator.num_processes
    prior = config.with_prior_preservation
    step_loss = torch.zeros(3, device=accelerator.device)
    for micro in range(accum):
        ks, examples = run.data.instance_batch(step * accum + micro, batch, accelerator.process_index, world)
        gens = [keyed_generator(config.seed, "instance", k) for k in ks]
        if prior:
            size = (examples[0].pixels.shape[-1], examples[0].pixels.shape[-2])
            examples += [run.data.prior(k, size) for k in ks]
            gens += [keyed_generator(config.seed, "prior", k) for k in ks]
        sync = micro == accum - 1
        with (nullcontext() if sync else accelerator.no_sync(run.unet)), accelerator.autocast():
            latents = run.encoder.latents(examples, gens)
            prompt = run.encoder.text([e.prompt for e in examples], text_encoders=run.text_encoders)
            if not run.train_text:
                prompt = prompt.to(run.weight_dtype)
            added = run.components.family.added_conditions(prompt, examples, prompt.embeds.dtype)
            masks = torch.stack([e.mask if e.mask is not None else torch.ones(1, *latents.shape[2:]) for e in examples])
            per_example = diffusion_loss(run.unet, run.components.noise_scheduler, latents, prompt.embeds,
                                         masks.to(latents.device), gens, snr_gamma=config.snr_gamma,
                                         added_conditions=added)
            instance_loss = per_example[:batch].mean()
            prior_loss = per_example[batch:].mean() if prior else torch.zeros_like(instance_loss)
            loss = instance_loss + config.prior_loss_weight * prior_loss
            accelerator.backward(loss / accum)
        step_loss += torch.stack([loss.detach(), instance_loss.detach(), prior_loss.detach()]) / accum
    step_loss = accelerator.reduce(step_loss, reduction="mean")
    if not torch.isfinite(step_loss).all():
        last = latest_checkpoint(run.output_dir)
        raise TrainingDiverged(
            f"the loss became {step_loss[0].item()} at step {step + 1}; the weights were not updated. "
            + (f"The last good checkpoint is {last}. " if last else "")
            + "Lower learning_rate, or use mixed_precision = 'bf16' instead of 'fp16'."
        )
    return step_loss


def log_step(run: Run, step: int, step_loss: torch.Tensor, *, step_time: float, wall_time: float) -> None:
    """Append one row to logs/metrics.csv (and the tracker, when one is on)."""
    row = {"step": step, "loss": step_loss[0].item(), "instance_loss": step_loss[1].item(),
           "prior_loss": step_loss[2].item(), "lr": run.lr_scheduler.get_last_lr()[0],
           "step_time": step_time, "wall_time": wall_time}
    run.log.append(row)
    if run.trackers:
        run.accelerator.log(row, step=step)


def finish(run: Run, losses: list[float]) -> RunResult:
    """The last validation grid, the artifact and the loss curve (main process), then the result."""
    config, accelerator = run.config, run.accelerator
    artifact_dir = run.output_dir / "artifact"
    accelerator.wait_for_everyone()
    if run.main:
        if config.validation_steps:
            run_validation(run.components, run.validation_prompts, config, run.output_dir, config.max_train_steps,
                           accelerator)
        save_artifact(run.method, run.components, artifact_dir, config)
        run.log.plot(run.output_dir / "logs" / "loss.png")
    accelerator.wait_for_everyone()
    if run.trackers:
        accelerator.end_training()
    return RunResult(run.output_dir, artifact_dir, losses, run.pipe)


def setup(config: TrainConfig, *, overwrite: bool, resume: str | None, progress: bool,
          resume_with_changes: bool = False) -> Run | None:
    """Everything before the first step: accelerator, run folder, models, class images, method, data,
    encoder caches, optimizer and schedule, and the state of a resumed checkpoint.

    None when `resume` finds the run already finished (nothing is written then)."""
    from diffusers.optimization import get_scheduler

    output_dir = Path(config.output_dir).expanduser()
    accelerator, trackers = make_accelerator(config, output_dir)
    plan, changes = plan_run_folder(config, output_dir, accelerator, overwrite=overwrite, resume=resume,
                                    resume_with_changes=resume_with_changes)
    if plan.action == "finished":
        return None
    torch.manual_seed(config.seed)

    concepts = [load_concept(c, skip_bad_images=config.skip_bad_images, index=i) for i, c in enumerate(config.concepts)]
    pipe = load_base(config.pretrained_model_name_or_path, revision=config.revision, variant=config.variant,
                     single_file_config=config.single_file_config)
    if config.vae_path:
        pipe.vae = load_vae(config.vae_path)
    components = Components.from_pipeline(pipe, config.pretrained_model_name_or_path)
    check_loaded_model(config, components)
    for c in concepts:
        for warning in check_identifier(components.tokenizer, c.config.identifier):
            logger.warning(warning)
    # Class images are generated by the base model while it is still frozen.
    priors = prepare_priors(config, pipe, concepts, accelerator, progress=progress) if config.with_prior_preservation else None

    set_attention(components.unet, config.attention)
    method = get_method(config.method)(config)
    param_groups = method.prepare(components, concepts)
    if accelerator.is_main_process:
        trained = [p for g in param_groups for p in g["params"]]
        warn_if_disk_is_short(output_dir, checkpoint_bytes(trained, 2 if config.checkpointing_steps else 0))
    data = TrainData(concepts, priors, resolution=config.resolution, center_crop=config.center_crop,
                     random_flip=config.random_flip, augment=config.augment_enabled,
                     latent_scale=components.latent_scale, seed=config.seed, repeats=config.repeats,
                     bucketing=config.bucketing, bucket_step=config.bucket_step,
                     bucket_max_ratio=config.bucket_max_ratio, caption_dropout=config.caption_dropout,
                     keep_pixels=not config.cache_to_disk)
    weight_dtype = weight_dtype_of(config.mixed_precision)
    place_models(components, accelerator.device, weight_dtype, vae_fp32=config.vae_fp32)
    train_text = method.trains_text_encoder(components)
    if config.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        for text_model in components.text_encoders:
            if any(p.requires_grad for p in text_model.parameters()):
                text_model.gradient_checkpointing_enable()
    cache_text = config.cache_text_embeddings
    encoder = Encoder(components, data, cache_latents=config.cache_latents, cache_text=cache_text and not train_text,
                      frozen_prompt=method.frozen_prompt if cache_text and train_text else None,
                      device=accelerator.device, dtype=weight_dtype,
                      disk_cache=(config.cache_dir or default_cache_dir()) if config.cache_to_disk else None)

    optimizer = make_optimizer(param_groups, config, accelerator.num_processes)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=config.max_train_steps)
    unet, text_encoders, optimizer = prepare_for_accelerator(accelerator, components, optimizer, train_text)
    start_step = restore(plan.checkpoint, method, components, optimizer, lr_scheduler, new_settings=bool(changes))
    log = None
    if accelerator.is_main_process:
        write_text(output_dir / "config.toml",
                   config_toml_with_history(output_dir, config_to_toml(config), step=start_step, changes=changes))
        if trackers:
            accelerator.init_trackers("dreamtune", config={k: v for k, v in vars(config).items() if isinstance(v, (int, float, str, bool))})
        log = MetricsLog(output_dir / "logs" / "metrics.csv", start_step=start_step)
    validation_prompts = [concepts[0].config.format(p) for p in config.validation_prompts] or default_validation_prompts(concepts)
    return Run(config, accelerator, output_dir, pipe, components, concepts, method, data, encoder, unet, text_encoders,
               [p for g in param_groups for p in g["params"]], train_text, weight_dtype, optimizer, lr_scheduler,
               start_step, validation_prompts, trackers, log)


def make_accelerator(config: TrainConfig, output_dir: Path):
    """The Accelerator of a run and the trackers it logs to besides the CSV (None: none)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Several runs in one process (a benchmark, a notebook) may differ in mixed precision: accelerate
    # keeps one global state, so it is reset here; the process group itself (PartialState) is kept.
    AcceleratorState._reset_state()
    trackers = [config.report_to] if config.report_to in ("tensorboard", "wandb") else None
    accelerator = Accelerator(mixed_precision=config.mixed_precision, log_with=trackers,
                              project_dir=str(output_dir / "logs"))
    return accelerator, trackers


def prepare_priors(config: TrainConfig, pipe, concepts: list, accelerator, *, progress: bool) -> list:
    """Each concept's class images: real ones with captions, or generated (shared out over processes).

    Bucketed, they are generated at the sizes of the buckets the concept's images fall in, as many in
    each as its share of the concept's images (`class_image_counts`).
    """
    pipe.to(accelerator.device)
    sampling = dict(resolution=config.resolution, steps=config.class_generation_steps,
                    guidance=config.class_generation_guidance)
    buckets = make_buckets(config.resolution, config.bucket_step, config.bucket_max_ratio) if config.bucketing else None
    priors = []
    for c in concepts:
        folder = Path(c.config.class_data_dir).expanduser() if c.config.class_data_dir else \
            default_class_dir(config.pretrained_model_name_or_path, c.class_prompt, **sampling)
        sizes = None
        if not has_captions(folder):
            sizes = class_image_counts([nearest_bucket(buckets, *im.size) for im in c.images],
                                       config.num_class_images) if buckets else {None: config.num_class_images}
            for size, count in sizes.items():
                generate_class_images(pipe, c.class_prompt, folder, count, **sampling, size=size,
                                      batch_size=config.sample_batch_size, seed=config.seed,
                                      rank=accelerator.process_index, world_size=accelerator.num_processes,
                                      progress=progress and accelerator.is_main_process)
        accelerator.wait_for_everyone()
        priors.append(load_class_images(folder, c.class_prompt, config.num_class_images,
                                        prompt_source=config.class_prompt_source,
                                        skip_bad_images=config.skip_bad_images, sizes=sizes if buckets else None))
    return priors


def place_models(components: Components, device, weight_dtype: torch.dtype, *, vae_fp32: bool = False) -> None:
    """Move the models to the device; frozen weights take the mixed-precision dtype, trained ones stay float32.

    With `vae_fp32` the VAE stays float32 (SDXL's own VAE overflows in fp16).
    """
    for module in (components.unet, components.vae, *components.text_encoders):
        module.to(device)
        if module is components.vae and vae_fp32:
            module.to(torch.float32)
            continue
        for p in module.parameters():
            if not p.requires_grad and p.dtype != weight_dtype:
                p.data = p.data.to(weight_dtype)


def prepare_for_accelerator(accelerator, components: Components, optimizer, train_text: bool):
    """Wrap the trained models and the optimizer (DDP on several processes); returns (unet, text_encoders, optimizer)."""
    # DDP refuses a module with nothing to train (Textual Inversion's UNet), so only trained ones are wrapped.
    modules = [components.unet, *components.text_encoders]
    trained = [i for i, m in enumerate(modules) if any(p.requires_grad for p in m.parameters())]
    prepared = accelerator.prepare(*[modules[i] for i in trained], optimizer)
    prepared = prepared if isinstance(prepared, tuple) else (prepared,)
    for i, module in zip(trained, prepared[:-1]):
        modules[i] = module
    unet, text_encoders = modules[0], modules[1:]
    unet.train()
    for text_model in text_encoders if train_text else ():
        text_model.train()
    return unet, text_encoders, prepared[-1]


def plan_run_folder(config: TrainConfig, output_dir: Path, accelerator, *, overwrite: bool, resume: str | None,
                    resume_with_changes: bool) -> tuple[RunPlan, list]:
    """Decide from the run folder's state what this call may do, before anything is written.

    Leftovers of a killed process are removed first; a resume's config is compared with the run's
    (the changes it accepted are returned); a folder to start over is cleared last.
    """
    if accelerator.is_main_process:
        remove_run_leftovers(output_dir)
    accelerator.wait_for_everyone()
    plan = plan_run(output_dir, resume=resume, overwrite=overwrite)
    if plan.action == "finished":
        return plan, []
    if not config.concepts:
        raise ConfigError("no concepts: add a [[concepts]] table or pass --instance-data-dir and --class-noun.")
    changes = []
    if plan.checkpoint is not None:
        match = re.match(r"checkpoint-(\d+)$", plan.checkpoint.name)
        changes = check_resume_config(output_dir, config, step=int(match.group(1)) if match else 0,
                                      accept_changes=resume_with_changes)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and plan.clear:
        clear_run(output_dir, RUN_ENTRIES)
    accelerator.wait_for_everyone()
    return plan, changes


def restore(checkpoint: Path | None, method: Method, components: Components, optimizer, lr_scheduler, *,
            new_settings: bool = False) -> int:
    """Load a checkpoint and return its step (0 for a new run).

    With `new_settings` (a resume that accepted config changes), the optimizer keeps the
    checkpoint's moments but takes the new config's learning rate and other settings.
    """
    if checkpoint is None:
        return 0
    settings = optimizer_settings(optimizer)
    step = load_checkpoint(checkpoint, method, components, optimizer, lr_scheduler)
    if new_settings:
        apply_optimizer_settings(optimizer, lr_scheduler, settings)
    logger.info("resumed from %s at step %d", checkpoint, step)
    return step


def save_artifact(method, components: Components, artifact_dir: Path, config: TrainConfig) -> None:
    """Write the method's artifact and its metadata into `artifact_dir`, atomically."""
    from .artifacts import metadata, write_metadata
    from .io import atomic_dir

    meta = metadata(method.name, config.pretrained_model_name_or_path, method.tokens, family=components.family.name,
                    concepts=[{"identifier": c.identifier, "class_noun": c.class_noun, "instance_prompt": c.prompt}
                              for c in config.concepts])
    with atomic_dir(artifact_dir) as tmp:
        method.save_artifact(components, tmp, meta)
        write_metadata(tmp, meta)


@torch.no_grad()
def run_validation(components: Components, prompts: list[str], config: TrainConfig, output_dir: Path,
                   step: int, accelerator) -> Path:
    """Render the validation prompts with a fixed seed into samples/step-XXXXXX.png."""
    from .grid import image_grid
    from .io import save_image
    from .pipeline import sample

    modules = [components.unet, *components.text_encoders]
    was_training = [m.training for m in modules]
    for module in modules:
        module.eval()
    pipe = components.pipe
    pipe.set_progress_bar_config(disable=True)
    try:
        with accelerator.autocast():
            images = sample(pipe, prompts, num_images=config.num_validation_images, seed=config.seed,
                            steps=config.validation_inference_steps, guidance=config.validation_guidance_scale,
                            height=config.resolution, width=config.resolution)
    finally:
        for module, mode in zip(modules, was_training):
            module.train(mode)
    path = output_dir / "samples" / f"step-{step:06d}.png"
    save_image(image_grid(images, prompts, config.num_validation_images, title=f"step {step}"), path)
    return path

