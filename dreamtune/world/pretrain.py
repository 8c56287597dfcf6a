"""Pretrain the shapes world's base model with the real Stable Diffusion component classes.

Three phases, each resumable from atomic safetensors checkpoints:
1. the VAE (AutoencoderKL, 32 px -> 16x16x4 latents) on world images, patterned ones included so it
   can reconstruct the subjects' patterns later;
2. the CLIP text encoder, contrastively against a small CLIP vision tower on world images and their
   captions (a caption counts as a match for every image it describes), as Stable Diffusion's text
   encoder was trained on image-text pairs before its UNet;
3. the UNet (UNet2DConditionModel) on plain and patterned world images and prompt-style captions,
   the text encoder frozen: v-prediction, a cosine ("squaredcos_cap_v2") schedule, a loss that weighs
   the object's latent pixels more than the background's, 10% caption dropout (for classifier-free
   guidance) and an EMA of the weights. The prompt reaches the UNet through cross-attention only,
   as in SD 1.x/2.x (`text_time_embedding=True` also feeds the pooled prompt into its time
   embedding, as SDXL does).

The result is a diffusers `StableDiffusionPipeline` folder (`<output_dir>/pipeline`) that
`StableDiffusionPipeline.from_pretrained` loads, with a DDIM scheduler set for 25-step sampling.
Every batch and every noise draw is a function of (seed, step), so a resumed run matches an
uninterrupted one.
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..assets import CLIP_TOKENIZER_DIR
from ..errors import DreamtuneError
from ..io import atomic_dir, save_safetensors, write_json
from . import render
from .scores import caption_attributes, caption_fits


@dataclass
class PretrainSettings:
    """Sizes and hyper-parameters of the base model and its training (saved with every checkpoint)."""

    seed: int = 0
    vae_steps: int = 1000
    unet_steps: int = 10000
    batch_size: int = 16
    vae_batch_size: int = 16
    vae_learning_rate: float = 1e-3
    learning_rate: float = 4e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    vae_patterned_share: float = 0.4
    ema_decay: float = 0.999
    # Min-SNR weighting starves the noisiest steps, where the prompt decides colour, background and
    # class: with it on, this model ignored its captions for 700 steps. Off (0) by default.
    snr_gamma: float = 0.0
    checkpoint_every: int = 250
    text_hidden_size: int = 96
    text_layers: int = 4
    unet_channels: tuple = (48, 96, 128)
    # Prompts padded to CLIP's 77 tokens, as Stable Diffusion's are.
    max_length: int = 77
    # Also feed the pooled prompt into the time embedding (diffusers' `addition_embed_type="text"`), as
    # SDXL does with its pooled text embedding; SD 1.x/2.x has no such path, and by default neither has
    # this UNet. With the text encoder trained first and frozen, the path costs generalisation: the same
    # 10,000-step run (seed 0) without it draws held-out colour-class pairs' class in 0.96 of images
    # against 0.77 with it, size 0.98 against 0.91, colour 0.84 against 0.80; seen pairs the same within
    # noise (8 images per prompt; see the model card). Likely because one vector for the whole prompt lets the UNet
    # recall seen pairs as wholes instead of composing words. (When the text encoder trained jointly with
    # the UNet, the path made colour and background learnable sooner; see the model card.)
    text_time_embedding: bool = False
    # Where attention sits. "sd": as in Stable Diffusion 1.x (every level but the lowest, plus the
    # middle block; here 16x16 and 8x8 latents); "low": the first version's 8x8 and 4x4 only.
    unet_layout: str = "sd"
    # With unet_layout "low": cross-attention at the 16x16 level too.
    attention_at_top: bool = False
    # Share of pretraining scenes (other than named instances) with a two-colour pattern (the subjects'
    # visual vocabulary). With a fifth of all scenes named instances, all patterned, 0.4 keeps about
    # half of all scenes patterned, as 0.5 did before named instances.
    pattern_share: float = 0.4
    # How rare words enter captions (`render.RARE_WORD_MODES`): "instances", a fifth of scenes are named
    # instances, each rare word always one patterned object, as web captions' names and brands are; or
    # "noise", a fifth of captions carry a random rare word that names nothing (runs before it). With
    # noise, the frozen text encoder learned to read "a sks star" as "a star" and DreamBooth could not
    # learn a subject without tuning it (see the model card).
    rare_words: str = "instances"
    # A plain first stage of the UNet phase: its first `plain_steps` steps see plain objects only, with
    # no named instances (so no rare word), as the first version of the shipped model was trained before
    # patterns came in; the rest of the phase sees the full world. Off: 3,000 plain steps (seed 0) gave
    # held-out colour 0.88 at step 3,000 against 0.79 for the same step without them, by drawing fewer
    # two-colour objects (0.16 against 0.47), but red rings, the pair the finished run misses, no better
    # (0.58 against 0.54; 8 images per prompt). See the model card.
    plain_steps: int = 0
    # Hard negatives in the text phase: beside each batch's captions, each caption that names its object's
    # colour also appears with another colour in its place ("a photo of an orange ring"), a caption that
    # fits no image of the batch unless one has that colour; the contrastive loss then has to tell colours
    # apart on the same class, not only tell classes apart (as NegCLIP's swapped captions do for a web
    # CLIP, whose text tower otherwise reads prompts as bags of words). Off: the text phase's zero-shot
    # colour accuracy stayed where it was (0.76 / 0.76 / 0.80 at steps 500 / 1,000 / 1,500, against 0.75 /
    # 0.77 / 0.78), and "a red ring" and "an orange ring" encode no further apart.
    text_negatives: bool = False
    # After its own phase the text encoder keeps learning with the UNet at this rate, from the diffusion
    # loss (0: frozen under the UNet, as Stable Diffusion's CLIP was). Frozen, a contrastive text encoder
    # left held-out colour at 0.85 (red rings drawn reddish orange: 0.50); learning on at 1e-4 (a quarter
    # of the UNet's rate), the same run (seed 0, 8 images per prompt) composes held-out pairs' colour in
    # 0.96 [0.91,1.00] of images, red rings 0.92, class 0.97, size 0.99. See the model card.
    text_joint_lr: float = 1e-4
    # Keep held-out colour-class pairs out of patterned scenes' second colours as well, so a held-out pair
    # is never drawn at all. Off: without it the model trained from scratch drew held-out pairs' colour in
    # 0.84 of images, its misses mostly two-colour objects, which suggested the leak; but with it, at step
    # 3,000 (seed 0, 16 images per prompt) held-out colour fell to 0.46 against 0.78, with more
    # two-colour objects (0.57 against 0.42): seeing a colour on the class as a second colour helps the
    # UNet draw it as the main one. (Its text phase also sees other batches.) See the model card.
    hold_out_second_colour: bool = False
    # Where the VAE comes from: "" trains one first (the VAE phase, on plain and patterned scenes);
    # "shipped" loads the shipped model's VAE, or a pipeline/VAE folder, and skips that phase.
    vae_from: str = ""
    # Start the UNet and text encoder from another world pipeline folder (continued pretraining): every
    # tensor whose name and shape match is copied; attention blocks the other model lacks start as the
    # identity (their output projection zeroed), so the copy first behaves as its source's layers do.
    init_from: str = ""
    # Loss weight of latent pixels on and next to the object (background pixels weigh 1). Objects
    # cover 5-15% of an image, so a plain loss learns backgrounds first and shapes last.
    # It may change between resumed parts of a run.
    object_weight: float = 5.0
    # The text phase: the CLIP text encoder is first trained contrastively against a small CLIP vision
    # tower on world images and captions (as Stable Diffusion's text encoder was trained on web pairs
    # before the UNet saw it), then frozen while the UNet learns. 0 trains it jointly with the UNet
    # instead, as the earlier recipes did.
    text_steps: int = 1500
    text_batch_size: int = 64
    text_learning_rate: float = 1e-3

    def __post_init__(self):
        self.unet_channels = tuple(self.unet_channels)  # JSON gives back a list


# What runs saved before a setting existed used instead of it.
_EARLIER_DEFAULTS = {"max_length": 77, "text_time_embedding": False, "attention_at_top": False, "object_weight": 1.0,
                     "unet_layout": "low", "pattern_share": 0.0, "vae_from": "", "init_from": "", "text_steps": 0,
                     "hold_out_second_colour": False, "rare_words": "noise",
                     "plain_steps": 0, "text_negatives": False,
                     "text_joint_lr": 0.0}


def _scene_batch(settings: PretrainSettings, stream: int, index: int, size: int, plain: bool = False):
    """Batch `index` of a captioned scene stream as the text and UNet phases see it (the settings' pattern
    share, held-out rule and rare words; with `plain`, plain objects without names): (uint8 images,
    captions, scenes)."""
    if plain:
        return render.training_batch(stream, index, size, rare_words_mode=settings.rare_words, named_share=0.0)
    return render.training_batch(stream, index, size, pattern_share=settings.pattern_share,
                                 hold_out_second_colour=settings.hold_out_second_colour,
                                 rare_words_mode=settings.rare_words)


def _saved_settings(state_file: Path) -> PretrainSettings:
    """The settings a checkpoint (or a pipeline's `SETTINGS_FILE`) was trained with; settings added later
    take the value runs had before, and a missing file reads as a run from before them all."""
    saved = {**_EARLIER_DEFAULTS, **(json.loads(state_file.read_text())["settings"] if state_file.exists() else {})}
    known = set(asdict(PretrainSettings()))
    return PretrainSettings(**{k: v for k, v in saved.items() if k in known})


def build_components(settings: PretrainSettings) -> dict:
    """Freshly initialised VAE, text encoder, tokenizer, UNet and training scheduler of the base model."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(settings.seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=render.RESOLUTION,
    )
    hidden = settings.text_hidden_size
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden,
            intermediate_size=hidden * 4,
            num_hidden_layers=settings.text_layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=hidden,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, local_files_only=True,
                                              model_max_length=settings.max_length)
    channels = tuple(settings.unet_channels)
    extra = {"addition_embed_type": "text", "addition_embed_type_num_heads": 4} if settings.text_time_embedding else {}
    if settings.unet_layout == "sd":
        down = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
        up = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    elif settings.unet_layout == "low":
        top = "CrossAttn" if settings.attention_at_top else ""
        down = (f"{top}DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
        up = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", f"{top}UpBlock2D")
    else:
        raise DreamtuneError(f"pretrain: unet_layout must be 'sd' or 'low', got {settings.unet_layout!r}")
    unet = UNet2DConditionModel(
        sample_size=render.RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=hidden,
        attention_head_dim=4,
        norm_num_groups=16,
        **extra,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
    )
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet, "scheduler": scheduler}


def sampling_scheduler():
    """The scheduler shipped with the model: DDIM, "trailing" spacing, v-prediction, for 25 steps."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=0,
        timestep_spacing="trailing",
    )


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            tensors[f"{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params, lr: float) -> None:
    """One step at learning rate `lr`, gradients clipped to norm 1."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


def _save_phase(run_dir: Path, phase: str, step: int, tensors: dict[str, dict], optimizer, settings,
                extra: dict | None = None) -> None:
    """Checkpoint a phase: its tensors, its optimizer state and the settings."""
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    _save_checkpoint(run_dir / "checkpoints", phase, step, {**tensors, "optimizer": opt_tensors}, settings,
                     {"optimizer": opt_meta, **(extra or {})})


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)


class _Stopwatch:
    def __init__(self, minutes: float | None, steps: int | None = None):
        self.deadline = None if minutes is None else time.monotonic() + 60.0 * minutes
        self.steps_left = steps

    def tick(self) -> None:
        if self.steps_left is not None:
            self.steps_left -= 1

    def expired(self) -> bool:
        if self.steps_left is not None and self.steps_left <= 0:
            return True
        return self.deadline is not None and time.monotonic() > self.deadline


def _save_checkpoint(folder: Path, phase: str, step: int, tensors: dict[str, dict], settings, extra=None) -> None:
    with atomic_dir(folder / f"{phase}") as tmp:
        for name, group in tensors.items():
            save_safetensors(group, tmp / f"{name}.safetensors")
        write_json(tmp / "state.json", {"phase": phase, "step": step, "settings": asdict(settings), **(extra or {})})


def _read_checkpoint(folder: Path) -> tuple[dict, dict[str, dict]] | None:
    from safetensors.torch import load_file

    state_file = folder / "state.json"
    if not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    tensors = {p.stem: load_file(str(p)) for p in folder.glob("*.safetensors")}
    return state, tensors


def _restore(folder: Path, resume: bool, optimizer, modules: dict) -> tuple[int, dict]:
    """Load a phase's checkpoint into its modules and optimizer; returns (step, all saved tensors)."""
    found = _read_checkpoint(folder) if resume else None
    if not found:
        return 0, {}
    state, tensors = found
    for name, module in modules.items():
        module.load_state_dict(tensors[name])
    _load_optimizer(optimizer, tensors["optimizer"], state["optimizer"])
    return state["step"], tensors


def train_vae(components: dict, settings: PretrainSettings, run_dir: Path, *, resume: bool, progress: bool,
              stopwatch: _Stopwatch, log) -> bool:
    """Phase 1: the autoencoder. Returns True when all its steps are done."""
    vae = components["vae"]
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_learning_rate, weight_decay=0.0)
    folder = run_dir / "checkpoints" / "vae"
    start, _ = _restore(folder, resume, optimizer, {"vae": vae})
    if start >= settings.vae_steps:
        return True
    vae.train()
    bar = _progress(settings.vae_steps, start, "vae", progress)
    step = start
    while step < settings.vae_steps:
        images, _, _ = render.training_batch(settings.seed + 1000, step, settings.vae_batch_size,
                                             settings.vae_patterned_share)
        pixels = _to_tensor(images)
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        mse = torch.nn.functional.mse_loss(recon, pixels)
        loss = mse + torch.nn.functional.l1_loss(recon, pixels) * 0.5 + 1e-6 * posterior.kl().mean()
        # Cosine decay to 10%: the VAE settles faster and sharper than at a constant rate.
        lr = settings.vae_learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / settings.vae_steps)))
        _optimizer_step(optimizer, loss, vae.parameters(), lr)
        step += 1
        stopwatch.tick()
        bar.update(1)
        bar.set_postfix(mse=f"{mse.item():.4f}")
        if step % 50 == 0:
            log(f"vae step {step} mse {mse.item():.5f}")
        last = step == settings.vae_steps
        if last or step % settings.checkpoint_every == 0 or stopwatch.expired():
            _save_phase(run_dir, "vae", step, {"vae": vae.state_dict()}, optimizer, settings)
            if stopwatch.expired() and not last:
                bar.close()
                return False
    bar.close()
    return True


def _text_phase_clip(text_encoder):
    """A CLIPModel whose text tower is `text_encoder`'s (shared modules) and whose vision tower is small and new."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    text_config = text_encoder.config
    vision_config = CLIPVisionConfig(image_size=render.RESOLUTION, patch_size=4, hidden_size=text_config.hidden_size,
                                     intermediate_size=text_config.intermediate_size, num_hidden_layers=4,
                                     num_attention_heads=4, projection_dim=text_config.projection_dim)
    clip = CLIPModel(CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                                projection_dim=text_config.projection_dim))
    clip.text_model = text_encoder
    return clip


def _contrastive_loss(logits: torch.Tensor, fits: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric loss with several right answers: every caption that fits an image counts as its match.

    `logits` [images, captions]; `fits` the same shape, True where the caption describes the image (its own
    caption always does). Each side's target spreads evenly over the matches.
    Captions beyond the images (hard negatives) may fit no image: they count only against the images.
    """
    fits = fits.float()
    per_image = -(torch.log_softmax(logits, dim=1) * fits / fits.sum(1, keepdim=True)).sum(1).mean()
    matched = fits.sum(0) > 0
    logits, fits = logits[:, matched], fits[:, matched]
    per_caption = -(torch.log_softmax(logits, dim=0) * fits / fits.sum(0, keepdim=True)).sum(0).mean()
    return 0.5 * (per_image + per_caption)


def _fits(captions: list[str], scenes: list, sources: list | None = None) -> torch.Tensor:
    """[images, captions] True where caption j describes image i (caption i is image i's own).

    A named instance's caption fits only images of that instance (its name pins class, colours, pattern
    and geometry); other captions fit every image with the attributes they name. `sources` are the scenes
    the captions were written for (default: `scenes`, one caption each).
    """
    named = [caption_attributes(c) for c in captions]
    sources = scenes if sources is None else sources
    return torch.tensor([[caption_fits(n, scene) and (source.name is None or render.same_instance(scene, source))
                          for n, source in zip(named, sources)] for scene in scenes])


_OBJECT_COLOUR = re.compile(r"\b(an? )?(" + "|".join(render.COLOURS) + r") (" + "|".join(render.CLASSES) + r")\b")


def _colour_swaps(captions: list[str], scenes: list, rng: np.random.Generator) -> tuple[list[str], list[int]]:
    """Hard-negative captions: each unnamed caption that names its object's colour, with another colour
    (and the article that goes with it). Returns (captions, index of the caption each came from)."""
    negatives, sources = [], []
    for index, (text, scene) in enumerate(zip(captions, scenes)):
        found = _OBJECT_COLOUR.search(text)
        if scene.name or not found:
            continue
        other = str(rng.choice([c for c in render.COLOURS if c not in (found.group(2), scene.background)]))
        article = f"{render._article(other)} " if found.group(1) else ""
        negatives.append(f"{text[:found.start()]}{article}{other} {found.group(3)}{text[found.end():]}")
        sources.append(index)
    return negatives, sources


@torch.no_grad()
def _text_phase_accuracy(clip, tokenizer, settings: PretrainSettings) -> dict[str, float]:
    """Zero-shot accuracy of the text tower on fresh images: which caption of each attribute fits best.

    Class among "a photo of a {class}"; colour, background and size among captions that also name
    the image's true class ("a photo of a {colour} star"), one attribute at a time.
    """
    images, _, scenes = _scene_batch(settings, settings.seed + 4000, 0, 96)
    image_features = clip.get_image_features(pixel_values=_to_tensor(images)).pooler_output
    image_features = torch.nn.functional.normalize(image_features, dim=-1)

    def features(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        return torch.nn.functional.normalize(clip.get_text_features(**tokens).pooler_output, dim=-1)

    options = {"colour": render.COLOURS, "background": render.COLOURS, "size": tuple(render.SIZES)}
    accuracy = {"class": float(((image_features @ features([f"a photo of a {c}" for c in render.CLASSES]).T).argmax(1)
                                == torch.tensor([render.CLASSES.index(s.cls) for s in scenes])).float().mean())}
    for attribute, values in options.items():
        right = 0
        for feature, scene in zip(image_features, scenes):
            texts = [render.describe(scene.cls, **{attribute: v}) for v in values]
            chosen = int((features(texts) @ feature).argmax())
            right += values[chosen] == scene.attributes()[attribute]
        accuracy[attribute] = right / len(scenes)
    return accuracy


def train_text(components: dict, settings: PretrainSettings, run_dir: Path, *, resume: bool, progress: bool,
               stopwatch: _Stopwatch, log) -> bool:
    """Phase 2: the text encoder, contrastively against a small vision tower. Returns True when done."""
    text_encoder, tokenizer = components["text_encoder"], components["tokenizer"]
    clip = _text_phase_clip(text_encoder)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=settings.text_learning_rate, weight_decay=0.0)
    folder = run_dir / "checkpoints" / "text"
    start, _ = _restore(folder, resume, optimizer, {"clip": clip})
    if start >= settings.text_steps:
        return True
    clip.train()
    bar = _progress(settings.text_steps, start, "text", progress)
    step = start
    while step < settings.text_steps:
        images, captions, scenes = _scene_batch(settings, settings.seed + 5000, step, settings.text_batch_size)
        if settings.text_negatives:
            negatives, sources = _colour_swaps(captions, scenes, np.random.default_rng([settings.seed, step, 11]))
            fits = _fits(captions + negatives, scenes, scenes + [scenes[i] for i in sources])
            captions = captions + negatives
        else:
            fits = _fits(captions, scenes)
        # Captions are short and the mask is causal, so padding to the batch's longest changes no state
        # the padded tokens precede: the same features as at 77 tokens, at a fraction of the cost.
        tokens = tokenizer(captions, padding=True, return_tensors="pt")
        output = clip(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                      pixel_values=_to_tensor(images))
        loss = _contrastive_loss(output.logits_per_image, fits)
        lr = settings.text_learning_rate * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / settings.text_steps))
        _optimizer_step(optimizer, loss, clip.parameters(), lr)
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        step += 1
        stopwatch.tick()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        last = step == settings.text_steps
        if step % 50 == 0:
            log(f"text step {step} loss {loss.item():.4f}")
        if step % 500 == 0:  # zero-shot accuracy, to watch the phase from its log
            clip.eval()
            log(f"text step {step} zero-shot accuracy {_text_phase_accuracy(clip, tokenizer, settings)}")
            clip.train()
        if last or step % settings.checkpoint_every == 0 or stopwatch.expired():
            _save_phase(run_dir, "text", step, {"clip": clip.state_dict()}, optimizer, settings)
            if stopwatch.expired() and not last:
                bar.close()
                return False
    bar.close()
    return True


@torch.no_grad()
def _latent_scale(vae, settings: PretrainSettings) -> float:
    images, _, _ = render.training_batch(settings.seed + 2000, 0, 256)
    latents = vae.encode(_to_tensor(images)).latent_dist.mean
    return float(1.0 / latents.std())


def _encode_prompts(components: dict, captions: list[str]) -> torch.Tensor:
    tokens = components["tokenizer"](captions, padding="max_length", max_length=components["tokenizer"].model_max_length,
                                     truncation=True, return_tensors="pt")
    return components["text_encoder"](tokens.input_ids)[0]


def _object_weights(scenes, size: int, weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weights [B, 1, size, size]: 1 + (weight - 1) x the largest object coverage
    in the pixel's 3x3 neighbourhood, so the object and a rim of one latent pixel around it weigh most."""
    cover = torch.from_numpy(np.stack([render.object_coverage(s, size) for s in scenes]))[:, None]
    near = torch.nn.functional.max_pool2d(cover, 3, stride=1, padding=1)
    return 1.0 + (weight - 1.0) * near


def train_unet(components: dict, settings: PretrainSettings, run_dir: Path, *, resume: bool, progress: bool,
               stopwatch: _Stopwatch, log) -> tuple[bool, dict]:
    """Phase 3: the UNet on the VAE's latents, the text encoder frozen after its own phase (or, with
    `text_steps` 0 or `text_joint_lr`, trained jointly). Returns (done, EMA weights)."""
    unet, text_encoder, vae, scheduler = (components[k] for k in ("unet", "text_encoder", "vae", "scheduler"))
    vae.eval().requires_grad_(False)
    joint_text = settings.text_steps == 0 or settings.text_joint_lr > 0
    if not joint_text:
        text_encoder.eval().requires_grad_(False)
    scale = vae.config.scaling_factor
    params = {f"unet.{k}": p for k, p in unet.named_parameters()}
    groups = [{"params": list(unet.parameters()), "weight_decay": 1e-2}]
    if joint_text:
        params.update({f"text_encoder.{k}": p for k, p in text_encoder.named_parameters()})
        # No decay on the text encoder: it would shrink the embeddings of words never seen in
        # training (rare identifiers such as "sks") towards zero.
        groups.append({"params": list(text_encoder.parameters()), "weight_decay": 0.0,
                       "lr": settings.text_joint_lr if settings.text_steps else settings.learning_rate})
    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate)
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    folder = run_dir / "checkpoints" / "unet"
    start, saved = _restore(folder, resume, optimizer, {"unet": unet, "text_encoder": text_encoder})
    # diffusers' EMA with its default warm-up: decay min(ema_decay, (1 + step) / (10 + step)).
    ema_model = EMAModel(list(params.values()), decay=settings.ema_decay)
    if "ema" in saved:
        ema_model.shadow_params = [saved["ema"][k].clone() for k in params]
        ema_model.optimization_step = start

    def ema_weights() -> dict:
        return dict(zip(params, ema_model.shadow_params))

    if start >= settings.unet_steps:
        return True, ema_weights()
    if stopwatch.expired():
        return False, ema_weights()
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=settings.warmup_steps,
                                 num_training_steps=settings.unet_steps)
    with warnings.catch_warnings():  # fast-forwarding a resumed schedule, before any optimizer step
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(start):
            lr_scheduler.step()
    unet.train()
    text_encoder.train(joint_text)
    alphas_cumprod = scheduler.alphas_cumprod
    snr_all = alphas_cumprod / (1 - alphas_cumprod)
    bar = _progress(settings.unet_steps, start, "unet", progress)
    step = start
    losses: list[float] = []
    while step < settings.unet_steps:
        images, captions, scenes = _scene_batch(settings, settings.seed, step, settings.batch_size,
                                                plain=step < settings.plain_steps)
        rng = np.random.default_rng([settings.seed, step, 7])
        captions = ["" if rng.random() < settings.caption_dropout else c for c in captions]
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
        with torch.no_grad():
            posterior = vae.encode(_to_tensor(images)).latent_dist
            latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)) * scale
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = scheduler.get_velocity(latents, noise, timesteps)
        with torch.set_grad_enabled(joint_text):
            hidden = _encode_prompts(components, captions)
        pred = unet(noisy, timesteps, hidden).sample
        # Optional Min-SNR-gamma weighting for v-prediction: weight = min(snr, gamma) / (snr + 1).
        snr = snr_all[timesteps]
        if settings.snr_gamma > 0:
            weight = torch.clamp(snr, max=settings.snr_gamma) / (snr + 1)
        else:
            weight = torch.ones_like(snr)
        error = (pred.float() - target.float()) ** 2
        if settings.object_weight != 1.0:
            error = error * _object_weights(scenes, latents.shape[-1], settings.object_weight)
        per_sample = error.mean(dim=(1, 2, 3))
        loss = (per_sample * weight).mean()
        lr = lr_scheduler.get_last_lr()[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        lr_scheduler.step()
        ema_model.step(list(params.values()))
        step += 1
        stopwatch.tick()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step % 50 == 0:
            log(f"unet step {step} loss {np.mean(losses[-50:]):.5f} lr {lr:.2e}")
        last = step == settings.unet_steps
        if last or step % settings.checkpoint_every == 0 or stopwatch.expired():
            _save_phase(run_dir, "unet", step, {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                                                "ema": ema_weights()}, optimizer, settings)
            if stopwatch.expired() and not last:
                bar.close()
                return False, ema_weights()
    bar.close()
    return True, ema_weights()


def _load_vae(components: dict, source: str) -> None:
    """Put a finished VAE (weights and latent scale) into the components: "shipped" or a pipeline folder."""
    from diffusers import AutoencoderKL

    if source == "shipped":
        from . import MODEL_DIR

        source = str(MODEL_DIR)
    folder = Path(source)
    folder = folder / "vae" if (folder / "vae").is_dir() else folder
    if not (folder / "config.json").exists():
        raise DreamtuneError(f"pretrain: vae_from {source!r} is not a VAE folder nor a pipeline folder with vae/")
    trained = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)
    components["vae"].load_state_dict(trained.state_dict())
    components["vae"].register_to_config(scaling_factor=trained.config.scaling_factor)


def _initialise_from(components: dict, source: str, log) -> None:
    """Copy the UNet and text encoder tensors of a pipeline folder whose names and shapes match."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(source).expanduser()
    if not (folder / "model_index.json").exists():
        raise DreamtuneError(f"pretrain: init_from {source!r} is not a pipeline folder (no model_index.json)")
    sources = {"unet": UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32),
               "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32)}
    for name, donor in sources.items():
        module = components[name]
        theirs = donor.state_dict()
        ours = module.state_dict()
        taken = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
        module.load_state_dict(taken, strict=False)
        if name == "unet":
            # Attention blocks with no counterpart start as the identity: their residual output is zero.
            for key in ours:
                if ".attentions." in key and ".proj_out." in key and key not in taken:
                    with torch.no_grad():
                        module.get_parameter(key).zero_()
        log(f"init_from {folder}: {name} took {len(taken)} of {len(ours)} tensors")


def _use_refined_decoder(vae, run_dir: Path) -> None:
    # The encoder (and so the latent scale) is the VAE phase's; only decoder weights are taken.
    from safetensors.torch import load_file

    refined = run_dir / "checkpoints" / "decoder" / "vae.safetensors"
    if refined.exists():
        state = load_file(str(refined))
        vae.load_state_dict({k: v for k, v in state.items() if k.startswith(("decoder.", "post_quant_conv."))},
                            strict=False)


# Beside a pretrained pipeline's diffusers files: the settings it was pretrained with (diffusers ignores it).
SETTINGS_FILE = "world_pretrain.json"


def pretrained_settings(model_dir: str | Path) -> PretrainSettings:
    """The settings a world pipeline folder was pretrained with (`SETTINGS_FILE`); for a folder without
    that file (exported before it existed), the settings of runs before it."""
    return _saved_settings(Path(model_dir) / SETTINGS_FILE)


def export_pipeline(components: dict, ema: dict | None, destination: str | Path, *, fp16: bool = True,
                    settings: PretrainSettings | None = None) -> Path:
    """Write the base model as a diffusers StableDiffusionPipeline folder (EMA weights, safetensors), with the
    settings it was pretrained with (`SETTINGS_FILE`) when given."""
    import copy

    from diffusers import StableDiffusionPipeline

    unet = copy.deepcopy(components["unet"])
    text_encoder = copy.deepcopy(components["text_encoder"])
    if ema:
        unet.load_state_dict({k[len("unet."):]: v for k, v in ema.items() if k.startswith("unet.")}, strict=False)
        text_encoder.load_state_dict(
            {k[len("text_encoder."):]: v for k, v in ema.items() if k.startswith("text_encoder.")}, strict=False
        )
    vae = copy.deepcopy(components["vae"])
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=components["tokenizer"], unet=unet,
        scheduler=sampling_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    if fp16:
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # its notice about casting with .to() does not apply here
        for module in (vae, text_encoder, unet):
            module.to(torch.float16)
        diffusers_logging.set_verbosity(verbosity)
    destination = Path(destination)
    with atomic_dir(destination) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if fp16:
            # Half-precision files, full-precision model: transformers loads a text encoder in the
            # dtype its config names, and diffusers' parts load as float32, so the config says float32.
            config_file = tmp / "text_encoder" / "config.json"
            config = json.loads(config_file.read_text())
            config["dtype"] = "float32"
            write_json(config_file, config)
        if settings is not None:
            write_json(tmp / SETTINGS_FILE, {"settings": asdict(settings)})
    return destination


def pretrain(
    output_dir: str | Path,
    *,
    seed: int = 0,
    vae_steps: int | None = None,
    unet_steps: int | None = None,
    minutes: float | None = None,
    resume: bool = True,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    progress: bool = True,
    fp16: bool = True,
    threads: int | None = None,
    stop_after_steps: int | None = None,
    **settings_overrides,
) -> Path:
    """Train the shapes world's base model into `<output_dir>/pipeline` and return that folder.

    Phases run in order (VAE, text encoder, UNet); with `resume` (the default) a run picks up
    from `<output_dir>/checkpoints`. `minutes` stops early (after a checkpoint) once that much wall
    time has passed, `stop_after_steps` after that many steps; call again to go on. The settings of a resumed run must match the first.
    A log of losses goes to `<output_dir>/pretrain.log`.
    """
    settings = PretrainSettings(seed=seed)
    if vae_steps is not None:
        settings.vae_steps = vae_steps
    if unet_steps is not None:
        settings.unet_steps = unet_steps
    if batch_size is not None:
        settings.batch_size = batch_size
    if learning_rate is not None:
        settings.learning_rate = learning_rate
    for name in settings_overrides:
        if not hasattr(settings, name):
            raise DreamtuneError(f"pretrain: unknown setting {name!r}; settings are {', '.join(asdict(settings))}")
    settings = replace(settings, **settings_overrides)
    if settings.rare_words not in render.RARE_WORD_MODES:
        raise DreamtuneError(f"pretrain: rare_words must be one of {', '.join(render.RARE_WORD_MODES)}, "
                             f"got {settings.rare_words!r}")
    for name in ("vae_steps", "unet_steps", "batch_size"):
        if getattr(settings, name) < 1:
            raise DreamtuneError(f"pretrain: {name} must be at least 1, got {getattr(settings, name)}")
    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = run_dir / "pretrain.log"
    started = time.monotonic()

    def log(message: str) -> None:
        with open(log_file, "a", encoding="utf-8") as fh:
            fh.write(f"[{time.monotonic() - started:7.1f}s] {message}\n")

    phase_keys = {"vae": ("seed", "vae_batch_size"),
                  "text": ("seed", "text_batch_size", "text_hidden_size", "text_layers", "max_length",
                           "hold_out_second_colour", "rare_words", "pattern_share", "text_negatives"),
                  "unet": ("seed", "batch_size", "text_hidden_size", "text_layers", "unet_channels", "max_length",
                           "text_time_embedding", "attention_at_top", "unet_layout", "vae_from", "init_from",
                           "text_steps", "hold_out_second_colour", "rare_words", "pattern_share", "plain_steps",
                           "text_negatives", "text_joint_lr")}
    for phase, keys in phase_keys.items():
        previous = run_dir / "checkpoints" / phase / "state.json"
        if resume and previous.exists():
            saved = _saved_settings(previous)
            for key in keys:
                value = getattr(saved, key)
                if value != getattr(settings, key):
                    raise DreamtuneError(
                        f"{previous}: saved {key}={value} differs from {getattr(settings, key)}; "
                        "use the same settings to resume, or resume=False with a fresh output_dir"
                    )
    log(f"pretrain settings {asdict(settings)}")
    components = build_components(settings)
    stopwatch = _Stopwatch(minutes, stop_after_steps)
    if settings.vae_from:
        _load_vae(components, settings.vae_from)
    if settings.init_from:
        _initialise_from(components, settings.init_from, log)
    if not settings.vae_from:
        if not train_vae(components, settings, run_dir, resume=resume, progress=progress, stopwatch=stopwatch,
                         log=log):
            log("stopped in the vae phase (time limit); resume to go on")
            return run_dir / "pipeline"
        components["vae"].register_to_config(scaling_factor=_latent_scale(components["vae"], settings))
    if settings.text_steps and not settings.init_from:
        if not train_text(components, settings, run_dir, resume=resume, progress=progress, stopwatch=stopwatch,
                          log=log):
            log("stopped in the text phase (time limit); resume to go on")
            return run_dir / "pipeline"
    done, ema = train_unet(components, settings, run_dir, resume=resume, progress=progress,
                           stopwatch=stopwatch, log=log)
    if not done:
        log("stopped in the unet phase; resume to go on")
    _use_refined_decoder(components["vae"], run_dir)
    destination = export_pipeline(components, ema, run_dir / "pipeline", fp16=fp16, settings=settings)
    log(f"{'finished' if done else 'stopped (time limit)'}; pipeline written to {destination}")
    return destination


def refine_decoder(run_dir: str | Path, *, steps: int = 1500, batch_size: int = 16, learning_rate: float = 5e-4,
                   resume: bool = True, progress: bool = True, threads: int | None = None,
                   stop_after_steps: int | None = None) -> Path:
    """Phase 3: train the VAE's decoder further with its encoder frozen; returns the decoder checkpoint folder.

    The latents do not change, so this can run beside (or after) the UNet phase, and the UNet stays
    valid: it is how Stable Diffusion's own VAE decoder was sharpened. `export_checkpoint` and
    `pretrain` use the refined decoder when its checkpoint exists.
    """
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    vae_dir = run_dir / "checkpoints" / "vae"
    if not (vae_dir / "state.json").exists():
        raise DreamtuneError(f"{run_dir}: the VAE phase has no checkpoint yet; run pretrain first")
    if threads:
        torch.set_num_threads(threads)
    settings = _saved_settings(vae_dir / "state.json")
    vae = build_components(settings)["vae"]
    vae.load_state_dict(load_file(str(vae_dir / "vae.safetensors")))
    vae.requires_grad_(False)
    decoder_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in decoder_params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder_params, lr=learning_rate, weight_decay=0.0)
    folder = run_dir / "checkpoints" / "decoder"
    start, _ = _restore(folder, resume, optimizer, {"vae": vae})
    stopwatch = _Stopwatch(None, stop_after_steps)
    bar = _progress(steps, start, "decoder", progress)
    step = start
    while step < steps:
        images, _, _ = render.training_batch(settings.seed + 3000, step, batch_size, settings.vae_patterned_share)
        pixels = _to_tensor(images)
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + 77 + step)
        with torch.no_grad():
            posterior = vae.encode(pixels).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        mse = torch.nn.functional.mse_loss(recon, pixels)
        loss = mse + 0.5 * torch.nn.functional.l1_loss(recon, pixels)
        lr = learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        _optimizer_step(optimizer, loss, decoder_params, lr)
        step += 1
        stopwatch.tick()
        bar.update(1)
        bar.set_postfix(mse=f"{mse.item():.4f}")
        if step == steps or step % 100 == 0 or stopwatch.expired():
            _save_phase(run_dir, "decoder", step, {"vae": vae.state_dict()}, optimizer, settings, {"mse": mse.item()})
            if stopwatch.expired():
                break
    bar.close()
    return folder


def export_checkpoint(run_dir: str | Path, destination: str | Path, *, fp16: bool = True) -> Path:
    """Write a pipeline folder from a pretraining run's latest checkpoints (EMA weights), mid-run or not.

    Lets one look at (or measure) a model while its pretraining is still going on.
    """
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    vae_state = run_dir / "checkpoints" / "vae" / "state.json"
    unet_dir = run_dir / "checkpoints" / "unet"
    if not (unet_dir / "state.json").exists():
        raise DreamtuneError(f"{run_dir}: no UNet checkpoint to export yet")
    settings = _saved_settings(unet_dir / "state.json")
    components = build_components(settings)
    if settings.vae_from:
        _load_vae(components, settings.vae_from)
    else:
        if not vae_state.exists():
            raise DreamtuneError(f"{run_dir}: no finished VAE phase to export yet")
        components["vae"].load_state_dict(load_file(str(run_dir / "checkpoints" / "vae" / "vae.safetensors")))
        components["vae"].register_to_config(scaling_factor=_latent_scale(components["vae"], settings))
        _use_refined_decoder(components["vae"], run_dir)
    components["unet"].load_state_dict(load_file(str(unet_dir / "unet.safetensors")))
    components["text_encoder"].load_state_dict(load_file(str(unet_dir / "text_encoder.safetensors")))
    ema = load_file(str(unet_dir / "ema.safetensors"))
    return export_pipeline(components, ema, destination, fp16=fp16, settings=settings)
